"""attn_match_loss (L_attn): every backend against the reference, properties of the loss, and argument errors.

The Triton kernels run under the interpreter here (tests/conftest.py), so shapes stay small; the CPU path's key
block is shrunk so that every case streams several key blocks. Their AOT compilation is tests/test_attn_match_compile.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import GRAD_FACTOR, VALUE_FACTOR, assert_within_pytorch_error

from laid_kernels import attn_match_loss, available_backends, reference
from laid_kernels import attn_match as attn_match_module

OP = "attn_match_loss"
FUSED = [b for b in available_backends(OP, "cpu") if b != "reference"]
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


def make_inputs(heads=(4, 2, 6, 3), batch=3, seq=48, dim=32, dtype=torch.float32, seed=0, text_positions=False):
    """Random inputs with padding: sample 0 none, sample 1 left-padded (7 tokens), sample 2 right-padded (5)."""
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
    return dict(q_s=rand(batch, seq, hs, dim, scale=1.5), k_s=rand(batch, seq, hs_kv, dim, scale=1.5),
                q_t=rand(batch, seq, ht, dim, scale=1.5), k_t=rand(batch, seq, ht_kv, dim, scale=1.5),
                w_q=rand(hs, ht, scale=1 / math.sqrt(ht)), w_k=rand(hs_kv, ht_kv, scale=1 / math.sqrt(ht_kv)),
                positions=positions, inv_freq=inv_freq, mrope_section=SECTION_32, valid=valid)


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


def loss_and_grads(inputs, mask, backend, progress, alpha, upstream):
    """Loss and (dq_s, dk_s) for the upstream gradient ``upstream`` of the loss."""
    q_s = inputs["q_s"].clone().requires_grad_(True)
    k_s = inputs["k_s"].clone().requires_grad_(True)
    args = {**inputs, "q_s": q_s, "k_s": k_s}
    valid = args.pop("valid")
    loss = attn_match_loss(**args, query_mask=mask, progress=progress, alpha=alpha, valid=valid, backend=backend)
    dq, dk = torch.autograd.grad(loss, (q_s, k_s), upstream)
    return loss.detach(), dq, dk


def as_double(inputs):
    """The same (already rounded) inputs in float64, except inv_freq (the angles are fp32 by definition)."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "inv_freq" else v
            for k, v in inputs.items()}


def assert_close_to_reference(inputs, mask, backend, progress, alpha, dtype):
    """Loss and gradients within the flash-attention rule (tests/kernel_checks.py) of the float64 reference."""
    upstream = torch.tensor(0.37 + 2 * torch.rand(()).item())  # a random upstream gradient
    exact = loss_and_grads(as_double(inputs), mask, "reference", progress, alpha, upstream)
    pytorch = loss_and_grads(inputs, mask, "reference", progress, alpha, upstream)
    out = loss_and_grads(inputs, mask, backend, progress, alpha, upstream)
    assert out[0].dtype == torch.float32 and out[0].shape == ()
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert_within_pytorch_error("loss", out[0], pytorch[0], exact[0], VALUE_FACTOR)
    for got, torch_grad, want, name in zip(out[1:], pytorch[1:], exact[1:], ("dq_s", "dk_s")):
        assert want.abs().max() > 0, f"{name}: exact gradient is zero (the comparison would be vacuous)"
        assert_within_pytorch_error(f"{backend} {name}", got, torch_grad, want, GRAD_FACTOR)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("progress,alpha", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 0.0), (0.7, 2.5)])
def test_progress_and_alpha(backend, progress, alpha):
    inputs = make_inputs()
    assert_close_to_reference(inputs, query_mask("question", inputs["valid"]), backend, progress, alpha,
                              torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["question", "random", "single", "first_and_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_masks_and_dtypes(backend, kind, dtype):
    inputs = make_inputs(dtype=dtype, seed=1)
    assert_close_to_reference(inputs, query_mask(kind, inputs["valid"], seed=2), backend, 0.6, 1.0, dtype)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_rows_with_one_key_give_zero(backend):
    """The first valid token attends only to itself: both rows are [1], the loss and the gradients are exactly 0."""
    inputs = make_inputs(seed=1)
    loss, dq, dk = loss_and_grads(inputs, query_mask("first", inputs["valid"]), backend, 1.0, 1.0, torch.tensor(1.0))
    assert loss.item() == 0.0
    assert torch.all(dq == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("heads,dtype", [((28, 4, 40, 8), torch.float32), ((28, 4, 40, 8), torch.bfloat16),
                                         ((16, 2, 40, 8), torch.float32), ((2, 1, 3, 1), torch.float32),
                                         ((4, 4, 2, 2), torch.float32)])
def test_gqa_head_counts(backend, heads, dtype):
    inputs = make_inputs(heads=heads, batch=2, seq=40, dtype=dtype, seed=3)
    assert_close_to_reference(inputs, query_mask("question", inputs["valid"]), backend, 0.8, 1.0, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_text_only_positions_and_no_valid(backend):
    inputs = make_inputs(batch=1, seq=37, seed=4, text_positions=True)
    inputs["positions"] = inputs["positions"][0:1]  # [B, N]
    mask = query_mask("random", inputs["valid"], seed=5)
    upstream = torch.tensor(1.3)
    inputs_no_valid = {k: v for k, v in inputs.items()}
    inputs_no_valid["valid"] = None
    ref = loss_and_grads(inputs_no_valid, mask, "reference", 1.0, 1.0, upstream)
    out = loss_and_grads(inputs_no_valid, mask, backend, 1.0, 1.0, upstream)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def softmax_kl(inputs, mask):
    """KL(softmax s_t || softmax s_s) over the selected valid rows, with full [B, H, N, N] attention by softmax."""
    valid = inputs["valid"]
    batch, seq, hs, dim = inputs["q_s"].shape
    group = hs // inputs["k_s"].shape[2]
    rope = dict(positions=inputs["positions"], inv_freq=inputs["inv_freq"], mrope_section=inputs["mrope_section"])
    q_s = reference.apply_mrope(inputs["q_s"].float(), **rope)
    k_s = reference.apply_mrope(inputs["k_s"].float(), **rope).repeat_interleave(group, 2)
    q_t = torch.einsum("ij,bnjd->bnid", inputs["w_q"], reference.apply_mrope(inputs["q_t"].float(), **rope))
    k_t = torch.einsum("ij,bnjd->bnid", inputs["w_k"], reference.apply_mrope(inputs["k_t"].float(), **rope))
    k_t = k_t.repeat_interleave(group, 2)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None] & valid[:, None, :]  # [B, N(query), N(key)]
    bias = torch.zeros(batch, 1, seq, seq).masked_fill(~allowed[:, None], float("-inf"))
    p_s = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q_s, k_s) / math.sqrt(dim) + bias, -1)
    p_t = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q_t, k_t) / math.sqrt(dim) + bias, -1)
    kl = (torch.special.xlogy(p_t, p_t) - torch.special.xlogy(p_t, p_s)).sum(-1)  # [B, H, N]
    rows = mask & valid
    return kl.permute(0, 2, 1)[rows].mean()


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("progress,alpha", [(0.0, 1.0), (1.0, 0.0)])
def test_no_distance_weight_is_softmax_kl(backend, progress, alpha):
    inputs = make_inputs(seed=6)
    mask = query_mask("random", inputs["valid"], seed=7)
    valid = inputs.pop("valid")
    loss = attn_match_loss(**inputs, query_mask=mask, progress=progress, alpha=alpha, valid=valid, backend=backend)
    inputs["valid"] = valid
    torch.testing.assert_close(loss, softmax_kl(inputs, mask), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_identical_student_and_teacher(backend):
    inputs = make_inputs(heads=(4, 2, 4, 2), seed=8)
    inputs["q_t"], inputs["k_t"] = inputs["q_s"], inputs["k_s"]
    inputs["w_q"], inputs["w_k"] = torch.eye(4), torch.eye(2)
    mask = query_mask("question", inputs["valid"])
    valid = inputs.pop("valid")
    at_start = attn_match_loss(**inputs, query_mask=mask, progress=0.0, valid=valid, backend=backend)
    at_end = attn_match_loss(**inputs, query_mask=mask, progress=1.0, valid=valid, backend=backend)
    assert abs(at_start.item()) < 1e-6
    assert at_end.item() > 1e-2  # the target moved toward distant keys: the same attention no longer matches it


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_teacher_side_gets_no_gradient(backend):
    inputs = make_inputs(seed=9)
    teacher = {k: inputs[k].clone().requires_grad_(True) for k in ("q_t", "k_t", "w_q", "w_k")}
    student = {k: inputs[k].clone().requires_grad_(True) for k in ("q_s", "k_s")}
    valid = inputs.pop("valid")
    loss = attn_match_loss(**{**inputs, **teacher, **student}, query_mask=query_mask("question", valid),
                           progress=0.5, valid=valid, backend=backend)
    grads = torch.autograd.grad(loss, [*student.values(), *teacher.values()], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    assert all(g is None for g in grads[2:])


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_selected_padding_rows_are_ignored(backend):
    inputs = make_inputs(seed=10)
    valid = inputs.pop("valid")
    mask = query_mask("question", valid)
    with_padding = mask | ~valid
    loss = attn_match_loss(**inputs, query_mask=mask, progress=0.5, valid=valid, backend=backend)
    loss_padding = attn_match_loss(**inputs, query_mask=with_padding, progress=0.5, valid=valid, backend=backend)
    torch.testing.assert_close(loss_padding, loss, rtol=0, atol=0)


def test_cpu_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the CPU custom op."""
    inputs = make_inputs(batch=2, seq=20, seed=11)
    row_index = query_mask("question", inputs["valid"]).flatten().nonzero().squeeze(1)
    args = (inputs["q_s"].requires_grad_(True), inputs["k_s"].requires_grad_(True), inputs["q_t"], inputs["k_t"],
            inputs["w_q"], inputs["w_k"], inputs["positions"], inputs["inv_freq"], list(SECTION_32), row_index,
            inputs["valid"], 0.5, 1.0)
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
    """benchmarks/attn_match_150img.py end to end at 1 and 2 images (the full 150-image run is not a test)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "attn_match_150img.py"
    done = subprocess.run([sys.executable, str(script), "--images", "1", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "attn_match_150img.json").read_text())["results"]
    assert {(r["images"], r["backend"]) for r in results} == {(1, "cpu"), (2, "cpu"), (1, "reference"),
                                                              (2, "reference")}
    for r in results:
        assert r["seconds"] > 0 and r["input_bytes"] > 0 and r["peak_bytes"] > 0
    losses = {r["images"]: [x["loss"] for x in results if x["images"] == r["images"]] for r in results}
    for images, (first, second) in losses.items():  # both backends compute the same loss on the same inputs
        assert first == pytest.approx(second, rel=1e-3), images
    assert (tmp_path / "attn_match_150img.md").is_file() and (tmp_path / "attn_match_150img.png").is_file()
