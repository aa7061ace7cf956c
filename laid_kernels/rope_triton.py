"""Triton device functions for M-RoPE computed in registers, shared by every fused kernel.

No cos/sin table is ever read: each kernel loads the three integer positions of its tokens and the inverse
frequencies of its channel pairs, and computes the angles as transformers does (fp32 product of the position and
inv_freq[f], then ``tl.cos`` / ``tl.sin``, which lower to libdevice's accurate __nv_cosf / __nv_sinf, not the
approximate hardware instructions that are wrong for the large angles of a 54K-token prompt: checked in the PTX by
``tests/test_compile_aot.py``).

Rotate-half convention: channel f (f < D/2) pairs with channel f + D/2; ``lo`` is the block of first-half channels
and ``hi`` the matching block of second-half channels.
"""

from __future__ import annotations

from .triton_support import tl, triton


@triton.jit
def load_positions(pos_ptr, stride_row, offsets, mask):
    """Load the (t, h, w) positions at ``offsets`` (token offsets within one position row) as fp32."""
    p_t = tl.load(pos_ptr + offsets, mask=mask, other=0).to(tl.float32)
    p_h = tl.load(pos_ptr + stride_row + offsets, mask=mask, other=0).to(tl.float32)
    p_w = tl.load(pos_ptr + 2 * stride_row + offsets, mask=mask, other=0).to(tl.float32)
    return p_t, p_h, p_w


@triton.jit
def load_block_positions(pos_ptr, stride_row, offsets, mask, f_first, f_end, SECTION_T: tl.constexpr,
                         SECTION_TH: tl.constexpr):
    """:func:`load_positions` for the frequencies [f_first, f_end) only: a position row that none of them uses
    (:func:`mrope_cos_sin`'s sections) is not read (returned as 0), so a kernel that handles one small channel
    block per iteration reads one row, not three, for most blocks."""
    p_t = tl.load(pos_ptr + offsets, mask=mask & (f_first < SECTION_T), other=0).to(tl.float32)
    p_h = tl.load(pos_ptr + stride_row + offsets, mask=mask & (f_first < SECTION_TH) & (f_end > SECTION_T),
                  other=0).to(tl.float32)
    p_w = tl.load(pos_ptr + 2 * stride_row + offsets, mask=mask & (f_end > SECTION_TH), other=0).to(tl.float32)
    return p_t, p_h, p_w


@triton.jit
def mrope_cos_sin(p_t, p_h, p_w, inv_freq, freq, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr):
    """cos and sin of the M-RoPE angle; every argument broadcasts (e.g. positions [BLOCK_N, 1], freq [1, BLOCK_F]).

    freq: frequency indices f; inv_freq: inv_freq[f] (fp32). SECTION_T = s0, SECTION_TH = s0 + s1.
    """
    position = tl.where(freq < SECTION_T, p_t, tl.where(freq < SECTION_TH, p_h, p_w))
    angle = position * inv_freq
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def rotate_pair(lo, hi, cos, sin):
    """Rotate a (first-half, second-half) channel pair forward: R x."""
    return lo * cos - hi * sin, hi * cos + lo * sin


@triton.jit
def unrotate_pair(lo, hi, cos, sin):
    """Rotate a channel pair backward, R^T x (the gradient of a rotation)."""
    return lo * cos + hi * sin, hi * cos - lo * sin
