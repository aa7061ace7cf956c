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
                padded=True, weighted=True, seed=0, scale=1.0):
    """Inputs shaped as captured from q_proj / k_proj: each x is a [B, N, H, D] view of a wider projection output
    (the student's q and k are slices of one fused projection, so their strides are not contiguous ones).

    Positions: text, then two image grids of different sizes (t constant, h / w varying), then text, with long-context
    offsets (about 50K) so that the angles are large. Padding: sample 1 loses its last 9 tokens (left padding
    elsewhere is the same case for this loss). Token weights: uniform in [0.5, 1.5).
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
    w_q = torch.randn(hs, ht, generator=g) / math.sqrt(ht)
    w_k = torch.randn(hs_kv, ht_kv, generator=g) / math.sqrt(ht_kv)

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
# normalisations.
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


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("heads,batch,seq,dim,section,dtype,normalize,padded,weighted", CASES)
def test_matches_reference(backend, heads, batch, seq, dim, section, dtype, normalize, padded, weighted):
    inputs = make_inputs(heads, batch, seq, dim, section, dtype, padded, weighted)
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
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=40, dim=64, section=SMALL_SECTION)  # 3 programs per part
    first = loss_and_grads(inputs, 1.0, backend=backend)
    second = loss_and_grads(inputs, 1.0, backend=backend)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@pytest.mark.parametrize("normalize", ["target", "none"])
def test_triton_gpu_block_size_under_interpreter(monkeypatch, normalize):
    """The interpreter normally runs all channel pairs in one block; run the block size the GPU launches with
    (several channel blocks per token) against the reference too."""
    if "triton" not in FUSED:
        pytest.skip("Triton interpreter not available")
    monkeypatch.setattr(qk_align_module, "INTERPRETER_BLOCK_F", qk_align_module.BLOCK_F)
    inputs = make_inputs((28, 4, 40, 8), batch=2, seq=5, dtype=torch.bfloat16)
    loss, grads = loss_and_grads(inputs, 1.3, normalize=normalize, backend="triton")
    torch_loss, torch_grads = loss_and_grads(inputs, 1.3, normalize=normalize, backend="reference")
    exact_loss, exact_grads = loss_and_grads(as_double(inputs), 1.3, normalize=normalize, backend="reference")
    assert_within_pytorch_error("loss", loss, torch_loss, exact_loss, VALUE_FACTOR)
    for name, grad in grads.items():
        assert_within_pytorch_error(f"d{name}", grad, torch_grads[name], exact_grads[name], GRAD_FACTOR)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("normalize", ["target", "none"])
def test_rotation_invariance(backend, normalize):
    """The rotation is orthogonal and shared by all heads of a token: rope=True equals rope=False up to rounding."""
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=12, dim=64, section=SMALL_SECTION)
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


@pytest.mark.parametrize("normalize", ["target", "none"])
def test_reference_gradcheck_float64(normalize):
    """The reference's autograd gradient is the derivative of its value. With normalize="target" the denominator
    S depends on W but is a stop-gradient by definition, so there only q_s and k_s are checked."""
    inputs = as_double(make_inputs((3, 1, 4, 2), batch=2, seq=3, dim=8, section=(1, 1, 2)))
    names = ("q_s", "k_s", "w_q", "w_k") if normalize == "none" else ("q_s", "k_s")
    leaves = [inputs[n].detach().clone().requires_grad_() for n in names]

    def loss(*xs):
        args = {**inputs, **dict(zip(names, xs))}
        return reference.qk_align_loss(args["q_s"], args["k_s"], args["q_t"], args["k_t"], args["w_q"], args["w_k"],
                                       args["positions"], args["inv_freq"], args["mrope_section"],
                                       token_weight=args["token_weight"], valid=args["valid"], normalize=normalize)

    assert torch.autograd.gradcheck(loss, leaves)


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
