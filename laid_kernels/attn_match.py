"""``attn_match_loss``: L_attn, progressive distance-weighted attention matching (shared/laid-spec.md, L_attn).

For the selected query rows only (a few hundred of a 54K-token prompt), the student's attention row p_s and the
teacher's row re-weighted toward distant keys, phat_t ∝ omega_p(d) softmax(s_t), are compared by KL(phat_t || p_s),
without ever materialising a [rows, N] logits tensor:

- Forward: stream key blocks with an online log-sum-exp for the student row (lse_s) and for the distance-weighted
  teacher row (lse_t = max_t + log l_t), and accumulate acc = sum_n e^(shat_t - max_t) (shat_t - s_s); then
  KL = acc / l_t - (max_t - max_s) + log l_s - log l_t (no cancellation of large lse values: exactly 0 for a row with
  one key). Only the per-(row, head) lse_s and lse_t are saved.
- Backward: recompute each key block; dL/ds_s(m, n) = (p_s - phat_t) / (rows * Hs) gives dq_s for the query rows
  and dk_s for every key.

Host preparation shared by both fused backends: the selected rows (query_mask & valid, sample-major, ascending m)
have their student queries rotated and their teacher queries mixed (w_q) and rotated, fp32 [R, Hs, D] each
(small: R is the number of rows); this reuses ``reference.mrope_cos_sin`` / ``reference.rotate``.

Backends (registered with ``laid_kernels.backends``):

- ``"triton"``: three kernels; every key block is loaded once per program and rotated (student) or mixed by w_k
  and rotated (teacher) in registers, so nothing of size N is allocated. ``_fwd_kernel`` and ``_dq_kernel`` run one
  program per (block of row-head lanes, student kv head, sample) and stream the sample's causal keys;
  ``_dk_kernel`` runs one program per (key block, kv head, sample) and streams the sample's rows.
- ``"cpu"``: the same algorithm in PyTorch over key blocks sized so one block's logits stay about 4 MB, with
  student and teacher keys mixed and rotated per block and query rows prepared 32 at a time (nothing of size
  N x heads x D is allocated beyond the returned gradients; rows that end before a key block skip it).

Precision: everything is computed in fp32 from inputs of any float dtype. On the GPU the kernels' ``tl.dot`` runs
with TF32 operands (``TRITON_PRECISION``; 10-bit mantissas, finer than bf16 inputs, relative logit error about 1e-3
for fp32 inputs): "tf32x3" (fp32-level) spills registers at every tile size tried. The interpreter is exact.

Both are ``torch.library`` custom ops (forward and backward each) with fake implementations and autograd.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from . import backends, reference
from .aot import Launch
from .rope_triton import load_positions, mrope_cos_sin, rotate_pair, unrotate_pair
from .triton_support import tl, triton
from .validation import check_attn_match_args

OP = "attn_match_loss"

# Key blocks of the CPU path: about CPU_BLOCK_ELEMENTS fp32 logits (4 MiB per [Hs, rows, block] tensor), but at least
# CPU_MIN_BLOCK keys (elementwise ops pay per row of a block: 64-key blocks ran 3x slower than 110-key ones).
CPU_BLOCK_ELEMENTS = 1 << 20
CPU_MIN_BLOCK = 128
# Query rows prepared at a time by the CPU path (bounds the temporaries of rotating and mixing them).
CPU_ROW_CHUNK = 32
# Finite "minus infinity" that starts each running maximum: exp(-inf - MAX_INIT) = 0 and never inf - inf = NaN.
MAX_INIT = -1.0e30


def attn_match_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                    w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                    query_mask: torch.Tensor, *, progress: float, alpha: float = 1.0,
                    valid: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """L_attn of the spec, an fp32 scalar; differentiable with respect to q_s and k_s only.

    For each selected valid query row m, student head i and causal valid key n <= m of the same sample (d = m - n):
    KL(phat_t || p_s) with p_s = softmax_n s_s and phat_t ∝ (1 + log2(1 + d)) ** (alpha * progress) * softmax_n s_t,
    averaged over (sample, row, head). See ``reference.attn_match_loss`` for the formulas.

    Args:
        q_s: [B, N, Hs, D] student queries before RoPE (q_proj output), fp32 / bf16 / fp16, any strides.
        k_s: [B, N, Hs_kv, D] student keys before RoPE; Hs must be a multiple of Hs_kv (GQA: head i reads kv head
            i // (Hs / Hs_kv)).
        q_t: [B, N, Ht, D] teacher queries; k_t: [B, N, Ht_kv, D] teacher keys (targets: no gradient).
        w_q: [Hs, Ht] query head mixing; w_k: [Hs_kv, Ht_kv] key head mixing (targets here: no gradient).
        positions: [3, B, N] or [B, N] int M-RoPE positions; inv_freq: [D/2]; mrope_section: (s0, s1, s2).
        query_mask: [B, N] bool, the query rows. Selected rows that are padding (valid False) are ignored; a mask
            that leaves no row raises ValueError.
        progress: training progress p in [0, 1]; alpha: distance exponent scale >= 0. At alpha * p = 0 the target
            is the teacher's plain attention row.
        valid: optional [B, N] bool attention mask (padding is never a key nor a row).
        backend: "auto", "triton", "cpu" or "reference" (see ``laid_kernels.backends``).

    Returns:
        A 0-dim fp32 tensor.

    Example:
        >>> loss = attn_match_loss(q_s, k_s, q_t, k_t, mixer.w_q, mixer.w_k, position_ids, inv_freq, (16, 24, 24),
        ...                        text_rows, progress=step / total_steps, valid=attention_mask.bool())
        >>> loss.backward()
    """
    positions, section, _ = check_attn_match_args(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, mrope_section,
                                                  query_mask, valid, progress, alpha)
    implementation = backends.resolve(OP, backend, q_s.device)
    return implementation(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, query_mask,
                          progress=progress, alpha=alpha, valid=valid)


# ----------------------------------------------------------------------------------------------------------------
# Host preparation shared by the fused backends


def _row_angles(positions: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int], row_index: torch.Tensor,
                seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [R, 1, D/2] of the rows at flat token indices row_index [R] (b * N + m)."""
    return reference.mrope_cos_sin(positions[:, row_index // seq, row_index % seq].unsqueeze(2), inv_freq, section)


def _query_rows(q_s: torch.Tensor, q_t: torch.Tensor, w_q: torch.Tensor, positions: torch.Tensor,
                inv_freq: torch.Tensor, section: Sequence[int],
                row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' rotated student queries and mixed rotated teacher queries, fp32 [R, Hs, D] each.

    row_index: [R] flat token indices b * N + m.
    """
    seq = q_s.shape[1]
    row_b, row_m = row_index // seq, row_index % seq
    cos, sin = _row_angles(positions, inv_freq, section, row_index, seq)
    student = reference.rotate(q_s[row_b, row_m].float().unsqueeze(1), cos, sin).squeeze(1)
    teacher = reference.rotate(q_t[row_b, row_m].float().unsqueeze(1), cos, sin).squeeze(1)
    return student, torch.einsum("ij,rjd->rid", w_q.float(), teacher)


def _write_row_grads(dq_s: torch.Tensor, d_rows: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     section: Sequence[int], row_index: torch.Tensor) -> None:
    """dq_s[b, m] = R^T d_rows (q_s's dtype) at the rows row_index [R], from the gradient [R, Hs, D] of the rotated
    rows (R^T is the rotation by the opposite angle)."""
    seq = dq_s.shape[1]
    cos, sin = _row_angles(positions, inv_freq, section, row_index, seq)
    d_rows = reference.rotate(d_rows.unsqueeze(1), cos, -sin).squeeze(1)
    dq_s[row_index // seq, row_index % seq] = d_rows.to(dq_s.dtype)


def _sample_rows(row_index: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """[B + 1] int64 offsets: the rows of sample b are row_index[offsets[b]:offsets[b + 1]]."""
    counts = torch.bincount(row_index // seq, minlength=batch)
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0))


# ----------------------------------------------------------------------------------------------------------------
# CPU: blockwise PyTorch


def _cpu_key_blocks(k_s: torch.Tensor, k_t: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, section: Sequence[int], b: int, n_end: int,
                    block: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Key blocks [n0, n0 + block) of sample b up to n_end: (n0, student keys, teacher keys, cos, sin).

    Keys are rotated (student) or mixed by w_k and rotated (teacher), fp32 [Hs_kv, block, D]; cos / sin are the
    block's [1, block, D/2] (for the gradient).
    """
    for n0 in range(0, n_end, block):
        n1 = min(n0 + block, n_end)
        cos, sin = reference.mrope_cos_sin(positions[:, b:b + 1, n0:n1], inv_freq, section)
        student = reference.rotate(k_s[b:b + 1, n0:n1].float(), cos, sin)
        teacher = torch.einsum("hj,bnjd->bnhd", w_k.float(), k_t[b:b + 1, n0:n1].float())
        teacher = reference.rotate(teacher, cos, sin)
        yield n0, student[0].transpose(0, 1), teacher[0].transpose(0, 1), cos, sin


def _cpu_block_logits(qs: torch.Tensor, qt: torch.Tensor, ks: torch.Tensor, kt: torch.Tensor, m: torch.Tensor,
                      n0: int, key_valid: torch.Tensor, coef: float,
                      group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits s_s and distance-weighted teacher logits shat_t [Hs_kv, R, G, K], -inf where not allowed.

    qs, qt: [Hs_kv, R * G, D] query lanes (row r, head h * G + g at lane r * G + g of batch h); ks, kt:
    [Hs_kv, K, D] keys n0 + [0, K); m: [R] row positions; key_valid: [N] of this sample. Also returns allowed
    [R, K] (causal and valid).
    """
    hs_kv, lanes, dim = qs.shape
    keys = ks.shape[1]
    n = torch.arange(n0, n0 + keys, device=m.device)
    distance = m[:, None] - n[None, :]  # [R, K]
    allowed = (distance >= 0) & key_valid[n0:n0 + keys][None, :]
    scale = 1.0 / math.sqrt(dim)
    blocked = ~allowed[:, None, :]
    s_s = torch.bmm(qs, ks.transpose(1, 2)).view(hs_kv, lanes // group, group, keys).mul_(scale)
    s_t = torch.bmm(qt, kt.transpose(1, 2)).view(hs_kv, lanes // group, group, keys).mul_(scale)
    s_t.add_(reference.distance_log_weight(distance.clamp_min(0), coef, 1.0)[:, None, :])
    return s_s.masked_fill_(blocked, float("-inf")), s_t.masked_fill_(blocked, float("-inf")), allowed


def _cpu_lanes(rows: torch.Tensor, hs_kv: int) -> torch.Tensor:
    """[R, Hs, X] -> the lane layout [Hs_kv, R * G, X] of :func:`_cpu_block_logits`."""
    r, hs, x = rows.shape
    return rows.view(r, hs_kv, hs // hs_kv, x).transpose(0, 1).reshape(hs_kv, -1, x)


def _cpu_unlanes(lanes: torch.Tensor, rows: int) -> torch.Tensor:
    """[Hs_kv, R * G, X] -> [R, Hs, X] (inverse of :func:`_cpu_lanes`)."""
    hs_kv, _, x = lanes.shape
    return lanes.view(hs_kv, rows, -1, x).transpose(0, 1).reshape(rows, -1, x)


def _cpu_query_lanes(q_s: torch.Tensor, q_t: torch.Tensor, w_q: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, section: Sequence[int], row_index: torch.Tensor,
                     hs_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_query_rows` of one sample's rows in the lane layout [Hs_kv, R * G, D], built CPU_ROW_CHUNK rows at a
    time (no [R, Hs, D] copy)."""
    rows, (hs, dim) = row_index.numel(), q_s.shape[2:]
    student = q_s.new_empty((hs_kv, rows, hs // hs_kv, dim), dtype=torch.float32)
    teacher = torch.empty_like(student)
    for r0 in range(0, rows, CPU_ROW_CHUNK):
        chunk = row_index[r0:r0 + CPU_ROW_CHUNK]
        for out, x in zip((student, teacher), _query_rows(q_s, q_t, w_q, positions, inv_freq, section, chunk)):
            out[:, r0:r0 + chunk.numel()] = x.view(chunk.numel(), hs_kv, -1, dim).transpose(0, 1)
    return student.view(hs_kv, -1, dim), teacher.view(hs_kv, -1, dim)


def _cpu_samples(row_index: torch.Tensor, batch: int, seq: int, hs: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Per sample with rows: (b, first row, end row, n_end = last row's m + 1, key block size)."""
    offsets = _sample_rows(row_index, batch, seq).tolist()
    for b in range(batch):
        lo, hi = offsets[b], offsets[b + 1]
        if hi > lo:
            n_end = int(row_index[hi - 1]) - b * seq + 1
            block = min(n_end, max(CPU_MIN_BLOCK, CPU_BLOCK_ELEMENTS // (hs * (hi - lo))))
            yield b, lo, hi, n_end, block


@torch.no_grad()
def _cpu_forward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress, alpha):
    batch, seq, hs, _ = q_s.shape
    hs_kv = k_s.shape[2]
    group = hs // hs_kv
    lse_s = q_s.new_empty((row_index.numel(), hs), dtype=torch.float32)
    lse_t = torch.empty_like(lse_s)
    total = lse_s.new_zeros((), dtype=torch.float64)
    for b, lo, hi, n_end, block in _cpu_samples(row_index, batch, seq, hs):
        m = row_index[lo:hi] - b * seq
        m_list = m.tolist()
        qs, qt = _cpu_query_lanes(q_s, q_t, w_q, positions, inv_freq, section, row_index[lo:hi], hs_kv)
        # per (kv head, row, head in group): running max / sum of the student and teacher rows, and acc
        max_s, sum_s = qs.new_full((hs_kv, hi - lo, group), MAX_INIT), qs.new_zeros((hs_kv, hi - lo, group))
        max_t, sum_t = torch.full_like(max_s, MAX_INIT), torch.zeros_like(sum_s)
        acc = torch.zeros_like(sum_s)
        for n0, ks, kt, _, _ in _cpu_key_blocks(k_s, k_t, w_k, positions, inv_freq, section, b, n_end, block):
            r0 = bisect.bisect_left(m_list, n0)  # rows before r0 end before this block (rows ascend in m)
            s_s, s_t, allowed = _cpu_block_logits(qs[:, r0 * group:], qt[:, r0 * group:], ks, kt, m[r0:], n0,
                                                  key_valid[b], alpha * progress, group)
            old_s, old_t = max_s[:, r0:], max_t[:, r0:]
            new_s, new_t = torch.maximum(old_s, s_s.amax(-1)), torch.maximum(old_t, s_t.amax(-1))
            sum_s[:, r0:] = sum_s[:, r0:] * (old_s - new_s).exp() + (s_s - new_s[..., None]).exp_().sum(-1)
            diff = torch.sub(s_t, s_s).masked_fill_(~allowed[:, None, :], 0.0)  # shat_t - s_s, 0 where blocked
            e_t = s_t.sub_(new_t[..., None]).exp_()  # s_t is not needed after this
            rescale = (old_t - new_t).exp()
            sum_t[:, r0:] = sum_t[:, r0:] * rescale + e_t.sum(-1)
            acc[:, r0:] = acc[:, r0:] * rescale + diff.mul_(e_t).sum(-1)
            max_s[:, r0:], max_t[:, r0:] = new_s, new_t
        lse_s[lo:hi] = _cpu_unlanes((max_s + sum_s.log()).reshape(hs_kv, -1, 1), hi - lo)[..., 0]
        lse_t[lo:hi] = _cpu_unlanes((max_t + sum_t.log()).reshape(hs_kv, -1, 1), hi - lo)[..., 0]
        total += (acc / sum_t - (max_t - max_s) + (sum_s.log() - sum_t.log())).double().sum()
    return (total / (row_index.numel() * hs)).float(), lse_s, lse_t


@torch.no_grad()
def _cpu_backward(grad, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, lse_s,
                  lse_t, progress, alpha):
    batch, seq, hs, dim = q_s.shape
    hs_kv = k_s.shape[2]
    group = hs // hs_kv
    dq_s = torch.zeros(q_s.shape, dtype=q_s.dtype, device=q_s.device)
    dk_s = torch.zeros(k_s.shape, dtype=k_s.dtype, device=k_s.device)
    scale = grad.float() / (row_index.numel() * hs * math.sqrt(dim))
    for b, lo, hi, n_end, block in _cpu_samples(row_index, batch, seq, hs):
        m = row_index[lo:hi] - b * seq
        m_list = m.tolist()
        qs, qt = _cpu_query_lanes(q_s, q_t, w_q, positions, inv_freq, section, row_index[lo:hi], hs_kv)
        row_lse_s = _cpu_lanes(lse_s[lo:hi, :, None], hs_kv).view(hs_kv, hi - lo, group, 1)
        row_lse_t = _cpu_lanes(lse_t[lo:hi, :, None], hs_kv).view(hs_kv, hi - lo, group, 1)
        dq = torch.zeros_like(qs)
        for n0, ks, kt, cos, sin in _cpu_key_blocks(k_s, k_t, w_k, positions, inv_freq, section, b, n_end, block):
            r0 = bisect.bisect_left(m_list, n0)
            s_s, s_t, _ = _cpu_block_logits(qs[:, r0 * group:], qt[:, r0 * group:], ks, kt, m[r0:], n0, key_valid[b],
                                            alpha * progress, group)
            d_logits = s_s.sub_(row_lse_s[:, r0:]).exp_().sub_(s_t.sub_(row_lse_t[:, r0:]).exp_()).mul_(scale)
            d_logits = d_logits.view(hs_kv, -1, ks.shape[1])  # [Hs_kv, lanes, K]
            dq[:, r0 * group:] += torch.bmm(d_logits, ks)
            dk = torch.bmm(d_logits.transpose(1, 2), qs[:, r0 * group:])  # [Hs_kv, K, D], rotated frame
            dk = reference.rotate(dk.transpose(0, 1).unsqueeze(0), cos, -sin)
            dk_s[b, n0:n0 + ks.shape[1]] = dk[0].to(k_s.dtype)
        dq = dq.view(hs_kv, hi - lo, group, dim)
        for r0 in range(0, hi - lo, CPU_ROW_CHUNK):
            chunk = dq[:, r0:r0 + CPU_ROW_CHUNK].transpose(0, 1)
            _write_row_grads(dq_s, chunk.reshape(chunk.shape[0], hs, dim), positions, inv_freq, section,
                             row_index[lo + r0:lo + r0 + chunk.shape[0]])
    return dq_s, dk_s


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rotated_key_block(ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq, valid_ptr, b, offs_n, offs_f, n_end, seq,
                       stride_kb, stride_kn, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
                       stride_pr, stride_pb, stride_pn, HT_KV: tl.constexpr, HALF: tl.constexpr,
                       SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr):
    """One key block for one student kv head h: the rotated student key halves and the teacher key halves mixed by
    w_k[h, :] and rotated ([BLOCK_N, HALF] each, fp32).

    ks_ptr points at k_s[:, :, h]; wk_ptr at w_k[h, 0]; kt_ptr at k_t (all HT_KV teacher kv heads are read). Also
    returns key_ok [BLOCK_N]: the key is below n_end and valid in sample b (other keys load as 0).
    """
    key_ok = (offs_n < n_end) & (tl.load(valid_ptr + b * seq + offs_n, mask=offs_n < n_end, other=0) != 0)
    p_t, p_h, p_w = load_positions(pos_ptr + b * stride_pb, stride_pr, offs_n * stride_pn, key_ok)
    cos, sin = mrope_cos_sin(p_t[:, None], p_h[:, None], p_w[:, None], inv_freq[None, :], offs_f[None, :],
                             SECTION_T, SECTION_TH)
    ks = ks_ptr + b * stride_kb + offs_n[:, None] * stride_kn + offs_f[None, :] * stride_kd
    ks_lo = tl.load(ks, mask=key_ok[:, None], other=0.0).to(tl.float32)
    ks_hi = tl.load(ks + HALF * stride_kd, mask=key_ok[:, None], other=0.0).to(tl.float32)
    ks_lo, ks_hi = rotate_pair(ks_lo, ks_hi, cos, sin)
    kt = kt_ptr + b * stride_tb + offs_n[:, None] * stride_tn + offs_f[None, :] * stride_td
    kt_lo = tl.zeros_like(ks_lo)
    kt_hi = tl.zeros_like(ks_hi)
    for j in tl.static_range(HT_KV):
        w = tl.load(wk_ptr + j).to(tl.float32)
        kt_lo += w * tl.load(kt + j * stride_th, mask=key_ok[:, None], other=0.0).to(tl.float32)
        kt_hi += w * tl.load(kt + j * stride_th + HALF * stride_td, mask=key_ok[:, None], other=0.0).to(tl.float32)
    kt_lo, kt_hi = rotate_pair(kt_lo, kt_hi, cos, sin)
    return key_ok, ks_lo, ks_hi, kt_lo, kt_hi


@triton.jit
def _block_logits(qs_lo, qs_hi, qt_lo, qt_hi, ks_lo, ks_hi, kt_lo, kt_hi, m, offs_n, lane_ok, key_ok, sm_scale, coef,
                  PRECISION: tl.constexpr):
    """Student logits and distance-weighted teacher logits [BLOCK_M, BLOCK_N] (fp32), -inf where not allowed."""
    distance = m[:, None] - offs_n[None, :]
    allowed = lane_ok[:, None] & key_ok[None, :] & (distance >= 0)
    s_s = tl.dot(qs_lo, tl.trans(ks_lo), input_precision=PRECISION)
    s_s = tl.dot(qs_hi, tl.trans(ks_hi), s_s, input_precision=PRECISION) * sm_scale
    s_t = tl.dot(qt_lo, tl.trans(kt_lo), input_precision=PRECISION)
    s_t = tl.dot(qt_hi, tl.trans(kt_hi), s_t, input_precision=PRECISION) * sm_scale
    s_t += coef * tl.log(1.0 + tl.log2(1.0 + tl.maximum(distance, 0).to(tl.float32)))
    return tl.where(allowed, s_s, float("-inf")), tl.where(allowed, s_t, float("-inf")), allowed


@triton.jit
def _row_block(qs_ptr, qt_ptr, sample_rows_ptr, row_m_ptr, b, lane0, h, offs_f, BLOCK_M: tl.constexpr,
               GROUP: tl.constexpr, HS: tl.constexpr, HALF: tl.constexpr):
    """Lanes lane0 + [0, BLOCK_M) of sample b's (row, head in group) pairs for kv head h.

    Returns the flat row index, the student head, the row position m (-1 on dead lanes), whether the lane is live,
    and the student and teacher query halves [BLOCK_M, HALF] (fp32 [R, HS, 2 * HALF] row tensors).
    """
    row_lo = tl.load(sample_rows_ptr + b)
    row_hi = tl.load(sample_rows_ptr + b + 1)
    lanes = lane0 + tl.arange(0, BLOCK_M)
    row = row_lo + lanes // GROUP
    lane_ok = row < row_hi
    head = h * GROUP + lanes % GROUP
    m = tl.load(row_m_ptr + row, mask=lane_ok, other=-1)
    offs = (row[:, None] * HS + head[:, None]) * (2 * HALF) + offs_f[None, :]
    qs_lo = tl.load(qs_ptr + offs, mask=lane_ok[:, None], other=0.0)
    qs_hi = tl.load(qs_ptr + offs + HALF, mask=lane_ok[:, None], other=0.0)
    qt_lo = tl.load(qt_ptr + offs, mask=lane_ok[:, None], other=0.0)
    qt_hi = tl.load(qt_ptr + offs + HALF, mask=lane_ok[:, None], other=0.0)
    return row, head, m, lane_ok, qs_lo, qs_hi, qt_lo, qt_hi


@triton.jit
def _fwd_kernel(qs_ptr, qt_ptr, row_m_ptr, sample_rows_ptr, ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq_ptr, valid_ptr,
                lse_s_ptr, lse_t_ptr, kl_ptr, seq, sm_scale, coef,
                stride_kb, stride_kn, stride_kh, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
                stride_pr, stride_pb, stride_pn, HS: tl.constexpr, HS_KV: tl.constexpr, HT_KV: tl.constexpr,
                HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Per (row, head) lane: lse_s, lse_t and KL(phat_t || p_s), streaming the sample's keys n < max m + 1."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    GROUP: tl.constexpr = HS // HS_KV
    offs_f = tl.arange(0, HALF)
    row, head, m, lane_ok, qs_lo, qs_hi, qt_lo, qt_hi = _row_block(
        qs_ptr, qt_ptr, sample_rows_ptr, row_m_ptr, b, pid_m * BLOCK_M, h, offs_f, BLOCK_M, GROUP, HS, HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_f).to(tl.float32)
    max_s = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # MAX_INIT
    max_t = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    sum_s = tl.zeros((BLOCK_M,), tl.float32)
    sum_t = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    n_end = tl.max(m, axis=0) + 1
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok, ks_lo, ks_hi, kt_lo, kt_hi = _rotated_key_block(
            ks_ptr + h * stride_kh, kt_ptr, wk_ptr + h * HT_KV, pos_ptr, inv_freq, valid_ptr, b, offs_n, offs_f,
            n_end, seq, stride_kb, stride_kn, stride_kd, stride_tb, stride_tn, stride_th, stride_td, stride_pr,
            stride_pb, stride_pn, HT_KV, HALF, SECTION_T, SECTION_TH)
        s_s, s_t, allowed = _block_logits(qs_lo, qs_hi, qt_lo, qt_hi, ks_lo, ks_hi, kt_lo, kt_hi, m, offs_n,
                                          lane_ok, key_ok, sm_scale, coef, PRECISION)
        new_max = tl.maximum(max_s, tl.max(s_s, axis=1))
        sum_s = sum_s * tl.exp(max_s - new_max) + tl.sum(tl.exp(s_s - new_max[:, None]), axis=1)
        max_s = new_max
        new_max = tl.maximum(max_t, tl.max(s_t, axis=1))
        e_t = tl.exp(s_t - new_max[:, None])
        rescale = tl.exp(max_t - new_max)
        sum_t = sum_t * rescale + tl.sum(e_t, axis=1)
        acc = acc * rescale + tl.sum(e_t * tl.where(allowed, s_t - s_s, 0.0), axis=1)
        max_t = new_max
    lse_s = max_s + tl.log(sum_s)
    lse_t = max_t + tl.log(sum_t)
    out = row * HS + head
    tl.store(lse_s_ptr + out, lse_s, mask=lane_ok)
    tl.store(lse_t_ptr + out, lse_t, mask=lane_ok)
    tl.store(kl_ptr + out, acc / sum_t - (max_t - max_s) + (tl.log(sum_s) - tl.log(sum_t)), mask=lane_ok)


@triton.jit
def _dq_kernel(qs_ptr, qt_ptr, row_m_ptr, sample_rows_ptr, ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq_ptr, valid_ptr,
               lse_s_ptr, lse_t_ptr, grad_ptr, dq_ptr, seq, sm_scale, coef, grad_scale,
               stride_kb, stride_kn, stride_kh, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
               stride_pr, stride_pb, stride_pn, HS: tl.constexpr, HS_KV: tl.constexpr, HT_KV: tl.constexpr,
               HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Gradient of the loss with respect to the rotated student query rows, fp32 [R, HS, 2 * HALF]."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    GROUP: tl.constexpr = HS // HS_KV
    offs_f = tl.arange(0, HALF)
    row, head, m, lane_ok, qs_lo, qs_hi, qt_lo, qt_hi = _row_block(
        qs_ptr, qt_ptr, sample_rows_ptr, row_m_ptr, b, pid_m * BLOCK_M, h, offs_f, BLOCK_M, GROUP, HS, HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_f).to(tl.float32)
    lse_s = tl.load(lse_s_ptr + row * HS + head, mask=lane_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + row * HS + head, mask=lane_ok, other=0.0)
    scale = tl.load(grad_ptr).to(tl.float32) * grad_scale
    dq_lo = tl.zeros((BLOCK_M, HALF), tl.float32)
    dq_hi = tl.zeros((BLOCK_M, HALF), tl.float32)
    n_end = tl.max(m, axis=0) + 1
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok, ks_lo, ks_hi, kt_lo, kt_hi = _rotated_key_block(
            ks_ptr + h * stride_kh, kt_ptr, wk_ptr + h * HT_KV, pos_ptr, inv_freq, valid_ptr, b, offs_n, offs_f,
            n_end, seq, stride_kb, stride_kn, stride_kd, stride_tb, stride_tn, stride_th, stride_td, stride_pr,
            stride_pb, stride_pn, HT_KV, HALF, SECTION_T, SECTION_TH)
        s_s, s_t, _ = _block_logits(qs_lo, qs_hi, qt_lo, qt_hi, ks_lo, ks_hi, kt_lo, kt_hi, m, offs_n,
                                    lane_ok, key_ok, sm_scale, coef, PRECISION)
        d_logits = (tl.exp(s_s - lse_s[:, None]) - tl.exp(s_t - lse_t[:, None])) * scale
        dq_lo = tl.dot(d_logits, ks_lo, dq_lo, input_precision=PRECISION)
        dq_hi = tl.dot(d_logits, ks_hi, dq_hi, input_precision=PRECISION)
    out = dq_ptr + (row[:, None] * HS + head[:, None]) * (2 * HALF) + offs_f[None, :]
    tl.store(out, dq_lo, mask=lane_ok[:, None])
    tl.store(out + HALF, dq_hi, mask=lane_ok[:, None])


@triton.jit
def _dk_kernel(qs_ptr, qt_ptr, row_m_ptr, sample_rows_ptr, ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq_ptr, valid_ptr,
               lse_s_ptr, lse_t_ptr, grad_ptr, dk_ptr, seq, sm_scale, coef, grad_scale,
               stride_kb, stride_kn, stride_kh, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
               stride_pr, stride_pb, stride_pn, HS: tl.constexpr, HS_KV: tl.constexpr, HT_KV: tl.constexpr,
               HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dk_s [B, N, HS_KV, 2 * HALF] (contiguous, k_s's dtype) for one key block of one kv head, streaming the
    sample's (row, head) lanes; every key is written (zero where no row attends to it)."""
    pid_n, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    GROUP: tl.constexpr = HS // HS_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_f).to(tl.float32)
    key_ok, ks_lo, ks_hi, kt_lo, kt_hi = _rotated_key_block(
        ks_ptr + h * stride_kh, kt_ptr, wk_ptr + h * HT_KV, pos_ptr, inv_freq, valid_ptr, b, offs_n, offs_f, seq,
        seq, stride_kb, stride_kn, stride_kd, stride_tb, stride_tn, stride_th, stride_td, stride_pr, stride_pb,
        stride_pn, HT_KV, HALF, SECTION_T, SECTION_TH)
    scale = tl.load(grad_ptr).to(tl.float32) * grad_scale
    dk_lo = tl.zeros((BLOCK_N, HALF), tl.float32)
    dk_hi = tl.zeros((BLOCK_N, HALF), tl.float32)
    lanes = (tl.load(sample_rows_ptr + b + 1) - tl.load(sample_rows_ptr + b)) * GROUP
    for lane0 in range(0, lanes, BLOCK_M):
        row, head, m, lane_ok, qs_lo, qs_hi, qt_lo, qt_hi = _row_block(
            qs_ptr, qt_ptr, sample_rows_ptr, row_m_ptr, b, lane0, h, offs_f, BLOCK_M, GROUP, HS, HALF)
        lse_s = tl.load(lse_s_ptr + row * HS + head, mask=lane_ok, other=0.0)
        lse_t = tl.load(lse_t_ptr + row * HS + head, mask=lane_ok, other=0.0)
        s_s, s_t, _ = _block_logits(qs_lo, qs_hi, qt_lo, qt_hi, ks_lo, ks_hi, kt_lo, kt_hi, m, offs_n,
                                    lane_ok, key_ok, sm_scale, coef, PRECISION)
        d_logits = (tl.exp(s_s - lse_s[:, None]) - tl.exp(s_t - lse_t[:, None])) * scale
        dk_lo = tl.dot(tl.trans(d_logits), qs_lo, dk_lo, input_precision=PRECISION)
        dk_hi = tl.dot(tl.trans(d_logits), qs_hi, dk_hi, input_precision=PRECISION)
    # the block's cos / sin again, rather than kept live through the loop (registers)
    p_t, p_h, p_w = load_positions(pos_ptr + b * stride_pb, stride_pr, offs_n * stride_pn, key_ok)
    cos, sin = mrope_cos_sin(p_t[:, None], p_h[:, None], p_w[:, None], inv_freq[None, :], offs_f[None, :],
                             SECTION_T, SECTION_TH)
    dk_lo, dk_hi = unrotate_pair(dk_lo, dk_hi, cos, sin)
    out = dk_ptr + ((b * seq + offs_n[:, None]) * HS_KV + h) * (2 * HALF) + offs_f[None, :]
    n_ok = offs_n < seq
    tl.store(out, dk_lo.to(dk_ptr.dtype.element_ty), mask=n_ok[:, None])
    tl.store(out + HALF, dk_hi.to(dk_ptr.dtype.element_ty), mask=n_ok[:, None])


# Launch configuration of the Triton kernels (also what ``aot_launches`` compiles).
TRITON_BLOCK_M = 32
TRITON_BLOCK_N = 16
TRITON_NUM_WARPS = 4
TRITON_PRECISION = "tf32"  # see the module docstring: "tf32x3" spills at every tile size tried


def attention_launch(kernel, name: str, grid: tuple[int, int, int], rows: Sequence[torch.Tensor],
                     k_s: torch.Tensor, k_t: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, valid: torch.Tensor, tensors: Sequence[torch.Tensor],
                     scalars: Sequence[float], section: Sequence[int]) -> Launch:
    """A launch of ``_fwd_kernel``, ``_dq_kernel`` or ``_dk_kernel``; works on meta tensors (AOT compilation).

    rows: (student rows [R, Hs, D] fp32, teacher rows [R, Hs, D] fp32, row m [R] int64, sample row offsets [B + 1]
    int64); k_s, k_t: strided key views; w_k: contiguous [Hs_kv, Ht_kv]; valid: [B, N] uint8; tensors: the kernel's
    statistics / gradient tensors in parameter order; scalars: (sm_scale, coef[, grad_scale]).
    """
    return Launch(name=name, kernel=kernel, grid=grid,
                  args=(*rows, k_s, k_t, w_k, positions, inv_freq, valid, *tensors, k_s.shape[1], *scalars,
                        *k_s.stride(), *k_t.stride(), *positions.stride()),
                  constexprs=dict(HS=rows[0].shape[1], HS_KV=k_s.shape[2], HT_KV=k_t.shape[2],
                                  HALF=k_s.shape[3] // 2, SECTION_T=section[0], SECTION_TH=section[0] + section[1],
                                  BLOCK_M=TRITON_BLOCK_M, BLOCK_N=TRITON_BLOCK_N, PRECISION=TRITON_PRECISION),
                  num_warps=TRITON_NUM_WARPS)


def _row_grid(max_rows: int, group: int, hs_kv: int, batch: int) -> tuple[int, int, int]:
    """Grid of the row kernels: (blocks of a sample's row-head lanes, kv heads, samples)."""
    return triton.cdiv(max_rows * group, TRITON_BLOCK_M), hs_kv, batch


def _key_grid(seq: int, hs_kv: int, batch: int) -> tuple[int, int, int]:
    """Grid of ``_dk_kernel``: (key blocks, kv heads, samples)."""
    return triton.cdiv(seq, TRITON_BLOCK_N), hs_kv, batch


def _triton_prepare(q_s, q_t, w_q, positions, inv_freq, section, row_index, key_valid):
    """Row tensors and valid mask shared by the attention kernels, and the most rows of one sample (the row grid)."""
    batch, seq, hs, _ = q_s.shape
    q_rows, t_rows = _query_rows(q_s, q_t, w_q, positions, inv_freq, section, row_index)
    sample_rows = _sample_rows(row_index, batch, seq)
    rows = (q_rows.contiguous(), t_rows.contiguous(), (row_index % seq).contiguous(), sample_rows)
    return rows, key_valid.contiguous().view(torch.uint8), int((sample_rows[1:] - sample_rows[:-1]).max())


def _triton_forward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress,
                    alpha):
    rows, valid, max_rows = _triton_prepare(q_s, q_t, w_q, positions, inv_freq, section, row_index, key_valid)
    hs, hs_kv = q_s.shape[2], k_s.shape[2]
    lse_s, lse_t, kl = (torch.empty(row_index.numel(), hs, dtype=torch.float32, device=q_s.device) for _ in range(3))
    attention_launch(_fwd_kernel, "attn_match/forward", _row_grid(max_rows, hs // hs_kv, hs_kv, q_s.shape[0]), rows,
                     k_s, k_t, w_k.contiguous(), positions, inv_freq, valid, (lse_s, lse_t, kl),
                     (1.0 / math.sqrt(q_s.shape[3]), alpha * progress), section).run()
    return (kl.sum(dtype=torch.float64) / kl.numel()).float(), lse_s, lse_t


def _triton_backward(grad, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, lse_s,
                     lse_t, progress, alpha):
    batch, seq, hs, dim = q_s.shape
    hs_kv = k_s.shape[2]
    rows, valid, max_rows = _triton_prepare(q_s, q_t, w_q, positions, inv_freq, section, row_index, key_valid)
    keys = (k_s, k_t, w_k.contiguous(), positions, inv_freq, valid)
    scalars = (1.0 / math.sqrt(dim), alpha * progress, 1.0 / (math.sqrt(dim) * row_index.numel() * hs))
    stats = (lse_s.contiguous(), lse_t.contiguous(), grad.float().reshape(1))
    d_rows = torch.empty(row_index.numel(), hs, dim, dtype=torch.float32, device=q_s.device)
    attention_launch(_dq_kernel, "attn_match/dq", _row_grid(max_rows, hs // hs_kv, hs_kv, batch), rows, *keys,
                     (*stats, d_rows), scalars, section).run()
    dk_s = torch.empty(k_s.shape, dtype=k_s.dtype, device=k_s.device)
    attention_launch(_dk_kernel, "attn_match/dk", _key_grid(seq, hs_kv, batch), rows, *keys, (*stats, dk_s), scalars,
                     section).run()
    dq_s = torch.zeros(q_s.shape, dtype=q_s.dtype, device=q_s.device)
    _write_row_grads(dq_s, d_rows, positions, inv_freq, section, row_index)
    return dq_s, dk_s


def aot_launches(heads: Sequence[int] = (28, 4, 40, 8), tokens: int = 53590, rows: int = 340, head_dim: int = 128,
                 section: Sequence[int] = (16, 24, 24), dtype: str = "bfloat16") -> list[Launch]:
    """Every launch of one forward and backward for student heads (Hs, Hs_kv) against teacher heads (Ht, Ht_kv)
    = ``heads``, one sample of ``tokens`` tokens with ``rows`` query rows, on meta tensors shaped like the k_proj
    output views; for ahead-of-time compilation (``laid_kernels.aot``)."""
    hs, hs_kv, _, ht_kv = heads
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    k_s = torch.empty(1, tokens, hs_kv * head_dim, **meta).view(1, tokens, hs_kv, head_dim)
    k_t = torch.empty(1, tokens, ht_kv * head_dim, **meta).view(1, tokens, ht_kv, head_dim)
    keys = (k_s, k_t, torch.empty(hs_kv, ht_kv, device="meta"), torch.empty(3, 1, tokens, dtype=torch.int64,
            device="meta"), torch.empty(head_dim // 2, device="meta"), torch.empty(1, tokens, dtype=torch.uint8,
                                                                                   device="meta"))
    q_rows = torch.empty(rows, hs, head_dim, device="meta")
    row_tensors = (q_rows, torch.empty_like(q_rows), torch.empty(rows, dtype=torch.int64, device="meta"),
                   torch.empty(2, dtype=torch.int64, device="meta"))
    stats = (torch.empty(rows, hs, device="meta"), torch.empty(rows, hs, device="meta"))
    grid = _row_grid(rows, hs // hs_kv, hs_kv, 1)
    scalars = (head_dim ** -0.5, 0.5)
    grad = torch.empty(1, device="meta")
    return [
        attention_launch(_fwd_kernel, "attn_match/forward", grid, row_tensors, *keys,
                         (*stats, torch.empty_like(stats[0])), scalars, section),
        attention_launch(_dq_kernel, "attn_match/dq", grid, row_tensors, *keys,
                         (*stats, grad, torch.empty_like(q_rows)), (*scalars, 1e-6), section),
        attention_launch(_dk_kernel, "attn_match/dk", _key_grid(tokens, hs_kv, 1), row_tensors, *keys,
                         (*stats, grad, torch.empty_like(k_s)), (*scalars, 1e-6), section),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, autograd and registration


def _define_ops(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register ``laid_kernels::attn_match_<name>`` (forward) and ``..._backward`` as custom ops with fake
    implementations and autograd (gradients for q_s and k_s only); return the public-signature implementation."""

    @torch.library.custom_op(f"laid_kernels::attn_match_{name}", mutates_args=())
    def forward_op(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                   w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                   row_index: torch.Tensor, key_valid: torch.Tensor, progress: float,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [], lse_s [R, Hs], lse_t [R, Hs]); row_index [R] flat b * N + m, key_valid [B, N] bool."""
        return forward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress,
                       alpha)

    @torch.library.custom_op(f"laid_kernels::attn_match_{name}_backward", mutates_args=())
    def backward_op(grad: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                    w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                    section: list[int], row_index: torch.Tensor, key_valid: torch.Tensor, lse_s: torch.Tensor,
                    lse_t: torch.Tensor, progress: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(dq_s like q_s, dk_s like k_s) for the upstream gradient ``grad`` [] of the loss."""
        return backward(grad, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid,
                        lse_s, lse_t, progress, alpha)

    @forward_op.register_fake
    def _(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress, alpha):
        stat = q_s.new_empty((row_index.shape[0], q_s.shape[2]), dtype=torch.float32)
        return q_s.new_empty((), dtype=torch.float32), stat, torch.empty_like(stat)

    @backward_op.register_fake
    def _(grad, q_s, k_s, *args):
        return torch.empty_like(q_s, memory_format=torch.contiguous_format), torch.empty_like(
            k_s, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress, alpha = inputs
        _, lse_s, lse_t = output
        ctx.save_for_backward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, row_index, key_valid, lse_s, lse_t)
        ctx.section, ctx.progress, ctx.alpha = section, progress, alpha

    def backward_fn(ctx, grad_loss, _grad_lse_s, _grad_lse_t):
        q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, row_index, key_valid, lse_s, lse_t = ctx.saved_tensors
        dq_s, dk_s = backward_op(grad_loss, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, ctx.section,
                                 row_index, key_valid, lse_s, lse_t, ctx.progress, ctx.alpha)
        return dq_s, dk_s, None, None, None, None, None, None, None, None, None, None, None

    forward_op.register_autograd(backward_fn, setup_context=setup_context)

    def implementation(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, query_mask, *, progress,
                       alpha=1.0, valid=None):
        """The public signature, after ``check_attn_match_args`` (positions [3, B, N], section a tuple)."""
        key_valid = torch.ones_like(query_mask, dtype=torch.bool) if valid is None else valid.bool()
        row_index = (query_mask.bool() & key_valid).flatten().nonzero().squeeze(1)
        loss, _, _ = forward_op(q_s, k_s, q_t.detach(), k_t.detach(), w_q.detach(), w_k.detach(), positions,
                                inv_freq, list(section), row_index, key_valid, float(progress), float(alpha))
        return loss

    return implementation


backends.register(OP, "reference", reference.attn_match_loss)
backends.register(OP, "cpu", _define_ops("cpu", _cpu_forward, _cpu_backward))
backends.register(OP, "triton", _define_ops("triton", _triton_forward, _triton_backward))
