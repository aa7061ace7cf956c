"""The RoPE spectrum of attention heads: how much of the q . k logits a head attends by comes from each frequency.

Frequency pair f (channels f and f + D/2, rotate-half convention) turns by inv_freq[f] per position; its part of the
logit of query m and key n is c_f(m, n) (``laid.attention_stats``). A head's spectrum is the attention-weighted
magnitude sum_{m, n} p(m, n) |c_f(m, n)| over the analysed query rows, normalised over f: ``pair_shares`` [..., D/2]
sums to 1 per head. Low-frequency (long-range) pairs are those whose wavelength 2 pi / inv_freq[f] is longer than
the largest position distance of the prompts (they turn less than once across the whole prompt, so their angle
still tells near from far); ``low_frequency_share`` is the share of a head's spectrum on them.
"""

from __future__ import annotations

import math

import torch


def pair_shares(spectrum: torch.Tensor) -> torch.Tensor:
    """spectrum [..., D/2] (non-negative sums) -> shares [..., D/2] summing to 1 over the last axis."""
    return spectrum / spectrum.sum(-1, keepdim=True).clamp_min(torch.finfo(spectrum.dtype).tiny)


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """Wavelength in positions [D/2] of each frequency pair: 2 pi / inv_freq."""
    return 2 * math.pi / inv_freq.double()


def low_frequency_pairs(inv_freq: torch.Tensor, span: int) -> torch.Tensor:
    """bool [D/2]: the pairs that turn less than once over ``span`` positions (wavelength > span)."""
    if span < 1:
        raise ValueError(f"span must be >= 1 position, got {span}")
    return wavelengths(inv_freq) > span


def low_frequency_share(shares: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """shares [..., D/2] and low [D/2] bool -> the share on the low-frequency pairs [...]."""
    return shares[..., low.to(shares.device)].sum(-1)
