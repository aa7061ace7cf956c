"""``apply_mrope``: Qwen2.5-VL's multimodal rotary embedding of a [B, N, H, D] tensor.

Triton implementation: one program per token rotates all its heads, with the angles computed in registers from the
token's three positions and inv_freq (no cos/sin tensor). It reads x through its strides (no copy) and writes a
contiguous [B, N, H, D] result. The backward of a rotation is the inverse rotation: the same kernel with
``INVERSE=True``. Registered as the custom op ``laid_kernels::mrope_triton`` (fake implementation and autograd
included), so torch.compile can trace it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference
from .aot import Launch
from .rope_triton import load_positions, mrope_cos_sin, rotate_pair, unrotate_pair
from .triton_support import tl, triton
from .validation import check_apply_mrope_args

OP = "apply_mrope"


def apply_mrope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                *, backend: str = "auto") -> torch.Tensor:
    """Rotate x by M-RoPE, as transformers' Qwen2.5-VL does to queries and keys (rotate-half convention).

    Args:
        x: [B, N, H, D], fp32 / bf16 / fp16, any strides (e.g. the view ``q_proj(h).view(B, N, H, D)``).
        positions: [3, B, N] int (rows t, h, w, as ``get_rope_index`` returns them), or [B, N] for text only.
        inv_freq: [D/2] float, 1 / theta^(2f/D).
        mrope_section: (s0, s1, s2) with s0 + s1 + s2 = D/2; frequency f uses row 0 for f < s0, 1 for
            f < s0 + s1, else 2.
        backend: "auto", "triton", "cpu" or "reference" (see ``laid_kernels.backends``).

    Returns:
        [B, N, H, D] in x's dtype, computed in fp32.

    Example:
        >>> q = apply_mrope(q_proj(h).view(1, n, 28, 128), position_ids, inv_freq, (16, 24, 24))
    """
    positions, section = check_apply_mrope_args(x, positions, inv_freq, mrope_section)
    return backends.resolve(OP, backend, x.device)(x, positions, inv_freq, section)


@triton.jit
def mrope_kernel(x_ptr, out_ptr, pos_ptr, inv_freq_ptr, seq, heads,
                 stride_xb, stride_xn, stride_xh, stride_xd, stride_pr, stride_pb, stride_pn,
                 SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                 H_PAD: tl.constexpr, INVERSE: tl.constexpr):
    """out[b, n] = R x[b, n] (or R^T x[b, n] if INVERSE) for the token of this program, all heads at once.

    x: [B, N, H, 2 * HALF] strided; out: contiguous [B, N, H, 2 * HALF]; pos: [3, B, N] strided.
    """
    token = tl.program_id(0).to(tl.int64)
    b = token // seq
    n = token - b * seq
    f = tl.arange(0, HALF_PAD)[None, :]
    h = tl.arange(0, H_PAD)[:, None]
    mask = (h < heads) & (f < HALF)
    inv_freq = tl.load(inv_freq_ptr + f, mask=f < HALF, other=0).to(tl.float32)
    p_t, p_h, p_w = load_positions(pos_ptr + b * stride_pb, stride_pr, n * stride_pn, True)
    cos, sin = mrope_cos_sin(p_t, p_h, p_w, inv_freq, f, SECTION_T, SECTION_TH)

    x_row = x_ptr + b * stride_xb + n * stride_xn + h * stride_xh
    lo = tl.load(x_row + f * stride_xd, mask=mask, other=0).to(tl.float32)
    hi = tl.load(x_row + (f + HALF) * stride_xd, mask=mask, other=0).to(tl.float32)
    if INVERSE:
        lo, hi = unrotate_pair(lo, hi, cos, sin)
    else:
        lo, hi = rotate_pair(lo, hi, cos, sin)
    out_row = out_ptr + token * heads * 2 * HALF + h * 2 * HALF
    tl.store(out_row + f, lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + f + HALF, hi.to(out_ptr.dtype.element_ty), mask=mask)


def mrope_launch(x: torch.Tensor, out: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 section: Sequence[int], inverse: bool) -> Launch:
    """The launch that writes R x (R^T x if ``inverse``) of x [B, N, H, D] into contiguous ``out``.

    positions: [3, B, N] int; inv_freq: [D/2]. Works on meta tensors (for ahead-of-time compilation).
    """
    batch, seq, heads, dim = x.shape
    half = dim // 2
    h_pad = triton.next_power_of_2(heads)
    return Launch(
        name="mrope/inverse" if inverse else "mrope/forward", kernel=mrope_kernel, grid=(batch * seq,),
        args=(x, out, positions, inv_freq, seq, heads, *x.stride(), *positions.stride()),
        constexprs=dict(SECTION_T=section[0], SECTION_TH=section[0] + section[1], HALF=half,
                        HALF_PAD=triton.next_power_of_2(half), H_PAD=h_pad, INVERSE=inverse),
        num_warps=4 if h_pad * triton.next_power_of_2(half) >= 2048 else 2)


@torch.library.custom_op("laid_kernels::mrope_triton", mutates_args=())
def mrope_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                 inverse: bool) -> torch.Tensor:
    """R x (or R^T x if ``inverse``) by the Triton kernel; x [B, N, H, D] -> contiguous [B, N, H, D], x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        mrope_launch(x, out, positions, inv_freq, section, inverse).run()
    return out


@mrope_triton.register_fake
def mrope_fake(x, positions, inv_freq, section, inverse):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def mrope_setup_context(ctx, inputs, output):
    _, positions, inv_freq, section, inverse = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.section, ctx.inverse = section, inverse


def rotation_backward(rotation_op):
    """The autograd backward of ``rotation_op(x, positions, inv_freq, section, inverse)`` (any backend's M-RoPE
    custom op): the opposite rotation of the incoming gradient by the same op."""

    def backward(ctx, grad):
        positions, inv_freq = ctx.saved_tensors
        return rotation_op(grad, positions, inv_freq, ctx.section, not ctx.inverse), None, None, None, None

    return backward


mrope_triton.register_autograd(rotation_backward(mrope_triton), setup_context=mrope_setup_context)


def _apply_mrope_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                        section: Sequence[int]) -> torch.Tensor:
    return mrope_triton(x, positions, inv_freq, list(section), False)


def aot_launches(heads: Sequence[int] = (28, 4, 40, 8), tokens: int = 512, head_dim: int = 128,
                 section: Sequence[int] = (16, 24, 24), dtype: str = "bfloat16") -> list[Launch]:
    """The launches apply_mrope makes (forward and inverse) for each head count, on meta tensors shaped like
    ``q_proj(h).view(1, tokens, heads, head_dim)``; for ahead-of-time compilation (``laid_kernels.aot``)."""
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    positions = torch.empty(3, 1, tokens, dtype=torch.int64, device="meta")
    inv_freq = torch.empty(head_dim // 2, dtype=torch.float32, device="meta")
    launches = []
    for h in dict.fromkeys(heads):
        x = torch.empty(1, tokens, h * head_dim, **meta).view(1, tokens, h, head_dim)
        for inverse in (False, True):
            launch = mrope_launch(x, torch.empty_like(x), positions, inv_freq, section, inverse)
            launch.name += f"/H={h}"
            launches.append(launch)
    return launches


backends.register(OP, "reference", reference.apply_mrope)
backends.register(OP, "triton", _apply_mrope_triton)
