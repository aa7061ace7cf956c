"""``qk_align_loss``: L_qk, head-level Q/K alignment of a student to mixed teacher heads (shared/laid-spec.md).

Fused Triton implementation: the query part (q_s, q_t, w_q) and the key part (k_s, k_t, w_k) have the same
structure, x_s [B, N, Hs, D] against the mix by W of x_t [B, N, Ht, D], and are two launches of one kernel. A
persistent grid (:func:`launch_shape`, a function of the token count only, never of the device, so the result is
bit-reproducible) strides over the tokens. Per token it loads the first-half and second-half channel blocks of both
sides through their strides, rotates them in registers (angles from positions and inv_freq), forms the target:
head mixing W [Hs, Ht] @ (R x_t) with ``tl.dot`` (heads padded to a power of two >= 16, masked), frequency mixing
sum_j C[i, j, f] z_t,j,f as complex products of a [Hs, Ht, channel block] tile of C held in registers (one channel
block per program), and accumulates per student head the weighted squared error E_i, the student energy S_i and
the target norm T_i, the token weight, and the partial gradient of W per program (per token chunk for frequency
mixing). In the same pass it writes G = dE_i / dx_s = R^T (2 w (R x_s - target)), in the input dtype (fp32 for
fp16 inputs: G overflows fp16 long before the scaled gradient does). No rotated or mixed [B, N, H, D] tensor
exists. Padding tokens (weight 0) are not read; their gradient is written as 0. When no input needs a gradient
(torch.no_grad, or none requires grad: :func:`wants_grads`) the pass computes the sums only: no G, no dW, and
neither is allocated.

Every normalisation makes the gradient a per-head combination dL/dx_s,i = alpha_i G_i + beta_i w_n x_s,i
(:func:`finish_loss`): "target" and "none" have one alpha and beta = 0; "student" (L = mean_i E_i / S_i per side,
halved) has alpha_i = 1 / (2 H S_i) and beta_i = -2 alpha_i E_i / S_i (the derivative through S_i). The sums are
only known after the pass and grad_output only in backward, so the backward rescales G in place by a second
kernel (:func:`qk_rescale_kernel`): one read and one write of dq_s and dk_s, plus one read of q_s and k_s for
"student" (counted separately in benchmarks/compile_report.py). The saved gradient is therefore rounded to the
input dtype twice (at most about 1.5 ulp instead of 0.5 for bf16 inputs; the tests' 3x rule covers it). The
per-program partial sums are reduced on the host by ``torch.sum`` over a fixed-size dimension (deterministic).

Registered as the custom ops ``laid_kernels::qk_align_triton`` and ``laid_kernels::qk_rescale_triton`` (fake
implementations and autograd included), so torch.compile can trace a training step through them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference
from .aot import Launch
from .rope_triton import load_block_positions, mrope_cos_sin, rotate_pair, unrotate_pair
from .triton_support import tl, triton
from .validation import check_qk_align_args

OP = "qk_align_loss"


def qk_align_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                  w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                  *, token_weight: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                  normalize: str = "student", rope: bool = True, backend: str = "auto") -> torch.Tensor:
    """L_qk of the spec, an fp32 scalar; differentiable with respect to q_s, k_s, w_q and w_k.

    Args:
        q_s: [B, N, Hs, D] student queries before RoPE (q_proj output), fp32 / bf16 / fp16.
        k_s: [B, N, Hs_kv, D] student keys before RoPE.
        q_t: [B, N, Ht, D] teacher queries (a constant: no gradient).
        k_t: [B, N, Ht_kv, D] teacher keys (a constant: no gradient).
        w_q, w_k: the mixing, chosen by shape: head mixing w_q [Hs, Ht], w_k [Hs_kv, Ht_kv]; or frequency mixing
            w_q [Hs, Ht, D/2, 2], w_k [Hs_kv, Ht_kv, D/2, 2] (complex weights per RoPE frequency pair, last axis
            real / imaginary; channels f and f + D/2 are the real and imaginary parts).
        positions: [3, B, N] or [B, N] int M-RoPE positions; inv_freq: [D/2]; mrope_section: (s0, s1, s2).
        token_weight: optional [B, N] float per-token weight w_n (default 1).
        valid: optional [B, N] bool attention mask; padding contributes nothing.
        normalize: "student" (default: mean over student heads of E_i / S_i, the share of each head's energy its
            teacher mix does not explain, queries and keys averaged), "target" (version 1: divided by the
            stop-gradient squared norm of the mixed teacher targets) or "none" (weighted mean over elements).
        rope: rotate both sides by M-RoPE first (the paper's equation; equal to rope=False up to rounding).
        backend: "auto", "triton", "cpu" or "reference" (see ``laid_kernels.backends``).

    Returns:
        A 0-dim fp32 tensor.

    Example:
        >>> loss = qk_align_loss(q_s, k_s, q_t, k_t, mixer.w_q[0], mixer.w_k[0], position_ids, inv_freq, (16, 24, 24),
        ...                      valid=attention_mask.bool())
        >>> loss.backward()
    """
    positions, section = check_qk_align_args(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, mrope_section,
                                             token_weight, valid, normalize)
    implementation = backends.resolve(OP, backend, q_s.device)
    return implementation(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, token_weight=token_weight,
                          valid=valid, normalize=normalize, rope=rope)


# tl.dot precision. "ieee" keeps fp32 accuracy on the GPU (TF32 would give ~1e-3 relative errors, far above the
# plain PyTorch fp32 error the tests compare against). It runs the dots on fp32 FMA units: about 1.2 MFLOP per token
# for the 7B/32B shapes, which may exceed the memory time on an H100 (a prediction, see benchmarks/RESULTS.md;
# "tf32x3" is the candidate to measure on a GPU).
INPUT_PRECISION = "ieee"
# Channel pairs per iteration (tl.dot needs >= 16) and warps. Chosen with laid_kernels.aot for the 7B/32B shapes:
# 16 / 4 warps compiles without spills for sm_80 and sm_90 (196 registers for the query part on sm_90); 16 / 8 warps
# and 32 / 4 warps reach 255 registers and 32 / 4 spills. The interpreter (CPU tensors) has no registers and pays
# per operation, so it runs one block of all channel pairs (INTERPRETER_BLOCK_F); the tests also run BLOCK_F there.
BLOCK_F = 16
INTERPRETER_BLOCK_F = 64
NUM_WARPS = 4
# ptxas left alone gives the fp32-input query part 128 registers and 8 bytes of spills on sm_80; allowed 255 it
# takes 164 and does not spill (4 warps: 255 registers per thread fit an SM's register file).
HEAD_MAXNREG = 255
MIN_TOKENS_PER_PROGRAM = 32  # keeps the [programs, Hs, Ht] partial-dW traffic below ~1% of the input traffic
MAX_PROGRAMS = 1024
# Frequency mixing holds a [HS_PAD, HT_PAD, BLOCK_F] block of C and of dC (real and imaginary) per program, so its
# channel blocks are small and spread over the grid: program pid takes channel block pid % (D/2 / block) of token
# chunk pid // (D/2 / block). The programs of one chunk are adjacent in the grid and walk the same tokens in the same
# order, so a token's 32-byte sectors should be fetched once from DRAM and served from L2 to the other blocks (a
# prediction, unmeasured). Its dC partials are [chunks, Hs, Ht, D/2, 2] fp32 (0.59 MB per chunk for the 7B/32B
# heads, written once and read once by the reduction), so chunks hold at least MIN_TOKENS_PER_CHUNK tokens (the
# partials then move <= 3% of the fused pass's minimal bytes) and there are at most MAX_CHUNKS (9.4 MB at 54K
# tokens, under 1% of the input bytes). 2 channel pairs and 16 warps compile to 128 registers without spills for
# sm_80 and sm_90 (laid_kernels.aot); 2 / 8 warps takes 243 and 4 / 16 warps spills.
FREQUENCY_BLOCK_F = 2
FREQUENCY_NUM_WARPS = 16
MIN_TOKENS_PER_CHUNK = 2048
MAX_CHUNKS = 16
HEAD_SUMS = 3  # per-program, per-student-head partial sums: E_i (squared error), S_i (student energy), T_i (target)


@triton.jit
def qk_align_kernel(xs_ptr, xt_ptr, w_ptr, pos_ptr, inv_freq_ptr, tw_ptr, valid_ptr, grad_ptr, dw_ptr, sums_ptr,
                    n_tokens, seq, hs, ht,
                    stride_sb, stride_sn, stride_sh, stride_sd, stride_tb, stride_tn, stride_th, stride_td,
                    stride_wi, stride_wj, stride_wf, stride_wc, stride_pr, stride_pb, stride_pn, stride_twb,
                    stride_twn, stride_vb, stride_vn,
                    SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, HALF: tl.constexpr, BLOCK_F: tl.constexpr,
                    F_SPLIT: tl.constexpr, HS_PAD: tl.constexpr, HT_PAD: tl.constexpr, FREQUENCY: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_VALID: tl.constexpr, ROPE: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One part of L_qk: program pid handles the channel blocks f0 = (pid % F_SPLIT) * BLOCK_F, + F_SPLIT * BLOCK_F,
    ... of the tokens c, c + C, ... (c = pid // F_SPLIT, C = programs / F_SPLIT chunks).

    xs: [B, N, hs, 2 * HALF] student, xt: [B, N, ht, 2 * HALF] teacher, pos: [3, B, N], all strided; w: head
    mixing [hs, ht] (FREQUENCY False; F_SPLIT 1: every channel block) or frequency mixing [hs, ht, HALF, 2]
    (FREQUENCY True; F_SPLIT = the number of channel blocks: one block per program), strided; tw / valid: optional
    [B, N] token weight / mask. Writes, if WRITE_GRAD, grad: contiguous [B, N, hs, 2 * HALF] (G, the gradient of
    E_i with respect to x_s) and dw: the partial gradient of sum_i E_i with respect to W, contiguous [C, hs, ht]
    (head mixing) or [C, hs, ht, HALF, 2] (frequency mixing: each program writes its channel block); always sums:
    [programs, 3 * hs + 1] (per head: E_i, then S_i, then T_i; then the token weight). The channel-block loop is
    outside the token loop so that each iteration holds only [H_PAD, BLOCK_F] tiles (and, for frequency mixing,
    the [HS_PAD, HT_PAD, BLOCK_F] block of C and of its gradient) while inv_freq and C are read once per block.
    """
    pid = tl.program_id(0)
    chunk = pid // F_SPLIT
    chunks = tl.num_programs(0) // F_SPLIT
    i = tl.arange(0, HS_PAD)[:, None]
    j = tl.arange(0, HT_PAD)[:, None]
    j_col = tl.arange(0, HT_PAD)[None, :]
    w_mask = (i < hs) & (j_col < ht)
    if not FREQUENCY:
        w = tl.load(w_ptr + i * stride_wi + j_col * stride_wj, mask=w_mask, other=0).to(tl.float32)
        dw = tl.zeros((HS_PAD, HT_PAD), dtype=tl.float32)

    squared_error = tl.zeros((HS_PAD,), dtype=tl.float32)
    energy = tl.zeros((HS_PAD,), dtype=tl.float32)
    target_norm = tl.zeros((HS_PAD,), dtype=tl.float32)
    weight_sum = 0.0
    s_heads = i * stride_sh
    t_heads = j * stride_th
    g_heads = i * 2 * HALF
    for f0 in range((pid % F_SPLIT) * BLOCK_F, HALF, F_SPLIT * BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)[None, :]
        inv_freq = tl.load(inv_freq_ptr + f, mask=f < HALF, other=0).to(tl.float32)
        s_lo_off, s_hi_off = s_heads + f * stride_sd, s_heads + (f + HALF) * stride_sd
        t_lo_off, t_hi_off = t_heads + f * stride_td, t_heads + (f + HALF) * stride_td
        g_mask = (i < hs) & (f < HALF)
        if FREQUENCY:  # this block of C [HS_PAD, HT_PAD, BLOCK_F] (real, imaginary) and of its gradient
            c_off = i[:, :, None] * stride_wi + j_col[:, :, None] * stride_wj + f[:, None, :] * stride_wf
            c_mask = w_mask[:, :, None] & (f[:, None, :] < HALF)
            c_re = tl.load(w_ptr + c_off, mask=c_mask, other=0).to(tl.float32)
            c_im = tl.load(w_ptr + c_off + stride_wc, mask=c_mask, other=0).to(tl.float32)
            dc_re = tl.zeros((HS_PAD, HT_PAD, BLOCK_F), dtype=tl.float32)
            dc_im = tl.zeros((HS_PAD, HT_PAD, BLOCK_F), dtype=tl.float32)
        for token in range(chunk, n_tokens, chunks):
            token64 = tl.cast(token, tl.int64)  # 64-bit offsets: B * N * H * D may exceed 2^31
            b = token64 // seq
            n = token64 - b * seq
            weight = tl.full((), 1.0, tl.float32)
            if HAS_WEIGHT:
                weight = tl.load(tw_ptr + b * stride_twb + n * stride_twn).to(tl.float32)
            if HAS_VALID:
                weight = tl.where(tl.load(valid_ptr + b * stride_vb + n * stride_vn) != 0, weight, 0.0)
            # Heads to read: none for a padding token (weight 0), whose inputs are not loaded.
            hs_live = tl.where(weight != 0.0, hs, 0)
            ht_live = tl.where(weight != 0.0, ht, 0)

            s_token = xs_ptr + b * stride_sb + n * stride_sn
            s_mask = (i < hs_live) & (f < HALF)
            s_lo = tl.load(s_token + s_lo_off, mask=s_mask, other=0).to(tl.float32)
            s_hi = tl.load(s_token + s_hi_off, mask=s_mask, other=0).to(tl.float32)
            t_token = xt_ptr + b * stride_tb + n * stride_tn
            t_mask = (j < ht_live) & (f < HALF)
            t_lo = tl.load(t_token + t_lo_off, mask=t_mask, other=0).to(tl.float32)
            t_hi = tl.load(t_token + t_hi_off, mask=t_mask, other=0).to(tl.float32)
            if ROPE:
                p_t, p_h, p_w = load_block_positions(pos_ptr + b * stride_pb, stride_pr, n * stride_pn, weight != 0.0,
                                                     f0, f0 + BLOCK_F, SECTION_T, SECTION_TH)
                cos, sin = mrope_cos_sin(p_t, p_h, p_w, inv_freq, f, SECTION_T, SECTION_TH)
                s_lo, s_hi = rotate_pair(s_lo, s_hi, cos, sin)
                t_lo, t_hi = rotate_pair(t_lo, t_hi, cos, sin)

            if FREQUENCY:  # target_f = sum_j C[i, j, f] z_t,j,f, complex (it commutes with the rotation)
                teacher_lo, teacher_hi = t_lo[None, :, :], t_hi[None, :, :]
                target_lo = tl.sum(c_re * teacher_lo - c_im * teacher_hi, axis=1)
                target_hi = tl.sum(c_re * teacher_hi + c_im * teacher_lo, axis=1)
            else:
                target_lo = tl.dot(w, t_lo, input_precision=INPUT_PRECISION)
                target_hi = tl.dot(w, t_hi, input_precision=INPUT_PRECISION)
            diff_lo = s_lo - target_lo
            diff_hi = s_hi - target_hi
            squared_error += weight * tl.sum(diff_lo * diff_lo + diff_hi * diff_hi, axis=1)
            energy += weight * tl.sum(s_lo * s_lo + s_hi * s_hi, axis=1)
            target_norm += weight * tl.sum(target_lo * target_lo + target_hi * target_hi, axis=1)
            weight_sum += tl.where(f0 == 0, weight, 0.0)

            if WRITE_GRAD:
                grad_lo = (2.0 * weight) * diff_lo
                grad_hi = (2.0 * weight) * diff_hi
                if FREQUENCY:  # dE/dC = -sum_n g conj(z_t): real g_lo t_lo + g_hi t_hi, imaginary g_hi t_lo - g_lo t_hi
                    g_lo, g_hi = grad_lo[:, None, :], grad_hi[:, None, :]
                    dc_re -= g_lo * teacher_lo + g_hi * teacher_hi
                    dc_im -= g_hi * teacher_lo - g_lo * teacher_hi
                else:
                    dw -= tl.dot(grad_lo, tl.trans(t_lo), input_precision=INPUT_PRECISION)
                    dw -= tl.dot(grad_hi, tl.trans(t_hi), input_precision=INPUT_PRECISION)
                if ROPE:
                    grad_lo, grad_hi = unrotate_pair(grad_lo, grad_hi, cos, sin)
                g_token = grad_ptr + token64 * hs * 2 * HALF + g_heads
                tl.store(g_token + f, grad_lo.to(grad_ptr.dtype.element_ty), mask=g_mask)
                tl.store(g_token + f + HALF, grad_hi.to(grad_ptr.dtype.element_ty), mask=g_mask)
        if FREQUENCY:
            if WRITE_GRAD:
                dc_off = (chunk * hs * ht + i[:, :, None] * ht + j_col[:, :, None]) * HALF * 2 + f[:, None, :] * 2
                tl.store(dw_ptr + dc_off, dc_re, mask=c_mask)
                tl.store(dw_ptr + dc_off + 1, dc_im, mask=c_mask)

    if not FREQUENCY:
        if WRITE_GRAD:
            tl.store(dw_ptr + chunk * hs * ht + i * ht + j_col, dw, mask=w_mask)
    heads = tl.arange(0, HS_PAD)
    row = sums_ptr + pid * (3 * hs + 1)  # HEAD_SUMS = 3 per head, then the weight (a jit kernel reads no globals)
    tl.store(row + heads, squared_error, mask=heads < hs)
    tl.store(row + hs + heads, energy, mask=heads < hs)
    tl.store(row + 2 * hs + heads, target_norm, mask=heads < hs)
    tl.store(row + 3 * hs, weight_sum)


@triton.jit
def qk_rescale_kernel(grad_ptr, xs_ptr, weight_ptr, alpha_ptr, beta_ptr, seq, hs,
                      stride_sb, stride_sn, stride_sh, stride_sd,
                      DIM: tl.constexpr, DIM_PAD: tl.constexpr, HS_PAD: tl.constexpr, HAS_X: tl.constexpr):
    """grad[b, n, i] = alpha[i] * grad[b, n, i] + beta[i] * weight[b, n] * xs[b, n, i] in place, for the token of
    this program (all heads). grad: contiguous [B, N, hs, DIM]; xs: [B, N, hs, DIM] strided (read only if HAS_X);
    weight: contiguous [B, N] fp32; alpha, beta: [hs] fp32. Arithmetic in fp32, one rounding to grad's dtype."""
    token = tl.program_id(0).to(tl.int64)
    b = token // seq
    n = token - b * seq
    i = tl.arange(0, HS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (i < hs) & (d < DIM)
    alpha = tl.load(alpha_ptr + i, mask=i < hs, other=0)
    offsets = token * hs * DIM + i * DIM + d
    result = alpha * tl.load(grad_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if HAS_X:
        weight = tl.load(weight_ptr + token)
        beta = tl.load(beta_ptr + i, mask=i < hs, other=0)
        hs_live = tl.where(weight != 0.0, hs, 0)  # padding (weight 0): x is not read
        x = tl.load(xs_ptr + b * stride_sb + n * stride_sn + i * stride_sh + d * stride_sd,
                    mask=(i < hs_live) & (d < DIM), other=0).to(tl.float32)
        result += (beta * weight) * x
    tl.store(grad_ptr + offsets, result.to(grad_ptr.dtype.element_ty), mask=mask)


def num_programs(n_tokens: int) -> int:
    """Size of the persistent grid of head mixing for ``n_tokens`` = B * N tokens (device-independent, for
    bit-reproducibility)."""
    return max(1, min(MAX_PROGRAMS, triton.cdiv(n_tokens, MIN_TOKENS_PER_PROGRAM)))


def _pad_heads(heads: int) -> int:
    return max(16, triton.next_power_of_2(heads))


def launch_shape(x_s: torch.Tensor, w: torch.Tensor, block_f: int | None = None) -> tuple[int, int, int]:
    """(block_f, chunks, f_split) of one part's launch: channel pairs per block, token chunks, programs per chunk
    (grid = chunks * f_split). Head mixing (w [Hs, Ht]): :func:`num_programs` chunks, each over every channel block
    (f_split 1); frequency mixing: one channel block per program. A function of the token count, head_dim, form and
    block_f only (never of the device), so the result is bit-reproducible. block_f default: BLOCK_F (head mixing)
    or FREQUENCY_BLOCK_F on a GPU or meta tensors, INTERPRETER_BLOCK_F on CPU tensors (the interpreter)."""
    frequency = w.dim() == 4
    half, tokens = x_s.shape[3] // 2, x_s.shape[0] * x_s.shape[1]
    if block_f is None:
        block_f = (INTERPRETER_BLOCK_F if x_s.device.type == "cpu" else FREQUENCY_BLOCK_F if frequency
                   else BLOCK_F)
    block_f = min(block_f, triton.next_power_of_2(half))
    if not frequency:
        return max(16, block_f), num_programs(tokens), 1  # tl.dot needs >= 16 channels
    return block_f, max(1, min(MAX_CHUNKS, triton.cdiv(tokens, MIN_TOKENS_PER_CHUNK))), triton.cdiv(half, block_f)


def qk_align_launch(x_s: torch.Tensor, x_t: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, section: Sequence[int], weight: torch.Tensor | None,
                    valid: torch.Tensor | None, rope: bool, grad: torch.Tensor | None, dw: torch.Tensor | None,
                    sums: torch.Tensor, name: str, block_f: int | None = None) -> Launch:
    """The launch of one part (queries or keys) of L_qk. Works on meta tensors (for ahead-of-time compilation).

    x_s [B, N, Hs, D], x_t [B, N, Ht, D], w [Hs, Ht] (head mixing) or [Hs, Ht, D/2, 2] (frequency mixing),
    positions [3, B, N], inv_freq [D/2], weight / valid [B, N] or None. Outputs (:func:`_outputs`): grad contiguous
    [B, N, Hs, D] and dw [chunks, *w.shape] fp32, both None when no gradient is wanted (then neither is computed);
    sums [programs, 3 * Hs + 1] fp32. block_f, chunks, programs: :func:`launch_shape`.
    """
    batch, seq, hs, dim = x_s.shape
    ht = x_t.shape[2]
    frequency = w.dim() == 4
    block_f, chunks, f_split = launch_shape(x_s, w, block_f)
    w_strides = w.stride() if frequency else (*w.stride(), 0, 0)
    dummy = positions  # stands in for an absent optional tensor (never read: HAS_WEIGHT / HAS_VALID are False)
    return Launch(
        name=name, kernel=qk_align_kernel, grid=(chunks * f_split,),
        args=(x_s, x_t, w, positions, inv_freq, dummy if weight is None else weight,
              dummy if valid is None else valid, x_s if grad is None else grad, sums if dw is None else dw, sums,
              batch * seq, seq, hs, ht, *x_s.stride(), *x_t.stride(), *w_strides, *positions.stride(),
              *(weight.stride() if weight is not None else (0, 0)),
              *(valid.stride() if valid is not None else (0, 0))),
        constexprs=dict(SECTION_T=section[0], SECTION_TH=section[0] + section[1], HALF=dim // 2,
                        BLOCK_F=block_f, F_SPLIT=f_split, HS_PAD=_pad_heads(hs), HT_PAD=_pad_heads(ht),
                        FREQUENCY=frequency, HAS_WEIGHT=weight is not None, HAS_VALID=valid is not None, ROPE=rope,
                        WRITE_GRAD=grad is not None, INPUT_PRECISION=INPUT_PRECISION),
        num_warps=FREQUENCY_NUM_WARPS if frequency else NUM_WARPS, maxnreg=None if frequency else HEAD_MAXNREG)


def qk_rescale_launch(grad: torch.Tensor, x_s: torch.Tensor | None, weight: torch.Tensor, alpha: torch.Tensor,
                      beta: torch.Tensor | None, name: str) -> Launch:
    """The backward's in-place rescaling of one part's G (:func:`qk_rescale_kernel`), one program per token.
    grad contiguous [B, N, Hs, D]; x_s [B, N, Hs, D] or None (then beta is unused); weight contiguous [B, N] fp32;
    alpha, beta [Hs] fp32. Works on meta tensors."""
    batch, seq, hs, dim = grad.shape
    strides = x_s.stride() if x_s is not None else (0, 0, 0, 0)
    return Launch(
        name=name, kernel=qk_rescale_kernel, grid=(batch * seq,),
        args=(grad, grad if x_s is None else x_s, weight, alpha, alpha if beta is None else beta, seq, hs, *strides),
        constexprs=dict(DIM=dim, DIM_PAD=triton.next_power_of_2(dim), HS_PAD=triton.next_power_of_2(hs),
                        HAS_X=x_s is not None),
        num_warps=NUM_WARPS)


def grad_dtype(x_s: torch.Tensor) -> torch.dtype:
    """dtype of the saved gradient G of x_s: x_s's dtype, except fp32 for fp16 (G = 2 w (R x_s - target) overflows
    fp16's 65504 for inputs of about 3e4, while the scaled gradient is finite)."""
    return torch.float32 if x_s.dtype == torch.float16 else x_s.dtype


def _outputs(x_s: torch.Tensor, w: torch.Tensor, grads: bool = True, block_f: int | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Empty (G [B, N, Hs, D] in :func:`grad_dtype`, dW partials [chunks, *w.shape] fp32, sums
    [programs, 3 Hs + 1] fp32) for one part launched with ``block_f`` (:func:`launch_shape`); G and the dW
    partials are None without ``grads``."""
    _, chunks, f_split = launch_shape(x_s, w, block_f)
    sums = torch.empty((chunks * f_split, HEAD_SUMS * x_s.shape[2] + 1), dtype=torch.float32, device=x_s.device)
    if not grads:
        return None, None, sums
    return (torch.empty(x_s.shape, dtype=grad_dtype(x_s), device=x_s.device),
            torch.empty((chunks, *w.shape), dtype=torch.float32, device=x_s.device), sums)


def finish_loss(sums_q: torch.Tensor, sums_k: torch.Tensor, weight_sum: torch.Tensor, dw_q: torch.Tensor | None,
                dw_k: torch.Tensor | None, dim: int, normalize: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, alpha, beta, grad_w_q, grad_w_k) from a fused pass's per-head sums, shared by every fused backend.

    sums_q [Hs, 3], sums_k [Hs_kv, 3]: per student head (E_i, S_i, T_i), any float dtype (fp64 from the backends);
    weight_sum: 0-dim, sum of w_n; dw_q / dw_k: dE / dW (shapes of w_q / w_k, fp32); dim: head_dim.
    The gradient of the loss is dL/dx_s,i = alpha_i G_i + beta_i w_n x_s,i (G = dE_i / dx_s) and
    dL/dW[i] = alpha_i dE / dW[i]. Returns the loss (0-dim fp32), alpha and beta ([Hs + Hs_kv] fp32, queries then
    keys) and the gradients of W (fp32, the shapes of dw_q / dw_k; None where dw_q / dw_k is None: a pass that
    computed no gradient). Denominators are clamped at fp32 tiny exactly as
    the reference does (a clamped S_i passes no gradient: beta_i = 0).
    """
    tiny = torch.finfo(torch.float32).tiny
    sums = torch.cat((sums_q, sums_k)).double()
    error, energy, target = sums.unbind(dim=1)
    hs, hs_kv = sums_q.shape[0], sums_k.shape[0]
    if normalize == "student":
        heads = torch.cat((torch.full((hs,), float(hs)), torch.full((hs_kv,), float(hs_kv)))).to(sums)
        clamped = energy.clamp_min(tiny)
        alpha = 1.0 / (2.0 * heads * clamped)
        loss = (alpha * error).sum()
        beta = torch.where(energy > tiny, -2.0 * alpha * error / clamped, 0.0)
    else:
        denominator = target.sum() if normalize == "target" else weight_sum.double() * (hs + hs_kv) * dim
        alpha = (1.0 / denominator.clamp_min(tiny)).expand(hs + hs_kv)
        loss = error.sum() * alpha[0]
        beta = torch.zeros_like(alpha)
    alpha, beta = alpha.float(), beta.float()
    if dw_q is None or dw_k is None:
        return loss.float(), alpha, beta, None, None
    row_q = alpha[:hs].view(-1, *[1] * (dw_q.dim() - 1))
    row_k = alpha[hs:].view(-1, *[1] * (dw_k.dim() - 1))
    return loss.float(), alpha, beta, dw_q * row_q, dw_k * row_k


def wants_grads(*tensors: torch.Tensor) -> bool:
    """Whether a fused pass must compute gradients: grad mode is on and one of ``tensors`` requires grad. When not
    (torch.no_grad, evaluation), the fused backends neither allocate nor write G and dW."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def no_grad_outputs(grad_q: torch.Tensor | None, grad_k: torch.Tensor | None, dw_q: torch.Tensor | None,
                    dw_k: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(G_q, G_k, grad_w_q, grad_w_k) of a qk_align op with each absent one (a pass without gradients) as an empty
    [0] tensor (custom ops return tensors)."""
    return tuple(like.new_empty(0) if t is None else t for t in (grad_q, grad_k, dw_q, dw_k))


@torch.library.custom_op("laid_kernels::qk_align_triton", mutates_args=())
def qk_align_triton(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                    w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                    token_weight: torch.Tensor | None, valid: torch.Tensor | None, normalize: str, rope: bool,
                    grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """(loss, alpha, beta, G_q, G_k, grad_w_q, grad_w_k) by the fused kernel (see :func:`finish_loss`): the
    gradients of the loss are dL/dx_s = grad_output (alpha_i G_i + beta_i w_n x_s,i) and grad_output grad_w.
    Shapes as in :func:`qk_align_loss`; alpha, beta [Hs + Hs_kv] fp32. Without ``grads`` the kernel computes only
    the loss terms and G_q, G_k, grad_w_q, grad_w_k are empty [0] tensors."""
    parts = []
    for x_s, x_t, w, name in ((q_s, q_t, w_q, "qk_align/query"), (k_s, k_t, w_k, "qk_align/key")):
        grad, dw, sums = _outputs(x_s, w, grads)
        if x_s.numel():
            qk_align_launch(x_s, x_t, w, positions, inv_freq, section, token_weight, valid, rope, grad, dw, sums,
                            name).run()
        else:
            sums.zero_()
            if dw is not None:
                dw.zero_()
        sums = sums.double().sum(0)
        hs = x_s.shape[2]
        parts.append((grad, None if dw is None else dw.sum(0), sums[:HEAD_SUMS * hs].view(HEAD_SUMS, hs).T,
                      sums[-1]))
    (grad_q, dw_q, sums_q, weight_sum), (grad_k, dw_k, sums_k, _) = parts
    loss, alpha, beta, dw_q, dw_k = finish_loss(sums_q, sums_k, weight_sum, dw_q, dw_k, q_s.shape[3], normalize)
    if grads:
        dw_q, dw_k = dw_q.to(w_q.dtype), dw_k.to(w_k.dtype)
    return loss, alpha, beta, *no_grad_outputs(grad_q, grad_k, dw_q, dw_k, q_s)


@qk_align_triton.register_fake
def qk_align_fake(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, token_weight, valid, normalize, rope,
                  grads):
    scalar = q_s.new_empty((), dtype=torch.float32)
    heads = q_s.new_empty((q_s.shape[2] + k_s.shape[2],), dtype=torch.float32)
    if not grads:
        return scalar, heads, heads.clone(), *no_grad_outputs(None, None, None, None, q_s)
    return (scalar, heads, heads.clone(), torch.empty(q_s.shape, dtype=grad_dtype(q_s), device=q_s.device),
            torch.empty(k_s.shape, dtype=grad_dtype(k_s), device=k_s.device), torch.empty_like(w_q),
            torch.empty_like(w_k))


def qk_align_setup_context(ctx, inputs, output):
    """Autograd context of every backend's qk_align custom op: saves alpha, beta, G and grad_w, and, for
    normalize="student" (beta != 0), the student inputs and the token weights the backward's rescaling reads."""
    q_s, k_s, _, _, _, _, _, _, _, token_weight, valid, normalize, _, _ = inputs
    ctx.dtypes = (q_s.dtype, k_s.dtype)
    ctx.student = normalize == "student"
    ctx.save_for_backward(*output[1:], *((q_s, k_s, token_weight, valid) if ctx.student else ()))
    # Only the loss receives a gradient: without this, autograd would pass zero tensors the size of dq_s and dk_s
    # for the other outputs (doubling the gradients' memory).
    ctx.set_materialize_grads(False)


def qk_align_backward_with(rescale):
    """The autograd backward of a backend's qk_align op, given its in-place rescaling op
    ``rescale(grad, x_s | None, weight, alpha, beta)`` (grad = alpha_i grad + beta_i w_n x_s, in place)."""

    def backward(ctx, grad_loss, *unused_grads):
        alpha, beta, grad_q, grad_k, dw_q, dw_k, *students = ctx.saved_tensors
        scale = grad_loss.float()
        alpha, beta = alpha * scale, beta * scale
        hs = grad_q.shape[2]
        weight = None
        if ctx.student:
            token_weight, valid = students[2:]
            batch, seq = grad_q.shape[:2]
            weight = reference.token_weights(valid, token_weight, batch, seq, grad_q.device).contiguous()
        grads = []
        # In place, so that no second gradient-sized tensor exists (the spec's memory contract; fp16 inputs, whose G
        # is fp32, get one conversion after the scaling). A second backward through the same graph
        # (retain_graph=True) then fails autograd's saved-tensor version check instead of scaling twice.
        for grad, x_s, a, b, dtype in ((grad_q, students[0] if students else None, alpha[:hs], beta[:hs],
                                        ctx.dtypes[0]),
                                       (grad_k, students[1] if students else None, alpha[hs:], beta[hs:],
                                        ctx.dtypes[1])):
            if grad.numel():
                rescale(grad, x_s, weight, a, b)
            grads.append(grad.to(dtype))
        return (grads[0], grads[1], None, None, dw_q * scale, dw_k * scale, None, None, None, None, None, None, None,
                None)

    return backward


@torch.library.custom_op("laid_kernels::qk_rescale_triton", mutates_args=("grad",))
def qk_rescale_triton(grad: torch.Tensor, x_s: torch.Tensor | None, weight: torch.Tensor | None,
                      alpha: torch.Tensor, beta: torch.Tensor) -> None:
    """grad [B, N, H, D] = alpha_i grad + beta_i w_n x_s (x_s None: alpha_i grad) in place, by the Triton kernel."""
    if weight is None:
        weight = alpha  # never read (HAS_X False)
    qk_rescale_launch(grad, x_s, weight, alpha.contiguous(), beta.contiguous(), "qk_align/rescale").run()


@qk_rescale_triton.register_fake
def _qk_rescale_fake(grad, x_s, weight, alpha, beta):
    return None


qk_align_triton.register_autograd(qk_align_backward_with(qk_rescale_triton), setup_context=qk_align_setup_context)


def _qk_align_loss_triton(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, *, token_weight=None,
                          valid=None, normalize="student", rope=True):
    return qk_align_triton(q_s, k_s, q_t.detach(), k_t.detach(), w_q, w_k, positions, inv_freq, list(section),
                           token_weight, valid, normalize, rope, wants_grads(q_s, k_s, w_q, w_k))[0]


def aot_launches(heads: Sequence[int] = (28, 4, 40, 8), tokens: int = 512, head_dim: int = 128,
                 section: Sequence[int] = (16, 24, 24), dtype: str = "bfloat16", token_weight: bool = True,
                 mixing: str = "head", grads: bool = True) -> list[Launch]:
    """The launches qk_align_loss makes for student heads (Hs, Hs_kv) = heads[:2] against teacher heads
    (Ht, Ht_kv) = heads[2:], on meta tensors laid out as q_proj / k_proj outputs, with a valid mask and (unless
    token_weight is False, as in the trainer) token weights, head or frequency ``mixing``: the fused pass of both
    parts, then (if ``grads``; else the pass without gradients, as under torch.no_grad) the backward's rescaling of
    both parts for normalize="student"; for ahead-of-time compilation (``laid_kernels.aot``)."""
    hs, hs_kv, ht, ht_kv = heads
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    positions = torch.empty(3, 1, tokens, dtype=torch.int64, device="meta")
    inv_freq = torch.empty(head_dim // 2, dtype=torch.float32, device="meta")
    weight = torch.empty(1, tokens, device="meta")
    valid = torch.empty(1, tokens, dtype=torch.bool, device="meta")
    launches, rescales = [], []
    for h_s, h_t, name in ((hs, ht, "qk_align/query"), (hs_kv, ht_kv, "qk_align/key")):
        x_s = torch.empty(1, tokens, h_s * head_dim, **meta).view(1, tokens, h_s, head_dim)
        x_t = torch.empty(1, tokens, h_t * head_dim, **meta).view(1, tokens, h_t, head_dim)
        w = torch.empty(h_s, h_t, *((head_dim // 2, 2) if mixing == "frequency" else ()), device="meta")
        grad, dw, sums = _outputs(x_s, w, grads)
        label = f"{name}/{mixing}/Hs={h_s},Ht={h_t}" + ("" if grads else "/no grad")
        launches.append(qk_align_launch(x_s, x_t, w, positions, inv_freq, section, weight if token_weight else None,
                                        valid, True, grad, dw, sums, label))
        if grads:
            alpha = torch.empty(h_s, device="meta")
            rescales.append(qk_rescale_launch(grad, x_s, weight, alpha, alpha.clone(), f"qk_align/rescale/Hs={h_s}"))
    return launches + rescales


def aot_configurations(shapes: dict) -> dict[str, dict]:
    """The keyword arguments of :func:`aot_launches` that cover every specialisation qk_align_loss launches, by
    label, for ``shapes`` (heads, tokens, head_dim, section, dtype): those shapes with token weights in head and
    frequency mixing, and the trainer's flags (about 54K tokens, a valid mask, no token weights) in both mixings for
    bf16, fp16 and fp32 inputs, and frequency mixing without gradients (torch.no_grad)."""
    trainer = {**shapes, "tokens": 54_000, "token_weight": False}
    return {"": shapes, "frequency": {**shapes, "mixing": "frequency"},
            **{f"trainer {mixing} {dtype}": {**trainer, "mixing": mixing, "dtype": dtype}
               for mixing in ("head", "frequency") for dtype in ("bfloat16", "float16", "float32")},
            "trainer frequency no grad": {**trainer, "mixing": "frequency", "grads": False}}


backends.register(OP, "reference", reference.qk_align_loss)
backends.register(OP, "triton", _qk_align_loss_triton)
