"""``qk_align_loss``: L_qk, head-level Q/K alignment of a student to mixed teacher heads (shared/laid-spec.md).

The fused Triton implementation of this op is added here; until then every backend resolves to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference
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


backends.register(OP, "reference", reference.qk_align_loss)
