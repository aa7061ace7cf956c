"""qk_align_loss (L_qk): every fused backend against the reference, properties of the loss, the reference's gradient.

The Triton kernel runs under the interpreter here (tests/conftest.py), which pays per operation, so shapes are the
real head counts but few tokens. Argument errors are in tests/test_validation.py, AOT compilation in
tests/test_compile_aot.py, torch.compile in tests/test_torch_compile.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import GRAD_FACTOR, VALUE_FACTOR, assert_within_pytorch_error

from laid_kernels import available_backends, qk_align_loss, reference
from laid_kernels import qk_align as qk_align_module

OP = "qk_align_loss"
FUSED = [b for b in available_backends(OP, "cpu") if b != "reference"]
QWEN_SECTION = (16, 24, 24)  # head_dim 128
SMALL_SECTION = (8, 12, 12)  # head_dim 64


def make_inputs(heads=(16, 2, 40, 8), batch=2, seq=131, dim=128, section=QWEN_SECTION, dtype=torch.float32,
                padded=True, weighted=True, seed=0, scale=1.0, mixing="head"):
    """Inputs shaped as captured from q_proj / k_proj: each x is a [B, N, H, D] view of a wider projection output
    (the student's q and k are slices of one fused projection, so their strides are not contiguous ones).

    Positions: text, then two image grids of different sizes (t constant, h / w varying), then text, with long-context
    offsets (about 50K) so that the angles are large. Padding: sample 1 loses its last 9 tokens (left padding
    elsewhere is the same case for this loss). Token weights: uniform in [0.5, 1.5). mixing: "head" (w [Hs, Ht]) or
    "frequency" (w [Hs, Ht, D/2, 2], complex weights per frequency pair).
    """
    hs, hs_kv, ht, ht_kv = heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s * scale).to(dtype)

    student = rand(batch, seq, (hs + hs_kv) * dim)  # fused q|k projection output
    q_s = student[..., :hs * dim].view(batch, seq, hs, dim)
    k_s = student[..., hs * dim:].view(batch, seq, hs_kv, dim)
    q_t = rand(batch, seq, ht * dim).view(batch, seq, ht, dim)
    k_t = rand(batch, seq, ht_kv * dim).view(batch, seq, ht_kv, dim)
    per_frequency = (dim // 2, 2) if mixing == "frequency" else ()
    w_q = torch.randn(hs, ht, *per_frequency, generator=g) / math.sqrt(ht * (1 + len(per_frequency)))
    w_k = torch.randn(hs_kv, ht_kv, *per_frequency, generator=g) / math.sqrt(ht_kv * (1 + len(per_frequency)))

    positions = torch.arange(seq).repeat(3, batch, 1) + 50_000
    for start, rows, cols in ((seq // 8, 3, 4), (seq // 2, 2, 5)):
        size = min(rows * cols, seq - start)
        first = positions[:, :, start, None].clone()
        positions[0, :, start:start + size] = first[0]
        positions[1, :, start:start + size] = first[1] + torch.arange(size) // cols
        positions[2, :, start:start + size] = first[2] + torch.arange(size) % cols
    inv_freq = 1.0 / 1e6 ** (torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)
    valid = None
    if padded:
        valid = torch.ones(batch, seq, dtype=torch.bool)
        valid[-1, max(1, seq - 9):] = False
    token_weight = 0.5 + torch.rand(batch, seq, generator=g) if weighted else None
    return dict(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, w_q=w_q, w_k=w_k, positions=positions, inv_freq=inv_freq,
                mrope_section=section, valid=valid, token_weight=token_weight)


def loss_and_grads(inputs, grad_output, **kwargs):
    """The loss and its gradients with respect to q_s, k_s, w_q, w_k for the upstream gradient ``grad_output``."""
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in ("q_s", "k_s", "w_q", "w_k")}
    args = {**inputs, **leaves}
    loss = qk_align_loss(args.pop("q_s"), args.pop("k_s"), args.pop("q_t"), args.pop("k_t"), args.pop("w_q"),
                         args.pop("w_k"), args.pop("positions"), args.pop("inv_freq"), args.pop("mrope_section"),
                         **args, **kwargs)
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_outputs=torch.tensor(grad_output))
    return loss.detach(), dict(zip(leaves, grads))


def as_double(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "inv_freq" else v
            for k, v in inputs.items()}


# (heads (Hs, Hs_kv, Ht, Ht_kv), batch, seq, dim, section, dtype, normalize, padded, weighted): the 3B and 7B
# students against the 32B teacher, odd N (131, 1), head dims 128 and 64 (and two small ones), fp32 and bf16, both
# version-1 normalisations. Each case runs in its own form and in the version-2 forms of FORMS.
CASES = [
    ((28, 4, 40, 8), 2, 131, 128, QWEN_SECTION, torch.bfloat16, "target", True, True),
    ((16, 2, 40, 8), 2, 131, 128, QWEN_SECTION, torch.float32, "none", True, False),
    ((16, 2, 40, 8), 1, 1, 128, QWEN_SECTION, torch.bfloat16, "none", False, True),
    ((28, 4, 40, 8), 1, 1, 128, QWEN_SECTION, torch.float32, "target", False, False),
    ((16, 2, 40, 8), 2, 37, 64, SMALL_SECTION, torch.float32, "target", True, True),
    ((28, 4, 40, 8), 2, 37, 64, SMALL_SECTION, torch.bfloat16, "none", True, True),
    ((4, 2, 8, 4), 2, 7, 16, (2, 3, 3), torch.float32, "target", True, True),  # the tiny test models' head_dim
    ((4, 2, 8, 4), 2, 7, 80, (10, 15, 15), torch.bfloat16, "none", True, True),  # D/2 not a power of two
]
# (normalize, mixing): None keeps the case's own normalize (version 1) with head mixing.
FORMS = [None, ("student", "head"), ("student", "frequency"), ("target", "frequency")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form", FORMS, ids=["v1", "student-head", "student-frequency", "target-frequency"])
@pytest.mark.parametrize("heads,batch,seq,dim,section,dtype,normalize,padded,weighted", CASES)
def test_matches_reference(backend, form, heads, batch, seq, dim, section, dtype, normalize, padded, weighted):
    normalize, mixing = form or (normalize, "head")
    inputs = make_inputs(heads, batch, seq, dim, section, dtype, padded, weighted, mixing=mixing)
    grad_output = 0.73
    loss, grads = loss_and_grads(inputs, grad_output, normalize=normalize, backend=backend)
    torch_loss, torch_grads = loss_and_grads(inputs, grad_output, normalize=normalize, backend="reference")
    exact_loss, exact_grads = loss_and_grads(as_double(inputs), grad_output, normalize=normalize, backend="reference")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_within_pytorch_error("loss", loss, torch_loss, exact_loss, VALUE_FACTOR)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_within_pytorch_error(f"d{name}", grad, torch_grads[name], exact_grads[name], GRAD_FACTOR)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])  # an attention_mask passed as it comes
def test_padding_gets_zero_gradient_and_is_not_read(backend, mask_dtype):
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=20, dim=64, section=SMALL_SECTION)
    valid = inputs["valid"]
    inputs["valid"] = valid.to(mask_dtype)
    for name in ("q_s", "k_s", "q_t", "k_t"):  # garbage on padding must not leak in
        inputs[name][~valid] = float("nan")
    loss, grads = loss_and_grads(inputs, 1.0, backend=backend)
    assert torch.isfinite(loss)
    for name in ("q_s", "k_s"):
        assert torch.all(grads[name][~valid] == 0), name
        assert torch.isfinite(grads[name]).all(), name
    for name in ("w_q", "w_k"):
        assert torch.isfinite(grads[name]).all(), name


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(backend):
    """Two calls give the same bits. Under the Triton interpreter programs run one after another, so this sees the
    host-side reductions' order, not a race: ``test_triton_writes_each_output_element_from_one_program`` checks
    race-freedom structurally; same bits over 20 compiled runs is what only a GPU shows (laid selfcheck)."""
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=40, dim=64, section=SMALL_SECTION)  # 3 programs per part
    first = loss_and_grads(inputs, 1.0, backend=backend)
    second = loss_and_grads(inputs, 1.0, backend=backend)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@pytest.mark.parametrize("mixing", ["head", "frequency"])
def test_triton_writes_each_output_element_from_one_program(mixing, triton_accesses, monkeypatch):
    """Race-freedom, checked structurally: no atomics, and no element of any output (G, dW partials, the per-program
    sums, the rescaled gradient) is stored twice, by two programs or by one, at the GPU's channel blocks and with
    several token chunks; every element of dq_s is written by the rescaling."""
    import numpy as np

    if "triton" not in FUSED:
        pytest.skip("Triton interpreter not available")
    gpu_block = qk_align_module.FREQUENCY_BLOCK_F if mixing == "frequency" else qk_align_module.BLOCK_F
    monkeypatch.setattr(qk_align_module, "INTERPRETER_BLOCK_F", gpu_block)
    monkeypatch.setattr(qk_align_module, "MIN_TOKENS_PER_CHUNK", 4)
    monkeypatch.setattr(qk_align_module, "MIN_TOKENS_PER_PROGRAM", 4)  # head mixing: several persistent programs
    inputs = make_inputs((28, 4, 40, 8), batch=2, seq=5, dtype=torch.bfloat16, mixing=mixing)
    _, grads = loss_and_grads(inputs, 1.3, backend="triton")
    assert triton_accesses.atomics == []
    assert set(triton_accesses.stores) == {"qk_align/query", "qk_align/key", "qk_align/rescale"}
    for launch, stores in triton_accesses.stores.items():
        assert len({program for program, _, _ in stores}) > 1, launch
        lanes = np.concatenate([addresses for _, addresses, _ in stores])
        assert np.unique(lanes).size == lanes.size, f"{launch}: an element is stored more than once"
    written = sum(sum(triton_accesses.touched(triton_accesses.stores, launch, grads["q_s"]).values())
                  for launch in triton_accesses.stores)
    assert written >= grads["q_s"].numel()


@pytest.mark.parametrize("mixing", ["head", "frequency"])
@pytest.mark.parametrize("normalize", ["student", "target", "none"])
def test_triton_gpu_block_size_under_interpreter(monkeypatch, normalize, mixing):
    """The interpreter normally runs all channel pairs in one block; run the block size the GPU launches with
    (several channel blocks per token; frequency mixing: one per program, and several token chunks) against the
    reference too."""
    if "triton" not in FUSED:
        pytest.skip("Triton interpreter not available")
    gpu_block = qk_align_module.FREQUENCY_BLOCK_F if mixing == "frequency" else qk_align_module.BLOCK_F
    monkeypatch.setattr(qk_align_module, "INTERPRETER_BLOCK_F", gpu_block)
    monkeypatch.setattr(qk_align_module, "MIN_TOKENS_PER_CHUNK", 4)
    inputs = make_inputs((28, 4, 40, 8), batch=2, seq=5, dtype=torch.bfloat16, mixing=mixing)
    _, chunks, f_split = qk_align_module.launch_shape(inputs["q_s"], inputs["w_q"])
    assert (chunks, f_split) == ((1, 1) if mixing == "head" else (3, 64 // gpu_block))
    loss, grads = loss_and_grads(inputs, 1.3, normalize=normalize, backend="triton")
    torch_loss, torch_grads = loss_and_grads(inputs, 1.3, normalize=normalize, backend="reference")
    exact_loss, exact_grads = loss_and_grads(as_double(inputs), 1.3, normalize=normalize, backend="reference")
    assert_within_pytorch_error("loss", loss, torch_loss, exact_loss, VALUE_FACTOR)
    for name, grad in grads.items():
        assert_within_pytorch_error(f"d{name}", grad, torch_grads[name], exact_grads[name], GRAD_FACTOR)


ALL_FORMS = [("student", "head"), ("student", "frequency"), ("target", "head"), ("target", "frequency"),
             ("none", "head"), ("none", "frequency")]


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("normalize,mixing", ALL_FORMS)
def test_rotation_invariance(backend, normalize, mixing):
    """The rotation is orthogonal, shared by all heads of a token and commutes with both mixings: rope=True equals
    rope=False up to rounding."""
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=12, dim=64, section=SMALL_SECTION, mixing=mixing)
    rotated, rotated_grads = loss_and_grads(inputs, 1.0, normalize=normalize, backend=backend)
    plain, plain_grads = loss_and_grads(inputs, 1.0, normalize=normalize, rope=False, backend=backend)
    torch.testing.assert_close(rotated, plain, rtol=1e-5, atol=0)
    for name in ("w_q", "w_k"):  # dW is rotation invariant too (dx_s is rotated back, so it is as well)
        torch.testing.assert_close(rotated_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
    for name in ("q_s", "k_s"):
        torch.testing.assert_close(rotated_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_rotation_changes_the_loss_when_student_and_teacher_positions_differ():
    """Control for the invariance test: the rotation is really applied (rotating only one side changes the loss)."""
    inputs = make_inputs((2, 1, 3, 2), batch=1, seq=8, dim=64, section=SMALL_SECTION, padded=False, weighted=False)
    rotated_teacher = {**inputs, "q_t": reference.apply_mrope(inputs["q_t"], inputs["positions"], inputs["inv_freq"],
                                                                  SMALL_SECTION)}
    base = loss_and_grads(inputs, 1.0, rope=False, backend="reference")[0]
    moved = loss_and_grads(rotated_teacher, 1.0, rope=False, backend="reference")[0]
    assert not torch.allclose(base, moved, rtol=1e-3)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_aligned_student_has_zero_loss_and_teacher_gets_no_gradient(backend):
    inputs = make_inputs((4, 2, 6, 3), batch=1, seq=6, dim=64, section=SMALL_SECTION, padded=False)
    inputs["q_s"] = torch.einsum("ij,bnjd->bnid", inputs["w_q"], inputs["q_t"])
    inputs["k_s"] = torch.einsum("ij,bnjd->bnid", inputs["w_k"], inputs["k_t"])
    q_s, q_t = inputs["q_s"].clone().requires_grad_(), inputs["q_t"].clone().requires_grad_()
    loss = qk_align_loss(q_s, inputs["k_s"], q_t, inputs["k_t"], inputs["w_q"], inputs["w_k"],
                         inputs["positions"], inputs["inv_freq"], SMALL_SECTION, backend=backend)
    assert loss.item() < 1e-10
    assert torch.autograd.grad(loss, q_t, allow_unused=True)[0] is None


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_finite_inputs_give_finite_loss(backend, dtype):
    inputs = make_inputs((16, 2, 40, 8), batch=1, seq=3, dim=64, section=SMALL_SECTION, dtype=dtype, scale=1e3)
    for name in ("w_q", "w_k"):  # the uniform initialisation
        inputs[name] = torch.full_like(inputs[name], 1.0 / inputs[name].shape[1])
    loss, grads = loss_and_grads(inputs, 1.0, backend=backend)
    assert torch.isfinite(loss), loss
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("normalize", ["student", "target", "none"])
def test_fp16_inputs_near_the_fp16_range_give_the_references_finite_gradients(backend, normalize):
    """|q_s| about 5e4 in fp16: the unscaled gradient 2 w (R x_s - target) would overflow fp16 (65504), the scaled
    one does not. The fused backends keep it in fp32 until it is scaled, so they match the reference."""
    inputs = make_inputs((16, 2, 40, 8), batch=1, seq=5, dim=64, section=SMALL_SECTION, dtype=torch.float16,
                         scale=1.2e4)
    assert 4e4 < inputs["q_s"].float().abs().max() < 65504
    for name in ("w_q", "w_k"):
        inputs[name] = torch.full_like(inputs[name], 1.0 / inputs[name].shape[1])
    loss, grads = loss_and_grads(inputs, 1.0, normalize=normalize, backend=backend)
    torch_loss, torch_grads = loss_and_grads(inputs, 1.0, normalize=normalize, backend="reference")
    exact_loss, exact_grads = loss_and_grads(as_double(inputs), 1.0, normalize=normalize, backend="reference")
    assert_within_pytorch_error("loss", loss, torch_loss, exact_loss, VALUE_FACTOR)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and torch.isfinite(torch_grads[name]).all(), name
        assert_within_pytorch_error(f"d{name}", grad, torch_grads[name], exact_grads[name], GRAD_FACTOR)


@pytest.mark.parametrize("mixing", ["head", "frequency"])
def test_triton_rotated_rows_are_the_mrope_rows(monkeypatch, mixing):
    """The loss cannot see the rotation (it is orthogonal and shared by both sides), so the rows the Triton kernel
    rotates are checked directly: every call of the shared rotation helper inside the fused pass is recorded and
    compared with apply_mrope of the reference."""
    if "triton" not in FUSED:
        pytest.skip("Triton interpreter not available")
    inputs = make_inputs((4, 2, 6, 3), batch=2, seq=20, dim=64, section=SMALL_SECTION, padded=False, mixing=mixing)
    positions = inputs["positions"]
    assert (positions[0] != positions[1]).any() and (positions[1] != positions[2]).any()  # the image grids
    original, seen = qk_align_module.rotate_pair, []

    def recording(lo, hi, cos, sin):
        rotated = original(lo, hi, cos, sin)
        seen.append([x.handle.data.copy() for x in rotated])
        return rotated

    monkeypatch.setattr(qk_align_module, "rotate_pair", recording)
    loss_and_grads(inputs, 1.0, backend="triton")
    tokens, half = 2 * 20, 32
    _, chunks, f_split = qk_align_module.launch_shape(inputs["q_s"], inputs["w_q"])
    order = [token for chunk in range(chunks) for token in range(chunk, tokens, chunks)]  # the interpreter's order
    assert f_split == 1 and len(seen) == 2 * 2 * tokens  # one channel block: student then teacher, per token
    assert chunks > 1 or mixing == "frequency"  # (frequency mixing: one chunk below MIN_TOKENS_PER_CHUNK tokens)
    calls = iter(seen)
    for name_s, name_t in (("q_s", "q_t"), ("k_s", "k_t")):
        expected = {name: reference.apply_mrope(inputs[name], positions, inputs["inv_freq"],
                                                SMALL_SECTION).reshape(tokens, -1, 2 * half)
                    for name in (name_s, name_t)}
        for token in order:
            for name in (name_s, name_t):
                lo, hi = next(calls)
                heads = expected[name].shape[1]
                torch.testing.assert_close(torch.from_numpy(lo[:heads]), expected[name][token, :, :half])
                torch.testing.assert_close(torch.from_numpy(hi[:heads]), expected[name][token, :, half:])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mixing", ["head", "frequency"])
def test_no_gradient_pass_gives_the_loss_and_allocates_no_gradient(backend, mixing):
    """Under torch.no_grad, or when no input requires grad, the fused pass writes no G / dW: the same loss, and
    far less memory allocated than the gradients of q_s and k_s (the control: with gradients, at least those; what
    remains is small per-program sums, and for the C++ backend's frequency mixing a copy of w_q in its layout)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs((4, 2, 6, 3), batch=2, seq=100, dim=64, section=SMALL_SECTION, mixing=mixing)
    expected = loss_and_grads(inputs, 1.0, backend=backend)[0]
    args = [inputs[k] for k in ("q_s", "k_s", "q_t", "k_t", "w_q", "w_k", "positions", "inv_freq", "mrope_section")]
    options = dict(valid=inputs["valid"], token_weight=inputs["token_weight"], backend=backend)
    gradient_bytes = (inputs["q_s"].numel() + inputs["k_s"].numel()) * inputs["q_s"].element_size()

    def allocated(requires_grad, grad_mode):
        leaves = [args[0].detach().clone().requires_grad_(requires_grad), *args[1:]]
        with torch.set_grad_enabled(grad_mode), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            loss = qk_align_loss(*leaves, **options)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
        return sum(max(event.self_cpu_memory_usage, 0) for event in p.events())

    assert allocated(requires_grad=True, grad_mode=True) >= gradient_bytes
    assert allocated(requires_grad=True, grad_mode=False) < gradient_bytes / 4
    assert allocated(requires_grad=False, grad_mode=True) < gradient_bytes / 4


@pytest.mark.skipif("cpu" not in FUSED, reason="native CPU backend not available")
def test_cpu_rotated_rows_are_the_mrope_rows():
    """The C++ kernel's rotated rows (its debug output) are the reference's apply_mrope rows, padding excluded."""
    from laid_kernels import cpu

    inputs = make_inputs((4, 2, 6, 3), batch=2, seq=70, dim=64, section=SMALL_SECTION)  # 140 tokens: 3 blocks
    assert (inputs["positions"][0] != inputs["positions"][1]).any()  # the image grids
    rotated = cpu.qk_align_rotated_rows(*(inputs[k] for k in ("q_s", "k_s", "q_t", "k_t", "w_q", "w_k", "positions",
                                                               "inv_freq", "mrope_section")), valid=inputs["valid"])
    valid = inputs["valid"]
    for name, rows in rotated.items():
        expected = reference.apply_mrope(inputs[name], inputs["positions"], inputs["inv_freq"], SMALL_SECTION)
        torch.testing.assert_close(rows[valid], expected[valid])
        assert torch.all(rows[~valid] == 0), name


@pytest.mark.parametrize("normalize,mixing", ALL_FORMS)
def test_reference_gradcheck_float64(normalize, mixing):
    """The reference's autograd gradient is the derivative of its value (for "student" through S_i as well). With
    normalize="target" the denominator depends on W but is a stop-gradient by definition, so there only q_s and
    k_s are checked."""
    inputs = as_double(make_inputs((3, 1, 4, 2), batch=2, seq=3, dim=8, section=(1, 1, 2), mixing=mixing))
    names = ("q_s", "k_s") if normalize == "target" else ("q_s", "k_s", "w_q", "w_k")
    leaves = [inputs[n].detach().clone().requires_grad_() for n in names]

    def loss(*xs):
        args = {**inputs, **dict(zip(names, xs))}
        return reference.qk_align_loss(args["q_s"], args["k_s"], args["q_t"], args["k_t"], args["w_q"], args["w_k"],
                                       args["positions"], args["inv_freq"], args["mrope_section"],
                                       token_weight=args["token_weight"], valid=args["valid"], normalize=normalize)

    assert torch.autograd.gradcheck(loss, leaves)


def refit(inputs, mixing):
    """inputs with w_q, w_k replaced by their exact (ridge 0) weighted least-squares fit (fp32)."""
    weight = reference.token_weights(inputs["valid"], inputs["token_weight"], *inputs["q_s"].shape[:2], "cpu")
    fitted = {}
    for w, student, teacher in (("w_q", "q_s", "q_t"), ("w_k", "k_s", "k_t")):
        stats = reference.mixing_statistics(inputs[student], inputs[teacher], weight, mixing == "frequency")
        fitted[w] = reference.fit_mixing(*stats).float()
    return {**inputs, **fitted}


def small_inputs(mixing, seed=0, **changes):
    """Few heads, head_dim 16, enough tokens (2 x 40) for a well-posed least-squares fit per frequency pair; the
    student is half explained by its teacher (x_s = mix of x_t by the inputs' W + noise of the same size)."""
    inputs = make_inputs((4, 2, 3, 2), batch=2, seq=40, dim=16, section=(2, 3, 3), seed=seed, mixing=mixing)
    for student, teacher, w in (("q_s", "q_t", "w_q"), ("k_s", "k_t", "w_k")):
        inputs[student] = inputs[student] + reference.mix_heads(inputs[w], inputs[teacher])
    return {**inputs, **changes}


def head_norm(x):
    """||x_i|| per head of x [B, N, H, D], over tokens and channels: [H]."""
    return x.square().sum(dim=(0, 1, 3)).sqrt()


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("mixing", ["head", "frequency"])
def test_student_normalisation_at_the_fit_is_scale_invariant_and_orthogonal(backend, mixing):
    """At the least-squares W, normalize="student" is 1 - R^2 per head: unchanged when q_s is scaled by 10 (W
    refitted), and its gradient is orthogonal to q_s (and k_s) per head: sum_n <dL/dx_s,i(n), x_s,i(n)> = 0."""
    inputs = refit(small_inputs(mixing), mixing)
    loss, grads = loss_and_grads(inputs, 1.0, backend=backend)
    scaled = refit({**inputs, "q_s": inputs["q_s"] * 10}, mixing)
    torch.testing.assert_close(loss_and_grads(scaled, 1.0, backend=backend)[0], loss, rtol=1e-5, atol=0)
    assert 0.0 < loss < 1.0
    for name in ("q_s", "k_s"):
        x, grad = inputs[name].double(), grads[name].double()
        radial = (grad * x).sum(dim=(0, 1, 3))  # [H]
        scale = head_norm(grad) * head_norm(x)
        assert (radial.abs() <= 1e-5 * scale).all(), (name, radial, scale)
    # Control: the same projection with W fixed away from the fit is far from 0.
    off = {**inputs, "w_q": inputs["w_q"] * 0.5}
    grad = loss_and_grads(off, 1.0, backend=backend)[1]["q_s"].double()
    radial = (grad * inputs["q_s"].double()).sum(dim=(0, 1, 3))
    assert (radial.abs() > 1e-3 * head_norm(grad) * head_norm(inputs["q_s"].double())).all()


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("mixing", ["head", "frequency"])
def test_shrinking_the_student_raises_the_student_normalised_loss(backend, mixing):
    """With W fixed, E_i / S_i = ||x - m / c||^2 / ||x||^2 for x scaled by c: shrinking never helps (version 1's
    "target" normalisation, for comparison, falls when the student is halved)."""
    inputs = refit(small_inputs(mixing), mixing)
    losses = [loss_and_grads({**inputs, "q_s": inputs["q_s"] * c, "k_s": inputs["k_s"] * c}, 1.0,
                             backend=backend)[0] for c in (1.0, 0.5, 0.1)]
    assert losses[0] < losses[1] < losses[2] and losses[2] > 10 * losses[0], losses
    targets = [loss_and_grads({**inputs, "q_s": inputs["q_s"] * c, "k_s": inputs["k_s"] * c}, 1.0,
                              normalize="target", backend=backend)[0] for c in (1.0, 0.5)]
    assert targets[1] < targets[0], targets


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("normalize", ["student", "target", "none"])
def test_frequency_mixing_with_real_constant_weights_is_head_mixing(backend, normalize):
    """C[i, j, f] = W[i, j] (imaginary part 0) gives head mixing's loss, and dC summed over f (real part) is dW."""
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=9, dim=64, section=SMALL_SECTION)
    as_frequency = {name: torch.stack((w[..., None].expand(*w.shape, 32), torch.zeros(*w.shape, 32)), dim=-1)
                    for name, w in (("w_q", inputs["w_q"]), ("w_k", inputs["w_k"]))}
    head_loss, head_grads = loss_and_grads(inputs, 0.7, normalize=normalize, backend=backend)
    loss, grads = loss_and_grads({**inputs, **as_frequency}, 0.7, normalize=normalize, backend=backend)
    torch.testing.assert_close(loss, head_loss, rtol=1e-5, atol=0)
    for name in ("q_s", "k_s"):
        torch.testing.assert_close(grads[name], head_grads[name], rtol=1e-4, atol=1e-7)
    for name in ("w_q", "w_k"):
        torch.testing.assert_close(grads[name][..., 0].sum(-1), head_grads[name], rtol=1e-4, atol=1e-6)


def complex_rescale(x, scale):
    """x [B, N, H, D] with frequency pair f of head h multiplied by the complex scale[h, f] (channels f, f + D/2 as
    real, imaginary)."""
    z = torch.complex(*x.double().chunk(2, dim=-1)) * scale
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_frequency_mixing_absorbs_a_per_frequency_complex_scale(backend):
    """Two models may differ, per kv head h, by a complex scale c[h, f] on each frequency pair: q_f -> c q_f,
    k_f -> k_f / conj(c) leaves every attention logit unchanged. The refitted frequency-mixing L_qk is unchanged by
    it, the refitted head-mixing one is not. (The modulus is shared by a head's frequencies, |c[h, f]| = r_h:
    normalize="student" weights frequencies by energy, and only a common scale of a head is invisible to it.)"""
    inputs = small_inputs("head")
    g = torch.Generator().manual_seed(1)
    hs_kv, half = inputs["k_s"].shape[2], inputs["k_s"].shape[3] // 2
    phase = torch.rand(hs_kv, half, generator=g, dtype=torch.float64) * 2 * math.pi
    c = torch.polar(0.5 + torch.rand(hs_kv, 1, generator=g, dtype=torch.float64).expand(hs_kv, half), phase)
    group = inputs["q_s"].shape[2] // hs_kv
    moved = {**inputs, "q_s": complex_rescale(inputs["q_s"], c.repeat_interleave(group, 0)),
             "k_s": complex_rescale(inputs["k_s"], 1 / c.conj())}
    logits = lambda x: torch.einsum("bnid,bmid->bnmi", x["q_s"][:, :, :group].double(),  # noqa: E731
                                    x["k_s"][:, :, :1].double().expand(-1, -1, group, -1))
    # the attention logits of head group 0 agree
    torch.testing.assert_close(logits(moved), logits(inputs), rtol=1e-5, atol=1e-5)
    for mixing, same in (("frequency", True), ("head", False)):
        before = loss_and_grads(refit(inputs, mixing), 1.0, backend=backend)[0]  # refit replaces w_q, w_k
        after = loss_and_grads(refit(moved, mixing), 1.0, backend=backend)[0]
        if same:
            torch.testing.assert_close(after, before, rtol=1e-4, atol=0)
        else:
            assert (after - before).abs() > 1e-2 * before, (mixing, before, after)


@pytest.mark.parametrize("backend", FUSED)
def test_second_backward_through_the_same_graph_fails_loudly(backend):
    """The fused backward scales its saved gradients in place (no second gradient-sized tensor): a second backward
    with retain_graph=True must raise, not return gradients scaled twice."""
    inputs = make_inputs((4, 2, 6, 3), batch=1, seq=4, dim=64, section=SMALL_SECTION, padded=False)
    q_s = inputs["q_s"].clone().requires_grad_()
    loss = qk_align_loss(q_s, inputs["k_s"], inputs["q_t"], inputs["k_t"], inputs["w_q"], inputs["w_k"],
                         inputs["positions"], inputs["inv_freq"], SMALL_SECTION, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
