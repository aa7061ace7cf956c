"""``apply_mrope``: Qwen2.5-VL's multimodal rotary embedding of a [B, N, H, D] tensor.

The Triton implementation of this op is added here; until then every backend resolves to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference
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


backends.register(OP, "reference", reference.apply_mrope)
