"""Statistics of a few attention rows, streamed over key blocks: no [N, N] (or [rows, N]) logits tensor.

From the pre-RoPE queries and keys one layer's ``q_proj`` / ``k_proj`` give (``laid.capture.QKCapture``), the
attention of query rows m (e.g. the question rows of a Visual Haystacks prompt) is rebuilt exactly as Qwen2.5-VL
computes it: M-RoPE by ``laid_kernels.apply_mrope``, logits (R q_h(m)) . (R k_g(h)(n)) / sqrt(D) over the causal keys
n <= m (g(h) = h // (H / H_kv), GQA), softmax. Two passes over blocks of ``block`` keys: the first gives each row's
log-sum-exp, the second the normalised attention p_h(m, n) of the block, which is reduced at once into

- ``distance`` [R, H, bins]: the mass at token distance d = m - n in log bins: bin 0 is d = 0, bin k >= 1 is
  2^(k-1) <= d < 2^k (:func:`distance_bin_edges`); each row sums to 1.
- ``reach`` [R, H]: the mean of log2(1 + d) under p (how far a head looks; 2^reach - 1 is a geometric-mean distance).
- ``entropy`` [R, H]: -sum_n p log p in nats (log(m + 1) for a row spread evenly over its m + 1 causal keys).
- ``groups`` [G, R, H]: the mass on each key group (a boolean mask over the keys, e.g. the needle image's tokens).
- ``spectrum`` [R, H, D/2]: sum_n p(m, n) |c_f(m, n)|, where c_f is frequency pair f's part of the logit,
  c_f = (x_f y_f + x_{f+D/2} y_{f+D/2}) / sqrt(D) for x = R q_h(m), y = R k_g(h)(n) (sum_f c_f is the logit):
  how much of the logits the head attends by comes from each RoPE frequency (``laid.rope_spectrum``).

Memory: the rotated rows [R, H, D] and, per block, the logits [R, H, block] and pair parts [R, H, block, D/2].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from laid_kernels import apply_mrope

BLOCK = 512  # keys per block


def distance_bin_edges(max_distance: int) -> torch.Tensor:
    """Left edges [bins - 1] of the log-distance bins 1..: 1, 2, 4, ..., the last <= max_distance (bin 0 is d = 0).

    ``torch.bucketize(d, edges, right=True)`` maps a distance d >= 0 to its bin: 0 for d = 0, k for
    2^(k-1) <= d < 2^k.
    """
    return torch.tensor([2 ** k for k in range(max(max_distance, 1).bit_length())], dtype=torch.long)


def uniform_distance(rows: torch.Tensor) -> torch.Tensor:
    """[R, bins]: the distance histogram of attention spread evenly over each row's causal keys (d = 0 .. m), the
    chance reference of ``RowStats.distance`` (bin k >= 1 holds min(2^k - 1, m) - 2^(k-1) + 1 of the m + 1 keys)."""
    edges = distance_bin_edges(int(rows.max()))[None]
    m = rows.long().cpu()[:, None]
    counts = (torch.minimum(2 * edges - 1, m) - edges + 1).clamp_min(0)
    return torch.cat((torch.ones_like(m), counts), 1) / (m + 1)


@dataclass
class RowStats:
    """The reductions of the attention of R query rows over H heads (see the module docstring for each)."""

    distance: torch.Tensor  # [R, H, bins]
    reach: torch.Tensor  # [R, H]
    entropy: torch.Tensor  # [R, H]
    groups: torch.Tensor  # [G, R, H]
    spectrum: torch.Tensor  # [R, H, D/2]


def _logits(rows: torch.Tensor, keys: torch.Tensor, row_index: torch.Tensor,
            key_index: torch.Tensor) -> torch.Tensor:
    """Causal logits [R, H, B] of rotated rows [R, H, D] against rotated keys [B, H, D] (-inf where n > m)."""
    logits = torch.einsum("rhd,bhd->rhb", rows, keys) / math.sqrt(rows.shape[-1])
    return logits.masked_fill((key_index[None, :] > row_index[:, None])[:, None, :], float("-inf"))


@torch.no_grad()
def attention_row_stats(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                        inv_freq: torch.Tensor, mrope_section: Sequence[int], *,
                        groups: Sequence[torch.Tensor] = (), block: int = BLOCK,
                        backend: str = "auto") -> RowStats:
    """The attention statistics of query ``rows`` of one sample, streamed over key blocks (all fp32).

    Args:
        queries: [N, H, D] pre-RoPE queries of one sample.
        keys: [N, H_kv, D] pre-RoPE keys.
        positions: [3, N] M-RoPE positions (``laid.capture.mrope_positions`` of the sample).
        rows: [R] token indices of the query rows.
        inv_freq: [D/2]; mrope_section: (s0, s1, s2), as the model's rotary embedding holds them.
        groups: boolean masks [N] over the keys; ``RowStats.groups[g]`` is the mass on ``groups[g]``.
        block: keys per block.
        backend: the ``laid_kernels.apply_mrope`` backend.
    """
    seq, kv_heads, dim = keys.shape
    heads, half = queries.shape[1], dim // 2
    if queries.shape[0] != seq or heads % kv_heads or queries.shape[-1] != dim:
        raise ValueError(f"queries [N, H, D] {tuple(queries.shape)} and keys [N, H_kv, D] {tuple(keys.shape)}: "
                         f"N and D must match and H must be a multiple of H_kv")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    device, rows = keys.device, rows.to(keys.device)
    kv_of_head = torch.arange(heads, device=device) // (heads // kv_heads)
    positions, inv_freq = positions.to(device), inv_freq.to(device).float()
    q = apply_mrope(queries[None, rows].float(), positions[:, None, rows], inv_freq, mrope_section, backend=backend)[0]
    edges = distance_bin_edges(int(rows.max())).to(device)
    group_masks = [g.to(device) for g in groups]

    def blocks():
        """(key indices [B], rotated keys [B, H, D]) of each key block up to the last row."""
        for start in range(0, int(rows.max()) + 1, block):
            index = torch.arange(start, min(start + block, seq), device=device)
            k = apply_mrope(keys[None, index].float(), positions[:, None, index], inv_freq, mrope_section,
                            backend=backend)[0]
            yield index, k[:, kv_of_head]

    lse = torch.full((len(rows), heads), float("-inf"), device=device)
    for index, k in blocks():
        lse = torch.logaddexp(lse, _logits(q, k, rows, index).logsumexp(-1))
    stats = RowStats(distance=torch.zeros(len(rows), heads, len(edges) + 1, device=device),
                     reach=torch.zeros(len(rows), heads, device=device),
                     entropy=torch.zeros(len(rows), heads, device=device),
                     groups=torch.zeros(len(group_masks), len(rows), heads, device=device),
                     spectrum=torch.zeros(len(rows), heads, half, device=device))
    for index, k in blocks():
        p = (_logits(q, k, rows, index) - lse[..., None]).exp()  # [R, H, B], 0 beyond the causal limit
        distance = (rows[:, None] - index[None, :]).clamp_min(0)  # [R, B]
        bins = torch.bucketize(distance, edges, right=True)
        stats.distance.scatter_add_(2, bins[:, None, :].expand_as(p), p)
        stats.reach += (p * torch.log2(1.0 + distance.float())[:, None, :]).sum(-1)
        stats.entropy -= torch.special.xlogy(p, p).sum(-1)
        for g, mask in enumerate(group_masks):
            stats.groups[g] += (p * mask[index]).sum(-1)
        k = k.transpose(0, 1)[None]  # [1, H, B, D]
        parts = q[:, :, None, :half] * k[..., :half] + q[:, :, None, half:] * k[..., half:]  # [R, H, B, D/2]
        stats.spectrum += torch.einsum("rhb,rhbf->rhf", p, parts.abs()) / math.sqrt(dim)
    return stats
