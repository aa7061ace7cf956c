"""``qk_align_loss``: L_qk, head-level Q/K alignment of a student to mixed teacher heads (shared/laid-spec.md).

Fused Triton implementation: the query part (q_s, q_t, w_q) and the key part (k_s, k_t, w_k) have the same
structure, x_s [B, N, Hs, D] against W [Hs, Ht] times x_t [B, N, Ht, D], and are two launches of one kernel. A
persistent grid of :func:`num_programs` programs (a function of the token count only, never of the device, so the
result is bit-reproducible) strides over the tokens. Per token it loads the first-half and second-half channel
blocks of both sides through their strides, rotates them in registers (angles from positions and inv_freq), forms
the target W @ (R x_t) with ``tl.dot`` (heads padded to a power of two >= 16, masked), and accumulates the weighted
squared error, the target norm S and the token weight, plus the partial gradient of W [Hs, Ht] per program. In the
same pass it writes the unscaled gradient with respect to x_s, R^T (2 w (R x_s - target)), in the input dtype. No
rotated or mixed [B, N, H, D] tensor exists. Padding tokens (weight 0) are not read; their gradient is written as 0.

The loss is numerator / denominator, and the denominator (S for ``normalize="target"``) is only known after the pass
while grad_output is only known in backward, so backward scales the saved gradients in place by grad_output /
denominator: one extra read and write of dq_s and dk_s (counted separately in benchmarks/compile_report.py). The saved gradient
is therefore rounded to the input dtype twice (at most about 1.5 ulp instead of 0.5 for bf16 / fp16 inputs; the tests'
3x rule covers it), and for fp16 inputs the unscaled gradient 2 w (R x_s - target) overflows beyond 65504 (inputs
of about 1e4). The per-program partial sums are reduced on the host by ``torch.sum`` over a fixed-size dimension
(deterministic).

Registered as the custom op ``laid_kernels::qk_align_triton`` (fake implementation and autograd included), so
torch.compile can trace a training step through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference
from .aot import Launch
from .rope_triton import load_positions, mrope_cos_sin, rotate_pair, unrotate_pair
from .triton_support import tl, triton
from .validation import check_qk_align_args

OP = "qk_align_loss"


def qk_align_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                  w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                  *, token_weight: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                  normalize: str = "target", rope: bool = True, backend: str = "auto") -> torch.Tensor:
    """L_qk of the spec, an fp32 scalar; differentiable with respect to q_s, k_s, w_q and w_k.

    Args:
        q_s: [B, N, Hs, D] student queries before RoPE (q_proj output), fp32 / bf16 / fp16.
        k_s: [B, N, Hs_kv, D] student keys before RoPE.
        q_t: [B, N, Ht, D] teacher queries (a constant: no gradient).
        k_t: [B, N, Ht_kv, D] teacher keys (a constant: no gradient).
        w_q: [Hs, Ht] query head mixing; w_k: [Hs_kv, Ht_kv] key head mixing.
        positions: [3, B, N] or [B, N] int M-RoPE positions; inv_freq: [D/2]; mrope_section: (s0, s1, s2).
        token_weight: optional [B, N] float per-token weight w_n (default 1).
        valid: optional [B, N] bool attention mask; padding contributes nothing.
        normalize: "target" (relative error: divided by the stop-gradient squared norm of the mixed teacher
            targets) or "none" (weighted mean over elements).
        rope: rotate both sides by M-RoPE first (the paper's equation; equal to rope=False up to rounding).
        backend: "auto", "triton", "cpu" or "reference" (see ``laid_kernels.backends``).

    Returns:
        A 0-dim fp32 tensor.

    Example:
        >>> loss = qk_align_loss(q_s, k_s, q_t, k_t, mixer.w_q, mixer.w_k, position_ids, inv_freq, (16, 24, 24),
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
MIN_TOKENS_PER_PROGRAM = 32  # keeps the [programs, Hs, Ht] partial-dW traffic below ~1% of the input traffic
MAX_PROGRAMS = 1024
N_SUMS = 3  # per-program partial sums: weighted squared error, weighted target norm, token weight


@triton.jit
def qk_align_kernel(xs_ptr, xt_ptr, w_ptr, pos_ptr, inv_freq_ptr, tw_ptr, valid_ptr, grad_ptr, dw_ptr, sums_ptr,
                    n_tokens, seq, hs, ht,
                    stride_sb, stride_sn, stride_sh, stride_sd, stride_tb, stride_tn, stride_th, stride_td,
                    stride_wi, stride_wj, stride_pr, stride_pb, stride_pn, stride_twb, stride_twn, stride_vb,
                    stride_vn,
                    SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, HALF: tl.constexpr, BLOCK_F: tl.constexpr,
                    HS_PAD: tl.constexpr, HT_PAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_VALID: tl.constexpr,
                    ROPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One part of L_qk for the tokens pid, pid + P, ... (P programs), BLOCK_F channel pairs at a time.

    xs: [B, N, hs, 2 * HALF] student, xt: [B, N, ht, 2 * HALF] teacher, w: [hs, ht], pos: [3, B, N], all strided;
    tw / valid: optional [B, N] token weight / mask. Writes grad: contiguous [B, N, hs, 2 * HALF] (unscaled
    gradient of the weighted squared error), dw: [P, hs, ht] partial gradient of W, sums: [P, 3] (weighted squared
    error, weighted target norm, token weight). The channel-block loop is outside the token loop so that each
    iteration holds only [H_PAD, BLOCK_F] tiles (no register spills) while inv_freq is read once per block.
    """
    pid = tl.program_id(0)
    i = tl.arange(0, HS_PAD)[:, None]
    j = tl.arange(0, HT_PAD)[:, None]
    j_col = tl.arange(0, HT_PAD)[None, :]
    w_mask = (i < hs) & (j_col < ht)
    w = tl.load(w_ptr + i * stride_wi + j_col * stride_wj, mask=w_mask, other=0).to(tl.float32)

    dw = tl.zeros((HS_PAD, HT_PAD), dtype=tl.float32)
    squared_error = 0.0
    target_norm = 0.0
    weight_sum = 0.0
    s_heads = i * stride_sh
    t_heads = j * stride_th
    g_heads = i * 2 * HALF
    for f0 in range(0, HALF, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)[None, :]
        inv_freq = tl.load(inv_freq_ptr + f, mask=f < HALF, other=0).to(tl.float32)
        s_lo_off, s_hi_off = s_heads + f * stride_sd, s_heads + (f + HALF) * stride_sd
        t_lo_off, t_hi_off = t_heads + f * stride_td, t_heads + (f + HALF) * stride_td
        g_mask = (i < hs) & (f < HALF)
        for token in range(pid, n_tokens, tl.num_programs(0)):
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
                p_t, p_h, p_w = load_positions(pos_ptr + b * stride_pb, stride_pr, n * stride_pn, weight != 0.0)
                cos, sin = mrope_cos_sin(p_t, p_h, p_w, inv_freq, f, SECTION_T, SECTION_TH)
                s_lo, s_hi = rotate_pair(s_lo, s_hi, cos, sin)
                t_lo, t_hi = rotate_pair(t_lo, t_hi, cos, sin)

            target_lo = tl.dot(w, t_lo, input_precision=INPUT_PRECISION)
            target_hi = tl.dot(w, t_hi, input_precision=INPUT_PRECISION)
            diff_lo = s_lo - target_lo
            diff_hi = s_hi - target_hi
            squared_error += weight * (tl.sum(diff_lo * diff_lo) + tl.sum(diff_hi * diff_hi))
            target_norm += weight * (tl.sum(target_lo * target_lo) + tl.sum(target_hi * target_hi))
            weight_sum += tl.where(f0 == 0, weight, 0.0)

            grad_lo = (2.0 * weight) * diff_lo
            grad_hi = (2.0 * weight) * diff_hi
            dw -= tl.dot(grad_lo, tl.trans(t_lo), input_precision=INPUT_PRECISION)
            dw -= tl.dot(grad_hi, tl.trans(t_hi), input_precision=INPUT_PRECISION)
            if ROPE:
                grad_lo, grad_hi = unrotate_pair(grad_lo, grad_hi, cos, sin)
            g_token = grad_ptr + token64 * hs * 2 * HALF + g_heads
            tl.store(g_token + f, grad_lo.to(grad_ptr.dtype.element_ty), mask=g_mask)
            tl.store(g_token + f + HALF, grad_hi.to(grad_ptr.dtype.element_ty), mask=g_mask)

    tl.store(dw_ptr + pid * hs * ht + i * ht + j_col, dw, mask=w_mask)
    tl.store(sums_ptr + pid * 3, squared_error)
    tl.store(sums_ptr + pid * 3 + 1, target_norm)
    tl.store(sums_ptr + pid * 3 + 2, weight_sum)


def num_programs(n_tokens: int) -> int:
    """Size of the persistent grid for ``n_tokens`` = B * N tokens (device-independent, for bit-reproducibility)."""
    return max(1, min(MAX_PROGRAMS, triton.cdiv(n_tokens, MIN_TOKENS_PER_PROGRAM)))


def _pad_heads(heads: int) -> int:
    return max(16, triton.next_power_of_2(heads))


def qk_align_launch(x_s: torch.Tensor, x_t: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, section: Sequence[int], weight: torch.Tensor | None,
                    valid: torch.Tensor | None, rope: bool, grad: torch.Tensor, dw: torch.Tensor,
                    sums: torch.Tensor, name: str, block_f: int | None = None) -> Launch:
    """The launch of one part (queries or keys) of L_qk. Works on meta tensors (for ahead-of-time compilation).

    x_s [B, N, Hs, D], x_t [B, N, Ht, D], w [Hs, Ht], positions [3, B, N], inv_freq [D/2], weight / valid
    [B, N] or None. Outputs: grad contiguous [B, N, Hs, D] (x_s's dtype), dw [P, Hs, Ht] fp32, sums [P, 3] fp32,
    P = ``num_programs(B * N)``. block_f: channel pairs per iteration (default: BLOCK_F on a GPU or meta tensors,
    INTERPRETER_BLOCK_F on CPU tensors).
    """
    batch, seq, hs, dim = x_s.shape
    ht = x_t.shape[2]
    half = dim // 2
    hs_pad, ht_pad = _pad_heads(hs), _pad_heads(ht)
    if block_f is None:
        block_f = INTERPRETER_BLOCK_F if x_s.device.type == "cpu" else BLOCK_F
    block_f = min(block_f, max(16, triton.next_power_of_2(half)))
    dummy = positions  # stands in for an absent optional tensor (never read: HAS_WEIGHT / HAS_VALID are False)
    return Launch(
        name=name, kernel=qk_align_kernel, grid=(num_programs(batch * seq),),
        args=(x_s, x_t, w, positions, inv_freq, dummy if weight is None else weight,
              dummy if valid is None else valid, grad, dw, sums, batch * seq, seq, hs, ht, *x_s.stride(),
              *x_t.stride(), *w.stride(), *positions.stride(), *(weight.stride() if weight is not None else (0, 0)),
              *(valid.stride() if valid is not None else (0, 0))),
        constexprs=dict(SECTION_T=section[0], SECTION_TH=section[0] + section[1], HALF=half,
                        BLOCK_F=block_f, HS_PAD=hs_pad, HT_PAD=ht_pad,
                        HAS_WEIGHT=weight is not None, HAS_VALID=valid is not None, ROPE=rope,
                        INPUT_PRECISION=INPUT_PRECISION),
        num_warps=NUM_WARPS)


def _outputs(x_s: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (grad [B, N, Hs, D] in x_s's dtype, dw partials [P, Hs, Ht] fp32, sums [P, 3] fp32) for one part."""
    programs = num_programs(x_s.shape[0] * x_s.shape[1])
    return (torch.empty(x_s.shape, dtype=x_s.dtype, device=x_s.device),
            torch.empty((programs, *w.shape), dtype=torch.float32, device=x_s.device),
            torch.empty((programs, N_SUMS), dtype=torch.float32, device=x_s.device))


@torch.library.custom_op("laid_kernels::qk_align_triton", mutates_args=())
def qk_align_triton(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                    w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                    token_weight: torch.Tensor | None, valid: torch.Tensor | None, normalize: str,
                    rope: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """(loss, 1 / denominator, grad_q_s, grad_k_s, grad_w_q, grad_w_k) by the fused kernel; the four gradients are
    those of the numerator (d loss = grad * grad_output / denominator). Shapes as in :func:`qk_align_loss`."""
    parts = []
    for x_s, x_t, w, name in ((q_s, q_t, w_q, "qk_align/query"), (k_s, k_t, w_k, "qk_align/key")):
        grad, dw, sums = _outputs(x_s, w)
        if x_s.numel():
            qk_align_launch(x_s, x_t, w, positions, inv_freq, section, token_weight, valid, rope, grad, dw, sums,
                            name).run()
        else:
            dw.zero_(), sums.zero_()
        parts.append((grad, dw.sum(0).to(w.dtype), sums.double().sum(0)))
    (grad_q, dw_q, sums_q), (grad_k, dw_k, sums_k) = parts
    loss, inv_denominator = finish_loss(sums_q[0] + sums_k[0], sums_q[1] + sums_k[1], sums_q[2], q_s, k_s,
                                        normalize)
    return (loss, inv_denominator, grad_q, grad_k, dw_q, dw_k)


def finish_loss(numerator: torch.Tensor, target_norm: torch.Tensor, weight_sum: torch.Tensor, q_s: torch.Tensor,
                k_s: torch.Tensor, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, 1 / denominator), both 0-dim fp32, from the fused pass's sums (0-dim, any float dtype): the
    denominator is S = target_norm for normalize="target", else weight_sum * (Hs + Hs_kv) * D, clamped at fp32 tiny
    exactly as the reference does."""
    if normalize == "target":
        denominator = target_norm
    else:
        denominator = weight_sum * (q_s.shape[2] + k_s.shape[2]) * q_s.shape[3]
    inv_denominator = (1.0 / denominator.clamp_min(torch.finfo(torch.float32).tiny)).float()
    return numerator.float() * inv_denominator, inv_denominator


@qk_align_triton.register_fake
def qk_align_fake(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, token_weight, valid,
                          normalize, rope):
    scalar = q_s.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(), torch.empty(q_s.shape, dtype=q_s.dtype, device=q_s.device),
            torch.empty(k_s.shape, dtype=k_s.dtype, device=k_s.device), torch.empty_like(w_q),
            torch.empty_like(w_k))


def qk_align_setup_context(ctx, inputs, output):
    """Autograd context of every backend's qk_align custom op: saves 1 / denominator and the four gradients."""
    ctx.save_for_backward(*output[1:])
    # Only the loss receives a gradient: without this, autograd would pass zero tensors the size of dq_s and dk_s
    # for the other outputs (doubling the gradients' memory).
    ctx.set_materialize_grads(False)


def qk_align_backward(ctx, grad_loss, *unused_grads):
    inv_denominator, grad_q, grad_k, dw_q, dw_k = ctx.saved_tensors
    scale = grad_loss.float() * inv_denominator
    # In place, so that no second gradient-sized tensor exists (the spec's memory contract). A second backward
    # through the same graph (retain_graph=True) then fails autograd's saved-tensor version check instead of
    # scaling twice. A 0-dim fp32 factor multiplies in fp32 and rounds once to the gradient's dtype.
    return (grad_q.mul_(scale), grad_k.mul_(scale), None, None,
            dw_q * scale, dw_k * scale, None, None, None, None, None, None, None)


qk_align_triton.register_autograd(qk_align_backward, setup_context=qk_align_setup_context)


def _qk_align_loss_triton(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, *, token_weight=None,
                          valid=None, normalize="target", rope=True):
    return qk_align_triton(q_s, k_s, q_t.detach(), k_t.detach(), w_q, w_k, positions, inv_freq, list(section),
                           token_weight, valid, normalize, rope)[0]


def aot_launches(heads: Sequence[int] = (28, 4, 40, 8), tokens: int = 512, head_dim: int = 128,
                 section: Sequence[int] = (16, 24, 24), dtype: str = "bfloat16") -> list[Launch]:
    """The two launches qk_align_loss makes for student heads (Hs, Hs_kv) = heads[:2] against teacher heads
    (Ht, Ht_kv) = heads[2:], on meta tensors laid out as q_proj / k_proj outputs, with a valid mask and token
    weights; for ahead-of-time compilation (``laid_kernels.aot``)."""
    hs, hs_kv, ht, ht_kv = heads
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    positions = torch.empty(3, 1, tokens, dtype=torch.int64, device="meta")
    inv_freq = torch.empty(head_dim // 2, dtype=torch.float32, device="meta")
    weight = torch.empty(1, tokens, device="meta")
    valid = torch.empty(1, tokens, dtype=torch.bool, device="meta")
    launches = []
    for h_s, h_t, name in ((hs, ht, "qk_align/query"), (hs_kv, ht_kv, "qk_align/key")):
        x_s = torch.empty(1, tokens, h_s * head_dim, **meta).view(1, tokens, h_s, head_dim)
        x_t = torch.empty(1, tokens, h_t * head_dim, **meta).view(1, tokens, h_t, head_dim)
        w = torch.empty(h_s, h_t, device="meta")
        grad, dw, sums = _outputs(x_s, w)
        launches.append(qk_align_launch(x_s, x_t, w, positions, inv_freq, section, weight, valid, True, grad, dw,
                                        sums, f"{name}/Hs={h_s},Ht={h_t}"))
    return launches


backends.register(OP, "reference", reference.qk_align_loss)
backends.register(OP, "triton", _qk_align_loss_triton)
