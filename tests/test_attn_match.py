"""attn_match_loss (L_attn): every backend against the reference, properties of the loss, and argument errors.

Every form is tested: target "teacher" (the teacher's own heads mixed by pi = w_q^2 row-normalised; the default) and
"mixed" (version 1), divergence "forward" and "reverse", head mixing and frequency mixing. The Triton kernels run
under the interpreter here (tests/conftest.py), so shapes stay small; the CPU path's key block is shrunk so that
every case streams several key blocks. Their AOT compilation is tests/test_attn_match_compile.py.

The accuracy tests against the float64 reference (``assert_close_to_reference``) run the Triton kernels with the
GPU's TF32 dots emulated (``gpu_dots``) and allow the TF32 error of the same-precision PyTorch reference; the property
tests (closed forms, equivalences) check the definition with the interpreter's exact dots.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tf32_einsum
from kernel_checks import GRAD_FACTOR, VALUE_FACTOR, assert_within_pytorch_error

from laid_kernels import attn_match_loss, available_backends, reference
from laid_kernels import attn_match as attn_match_module

OP = "attn_match_loss"
FUSED = [b for b in available_backends(OP, "cpu") if b != "reference"]
FORMS = [("teacher", "forward"), ("teacher", "reverse"), ("mixed", "forward"), ("mixed", "reverse")]
SECTION_32 = (4, 6, 6)  # head_dim 32: 16 frequencies, split like Qwen2.5-VL's (16, 24, 24) of 64

# The interpreter evaluates masked-out lanes too (numpy warns about their -inf - -inf); results are masked.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


@pytest.fixture(autouse=True)
def small_cpu_blocks(monkeypatch):
    """Force the CPU path to stream 16-key blocks and prepare 3 query rows at a time (its defaults, 4 MB of logits
    and at least 128 keys per block and 32-row chunks, would be a single block and chunk at these sizes)."""
    monkeypatch.setattr(attn_match_module, "CPU_BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(attn_match_module, "CPU_MIN_BLOCK", 16)
    monkeypatch.setattr(attn_match_module, "CPU_ROW_CHUNK", 3)


def make_inputs(heads=(4, 2, 6, 3), batch=3, seq=48, dim=32, dtype=torch.float32, seed=0, text_positions=False,
                frequency_mixing=False):
    """Random inputs with padding: sample 0 none, sample 1 left-padded (7 tokens), sample 2 right-padded (5).
    frequency_mixing: w_q [Hs, Ht, D/2, 2], w_k [Hs_kv, Ht_kv, D/2, 2] instead of head mixing."""
    hs, hs_kv, ht, ht_kv = heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    valid = torch.ones(batch, seq, dtype=torch.bool)
    if batch > 1:
        valid[1, :7] = False
    if batch > 2:
        valid[2, seq - 5:] = False
    if text_positions:
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    else:  # an image grid in the middle: t constant, h and w vary, text before and after advances all three
        positions = torch.arange(seq).repeat(3, batch, 1)
        start, size = seq // 5, 4 * (seq // 10)  # a 4-wide grid of seq // 10 rows
        positions[0, :, start:start + size] = start
        positions[1, :, start:start + size] = start + torch.arange(size) // 4
        positions[2, :, start:start + size] = start + torch.arange(size) % 4
    inv_freq = 1.0 / 1e6 ** (torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)
    section = SECTION_32 if dim == 32 else (dim // 2 - 2 * (3 * dim // 16), 3 * dim // 16, 3 * dim // 16)
    mixing = (dim // 2, 2) if frequency_mixing else ()
    return dict(q_s=rand(batch, seq, hs, dim, scale=1.5), k_s=rand(batch, seq, hs_kv, dim, scale=1.5),
                q_t=rand(batch, seq, ht, dim, scale=1.5), k_t=rand(batch, seq, ht_kv, dim, scale=1.5),
                w_q=rand(hs, ht, *mixing, scale=1 / math.sqrt(ht)),
                w_k=rand(hs_kv, ht_kv, *mixing, scale=1 / math.sqrt(ht_kv)),
                positions=positions, inv_freq=inv_freq, mrope_section=section, valid=valid)


def query_mask(kind: str, valid: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """question: the last 6 valid tokens of each sample plus two delimiter rows; random: 30% of the tokens (padding
    included: it must be ignored); single: one row; first: each sample's first valid token (a row with one key); first_and_last: with the last."""
    batch, seq = valid.shape
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    if kind == "question":
        for b in range(batch):
            idx = valid[b].nonzero().squeeze(1)
            mask[b, idx[-6:]] = True
            mask[b, idx[[len(idx) // 5, len(idx) // 2]]] = True
    elif kind == "random":
        mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < 0.3
    elif kind == "single":
        mask[batch - 1, seq // 2] = True
    elif kind in ("first", "first_and_last"):
        mask[torch.arange(batch), valid.long().argmax(1)] = True
        if kind == "first_and_last":
            mask[torch.arange(batch), seq - 1 - valid.flip(1).long().argmax(1)] = True
    return mask


def loss_and_grads(inputs, mask, backend, progress, alpha, upstream, target="teacher", divergence="forward"):
    """Loss and (dq_s, dk_s) for the upstream gradient ``upstream`` of the loss."""
    q_s = inputs["q_s"].clone().requires_grad_(True)
    k_s = inputs["k_s"].clone().requires_grad_(True)
    args = {**inputs, "q_s": q_s, "k_s": k_s}
    valid = args.pop("valid")
    loss = attn_match_loss(**args, query_mask=mask, progress=progress, alpha=alpha, valid=valid, backend=backend,
                           target=target, divergence=divergence)
    dq, dk = torch.autograd.grad(loss, (q_s, k_s), upstream)
    return loss.detach(), dq, dk


def as_double(inputs):
    """The same (already rounded) inputs in float64, except inv_freq (the angles are fp32 by definition)."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "inv_freq" else v
            for k, v in inputs.items()}


def assert_close_to_reference(inputs, mask, backend, progress, alpha, dtype, target="teacher", divergence="forward"):
    """Loss and gradients within the flash-attention rule (tests/kernel_checks.py) of the float64 reference.

    The Triton kernels' dots are TF32 on the GPU (emulated by ``gpu_dots`` in the tests that request it), so their
    same-precision PyTorch implementation is also the reference with TF32 einsums (conftest ``tf32_einsum``): the
    bound is then 2x / 3x the larger of that error and the plain reference's.
    """
    upstream = torch.tensor(0.37 + 2 * torch.rand(()).item())  # a random upstream gradient
    form = (target, divergence)
    exact = loss_and_grads(as_double(inputs), mask, "reference", progress, alpha, upstream, *form)
    pytorch = loss_and_grads(inputs, mask, "reference", progress, alpha, upstream, *form)
    same_precision = [pytorch]
    if backend == "triton" and attn_match_module.TRITON_PRECISION == "tf32":
        with tf32_einsum():
            same_precision.append(loss_and_grads(inputs, mask, "reference", progress, alpha, upstream, *form))
    out = loss_and_grads(inputs, mask, backend, progress, alpha, upstream, *form)
    assert out[0].dtype == torch.float32 and out[0].shape == ()
    assert out[1].dtype == dtype and out[2].dtype == dtype
    for k, name, factor in ((0, "loss", VALUE_FACTOR), (1, "dq_s", GRAD_FACTOR), (2, "dk_s", GRAD_FACTOR)):
        want = exact[k]
        assert want.abs().max() > 0, f"{name}: exact value is zero (the comparison would be vacuous)"
        baseline = max((r[k] for r in same_precision), key=lambda g: (g.double() - want.double()).abs().max())
        assert_within_pytorch_error(f"{backend} {name}", out[k], baseline, want, factor)


def grid(default_cases, other_cases):
    """(target, divergence, *case) parameters: every case for the default form, ``other_cases`` for the others (the
    interpreter and the float64 reference are slow on this machine)."""
    return [(*FORMS[0], *c) for c in default_cases] + [(*f, *c) for f in FORMS[1:] for c in other_cases]


@pytest.mark.usefixtures("gpu_dots")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence,progress,alpha", grid(
    [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 0.0), (0.7, 2.5)], [(0.7, 2.5)]))
def test_progress_and_alpha(backend, target, divergence, progress, alpha):
    inputs = make_inputs()
    assert_close_to_reference(inputs, query_mask("question", inputs["valid"]), backend, progress, alpha,
                              torch.float32, target, divergence)


@pytest.mark.usefixtures("gpu_dots")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence,kind,dtype", grid(
    [(k, d) for k in ("question", "random", "single", "first_and_last") for d in (torch.float32, torch.bfloat16)],
    [("random", torch.bfloat16), ("first_and_last", torch.float32)]))
def test_query_masks_and_dtypes(backend, target, divergence, kind, dtype):
    inputs = make_inputs(dtype=dtype, seed=1)
    assert_close_to_reference(inputs, query_mask(kind, inputs["valid"], seed=2), backend, 0.6, 1.0, dtype, target,
                              divergence)


@pytest.mark.usefixtures("gpu_dots")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence,dtype", grid([(torch.float32,), (torch.float16,)], [(torch.float32,)]))
def test_frequency_mixing(backend, target, divergence, dtype):
    inputs = make_inputs(dtype=dtype, seed=14, frequency_mixing=True)
    assert_close_to_reference(inputs, query_mask("random", inputs["valid"], seed=15), backend, 0.6, 1.0, dtype,
                              target, divergence)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("target,divergence", FORMS)
def test_rows_with_one_key_give_zero(backend, target, divergence):
    """The first valid token attends only to itself: both rows are [1], the loss and the gradients are exactly 0."""
    inputs = make_inputs(seed=1)
    loss, dq, dk = loss_and_grads(inputs, query_mask("first", inputs["valid"]), backend, 1.0, 1.0, torch.tensor(1.0),
                                  target, divergence)
    assert abs(loss.item()) < 1e-6  # teacher: pbar = sum_j pi[i, j] * 1 = 1 up to the rounding of pi
    assert torch.all(dq.abs() < 1e-6) and torch.all(dk.abs() < 1e-6)


@pytest.mark.usefixtures("gpu_dots")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence,heads,dtype", grid(
    [((28, 4, 40, 8), torch.bfloat16), ((16, 2, 40, 8), torch.float32), ((2, 1, 3, 1), torch.float32),
     ((4, 4, 2, 2), torch.float32)],
    [((16, 2, 40, 8), torch.bfloat16)]))
def test_gqa_head_counts(backend, target, divergence, heads, dtype):
    """The real head counts: 7B (28 / 4) and 3B (16 / 2) students against the 32B teacher (40 / 8) (a subset of
    (heads, dtype) for the non-default forms: the interpreter and the float64 reference are slow here)."""
    inputs = make_inputs(heads=heads, batch=2, seq=40, dtype=dtype, seed=3)
    assert_close_to_reference(inputs, query_mask("question", inputs["valid"]), backend, 0.8, 1.0, dtype, target,
                              divergence)


@pytest.mark.usefixtures("gpu_dots")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence", FORMS)
def test_odd_length_and_head_dim_80(backend, target, divergence):
    """N = 37 (no block multiple) and D = 80 (D / 2 = 40, not a power of two: the Triton kernels pad the channel
    pairs to 64 and mask them)."""
    inputs = make_inputs(heads=(4, 2, 6, 3), batch=2, seq=37, dim=80, seed=16)
    assert_close_to_reference(inputs, query_mask("random", inputs["valid"], seed=17), backend, 0.6, 1.0,
                              torch.float32, target, divergence)


def real_positions_inputs(heads, dtype, seed, frequency_mixing=False, seq=64):
    """Qwen2.5-VL's shapes where the angles are large: head_dim 128, sections (16, 24, 24), theta 1e6, and the
    M-RoPE positions of the last ``seq`` tokens of an image followed by the closing text at position 4,900 on
    (``selfcheck.vhs_positions``: the image grid's h / w rows, then text), for 2 samples (the second left-padded)."""
    from laid_kernels.selfcheck import vhs_positions

    inputs = make_inputs(heads=heads, batch=2, seq=seq, dim=128, dtype=dtype, seed=seed,
                         frequency_mixing=frequency_mixing)
    positions, _ = vhs_positions(1, first=4900)
    inputs["positions"] = positions[:, :, -seq:].expand(3, 2, seq).contiguous()
    assert inputs["positions"].min() >= 4900 and inputs["mrope_section"] == (16, 24, 24)
    return inputs


@pytest.mark.usefixtures("gpu_dots")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence,heads,dtype,frequency_mixing", grid(
    [((28, 4, 40, 8), torch.float32, False), ((16, 2, 40, 8), torch.bfloat16, False),
     ((28, 4, 40, 8), torch.float16, True)],
    [((28, 4, 40, 8), torch.float32, False)]))
def test_head_dim_128_at_positions_in_the_thousands(backend, target, divergence, heads, dtype, frequency_mixing):
    """The real head counts, head_dim and positions (angles up to 4,980 rad: fp32 angle rounding and the accurate
    cos / sin matter) at the tiles the kernels launch with on the GPU (no test fixture shrinks them here): the 64
    tokens span several key blocks and the 28 / 4 student's row lanes more than one block of lanes."""
    assert 64 >= 2 * max(attn_match_module.TRITON_BLOCK_N, attn_match_module.TRITON_DK_BLOCK_N)
    inputs = real_positions_inputs(heads, dtype, seed=29, frequency_mixing=frequency_mixing)
    assert_close_to_reference(inputs, query_mask("question", inputs["valid"]), backend, 0.8, 1.0, dtype, target,
                              divergence)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target,divergence", FORMS)
def test_text_only_positions_and_no_valid(backend, target, divergence):
    inputs = make_inputs(batch=1, seq=37, seed=4, text_positions=True)
    inputs["positions"] = inputs["positions"][0:1]  # [B, N]
    mask = query_mask("random", inputs["valid"], seed=5)
    upstream = torch.tensor(1.3)
    inputs_no_valid = {k: v for k, v in inputs.items()}
    inputs_no_valid["valid"] = None
    ref = loss_and_grads(inputs_no_valid, mask, "reference", 1.0, 1.0, upstream, target, divergence)
    out = loss_and_grads(inputs_no_valid, mask, backend, 1.0, 1.0, upstream, target, divergence)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target,divergence", FORMS)
@pytest.mark.parametrize("frequency_mixing", [False, True])
def test_reference_gradcheck(target, divergence, frequency_mixing):
    """float64 gradcheck of the reference (autograd through its definition) with respect to q_s and k_s (fast mode:
    a random projection of the Jacobian; the full numerical Jacobian took minutes per case on this loaded machine)."""
    inputs = as_double(make_inputs(heads=(2, 1, 4, 2), batch=2, seq=12, dim=8, seed=18,
                                   frequency_mixing=frequency_mixing))
    valid = inputs.pop("valid")
    mask = query_mask("random", valid, seed=19)
    q_s, k_s = inputs.pop("q_s").requires_grad_(True), inputs.pop("k_s").requires_grad_(True)

    def loss(q, k):
        return reference.attn_match_loss(q, k, **inputs, query_mask=mask, progress=0.6, valid=valid, target=target,
                                         divergence=divergence)
    assert torch.autograd.gradcheck(loss, (q_s, k_s), fast_mode=True)


def full_attention(inputs, target):
    """(log p_s [B, Hs, N, N], pbar [B, Hs, N, N], allowed [B, N, N]) with full attention by softmax: the student's
    attention, and the target row pbar before the distance weight (target="teacher": each teacher head with its own
    kv head j // (Ht / Ht_kv), mixed by pi = w_q^2 row-normalised; "mixed": the softmax of the mixed Q/K)."""
    valid = inputs["valid"]
    batch, seq, hs, dim = inputs["q_s"].shape
    group = hs // inputs["k_s"].shape[2]
    rope = dict(positions=inputs["positions"], inv_freq=inputs["inv_freq"], mrope_section=inputs["mrope_section"])
    q_s = reference.apply_mrope(inputs["q_s"].float(), **rope)
    k_s = reference.apply_mrope(inputs["k_s"].float(), **rope).repeat_interleave(group, 2)
    q_t = reference.apply_mrope(inputs["q_t"].float(), **rope)
    k_t = reference.apply_mrope(inputs["k_t"].float(), **rope)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None] & valid[:, None, :]  # [B, N(query), N(key)]
    # finite: rows of left padding have no allowed key (and are never selected); exp(-1e9) is exactly 0 otherwise
    bias = torch.zeros(batch, 1, seq, seq).masked_fill(~allowed[:, None], -1e9)
    log_p_s = torch.log_softmax(torch.einsum("bmhd,bnhd->bhmn", q_s, k_s) / math.sqrt(dim) + bias, -1)
    if target == "teacher":
        w = inputs["w_q"].float()
        energy = (w ** 2).sum(dim=(2, 3)) if w.dim() == 4 else w ** 2
        pi = energy / energy.sum(1, keepdim=True)
        heads = [torch.softmax(q_t[:, :, j] @ k_t[:, :, j // (q_t.shape[2] // k_t.shape[2])].transpose(1, 2)
                               / math.sqrt(dim) + bias[:, 0], -1) for j in range(q_t.shape[2])]
        pbar = torch.einsum("ij,jbmn->bimn", pi, torch.stack(heads))
    else:
        q_t = torch.einsum("ij,bnjd->bnid", inputs["w_q"], q_t)
        k_t = torch.einsum("ij,bnjd->bnid", inputs["w_k"], k_t).repeat_interleave(group, 2)
        pbar = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q_t, k_t) / math.sqrt(dim) + bias, -1)
    return log_p_s, pbar, allowed


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("target,divergence,progress,alpha", grid([(0.0, 1.0), (1.0, 0.0)], [(0.0, 1.0)]))
def test_no_distance_weight_is_softmax_kl(backend, target, divergence, progress, alpha):
    """With omega = 1 the loss is the plain KL between full-softmax attention rows, computed independently here."""
    inputs = make_inputs(seed=6)
    mask = query_mask("random", inputs["valid"], seed=7)
    valid = inputs.pop("valid")
    loss = attn_match_loss(**inputs, query_mask=mask, progress=progress, alpha=alpha, valid=valid, backend=backend,
                           target=target, divergence=divergence)
    inputs["valid"] = valid
    log_p_s, pbar, _ = full_attention(inputs, target)
    p_s = log_p_s.exp()
    if divergence == "forward":
        kl = (torch.special.xlogy(pbar, pbar) - torch.special.xlogy(pbar, p_s)).sum(-1)  # [B, H, N]
    else:
        kl = (torch.special.xlogy(p_s, p_s) - torch.special.xlogy(p_s, pbar)).sum(-1)
    torch.testing.assert_close(loss, kl.permute(0, 2, 1)[mask & valid].mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_reverse_gradient_is_autograd_of_its_definition(backend):
    """The reverse KL's gradient (p_s (log p_s - log phat - KL) with respect to the logits) equals autograd of
    sum_n p_s (log p_s - log phat) written out here with full attention, phat = omega pbar / sum."""
    inputs = make_inputs(seed=20)
    mask = query_mask("question", inputs["valid"])
    upstream = torch.tensor(1.7)
    _, dq, dk = loss_and_grads(inputs, mask, backend, 0.8, 1.5, upstream, "teacher", "reverse")
    q_s = inputs["q_s"].clone().requires_grad_(True)
    k_s = inputs["k_s"].clone().requires_grad_(True)
    log_p_s, pbar, allowed = full_attention({**inputs, "q_s": q_s, "k_s": k_s}, "teacher")
    seq = allowed.shape[-1]
    distance = (torch.arange(seq)[:, None] - torch.arange(seq)[None, :]).clamp_min(0)
    phat = pbar * (1 + torch.log2(1.0 + distance)) ** (1.5 * 0.8)
    phat = phat / phat.sum(-1, keepdim=True)
    terms = log_p_s.exp() * torch.where(allowed[:, None], log_p_s - phat.log(), 0.0)
    loss = terms.sum(-1).permute(0, 2, 1)[mask & inputs["valid"]].mean()
    want = torch.autograd.grad(loss, (q_s, k_s), upstream)
    for got, exact, name in zip((dq, dk), want, ("dq_s", "dk_s")):
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_teacher_target_with_identity_mixing_is_mixed(backend, divergence):
    """Ht = Hs, Ht_kv = Hs_kv and W_q = W_k = I: each student head's target is teacher head i alone, which is what
    the mixed Q/K give too."""
    inputs = make_inputs(heads=(4, 2, 4, 2), seed=21)
    inputs["w_q"], inputs["w_k"] = torch.eye(4), torch.eye(2)
    mask = query_mask("random", inputs["valid"], seed=22)
    upstream = torch.tensor(0.9)
    teacher = loss_and_grads(inputs, mask, backend, 0.7, 1.0, upstream, "teacher", divergence)
    mixed = loss_and_grads(inputs, mask, "reference", 0.7, 1.0, upstream, "mixed", divergence)
    for got, want in zip(teacher, mixed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("target,divergence", FORMS)
def test_real_frequency_mixing_is_head_mixing(backend, target, divergence):
    """Frequency mixing with C[i, j, f] = W[i, j] (imaginary part 0) for every f gives the head-mixing loss (both
    pi and the mixed Q/K)."""
    inputs = make_inputs(seed=23)
    mask = query_mask("question", inputs["valid"])
    frequency = dict(inputs)
    for name in ("w_q", "w_k"):
        w = inputs[name]
        frequency[name] = torch.stack((w[:, :, None].expand(-1, -1, 16), torch.zeros(*w.shape, 16)), dim=-1)
    upstream = torch.tensor(1.1)
    got = loss_and_grads(frequency, mask, backend, 0.5, 1.0, upstream, target, divergence)
    want = loss_and_grads(inputs, mask, "reference", 0.5, 1.0, upstream, target, divergence)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("target,divergence", FORMS)
def test_uniform_teacher_rows(backend, target, divergence):
    """Zero teacher queries: every teacher row is uniform over the L allowed keys, whatever pi, so at progress 0 the
    loss is closed-form in the student's row: forward -log L - mean_n log p_s; reverse sum_n p_s log p_s + log L."""
    inputs = make_inputs(seed=24)
    inputs["q_t"] = torch.zeros_like(inputs["q_t"])
    mask = query_mask("random", inputs["valid"], seed=25)
    valid = inputs.pop("valid")
    loss = attn_match_loss(**inputs, query_mask=mask, progress=0.0, valid=valid, backend=backend, target=target,
                           divergence=divergence)
    log_p_s, _, allowed = full_attention({**inputs, "valid": valid}, target)
    keys = allowed.sum(-1)[:, None].double()  # [B, 1, N] allowed keys per row
    log_p_s = torch.where(allowed[:, None], log_p_s, 0.0).double()
    if divergence == "forward":
        kl = -keys.log() - log_p_s.sum(-1) / keys
    else:
        kl = (log_p_s.exp() * log_p_s).sum(-1) + keys.log()
    torch.testing.assert_close(loss.double(), kl.permute(0, 2, 1)[mask & valid].mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_identical_student_and_teacher(backend):
    inputs = make_inputs(heads=(4, 2, 4, 2), seed=8)
    inputs["q_t"], inputs["k_t"] = inputs["q_s"], inputs["k_s"]
    inputs["w_q"], inputs["w_k"] = torch.eye(4), torch.eye(2)
    mask = query_mask("question", inputs["valid"])
    valid = inputs.pop("valid")
    for target in ("teacher", "mixed"):
        at_start = attn_match_loss(**inputs, query_mask=mask, progress=0.0, valid=valid, backend=backend,
                                   target=target)
        at_end = attn_match_loss(**inputs, query_mask=mask, progress=1.0, valid=valid, backend=backend,
                                 target=target)
        assert abs(at_start.item()) < 1e-6
        assert at_end.item() > 1e-2  # the target moved toward distant keys: the same attention no longer matches it


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("target,divergence", FORMS)
def test_teacher_side_gets_no_gradient(backend, target, divergence):
    inputs = make_inputs(seed=9)
    teacher = {k: inputs[k].clone().requires_grad_(True) for k in ("q_t", "k_t", "w_q", "w_k")}
    student = {k: inputs[k].clone().requires_grad_(True) for k in ("q_s", "k_s")}
    valid = inputs.pop("valid")
    loss = attn_match_loss(**{**inputs, **teacher, **student}, query_mask=query_mask("question", valid),
                           progress=0.5, valid=valid, backend=backend, target=target, divergence=divergence)
    grads = torch.autograd.grad(loss, [*student.values(), *teacher.values()], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    assert all(g is None for g in grads[2:])


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("target,divergence", FORMS)
def test_selected_padding_rows_are_ignored(backend, target, divergence):
    inputs = make_inputs(seed=10)
    valid = inputs.pop("valid")
    mask = query_mask("question", valid)
    with_padding = mask | ~valid
    form = dict(target=target, divergence=divergence)
    loss = attn_match_loss(**inputs, query_mask=mask, progress=0.5, valid=valid, backend=backend, **form)
    loss_padding = attn_match_loss(**inputs, query_mask=with_padding, progress=0.5, valid=valid, backend=backend,
                                   **form)
    torch.testing.assert_close(loss_padding, loss, rtol=0, atol=0)


@pytest.mark.parametrize("target,divergence", FORMS)
def test_cpu_custom_op_passes_opcheck(target, divergence):
    """Schema, fake (meta) implementation and autograd registration of the CPU custom op."""
    inputs = make_inputs(batch=2, seq=20, seed=11)
    row_index = query_mask("question", inputs["valid"]).flatten().nonzero().squeeze(1)
    args = (inputs["q_s"].requires_grad_(True), inputs["k_s"].requires_grad_(True), inputs["q_t"], inputs["k_t"],
            inputs["w_q"], inputs["w_k"], inputs["positions"], inputs["inv_freq"], list(SECTION_32), row_index,
            inputs["valid"], 0.5, 1.0, target, divergence)
    torch.library.opcheck(torch.ops.laid_kernels.attn_match_cpu.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def call(**overrides):
    inputs = make_inputs(batch=2, seq=16)
    valid = inputs.pop("valid")
    kwargs = dict(query_mask=query_mask("single", valid), progress=0.5, valid=valid)
    merged = {**inputs, **kwargs, **overrides}
    return attn_match_loss(**merged)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(k_s=torch.randn(2, 16, 3, 32), w_k=torch.randn(3, 3)), ValueError, "multiple of student kv heads"),
    (dict(query_mask=torch.zeros(2, 16, dtype=torch.bool)), ValueError, "selects no valid row"),
    (dict(query_mask=torch.zeros(2, 15, dtype=torch.bool)), ValueError, "query_mask must have shape"),
    (dict(query_mask=torch.zeros(2, 16)), TypeError, "query_mask must be a bool"),
    (dict(query_mask=None), TypeError, "query_mask is required"),
    (dict(valid=torch.ones(2, 17, dtype=torch.bool)), ValueError, "valid must have shape"),
    (dict(progress=1.5), ValueError, "progress must be a float in"),
    (dict(progress=float("nan")), ValueError, "progress must be a float in"),
    (dict(alpha=-1.0), ValueError, "alpha must be a finite float"),
    (dict(q_t=torch.randn(2, 16, 6, 16)), ValueError, "head_dim"),
    (dict(w_q=torch.randn(6, 4)), ValueError, "w_q must have shape"),
    (dict(positions=torch.zeros(3, 2, 15, dtype=torch.long)), ValueError, "positions must have shape"),
    (dict(mrope_section=(4, 4, 4)), ValueError, "mrope_section"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(target="student"), ValueError, "target must be one of"),
    (dict(divergence="js"), ValueError, "divergence must be one of"),
    (dict(w_q=torch.randn(4, 6, 8, 2), w_k=torch.randn(2, 3, 8, 2)), ValueError,
     r"w_q must have shape .*\[4, 6, 16, 2\]"),
    (dict(w_q=torch.randn(4, 6, 16, 2)), ValueError, "same mixing"),
    (dict(w_q=torch.cat((torch.zeros(1, 6), torch.randn(3, 6)))), ValueError, r"w_q row\(s\) \[0\] are all zero"),
    (dict(q_t=torch.randn(2, 16, 5, 32), w_q=torch.randn(4, 5)), ValueError, "multiple of teacher kv heads"),
])
def test_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def test_error_when_only_padding_rows_are_selected():
    inputs = make_inputs(batch=2, seq=16)
    valid = inputs.pop("valid")
    with pytest.raises(ValueError, match="selects no valid row"):
        attn_match_loss(**inputs, query_mask=~valid, progress=0.5, valid=valid)


def test_auto_backend_on_cpu():
    """backend="auto" on CPU tensors runs the CPU path (the reference only where that backend cannot run here)."""
    from laid_kernels import backends

    chosen = backends.auto_backend(OP, torch.device("cpu"))
    assert chosen == ("cpu" if "cpu" in FUSED else "reference")
    inputs = make_inputs(batch=2, seq=24, seed=12)
    valid = inputs.pop("valid")
    mask = query_mask("random", valid, seed=13)
    auto = attn_match_loss(**inputs, query_mask=mask, progress=0.3, valid=valid)
    explicit = attn_match_loss(**inputs, query_mask=mask, progress=0.3, valid=valid, backend=chosen)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


def test_benchmark_script_small_run(tmp_path):
    """benchmarks/attn_match_150img.py end to end at 1 image, every variant (the full 150-image run is not a test)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "attn_match_150img.py"
    variants = ["cpu", "cpu-mixed", "reference", "compiled"] if "cpu" in FUSED else ["reference", "compiled"]
    done = subprocess.run([sys.executable, str(script), "--images", "1", "--variants", *variants, "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "attn_match_150img.json").read_text())["results"]
    assert [r["variant"] for r in results] == variants
    for r in results:
        assert r["images"] == 1 and r["seconds"] > 0 and r["input_bytes"] > 0 and r["peak_bytes"] > 0, r
    loss = {r["variant"]: r["loss"] for r in results}
    for variant in variants:  # the same target="teacher" loss on the same inputs; target="mixed" is another loss
        if not variant.endswith("-mixed"):
            assert loss[variant] == pytest.approx(loss["reference"], rel=1e-3), variant
    if "cpu-mixed" in loss:
        assert loss["cpu-mixed"] != pytest.approx(loss["cpu"], rel=1e-2)
    assert (tmp_path / "attn_match_150img.md").is_file() and (tmp_path / "attn_match_150img.png").is_file()


def small_triton_tiles(monkeypatch):
    """16-lane / 16-key tiles in every kernel, so that each launch at these sizes has several programs."""
    for name in ("TRITON_BLOCK_M", "TRITON_BLOCK_N", "TRITON_DK_BLOCK_M", "TRITON_DK_BLOCK_N"):
        monkeypatch.setattr(attn_match_module, name, 16)


@pytest.mark.skipif("triton" not in FUSED, reason="the Triton backend cannot run here")
@pytest.mark.parametrize("target,divergence", FORMS)
def test_triton_writes_each_output_element_from_one_program(target, divergence, triton_accesses, monkeypatch):
    """Race-freedom, checked structurally (the interpreter runs programs one after another, so running twice
    cannot see a race): no atomics, and no element of any output is stored twice, by two programs or by one; every
    key of dk_s is written. The order of a program's own reductions is fixed by the compiled code: that the compiled
    kernels give the same bits over 20 runs is what only a GPU shows (tests/test_cuda.py, laid selfcheck)."""
    import numpy as np

    small_triton_tiles(monkeypatch)
    inputs = make_inputs(batch=2, seq=40, seed=26)
    _, _, dk = loss_and_grads(inputs, query_mask("random", inputs["valid"], seed=27), "triton", 0.6, 1.0,
                              torch.tensor(1.0), target, divergence)
    assert triton_accesses.atomics == []
    launches = {"attn_match/forward", "attn_match/dq", "attn_match/dk"}
    assert set(triton_accesses.stores) == launches | ({"attn_match/teacher_lse"} if target == "teacher" else set())
    for launch, stores in triton_accesses.stores.items():
        assert len({program for program, _, _ in stores}) > 1, launch
        lanes = np.concatenate([addresses for _, addresses, _ in stores])
        assert np.unique(lanes).size == lanes.size, f"{launch}: an element is stored more than once"
    written = triton_accesses.touched(triton_accesses.stores, "attn_match/dk", dk)
    assert sum(written.values()) == dk.numel()


@pytest.mark.skipif("triton" not in FUSED, reason="the Triton backend cannot run here")
@pytest.mark.parametrize("target", ["teacher", "mixed"])
def test_triton_dk_skips_rows_that_end_before_its_key_block(target, triton_accesses, monkeypatch):
    """Causal skip of _dk_kernel: rows at m = 5 and 40 of 64 tokens, 16-key blocks. Block 0 streams both rows,
    blocks 1 and 2 only the row at 40, block 3 (keys 48..63, past the last row) reads no query row at all."""
    small_triton_tiles(monkeypatch)
    captured = []
    query_rows = attn_match_module._query_rows

    def capture(*args):
        captured.append(query_rows(*args))
        return captured[-1]

    monkeypatch.setattr(attn_match_module, "_query_rows", capture)
    inputs = make_inputs(heads=(4, 2, 6, 3), batch=1, seq=64, seed=28)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, [5, 40]] = True
    loss_and_grads(inputs, mask, "triton", 0.6, 1.0, torch.tensor(1.0), target)
    student_rows = captured[-1][0]  # the backward's rotated student rows [R, Hs, D]
    reads = triton_accesses.touched(triton_accesses.loads, "attn_match/dk", student_rows)
    for h in range(2):  # kv heads
        per_block = [reads.get((n, h, 0), 0) for n in range(4)]
        one_row = 2 * 2 * 16  # lanes of one row: its 2 heads of this kv head, lo and hi halves of 16 channel pairs
        assert per_block == [2 * one_row, one_row, one_row, 0], per_block
