"""``attn_match_loss``: L_attn, progressive distance-weighted attention matching (shared/laid-spec.md, L_attn).

For the selected query rows only (a few hundred of a 54K-token prompt), the student's attention row p_s is compared
with the target row phat ∝ omega_p(d) pbar by KL(phat || p_s) (divergence="forward") or KL(p_s || phat) ("reverse"),
without ever materialising a [rows, N] logits tensor. pbar is, by ``target``:

- "teacher" (default): sum_j pi[i, j] p_t,j, the teacher's own attention rows (teacher head j with its kv head
  j // (Ht / Ht_kv)) mixed by pi = ``reference.attention_mixture(w_q)`` (w_q^2 row-normalised; frequency mixing:
  the energy sum_f |C[i, j, f]|^2);
- "mixed" (version 1): the softmax of the mixed Q/K (head mixing, or frequency mixing: a complex weight per RoPE
  pair, ``reference.mix_heads``).

Both are written through one unnormalised log target per (row, student head, key):
x = log omega_p(d) + (s_t for "mixed" | log sum_j pi[i, j] exp(s_t,j - lse_t,j) for "teacher"), so that
log phat = x - lse_x with lse_x = logsumexp_n x.

Passes (both fused backends):

1. target="teacher" only: one pass over the keys computes the teacher's row log-sum-exp lse_t [R, Ht] per (row,
   teacher head), online (running max and sum). The mixture needs every p_t,j normalised before it can be summed.
2. Forward: one pass over the keys with online maxima for the student row (max_s, l_s = sum e^(s_s - max_s)) and the
   target (max_x, l_x), and one accumulator, rescaled with the maximum of the row it weights:
   forward acc = sum_n e^(x - max_x) (x - s_s), KL = acc / l_x - (max_x - max_s) + log l_s - log l_x;
   reverse acc = sum_n e^(s_s - max_s) (s_s - x), KL = acc / l_s - (max_s - max_x) + log l_x - log l_s
   (differences of maxima and of log-sums: large lse values never cancel, and a row with one key gives exactly 0).
   Saved per row: lse_s, lse_x and KL [R, Hs] (and lse_t [R, Ht]); nothing of size N.
3. Backward: one pass recomputes each key block (the teacher's logits too for "teacher"), with
   dL/ds_s(m, n) = (p_s - phat) (forward) or p_s (log p_s - log phat - KL) (reverse), over rows * Hs; this gives
   dq_s for the query rows and dk_s for every key. The reverse KL's per-row KL is why it is saved.

The teacher side is a target: q_t, k_t, w_q, w_k get no gradient. pbar is summed in linear space: where every
p_t,j of a key underflows fp32, x = -inf there (harmless for the forward KL; the reverse KL is then infinite, as is
the float64 definition's wherever the teacher gives a key no mass).

Host preparation shared by both fused backends: the selected rows (query_mask & valid, sample-major, ascending m)
have their student queries rotated and their teacher queries rotated (and, for "mixed", mixed by w_q), fp32
[R, H, D] each (small: R is the number of rows); this reuses ``reference.mrope_cos_sin`` / ``reference.rotate``.

Backends (registered with ``laid_kernels.backends``):

- ``"triton"``: ``_lse_kernel`` (pass 1, one program per (block of row / teacher-head lanes, teacher kv head,
  sample)), ``_fwd_kernel`` and ``_dq_kernel`` (one program per (block of row / student-head lanes, student kv head,
  sample), streaming the sample's causal keys) and ``_dk_kernel`` (one program per (key block, kv head, sample),
  streaming the sample's rows from the first that reaches its block, found by bisection: rows ascend in m, so a key
  block past the sample's last row does no work). Every key block is loaded once per program and rotated (and, for
  "mixed", mixed by w_k) in registers, so nothing of size N is allocated. For "teacher" each student lane loops over the Ht teacher
  heads (the teacher's key block of kv head a, then its Ht / Ht_kv query heads): the teacher logits are computed once
  per student lane, Hs times in all where once would do (the price of keeping every [BLOCK_M, BLOCK_N] tile in
  registers). Channel pairs are padded to BLOCK_F, the next power of two (at least 16), and masked: any even
  head dim runs (D = 80: 40 pairs in 64 lanes).
- ``"cpu"``: the same passes in PyTorch over key blocks sized so one block's logits stay about 4 MB, with student
  and teacher keys rotated (and mixed) per block and query rows prepared 32 at a time (nothing of size N x heads x D
  is allocated beyond the returned gradients; rows that end before a key block skip it). For "teacher" the mixture
  is one matrix product per block ([Hs, Ht] by [Ht, rows x block]).

Precision: everything is computed in fp32 from inputs of any float dtype, except the dots: on sm_80 / sm_90 every
``tl.dot`` is TF32 (``TRITON_PRECISION``; the operands' low 13 mantissa bits are dropped: ``mma ... tf32`` reads
the fp32 registers with no ``cvt.rna``), which the Triton interpreter does not model and the tests emulate
(tests/conftest.py ``gpu_dots``). Decided by ahead-of-time compilation for sm_80 and sm_90 at the launched tiles
(53,590 tokens; ptxas spill bytes must be 0): "tf32x3" spills in every kernel but ``_lse_kernel``; "ieee" (exact
fp32, FMA dots) fits ``_lse_kernel`` and ``_fwd_kernel`` but spills in ``_dq_kernel`` for target="teacher" at every
tile tried (16 x 16, 16 x 32, 32 x 16, 32 x 32, 64 x 16 lanes x keys; 2, 4 and 8 warps: an FMA dot keeps each
thread's operand rows of K = 64 channel pairs in registers). Exact forward passes with a TF32 backward were tried and
rejected: the backward then recomputes TF32 logits against exact row statistics, and truncation's bias no longer
cancels in p_s - phat (emulated, fp32 inputs: dq_s error 1.2e-4 against 1.9e-5 for the TF32 reference). The
tolerance, proven by the emulated tests (tests/test_attn_match.py, every Triton accuracy case): the loss within 2x
and the gradients within 3x the error of the same-precision PyTorch reference, which for a TF32 kernel is the
reference with its einsum operands truncated to TF32 too (what PyTorch with TF32 matmuls is on a GPU, and what
``laid selfcheck`` compares against); for fp32 inputs that is a relative error of about 1e-3 on the loss (against
about 1e-7 for exact fp32), for bf16 / fp16 inputs it is below the inputs' own rounding.

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
                    valid: torch.Tensor | None = None, target: str = "teacher", divergence: str = "forward",
                    backend: str = "auto") -> torch.Tensor:
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
                                                  query_mask, valid, progress, alpha, target, divergence)
    implementation = backends.resolve(OP, backend, q_s.device)
    return implementation(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, query_mask,
                          progress=progress, alpha=alpha, valid=valid, target=target, divergence=divergence)


# ----------------------------------------------------------------------------------------------------------------
# Host preparation shared by the fused backends


def _row_angles(positions: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int], row_index: torch.Tensor,
                seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [R, 1, D/2] of the rows at flat token indices row_index [R] (b * N + m)."""
    return reference.mrope_cos_sin(positions[:, row_index // seq, row_index % seq].unsqueeze(2), inv_freq, section)


def _query_rows(q_s: torch.Tensor, q_t: torch.Tensor, w_q: torch.Tensor | None, positions: torch.Tensor,
                inv_freq: torch.Tensor, section: Sequence[int],
                row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' rotated student queries fp32 [R, Hs, D] and rotated teacher queries, mixed by w_q ([R, Hs, D],
    target="mixed") or, with w_q None, the teacher's own heads ([R, Ht, D], target="teacher").

    row_index: [R] flat token indices b * N + m.
    """
    seq = q_s.shape[1]
    row_b, row_m = row_index // seq, row_index % seq
    cos, sin = _row_angles(positions, inv_freq, section, row_index, seq)
    student = reference.rotate(q_s[row_b, row_m].float().unsqueeze(1), cos, sin).squeeze(1)
    teacher = reference.rotate(q_t[row_b, row_m].float().unsqueeze(1), cos, sin).squeeze(1)
    return student, teacher if w_q is None else reference.mix_heads(w_q.float(), teacher)


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


def _cpu_key_blocks(k_s: torch.Tensor, k_t: torch.Tensor, w_k: torch.Tensor | None, positions: torch.Tensor,
                    inv_freq: torch.Tensor, section: Sequence[int], b: int, n_end: int,
                    block: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Key blocks [n0, n0 + block) of sample b up to n_end: (n0, student keys, teacher keys, cos, sin).

    Keys are rotated (student, fp32 [Hs_kv, block, D]) or mixed by w_k and rotated (teacher, [Hs_kv, block, D];
    with w_k None the teacher's own kv heads, [Ht_kv, block, D]); cos / sin are the block's [1, block, D/2] (for
    the gradient).
    """
    for n0 in range(0, n_end, block):
        n1 = min(n0 + block, n_end)
        cos, sin = reference.mrope_cos_sin(positions[:, b:b + 1, n0:n1], inv_freq, section)
        student = reference.rotate(k_s[b:b + 1, n0:n1].float(), cos, sin)
        teacher = k_t[b:b + 1, n0:n1].float()
        teacher = reference.rotate(teacher if w_k is None else reference.mix_heads(w_k.float(), teacher), cos, sin)
        yield n0, student[0].transpose(0, 1), teacher[0].transpose(0, 1), cos, sin


def _cpu_lane_logits(q: torch.Tensor, k: torch.Tensor, group: int, blocked: torch.Tensor) -> torch.Tensor:
    """Logits [H_kv, R, G, K] of query lanes q [H_kv, R * G, D] against keys k [H_kv, K, D], / sqrt(D), -inf where
    ``blocked`` [R, 1, K]."""
    h_kv, lanes, dim = q.shape
    s = torch.bmm(q, k.transpose(1, 2)).view(h_kv, lanes // group, group, k.shape[1]).mul_(1.0 / math.sqrt(dim))
    return s.masked_fill_(blocked, float("-inf"))


def _cpu_allowed(m: torch.Tensor, n0: int, keys: int, key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """allowed [R, K] (causal and valid) and the distances d = m - n [R, K] of keys n0 + [0, K) for rows m [R]."""
    n = torch.arange(n0, n0 + keys, device=m.device)
    distance = m[:, None] - n[None, :]
    return (distance >= 0) & key_valid[n0:n0 + keys][None, :], distance


def _cpu_block_scores(qs: torch.Tensor, qt: torch.Tensor, ks: torch.Tensor, kt: torch.Tensor, m: torch.Tensor,
                      n0: int, key_valid: torch.Tensor, coef: float, group: int, mixture: torch.Tensor | None,
                      lse_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits s_s and the unnormalised log target x = log(omega_p(d) pbar) [Hs_kv, R, G, K], -inf where
    not allowed (x is also -inf where pbar underflows), and allowed [R, K].

    qs: [Hs_kv, R * G, D] student query lanes (row r, head h * G + g at lane r * G + g of batch h); ks [Hs_kv, K, D]
    keys n0 + [0, K); m: [R] row positions; key_valid: [N] of this sample; coef = alpha * progress.
    target="mixed" (mixture None): qt [Hs_kv, R * G, D] mixed query lanes, kt [Hs_kv, K, D] mixed keys,
    x = s_t + log omega. target="teacher": qt [Ht_kv, R * Gt, D] the teacher's own query lanes, kt [Ht_kv, K, D],
    lse_t [Ht_kv, R, Gt, 1] the teacher's row log-sum-exps (first pass), mixture pi [Hs, Ht];
    x = log(sum_j pi[i, j] exp(s_t,j - lse_t,j)) + log omega.
    """
    allowed, distance = _cpu_allowed(m, n0, ks.shape[1], key_valid)
    blocked = ~allowed[:, None, :]
    s_s = _cpu_lane_logits(qs, ks, group, blocked)
    log_weight = reference.distance_log_weight(distance.clamp_min(0), coef, 1.0)[:, None, :]  # [R, 1, K]
    if mixture is None:
        return s_s, _cpu_lane_logits(qt, kt, group, blocked).add_(log_weight), allowed
    ht_kv, rows = kt.shape[0], m.numel()
    p_t = _cpu_lane_logits(qt, kt, qt.shape[1] // rows, blocked).sub_(lse_t).exp_()  # [Ht_kv, R, Gt, K]
    # pbar[h, r, g, k] = sum_(a, c) pi[h * G + g, a * Gt + c] p_t[a, r, c, k]
    pbar = torch.einsum("hgac,arck->hrgk", mixture.view(qs.shape[0], group, ht_kv, -1), p_t)
    return s_s, pbar.log_().add_(log_weight), allowed


def _cpu_lanes(rows: torch.Tensor, hs_kv: int) -> torch.Tensor:
    """[R, Hs, X] -> the lane layout [Hs_kv, R * G, X] of :func:`_cpu_block_scores`."""
    r, hs, x = rows.shape
    return rows.view(r, hs_kv, hs // hs_kv, x).transpose(0, 1).reshape(hs_kv, -1, x)


def _cpu_unlanes(lanes: torch.Tensor, rows: int) -> torch.Tensor:
    """[Hs_kv, R * G, X] -> [R, Hs, X] (inverse of :func:`_cpu_lanes`)."""
    hs_kv, _, x = lanes.shape
    return lanes.view(hs_kv, rows, -1, x).transpose(0, 1).reshape(rows, -1, x)


def _cpu_query_lanes(q_s: torch.Tensor, q_t: torch.Tensor, w_q: torch.Tensor | None, positions: torch.Tensor,
                     inv_freq: torch.Tensor, section: Sequence[int], row_index: torch.Tensor, hs_kv: int,
                     teacher_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_query_rows` of one sample's rows in the lane layout: student [Hs_kv, R * G, D], teacher
    [teacher_kv, R * G', D] (teacher_kv = Hs_kv for target="mixed", Ht_kv for "teacher"), built CPU_ROW_CHUNK rows
    at a time (no [R, H, D] copy)."""
    rows, dim = row_index.numel(), q_s.shape[3]
    heads = (q_s.shape[2], q_s.shape[2] if w_q is not None else q_t.shape[2])
    outs = [q_s.new_empty((kv, rows, h // kv, dim), dtype=torch.float32) for kv, h in zip((hs_kv, teacher_kv), heads)]
    for r0 in range(0, rows, CPU_ROW_CHUNK):
        chunk = row_index[r0:r0 + CPU_ROW_CHUNK]
        for out, x in zip(outs, _query_rows(q_s, q_t, w_q, positions, inv_freq, section, chunk)):
            out[:, r0:r0 + chunk.numel()] = x.view(chunk.numel(), out.shape[0], -1, dim).transpose(0, 1)
    return outs[0].view(hs_kv, -1, dim), outs[1].view(teacher_kv, -1, dim)


def _cpu_samples(row_index: torch.Tensor, batch: int, seq: int,
                 heads: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Per sample with rows: (b, first row, end row, n_end = last row's m + 1, key block size); ``heads`` is the
    most heads of one logits block (Hs, or max(Hs, Ht) for target="teacher")."""
    offsets = _sample_rows(row_index, batch, seq).tolist()
    for b in range(batch):
        lo, hi = offsets[b], offsets[b + 1]
        if hi > lo:
            n_end = int(row_index[hi - 1]) - b * seq + 1
            block = min(n_end, max(CPU_MIN_BLOCK, CPU_BLOCK_ELEMENTS // (heads * (hi - lo))))
            yield b, lo, hi, n_end, block


class _CpuSample:
    """One sample's rows prepared for the CPU passes: row positions, query lanes, the target's mixing and (for
    target="teacher") the teacher row log-sum-exps, and an iterator over key blocks with their scores."""

    def __init__(self, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, b, lo, hi,
                 n_end, block, coef, target):
        self.hs_kv = k_s.shape[2]
        self.group = q_s.shape[2] // self.hs_kv
        self.teacher = target == "teacher"
        teacher_kv = k_t.shape[2] if self.teacher else self.hs_kv
        self.m = row_index[lo:hi] - b * q_s.shape[1]
        self.m_list = self.m.tolist()
        self.qs, self.qt = _cpu_query_lanes(q_s, q_t, None if self.teacher else w_q, positions, inv_freq, section,
                                            row_index[lo:hi], self.hs_kv, teacher_kv)
        self.mixture = reference.attention_mixture(w_q.float()) if self.teacher else None
        self.keys = (k_s, k_t, None if self.teacher else w_k, positions, inv_freq, section, b, n_end, block)
        self.key_valid, self.coef = key_valid[b], coef
        self.lse_t = None  # [Ht_kv, R, Gt, 1] (target="teacher"), set by teacher_lse or from the forward

    def teacher_lse(self) -> torch.Tensor:
        """First pass (target="teacher"): the teacher's row log-sum-exp per teacher head, [Ht_kv, R, Gt, 1]."""
        rows = self.m.numel()
        ht_kv, lanes, _ = self.qt.shape
        max_t = self.qt.new_full((ht_kv, rows, lanes // rows), MAX_INIT)
        sum_t = torch.zeros_like(max_t)
        for n0, _, kt, _, _ in _cpu_key_blocks(*self.keys):
            r0 = bisect.bisect_left(self.m_list, n0)  # rows before r0 end before this block (rows ascend in m)
            allowed, _ = _cpu_allowed(self.m[r0:], n0, kt.shape[1], self.key_valid)
            s_t = _cpu_lane_logits(self.qt[:, r0 * (lanes // rows):], kt, lanes // rows, ~allowed[:, None, :])
            old = max_t[:, r0:]
            new = torch.maximum(old, s_t.amax(-1))
            sum_t[:, r0:] = sum_t[:, r0:] * (old - new).exp() + s_t.sub_(new[..., None]).exp_().sum(-1)
            max_t[:, r0:] = new
        self.lse_t = (max_t + sum_t.log())[..., None]
        return self.lse_t

    def blocks(self) -> Iterator[tuple]:
        """Per key block: (first row r0 that reaches it, n0, student keys [Hs_kv, K, D], cos, sin [1, K, D/2],
        s_s, x, allowed) with the scores of :func:`_cpu_block_scores` for the rows from r0 on."""
        lanes_t = self.qt.shape[1] // self.m.numel()
        for n0, ks, kt, cos, sin in _cpu_key_blocks(*self.keys):
            r0 = bisect.bisect_left(self.m_list, n0)
            lse_t = None if self.lse_t is None else self.lse_t[:, r0:]
            scores = _cpu_block_scores(self.qs[:, r0 * self.group:], self.qt[:, r0 * lanes_t:], ks, kt, self.m[r0:],
                                       n0, self.key_valid, self.coef, self.group, self.mixture, lse_t)
            yield r0, n0, ks, cos, sin, *scores


@torch.no_grad()
def _cpu_forward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress, alpha,
                 target, divergence):
    batch, seq, hs, _ = q_s.shape
    rows = row_index.numel()
    lse_s = q_s.new_empty((rows, hs), dtype=torch.float32)
    lse_x, kl = torch.empty_like(lse_s), torch.empty_like(lse_s)
    lse_t = q_s.new_empty((rows, q_t.shape[2] if target == "teacher" else 0), dtype=torch.float32)
    heads = max(hs, q_t.shape[2]) if target == "teacher" else hs
    for b, lo, hi, n_end, block in _cpu_samples(row_index, batch, seq, heads):
        sample = _CpuSample(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, b, lo,
                            hi, n_end, block, alpha * progress, target)
        if target == "teacher":
            lse_t[lo:hi] = _cpu_unlanes(sample.teacher_lse().reshape(k_t.shape[2], -1, 1), hi - lo)[..., 0]
        # per (kv head, row, head in group): running max / sum of the student and target rows, and acc
        max_s = sample.qs.new_full((sample.hs_kv, hi - lo, sample.group), MAX_INIT)
        sum_s, max_x, sum_x, acc = torch.zeros_like(max_s), torch.full_like(max_s, MAX_INIT), \
            torch.zeros_like(max_s), torch.zeros_like(max_s)
        for r0, _, _, _, _, s_s, x, allowed in sample.blocks():
            old_s, old_x = max_s[:, r0:], max_x[:, r0:]
            new_s, new_x = torch.maximum(old_s, s_s.amax(-1)), torch.maximum(old_x, x.amax(-1))
            rescale_s, rescale_x = (old_s - new_s).exp(), (old_x - new_x).exp()
            if divergence == "forward":  # acc = sum_n e^(x - max_x) (x - s_s), 0 where x = -inf
                diff = torch.sub(x, s_s).masked_fill_(x == float("-inf"), 0.0)
            else:  # acc = sum_n e^(s_s - max_s) (s_s - x), 0 where not allowed
                diff = torch.sub(s_s, x).masked_fill_(~allowed[:, None, :], 0.0)
            e_s = s_s.sub_(new_s[..., None]).exp_()  # s_s and x are not needed after this
            e_x = x.sub_(new_x[..., None]).exp_()
            sum_s[:, r0:] = sum_s[:, r0:] * rescale_s + e_s.sum(-1)
            sum_x[:, r0:] = sum_x[:, r0:] * rescale_x + e_x.sum(-1)
            if divergence == "forward":
                acc[:, r0:] = acc[:, r0:] * rescale_x + diff.mul_(e_x).sum(-1)
            else:
                acc[:, r0:] = acc[:, r0:] * rescale_s + diff.mul_(e_s).sum(-1)
            max_s[:, r0:], max_x[:, r0:] = new_s, new_x
        row_lse_s, row_lse_x = max_s + sum_s.log(), max_x + sum_x.log()
        # forward: KL = acc / l_x - lse_x + lse_s; reverse: KL = acc / l_s - lse_s + lse_x (as differences of maxima
        # and of log-sums, so that large lse values never cancel: exactly 0 for a row with one key)
        if divergence == "forward":
            row_kl = acc / sum_x - (max_x - max_s) + (sum_s.log() - sum_x.log())
        else:
            row_kl = acc / sum_s - (max_s - max_x) + (sum_x.log() - sum_s.log())
        for out, value in ((lse_s, row_lse_s), (lse_x, row_lse_x), (kl, row_kl)):
            out[lo:hi] = _cpu_unlanes(value.reshape(sample.hs_kv, -1, 1), hi - lo)[..., 0]
    return (kl.sum(dtype=torch.float64) / kl.numel()).float(), lse_s, lse_x, lse_t, kl


def _cpu_logit_gradient(s_s: torch.Tensor, x: torch.Tensor, lse_s: torch.Tensor, lse_x: torch.Tensor,
                        kl: torch.Tensor, allowed: torch.Tensor, divergence: str) -> torch.Tensor:
    """dKL/ds_s of one block (in place in s_s), broadcasting row statistics lse_s, lse_x, kl [..., 1] against the
    logits [..., K]: forward p_s - phat; reverse p_s (log p_s - log phat - KL), 0 where not allowed."""
    log_p_s = s_s.sub_(lse_s)
    log_phat = x.sub_(lse_x)
    if divergence == "forward":
        return log_p_s.exp_().sub_(log_phat.exp_())
    d = torch.sub(log_p_s, log_phat).sub_(kl).masked_fill_(~allowed, 0.0)
    return d.mul_(log_p_s.exp_())


@torch.no_grad()
def _cpu_backward(grad, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, lse_s,
                  lse_x, lse_t, kl, progress, alpha, target, divergence):
    batch, seq, hs, dim = q_s.shape
    hs_kv = k_s.shape[2]
    group = hs // hs_kv
    dq_s = torch.zeros(q_s.shape, dtype=q_s.dtype, device=q_s.device)
    dk_s = torch.zeros(k_s.shape, dtype=k_s.dtype, device=k_s.device)
    scale = grad.float() / (row_index.numel() * hs * math.sqrt(dim))
    heads = max(hs, q_t.shape[2]) if target == "teacher" else hs
    for b, lo, hi, n_end, block in _cpu_samples(row_index, batch, seq, heads):
        sample = _CpuSample(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, b, lo,
                            hi, n_end, block, alpha * progress, target)
        if target == "teacher":
            sample.lse_t = _cpu_lanes(lse_t[lo:hi, :, None], k_t.shape[2]).view(k_t.shape[2], hi - lo, -1, 1)
        stats = [_cpu_lanes(s[lo:hi, :, None], hs_kv).view(hs_kv, hi - lo, group, 1) for s in (lse_s, lse_x, kl)]
        dq = torch.zeros_like(sample.qs)
        for r0, n0, ks, cos, sin, s_s, x, allowed in sample.blocks():
            d_logits = _cpu_logit_gradient(s_s, x, *(s[:, r0:] for s in stats), allowed[:, None, :], divergence)
            d_logits = d_logits.mul_(scale).view(hs_kv, -1, ks.shape[1])  # [Hs_kv, lanes, K]
            dq[:, r0 * group:] += torch.bmm(d_logits, ks)
            dk = torch.bmm(d_logits.transpose(1, 2), sample.qs[:, r0 * group:])  # [Hs_kv, K, D], rotated frame
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
def _rotated_keys(k_ptr, key_ok, cos, sin, offs_n, offs_f, stride_n, stride_d, HALF: tl.constexpr):
    """One kv head's rotated key halves [BLOCK_N, BLOCK_F] (fp32); k_ptr points at k[b, 0, h, 0]; other keys and
    the padding channels f >= HALF are 0."""
    k = k_ptr + offs_n[:, None] * stride_n + offs_f[None, :] * stride_d
    ok = key_ok[:, None] & (offs_f < HALF)[None, :]
    lo = tl.load(k, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(k + HALF * stride_d, mask=ok, other=0.0).to(tl.float32)
    return rotate_pair(lo, hi, cos, sin)


@triton.jit
def _key_block(k_ptr, pos_ptr, inv_freq, valid_ptr, b, offs_n, offs_f, n_end, seq, stride_kn, stride_kd, stride_pr,
               stride_pb, stride_pn, HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr):
    """A key block of sample b: key_ok [BLOCK_N] (below n_end and valid), the keys' cos / sin [BLOCK_N, BLOCK_F] and
    the rotated key halves of one kv head (k_ptr points at k[b, 0, h, 0]), fp32."""
    key_ok = (offs_n < n_end) & (tl.load(valid_ptr + b * seq + offs_n, mask=offs_n < n_end, other=0) != 0)
    p_t, p_h, p_w = load_positions(pos_ptr + b * stride_pb, stride_pr, offs_n * stride_pn, key_ok)
    cos, sin = mrope_cos_sin(p_t[:, None], p_h[:, None], p_w[:, None], inv_freq[None, :], offs_f[None, :],
                             SECTION_T, SECTION_TH)
    k_lo, k_hi = _rotated_keys(k_ptr, key_ok, cos, sin, offs_n, offs_f, stride_kn, stride_kd, HALF)
    return key_ok, cos, sin, k_lo, k_hi


@triton.jit
def _query_lanes(q_ptr, inv_freq_ptr, sample_rows_ptr, row_m_ptr, b, lane0, h, BLOCK_M: tl.constexpr,
                 GROUP: tl.constexpr, H: tl.constexpr, HALF: tl.constexpr, BLOCK_F: tl.constexpr):
    """The lanes of :func:`_row_lanes` with their query halves (:func:`_lane_halves`), and the channel-pair offsets
    and inverse frequencies [BLOCK_F] every key block needs."""
    offs_f = tl.arange(0, BLOCK_F)
    row, head, m, lane_ok = _row_lanes(sample_rows_ptr, row_m_ptr, b, lane0, h, BLOCK_M, GROUP)
    q_lo, q_hi = _lane_halves(q_ptr, row, head[:, None], lane_ok, offs_f, H, HALF)
    return row, head, m, lane_ok, q_lo, q_hi, offs_f, _inv_freq(inv_freq_ptr, offs_f, HALF)


@triton.jit
def _inv_freq(inv_freq_ptr, offs_f, HALF: tl.constexpr):
    """inv_freq [BLOCK_F] fp32, 0 on the padding channels f >= HALF (their angle is 0: cos 1, sin 0)."""
    return tl.load(inv_freq_ptr + offs_f, mask=offs_f < HALF, other=0.0).to(tl.float32)


@triton.jit
def _mixed_keys(kt_ptr, wk_ptr, key_ok, cos, sin, offs_n, offs_f, stride_tn, stride_th, stride_td, teacher_kv,
                HT_KV: tl.constexpr, HALF: tl.constexpr, FREQ: tl.constexpr):
    """Teacher keys mixed by one row of w_k and rotated, [BLOCK_N, BLOCK_F] halves (fp32), target="mixed".

    kt_ptr points at k_t[b, 0, 0, 0] (all HT_KV teacher kv heads are read); wk_ptr at w_k[h]: [HT_KV] head mixing,
    or [HT_KV, HALF, 2] frequency mixing (FREQ: the complex product (w_re + i w_im)(lo + i hi) per channel pair).
    The loop runs to the runtime ``teacher_kv`` (= HT_KV): with a constant trip count the compiler unrolls it and
    hoists every weight load out of the key loop, which spills registers.
    """
    kt = kt_ptr + offs_n[:, None] * stride_tn + offs_f[None, :] * stride_td
    f_ok = offs_f < HALF
    ok = key_ok[:, None] & f_ok[None, :]
    mixed_lo = tl.zeros(cos.shape, tl.float32)
    mixed_hi = tl.zeros(cos.shape, tl.float32)
    for j in range(teacher_kv):
        lo = tl.load(kt + j * stride_th, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(kt + j * stride_th + HALF * stride_td, mask=ok, other=0.0).to(tl.float32)
        if FREQ:
            w_re = tl.load(wk_ptr + (j * HALF + offs_f) * 2, mask=f_ok, other=0.0).to(tl.float32)[None, :]
            w_im = tl.load(wk_ptr + (j * HALF + offs_f) * 2 + 1, mask=f_ok, other=0.0).to(tl.float32)[None, :]
            mixed_lo += w_re * lo - w_im * hi
            mixed_hi += w_re * hi + w_im * lo
        else:
            w = tl.load(wk_ptr + j).to(tl.float32)
            mixed_lo += w * lo
            mixed_hi += w * hi
    return rotate_pair(mixed_lo, mixed_hi, cos, sin)


@triton.jit
def _lane_halves(ptr, row, head, lane_ok, offs_f, H: tl.constexpr, HALF: tl.constexpr):
    """Query halves [BLOCK_M, BLOCK_F] of lanes (row, head) of an fp32 [R, H, 2 * HALF] row tensor (0 on dead lanes
    and on the padding channels f >= HALF)."""
    offs = (row[:, None] * H + head) * (2 * HALF) + offs_f[None, :]
    ok = lane_ok[:, None] & (offs_f < HALF)[None, :]
    lo = tl.load(ptr + offs, mask=ok, other=0.0)
    hi = tl.load(ptr + offs + HALF, mask=ok, other=0.0)
    return lo, hi


@triton.jit
def _logits(q_lo, q_hi, k_lo, k_hi, sm_scale, PRECISION: tl.constexpr):
    """(q . k) / sqrt(D) [BLOCK_M, BLOCK_N] from the halves of queries [BLOCK_M, BLOCK_F] and keys
    [BLOCK_N, BLOCK_F]."""
    s = tl.dot(q_lo, tl.trans(k_lo), input_precision=PRECISION)
    return tl.dot(q_hi, tl.trans(k_hi), s, input_precision=PRECISION) * sm_scale


@triton.jit
def _row_lanes(sample_rows_ptr, row_m_ptr, b, lane0, h, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """Lanes lane0 + [0, BLOCK_M) of sample b's (row, head in group) pairs for kv head h: the flat row index, the
    head (h * GROUP + lane % GROUP), the row position m (-1 on dead lanes) and whether the lane is live."""
    row_lo = tl.load(sample_rows_ptr + b)
    row_hi = tl.load(sample_rows_ptr + b + 1)
    lanes = lane0 + tl.arange(0, BLOCK_M)
    row = row_lo + lanes // GROUP
    lane_ok = row < row_hi
    m = tl.load(row_m_ptr + row, mask=lane_ok, other=-1)
    return row, h * GROUP + lanes % GROUP, m, lane_ok


@triton.jit
def _block_scores(qs_lo, qs_hi, ks_lo, ks_hi, qt_ptr, kt_ptr, wk_ptr, lse_t_ptr, key_ok, cos, sin, row, head, m,
                  lane_ok, offs_n, offs_f, h, sm_scale, coef, stride_tn, stride_th, stride_td, teacher_kv,
                  HS: tl.constexpr,
                  HT: tl.constexpr, HT_KV: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr,
                  TEACHER: tl.constexpr, FREQ: tl.constexpr):
    """Student logits s_s and the unnormalised log target x = log(omega_p(d) pbar) [BLOCK_M, BLOCK_N] (fp32),
    -inf where not allowed, and allowed.

    TEACHER (target="teacher"): qt_ptr is the teacher's own rotated query rows [R, HT, 2 * HALF], wk_ptr the
    mixture pi [HS, HT], lse_t_ptr the teacher row log-sum-exps [R, HT] (first pass); for each teacher kv head a
    its key block is loaded and rotated, and x = log(sum_j pi[head, j] exp(s_t,j - lse_t,j)) + log omega.
    Otherwise (target="mixed"): qt_ptr holds the mixed rotated rows [R, HS, 2 * HALF], and the key block is mixed
    by w_k[h] (wk_ptr) and rotated, x = s_t + log omega. ``teacher_kv`` is HT_KV as a runtime value: the teacher
    loops must not be unrolled (see :func:`_mixed_keys`).
    """
    distance = m[:, None] - offs_n[None, :]
    allowed = lane_ok[:, None] & key_ok[None, :] & (distance >= 0)
    log_weight = coef * tl.log(1.0 + tl.log2(1.0 + tl.maximum(distance, 0).to(tl.float32)))
    s_s = tl.where(allowed, _logits(qs_lo, qs_hi, ks_lo, ks_hi, sm_scale, PRECISION), float("-inf"))
    if TEACHER:
        group_t = HT // teacher_kv
        pbar = tl.zeros(s_s.shape, tl.float32)
        for a in range(teacher_kv):
            kt_lo, kt_hi = _rotated_keys(kt_ptr + a * stride_th, key_ok, cos, sin, offs_n, offs_f, stride_tn,
                                         stride_td, HALF)
            for c in range(group_t):
                j = a * group_t + c
                qt_lo, qt_hi = _lane_halves(qt_ptr, row, j, lane_ok, offs_f, HT, HALF)
                lse_t = tl.load(lse_t_ptr + row * HT + j, mask=lane_ok, other=0.0)
                weight = tl.load(wk_ptr + head * HT + j, mask=lane_ok, other=0.0)
                s_t = _logits(qt_lo, qt_hi, kt_lo, kt_hi, sm_scale, PRECISION) - lse_t[:, None]
                pbar += weight[:, None] * tl.exp(tl.where(allowed, s_t, float("-inf")))
        x = tl.log(pbar) + log_weight
    else:
        kt_lo, kt_hi = _mixed_keys(kt_ptr, wk_ptr + h * HT_KV * (HALF * 2 if FREQ else 1), key_ok, cos, sin, offs_n,
                                   offs_f, stride_tn, stride_th, stride_td, teacher_kv, HT_KV, HALF, FREQ)
        qt_lo, qt_hi = _lane_halves(qt_ptr, row, head[:, None], lane_ok, offs_f, HS, HALF)
        x = _logits(qt_lo, qt_hi, kt_lo, kt_hi, sm_scale, PRECISION) + log_weight
    return s_s, tl.where(allowed, x, float("-inf")), allowed


@triton.jit
def _logit_gradient(s_s, x, lse_s, lse_x, kl, allowed, scale, REVERSE: tl.constexpr):
    """dL/ds_s [BLOCK_M, BLOCK_N] times ``scale``: forward p_s - phat, reverse p_s (log p_s - log phat - KL)."""
    log_p_s = s_s - lse_s[:, None]
    log_phat = x - lse_x[:, None]
    if REVERSE:
        d = tl.exp(log_p_s) * tl.where(allowed, log_p_s - log_phat - kl[:, None], 0.0)
    else:
        d = tl.exp(log_p_s) - tl.exp(log_phat)
    return d * scale


@triton.jit
def _lse_kernel(q_ptr, row_m_ptr, sample_rows_ptr, k_ptr, pos_ptr, inv_freq_ptr, valid_ptr, lse_ptr, seq, sm_scale,
                stride_kb, stride_kn, stride_kh, stride_kd, stride_pr, stride_pb, stride_pn, H: tl.constexpr,
                H_KV: tl.constexpr, HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
    """First pass of target="teacher": the teacher's row log-sum-exp per (row, teacher head) lane, [R, H] fp32, for
    the rotated query rows [R, H, 2 * HALF] against the sample's keys k [B, N, H_KV, 2 * HALF] (kv head h)."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    row, head, m, lane_ok, q_lo, q_hi, offs_f, inv_freq = _query_lanes(
        q_ptr, inv_freq_ptr, sample_rows_ptr, row_m_ptr, b, pid_m * BLOCK_M, h, BLOCK_M, H // H_KV, H, HALF,
        BLOCK_F)
    max_t = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # MAX_INIT
    sum_t = tl.zeros((BLOCK_M,), tl.float32)
    n_end = tl.max(m, axis=0) + 1
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok, _, _, k_lo, k_hi = _key_block(k_ptr + b * stride_kb + h * stride_kh, pos_ptr, inv_freq, valid_ptr, b,
                                              offs_n, offs_f, n_end, seq, stride_kn, stride_kd, stride_pr, stride_pb,
                                              stride_pn, HALF, SECTION_T, SECTION_TH)
        allowed = lane_ok[:, None] & key_ok[None, :] & (m[:, None] >= offs_n[None, :])
        s = tl.where(allowed, _logits(q_lo, q_hi, k_lo, k_hi, sm_scale, PRECISION), float("-inf"))
        new_max = tl.maximum(max_t, tl.max(s, axis=1))
        sum_t = sum_t * tl.exp(max_t - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        max_t = new_max
    tl.store(lse_ptr + row * H + head, max_t + tl.log(sum_t), mask=lane_ok)


@triton.jit
def _fwd_kernel(qs_ptr, qt_ptr, row_m_ptr, sample_rows_ptr, ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq_ptr, valid_ptr,
                lse_t_ptr, lse_s_ptr, lse_x_ptr, kl_ptr, seq, teacher_kv, sm_scale, coef,
                stride_kb, stride_kn, stride_kh, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
                stride_pr, stride_pb, stride_pn, HS: tl.constexpr, HS_KV: tl.constexpr, HT: tl.constexpr,
                HT_KV: tl.constexpr, HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
                TEACHER: tl.constexpr, REVERSE: tl.constexpr, FREQ: tl.constexpr):
    """Per (row, head) lane: lse_s, lse_x (the log normaliser of x) and the KL, streaming the sample's keys
    n < max m + 1 with online maxima (as the CPU path: forward acc = sum e^(x - max_x) (x - s_s), reverse
    acc = sum e^(s_s - max_s) (s_s - x))."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    row, head, m, lane_ok, qs_lo, qs_hi, offs_f, inv_freq = _query_lanes(
        qs_ptr, inv_freq_ptr, sample_rows_ptr, row_m_ptr, b, pid_m * BLOCK_M, h, BLOCK_M, HS // HS_KV, HS, HALF,
        BLOCK_F)
    max_s = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # MAX_INIT
    max_x = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    sum_s = tl.zeros((BLOCK_M,), tl.float32)
    sum_x = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    n_end = tl.max(m, axis=0) + 1
    kt_base = kt_ptr + b * stride_tb
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok, cos, sin, ks_lo, ks_hi = _key_block(ks_ptr + b * stride_kb + h * stride_kh, pos_ptr, inv_freq,
                                                    valid_ptr, b, offs_n, offs_f, n_end, seq, stride_kn, stride_kd,
                                                    stride_pr, stride_pb, stride_pn, HALF, SECTION_T, SECTION_TH)
        s_s, x, allowed = _block_scores(qs_lo, qs_hi, ks_lo, ks_hi, qt_ptr, kt_base, wk_ptr, lse_t_ptr, key_ok, cos,
                                        sin, row, head, m, lane_ok, offs_n, offs_f, h, sm_scale, coef, stride_tn,
                                        stride_th, stride_td, teacher_kv, HS, HT, HT_KV, HALF, PRECISION, TEACHER,
                                        FREQ)
        new_s = tl.maximum(max_s, tl.max(s_s, axis=1))
        new_x = tl.maximum(max_x, tl.max(x, axis=1))
        e_s = tl.exp(s_s - new_s[:, None])
        e_x = tl.exp(x - new_x[:, None])
        rescale_s = tl.exp(max_s - new_s)
        rescale_x = tl.exp(max_x - new_x)
        sum_s = sum_s * rescale_s + tl.sum(e_s, axis=1)
        sum_x = sum_x * rescale_x + tl.sum(e_x, axis=1)
        if REVERSE:
            acc = acc * rescale_s + tl.sum(e_s * tl.where(allowed, s_s - x, 0.0), axis=1)
        else:
            acc = acc * rescale_x + tl.sum(e_x * tl.where(x > float("-inf"), x - s_s, 0.0), axis=1)
        max_s = new_s
        max_x = new_x
    out = row * HS + head
    tl.store(lse_s_ptr + out, max_s + tl.log(sum_s), mask=lane_ok)
    tl.store(lse_x_ptr + out, max_x + tl.log(sum_x), mask=lane_ok)
    if REVERSE:
        kl = acc / sum_s - (max_s - max_x) + (tl.log(sum_x) - tl.log(sum_s))
    else:
        kl = acc / sum_x - (max_x - max_s) + (tl.log(sum_s) - tl.log(sum_x))
    tl.store(kl_ptr + out, kl, mask=lane_ok)


@triton.jit
def _dq_kernel(qs_ptr, qt_ptr, row_m_ptr, sample_rows_ptr, ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq_ptr, valid_ptr,
               lse_t_ptr, lse_s_ptr, lse_x_ptr, kl_ptr, grad_ptr, dq_ptr, seq, teacher_kv, sm_scale, coef, grad_scale,
               stride_kb, stride_kn, stride_kh, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
               stride_pr, stride_pb, stride_pn, HS: tl.constexpr, HS_KV: tl.constexpr, HT: tl.constexpr,
               HT_KV: tl.constexpr, HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
               TEACHER: tl.constexpr, REVERSE: tl.constexpr, FREQ: tl.constexpr):
    """Gradient of the loss with respect to the rotated student query rows, fp32 [R, HS, 2 * HALF]."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    row, head, m, lane_ok, qs_lo, qs_hi, offs_f, inv_freq = _query_lanes(
        qs_ptr, inv_freq_ptr, sample_rows_ptr, row_m_ptr, b, pid_m * BLOCK_M, h, BLOCK_M, HS // HS_KV, HS, HALF,
        BLOCK_F)
    lse_s = tl.load(lse_s_ptr + row * HS + head, mask=lane_ok, other=0.0)
    lse_x = tl.load(lse_x_ptr + row * HS + head, mask=lane_ok, other=0.0)
    kl = tl.load(kl_ptr + row * HS + head, mask=lane_ok, other=0.0)
    scale = tl.load(grad_ptr).to(tl.float32) * grad_scale
    dq_lo = tl.zeros((BLOCK_M, BLOCK_F), tl.float32)
    dq_hi = tl.zeros((BLOCK_M, BLOCK_F), tl.float32)
    n_end = tl.max(m, axis=0) + 1
    kt_base = kt_ptr + b * stride_tb
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok, cos, sin, ks_lo, ks_hi = _key_block(ks_ptr + b * stride_kb + h * stride_kh, pos_ptr, inv_freq,
                                                    valid_ptr, b, offs_n, offs_f, n_end, seq, stride_kn, stride_kd,
                                                    stride_pr, stride_pb, stride_pn, HALF, SECTION_T, SECTION_TH)
        s_s, x, allowed = _block_scores(qs_lo, qs_hi, ks_lo, ks_hi, qt_ptr, kt_base, wk_ptr, lse_t_ptr, key_ok, cos,
                                        sin, row, head, m, lane_ok, offs_n, offs_f, h, sm_scale, coef, stride_tn,
                                        stride_th, stride_td, teacher_kv, HS, HT, HT_KV, HALF, PRECISION, TEACHER,
                                        FREQ)
        d_logits = _logit_gradient(s_s, x, lse_s, lse_x, kl, allowed, scale, REVERSE)
        dq_lo = tl.dot(d_logits, ks_lo, dq_lo, input_precision=PRECISION)
        dq_hi = tl.dot(d_logits, ks_hi, dq_hi, input_precision=PRECISION)
    out = dq_ptr + (row[:, None] * HS + head[:, None]) * (2 * HALF) + offs_f[None, :]
    ok = lane_ok[:, None] & (offs_f < HALF)[None, :]
    tl.store(out, dq_lo, mask=ok)
    tl.store(out + HALF, dq_hi, mask=ok)


@triton.jit
def _first_row_reaching(row_m_ptr, row_lo, row_hi, n0):
    """The first row index in [row_lo, row_hi) whose position m >= n0 (row_hi if none), by bisection over the
    ascending row positions row_m."""
    lo = row_lo
    hi = row_hi
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(row_m_ptr + mid) < n0
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _dk_kernel(qs_ptr, qt_ptr, row_m_ptr, sample_rows_ptr, ks_ptr, kt_ptr, wk_ptr, pos_ptr, inv_freq_ptr, valid_ptr,
               lse_t_ptr, lse_s_ptr, lse_x_ptr, kl_ptr, grad_ptr, dk_ptr, seq, teacher_kv, sm_scale, coef, grad_scale,
               stride_kb, stride_kn, stride_kh, stride_kd, stride_tb, stride_tn, stride_th, stride_td,
               stride_pr, stride_pb, stride_pn, HS: tl.constexpr, HS_KV: tl.constexpr, HT: tl.constexpr,
               HT_KV: tl.constexpr, HALF: tl.constexpr, SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
               TEACHER: tl.constexpr, REVERSE: tl.constexpr, FREQ: tl.constexpr):
    """dk_s [B, N, HS_KV, 2 * HALF] (contiguous, k_s's dtype) for one key block of one kv head, streaming the
    sample's (row, head) lanes from the first row that reaches the block (rows ascend in m: the rows before it end
    before the block, so a block past the last row does no work); every key is written (zero where no row attends
    to it)."""
    pid_n, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    GROUP: tl.constexpr = HS // HS_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, BLOCK_F)
    inv_freq = _inv_freq(inv_freq_ptr, offs_f, HALF)
    key_ok, cos, sin, ks_lo, ks_hi = _key_block(ks_ptr + b * stride_kb + h * stride_kh, pos_ptr, inv_freq, valid_ptr,
                                                b, offs_n, offs_f, seq, seq, stride_kn, stride_kd, stride_pr,
                                                stride_pb, stride_pn, HALF, SECTION_T, SECTION_TH)
    scale = tl.load(grad_ptr).to(tl.float32) * grad_scale
    dk_lo = tl.zeros((BLOCK_N, BLOCK_F), tl.float32)
    dk_hi = tl.zeros((BLOCK_N, BLOCK_F), tl.float32)
    row_lo = tl.load(sample_rows_ptr + b)
    row_hi = tl.load(sample_rows_ptr + b + 1)
    first = _first_row_reaching(row_m_ptr, row_lo, row_hi, pid_n * BLOCK_N)
    kt_base = kt_ptr + b * stride_tb
    for lane0 in range((first - row_lo) * GROUP, (row_hi - row_lo) * GROUP, BLOCK_M):
        row, head, m, lane_ok = _row_lanes(sample_rows_ptr, row_m_ptr, b, lane0, h, BLOCK_M, GROUP)
        qs_lo, qs_hi = _lane_halves(qs_ptr, row, head[:, None], lane_ok, offs_f, HS, HALF)
        lse_s = tl.load(lse_s_ptr + row * HS + head, mask=lane_ok, other=0.0)
        lse_x = tl.load(lse_x_ptr + row * HS + head, mask=lane_ok, other=0.0)
        kl = tl.load(kl_ptr + row * HS + head, mask=lane_ok, other=0.0)
        s_s, x, allowed = _block_scores(qs_lo, qs_hi, ks_lo, ks_hi, qt_ptr, kt_base, wk_ptr, lse_t_ptr, key_ok, cos,
                                        sin, row, head, m, lane_ok, offs_n, offs_f, h, sm_scale, coef, stride_tn,
                                        stride_th, stride_td, teacher_kv, HS, HT, HT_KV, HALF, PRECISION, TEACHER,
                                        FREQ)
        d_logits = _logit_gradient(s_s, x, lse_s, lse_x, kl, allowed, scale, REVERSE)
        dk_lo = tl.dot(tl.trans(d_logits), qs_lo, dk_lo, input_precision=PRECISION)
        dk_hi = tl.dot(tl.trans(d_logits), qs_hi, dk_hi, input_precision=PRECISION)
    dk_lo, dk_hi = unrotate_pair(dk_lo, dk_hi, cos, sin)
    out = dk_ptr + ((b * seq + offs_n[:, None]) * HS_KV + h) * (2 * HALF) + offs_f[None, :]
    ok = (offs_n < seq)[:, None] & (offs_f < HALF)[None, :]
    tl.store(out, dk_lo.to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, dk_hi.to(dk_ptr.dtype.element_ty), mask=ok)


# Launch configuration of the Triton kernels (also what ``aot_launches`` compiles).
TRITON_BLOCK_M = 32
TRITON_BLOCK_N = 16
# _dk_kernel's tiles: BLOCK_N keys per program, BLOCK_M row lanes per step. Chosen by ahead-of-time compilation
# (7B / 32B, bf16, 53,590 tokens): 16 x 32 compiles with no spills for every form on sm_80 and sm_90 (164 to 232
# registers) and gives each program twice the keys of 32 x 16 (which also fits, 182 to 252); 32 x 32 spills on sm_80
# for target="teacher" (40 to 48 bytes).
TRITON_DK_BLOCK_M = 16
TRITON_DK_BLOCK_N = 32
TRITON_NUM_WARPS = 4
# Every form but version 1's (target="mixed", forward KL, head mixing), which keeps 4 warps: at 4 warps ptxas
# spills at 32 x 16 tiles in _dq_kernel for "teacher" (28 to 72 bytes: its loop over the teacher heads keeps more
# tiles live), in _fwd_kernel / _dk_kernel for "mixed" with the reverse KL (24 to 40 bytes) and in _dk_kernel for
# frequency mixing with a 16 / 2 student (16 bytes); 8 warps do not.
TRITON_WIDE_NUM_WARPS = 8
TRITON_PRECISION = "tf32"  # see the module docstring: "ieee" and "tf32x3" spill in _dq_kernel at every tile tried


def _row_grid(max_rows: int, group: int, kv_heads: int, batch: int) -> tuple[int, int, int]:
    """Grid of the row kernels: (blocks of a sample's row-head lanes, kv heads, samples)."""
    return triton.cdiv(max_rows * group, TRITON_BLOCK_M), kv_heads, batch


def _key_grid(seq: int, hs_kv: int, batch: int) -> tuple[int, int, int]:
    """Grid of ``_dk_kernel``: (key blocks, kv heads, samples)."""
    return triton.cdiv(seq, TRITON_DK_BLOCK_N), hs_kv, batch


def _common_constexprs(kernel, half: int, section: Sequence[int]) -> dict:
    """The constexprs every attention kernel takes: head-dim half and its power-of-two padding BLOCK_F (at least
    16, the smallest ``tl.dot`` dimension), M-RoPE sections, the kernel's tile sizes, dot precision."""
    block_m, block_n = (TRITON_DK_BLOCK_M, TRITON_DK_BLOCK_N) if kernel is _dk_kernel else (TRITON_BLOCK_M,
                                                                                          TRITON_BLOCK_N)
    return dict(HALF=half, SECTION_T=section[0], SECTION_TH=section[0] + section[1], BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_F=max(16, triton.next_power_of_2(half)), PRECISION=TRITON_PRECISION)


def lse_launch(grid: tuple[int, int, int], rows: Sequence[torch.Tensor], k_t: torch.Tensor, positions: torch.Tensor,
               inv_freq: torch.Tensor, valid: torch.Tensor, lse_t: torch.Tensor, section: Sequence[int]) -> Launch:
    """The launch of ``_lse_kernel`` (target="teacher"'s first pass); works on meta tensors (AOT compilation).

    rows: (teacher rows [R, Ht, D] fp32, row m [R] int64, sample row offsets [B + 1] int64); k_t: strided view;
    valid: [B, N] uint8; lse_t: [R, Ht] fp32 output.
    """
    return Launch(name="attn_match/teacher_lse", kernel=_lse_kernel, grid=grid,
                  args=(*rows, k_t, positions, inv_freq, valid, lse_t, k_t.shape[1], k_t.shape[3] ** -0.5,
                        *k_t.stride(), *positions.stride()),
                  constexprs=dict(H=rows[0].shape[1], H_KV=k_t.shape[2],
                                  **_common_constexprs(_lse_kernel, k_t.shape[3] // 2, section)),
                  num_warps=TRITON_NUM_WARPS)


def attention_launch(kernel, name: str, grid: tuple[int, int, int], rows: Sequence[torch.Tensor],
                     k_s: torch.Tensor, k_t: torch.Tensor, mixing: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, valid: torch.Tensor, lse_t: torch.Tensor, tensors: Sequence[torch.Tensor],
                     scalars: Sequence[float], section: Sequence[int], target: str, divergence: str) -> Launch:
    """A launch of ``_fwd_kernel``, ``_dq_kernel`` or ``_dk_kernel``; works on meta tensors (AOT compilation).

    rows: (student rows [R, Hs, D] fp32, teacher rows fp32 (mixed [R, Hs, D] or the teacher's own [R, Ht, D]),
    row m [R] int64, sample row offsets [B + 1] int64); k_s, k_t: strided key views; mixing: contiguous w_k
    ([Hs_kv, Ht_kv] or [Hs_kv, Ht_kv, D/2, 2], target="mixed") or pi [Hs, Ht] (target="teacher"); valid: [B, N]
    uint8; lse_t: [R, Ht] teacher row log-sum-exps (target="teacher"; any fp32 tensor otherwise); tensors: the
    kernel's statistics / gradient tensors in parameter order; scalars: (sm_scale, coef[, grad_scale]).
    """
    teacher = target == "teacher"
    return Launch(name=name, kernel=kernel, grid=grid,
                  args=(*rows, k_s, k_t, mixing, positions, inv_freq, valid, lse_t, *tensors, k_s.shape[1],
                        k_t.shape[2], *scalars, *k_s.stride(), *k_t.stride(), *positions.stride()),
                  constexprs=dict(HS=rows[0].shape[1], HS_KV=k_s.shape[2], HT=rows[1].shape[1] if teacher else 1,
                                  HT_KV=k_t.shape[2], TEACHER=teacher, REVERSE=divergence == "reverse",
                                  FREQ=not teacher and mixing.dim() == 4,
                                  **_common_constexprs(kernel, k_s.shape[3] // 2, section)),
                  num_warps=TRITON_NUM_WARPS if (target, divergence, mixing.dim()) == ("mixed", "forward", 2)
                  else TRITON_WIDE_NUM_WARPS)


class _TritonRows:
    """Row tensors, mixing, valid mask and grids shared by the attention kernels of one call."""

    def __init__(self, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, target):
        batch, seq, hs, _ = q_s.shape
        self.teacher = target == "teacher"
        q_rows, t_rows = _query_rows(q_s, q_t, None if self.teacher else w_q, positions, inv_freq, section,
                                     row_index)
        sample_rows = _sample_rows(row_index, batch, seq)
        self.rows = (q_rows.contiguous(), t_rows.contiguous(), (row_index % seq).contiguous(), sample_rows)
        self.valid = key_valid.contiguous().view(torch.uint8)
        self.mixing = (reference.attention_mixture(w_q.float()) if self.teacher else w_k.float()).contiguous()
        max_rows = int((sample_rows[1:] - sample_rows[:-1]).max())
        self.grid = _row_grid(max_rows, hs // k_s.shape[2], k_s.shape[2], batch)
        self.teacher_grid = _row_grid(max_rows, q_t.shape[2] // k_t.shape[2], k_t.shape[2], batch)

    def keys(self, k_s, k_t, positions, inv_freq):
        return (k_s, k_t, self.mixing, positions, inv_freq, self.valid)


def _triton_forward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress,
                    alpha, target, divergence):
    prep = _TritonRows(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, target)
    hs, rows = q_s.shape[2], row_index.numel()
    lse_t = torch.empty(rows, q_t.shape[2] if prep.teacher else 0, dtype=torch.float32, device=q_s.device)
    if prep.teacher:
        lse_launch(prep.teacher_grid, (prep.rows[1], *prep.rows[2:]), k_t, positions, inv_freq, prep.valid, lse_t,
                   section).run()
    lse_s, lse_x, kl = (torch.empty(rows, hs, dtype=torch.float32, device=q_s.device) for _ in range(3))
    attention_launch(_fwd_kernel, "attn_match/forward", prep.grid, prep.rows, *prep.keys(k_s, k_t, positions,
                     inv_freq), lse_t, (lse_s, lse_x, kl), (1.0 / math.sqrt(q_s.shape[3]), alpha * progress), section,
                     target, divergence).run()
    return (kl.sum(dtype=torch.float64) / kl.numel()).float(), lse_s, lse_x, lse_t, kl


def _triton_backward(grad, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, lse_s,
                     lse_x, lse_t, kl, progress, alpha, target, divergence):
    batch, seq, hs, dim = q_s.shape
    prep = _TritonRows(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, target)
    keys = prep.keys(k_s, k_t, positions, inv_freq)
    scalars = (1.0 / math.sqrt(dim), alpha * progress, 1.0 / (math.sqrt(dim) * row_index.numel() * hs))
    stats = (lse_s.contiguous(), lse_x.contiguous(), kl.contiguous(), grad.float().reshape(1))
    d_rows = torch.empty(row_index.numel(), hs, dim, dtype=torch.float32, device=q_s.device)
    form = (section, target, divergence)
    attention_launch(_dq_kernel, "attn_match/dq", prep.grid, prep.rows, *keys, lse_t.contiguous(), (*stats, d_rows),
                     scalars, *form).run()
    dk_s = torch.empty(k_s.shape, dtype=k_s.dtype, device=k_s.device)
    attention_launch(_dk_kernel, "attn_match/dk", _key_grid(seq, k_s.shape[2], batch), prep.rows, *keys,
                     lse_t.contiguous(), (*stats, dk_s), scalars, *form).run()
    dq_s = torch.zeros(q_s.shape, dtype=q_s.dtype, device=q_s.device)
    _write_row_grads(dq_s, d_rows, positions, inv_freq, section, row_index)
    return dq_s, dk_s


def aot_launches(heads: Sequence[int] = (28, 4, 40, 8), tokens: int = 53590, rows: int = 340, head_dim: int = 128,
                 section: Sequence[int] = (16, 24, 24), dtype: str = "bfloat16") -> list[Launch]:
    """Every launch of one forward and backward of every form (target "teacher" / "mixed", divergence "forward" /
    "reverse", and frequency mixing for "mixed") for student heads (Hs, Hs_kv) against teacher heads (Ht, Ht_kv)
    = ``heads``, one sample of ``tokens`` tokens with ``rows`` query rows, on meta tensors shaped like the k_proj
    output views; for ahead-of-time compilation (``laid_kernels.aot``). Names: "attn_match/<kernel>" for the
    default form (teacher, forward), "attn_match/<kernel>[<target>, <divergence>(, frequency)]" otherwise."""
    hs, hs_kv, ht, ht_kv = heads
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    k_s = torch.empty(1, tokens, hs_kv * head_dim, **meta).view(1, tokens, hs_kv, head_dim)
    k_t = torch.empty(1, tokens, ht_kv * head_dim, **meta).view(1, tokens, ht_kv, head_dim)
    other = (torch.empty(3, 1, tokens, dtype=torch.int64, device="meta"), torch.empty(head_dim // 2, device="meta"),
             torch.empty(1, tokens, dtype=torch.uint8, device="meta"))
    q_rows = torch.empty(rows, hs, head_dim, device="meta")
    row_m = (torch.empty(rows, dtype=torch.int64, device="meta"), torch.empty(2, dtype=torch.int64, device="meta"))
    stats = tuple(torch.empty(rows, hs, device="meta") for _ in range(3))
    grad = torch.empty(1, device="meta")
    grid = _row_grid(rows, hs // hs_kv, hs_kv, 1)
    launches = [lse_launch(_row_grid(rows, ht // ht_kv, ht_kv, 1), (torch.empty(rows, ht, head_dim, device="meta"),
                           *row_m), k_t, *other, torch.empty(rows, ht, device="meta"), section)]
    forms = [("teacher", "forward", False), ("teacher", "reverse", False), ("mixed", "forward", False),
             ("mixed", "reverse", False), ("mixed", "forward", True)]
    for target, divergence, frequency in forms:
        teacher = target == "teacher"
        t_rows = torch.empty(rows, ht if teacher else hs, head_dim, device="meta")
        mixing = torch.empty(*((hs, ht) if teacher else (hs_kv, ht_kv, head_dim // 2, 2) if frequency
                               else (hs_kv, ht_kv)), device="meta")
        lse_t = torch.empty(rows, ht if teacher else 0, device="meta")
        keys = (k_s, k_t, mixing, *other[:2], other[2], lse_t)
        row_tensors = (q_rows, t_rows, *row_m)
        suffix = "" if (target, divergence) == ("teacher", "forward") else (
            f"[{target}, {divergence}{', frequency' if frequency else ''}]")
        scalars = (head_dim ** -0.5, 0.5)
        launches += [
            attention_launch(_fwd_kernel, f"attn_match/forward{suffix}", grid, row_tensors, *keys, stats, scalars,
                             section, target, divergence),
            attention_launch(_dq_kernel, f"attn_match/dq{suffix}", grid, row_tensors, *keys,
                             (*stats, grad, torch.empty_like(q_rows)), (*scalars, 1e-6), section, target, divergence),
            attention_launch(_dk_kernel, f"attn_match/dk{suffix}", _key_grid(tokens, hs_kv, 1), row_tensors, *keys,
                             (*stats, grad, torch.empty_like(k_s)), (*scalars, 1e-6), section, target, divergence),
        ]
    return launches


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, autograd and registration


def _define_ops(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register ``laid_kernels::attn_match_<name>`` (forward) and ``..._backward`` as custom ops with fake
    implementations and autograd (gradients for q_s and k_s only); return the public-signature implementation."""

    @torch.library.custom_op(f"laid_kernels::attn_match_{name}", mutates_args=())
    def forward_op(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                   w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                   row_index: torch.Tensor, key_valid: torch.Tensor, progress: float, alpha: float, target: str,
                   divergence: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [], lse_s [R, Hs], lse_x [R, Hs], lse_t [R, Ht] ([R, 0] for target="mixed"), kl [R, Hs]);
        row_index [R] flat b * N + m, key_valid [B, N] bool. lse_x is the log normaliser of the unnormalised
        target x = log(omega_p pbar), lse_t the teacher's row log-sum-exp per teacher head."""
        return forward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress,
                       alpha, target, divergence)

    @torch.library.custom_op(f"laid_kernels::attn_match_{name}_backward", mutates_args=())
    def backward_op(grad: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                    w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                    section: list[int], row_index: torch.Tensor, key_valid: torch.Tensor, lse_s: torch.Tensor,
                    lse_x: torch.Tensor, lse_t: torch.Tensor, kl: torch.Tensor, progress: float, alpha: float,
                    target: str, divergence: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(dq_s like q_s, dk_s like k_s) for the upstream gradient ``grad`` [] of the loss."""
        return backward(grad, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid,
                        lse_s, lse_x, lse_t, kl, progress, alpha, target, divergence)

    @forward_op.register_fake
    def _(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress, alpha, target,
          divergence):
        stat = q_s.new_empty((row_index.shape[0], q_s.shape[2]), dtype=torch.float32)
        lse_t = q_s.new_empty((row_index.shape[0], q_t.shape[2] if target == "teacher" else 0), dtype=torch.float32)
        return q_s.new_empty((), dtype=torch.float32), stat, torch.empty_like(stat), lse_t, torch.empty_like(stat)

    @backward_op.register_fake
    def _(grad, q_s, k_s, *args):
        return torch.empty_like(q_s, memory_format=torch.contiguous_format), torch.empty_like(
            k_s, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        (q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index, key_valid, progress, alpha, target,
         divergence) = inputs
        _, lse_s, lse_x, lse_t, kl = output
        ctx.save_for_backward(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, row_index, key_valid, lse_s, lse_x,
                              lse_t, kl)
        ctx.options = (section, progress, alpha, target, divergence)

    def backward_fn(ctx, grad_loss, *_grad_stats):
        q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, row_index, key_valid, *stats = ctx.saved_tensors
        section, progress, alpha, target, divergence = ctx.options
        dq_s, dk_s = backward_op(grad_loss, q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, row_index,
                                 key_valid, *stats, progress, alpha, target, divergence)
        return dq_s, dk_s, *([None] * 13)

    forward_op.register_autograd(backward_fn, setup_context=setup_context)

    def implementation(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, query_mask, *, progress,
                       alpha=1.0, valid=None, target="teacher", divergence="forward"):
        """The public signature, after ``check_attn_match_args`` (positions [3, B, N], section a tuple)."""
        key_valid = torch.ones_like(query_mask, dtype=torch.bool) if valid is None else valid.bool()
        row_index = (query_mask.bool() & key_valid).flatten().nonzero().squeeze(1)
        loss, *_ = forward_op(q_s, k_s, q_t.detach(), k_t.detach(), w_q.detach(), w_k.detach(), positions,
                              inv_freq, list(section), row_index, key_valid, float(progress), float(alpha), target,
                              divergence)
        return loss

    return implementation


backends.register(OP, "reference", reference.attn_match_loss)
backends.register(OP, "cpu", _define_ops("cpu", _cpu_forward, _cpu_backward))
backends.register(OP, "triton", _define_ops("triton", _triton_forward, _triton_backward))
