"""laid_kernels: fused M-RoPE, teacher-head mixing and LAid losses (Triton on CUDA, native C++ on CPU).

Public ops (each with a plain-PyTorch definition in ``laid_kernels.reference``):

- :func:`apply_mrope`: Qwen2.5-VL multimodal rotary embedding of [B, N, H, D] queries or keys.
- :func:`qk_align_loss`: L_qk, head-level Q/K alignment to a learned mix of teacher heads.
- :func:`attn_match_loss`: L_attn, progressive distance-weighted attention matching of selected query rows.

``backend=`` on every op picks the implementation ("auto", "triton", "cpu", "reference"); see
``laid_kernels.backends``.
"""

from . import reference
from .attn_match import attn_match_loss
from .backends import available_backends
from .mrope import apply_mrope
from .qk_align import qk_align_loss
from . import cpu  # noqa: F401  (registers the native CPU backend; importing it builds nothing)

__all__ = ["apply_mrope", "qk_align_loss", "attn_match_loss", "available_backends", "reference"]
__version__ = "0.1.0"
