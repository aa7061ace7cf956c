"""``HeadMixer``: the learnable head mixing W_q, W_k and RoPE response gain G of LAid (shared/laid-spec.md).

For each of the P aligned layer pairs:

- ``w_q[p]`` [Hs, Ht]: student query head i is aligned to sum_j w_q[p, i, j] * teacher query head j;
- ``w_k[p]`` [Hs_kv, Ht_kv]: the same for key heads;
- with ``mixing="frequency"``, w_q[p] [Hs, Ht, D/2, 2] and w_k[p] [Hs_kv, Ht_kv, D/2, 2] instead: one complex weight
  (real, imaginary) per head pair and RoPE frequency pair (``laid_kernels.qk_align_loss``'s frequency mixing);
- ``gain(p)`` [Hs, D/2] = softplus(gain_raw[p]) > 0: scales the student's query channel pair (f, f + D/2) of head i
  inside the student's forward (see ``laid.capture``); initialised to exactly 1 and folded into the student's
  q_proj at export (:func:`fold_gain`), so the exported checkpoint is a plain Qwen2.5-VL model.

Initialisations of W: "lstsq" (ridge least squares of the student's heads on the teacher's, on the first batch; for
frequency mixing the complex fit per frequency pair), "uniform" (1 / Ht), "nearest" (head i to teacher head
floor(i * Ht / Hs)); frequency mixing starts with real weights (imaginary parts 0) for the last two.

Example:
    >>> mixer = HeadMixer(pairs=1, student_heads=28, student_kv_heads=4, teacher_heads=40, teacher_kv_heads=8,
    ...                   head_dim=128)
    >>> mixer.init_lstsq(0, q_s, k_s, q_t, k_t, valid)        # q_s [B, N, 28, 128], q_t [B, N, 40, 128], ...
    >>> loss = qk_align_loss(q_s, k_s, q_t, k_t, mixer.w_q[0], mixer.w_k[0], ...)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from laid_kernels import reference

# softplus(GAIN_RAW_ONE) == 1 exactly enough in fp32: log(e - 1).
GAIN_RAW_ONE = math.log(math.e - 1.0)
MIXINGS = ("head", "frequency")


class HeadMixer(nn.Module):
    """W_q, W_k and gain_raw [P, Hs, D/2] for P aligned layer pairs (fp32).

    mixing "head": W_q [P, Hs, Ht], W_k [P, Hs_kv, Ht_kv]; "frequency": W_q [P, Hs, Ht, D/2, 2],
    W_k [P, Hs_kv, Ht_kv, D/2, 2] (complex weights, last axis real / imaginary).
    """

    def __init__(self, pairs: int, student_heads: int, student_kv_heads: int, teacher_heads: int,
                 teacher_kv_heads: int, head_dim: int, mixing: str = "head"):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE pairs channels f and f + D/2), got {head_dim}")
        if mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
        self.mixing = mixing
        self.shape = dict(pairs=pairs, student_heads=student_heads, student_kv_heads=student_kv_heads,
                          teacher_heads=teacher_heads, teacher_kv_heads=teacher_kv_heads, head_dim=head_dim)
        per_frequency = (head_dim // 2, 2) if mixing == "frequency" else ()
        self.w_q = nn.Parameter(torch.zeros(pairs, student_heads, teacher_heads, *per_frequency))
        self.w_k = nn.Parameter(torch.zeros(pairs, student_kv_heads, teacher_kv_heads, *per_frequency))
        self.init_uniform()
        self.gain_raw = nn.Parameter(torch.full((pairs, student_heads, head_dim // 2), GAIN_RAW_ONE))

    def gain(self, pair: int) -> torch.Tensor:
        """G [Hs, D/2] = softplus(gain_raw[pair])."""
        return F.softplus(self.gain_raw[pair])

    def gain_channels(self, pair: int) -> torch.Tensor:
        """G expanded to every query channel, [Hs, D]: channel f and f + D/2 share G[:, f]."""
        gain = self.gain(pair)
        return torch.cat((gain, gain), dim=-1)

    # ---------------------------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def _set_real(self, w: torch.Tensor, real: torch.Tensor) -> None:
        """w := real weights [P, H_s, H_t] (frequency mixing: the same real weight for every frequency pair, imaginary
        parts 0)."""
        if self.mixing == "head":
            w.copy_(real)
        else:
            w.zero_()
            w[..., 0] = real[..., None]

    @torch.no_grad()
    def init_uniform(self) -> None:
        """Every student head starts as the mean of the teacher heads: W = 1 / Ht."""
        for w in (self.w_q, self.w_k):
            self._set_real(w, torch.full(w.shape[:3], 1.0 / w.shape[2], device=w.device))

    @torch.no_grad()
    def init_nearest(self) -> None:
        """Student head i copies teacher head floor(i * Ht / Hs) (a one-hot row)."""
        for w in (self.w_q, self.w_k):
            pairs, student, teacher = w.shape[:3]
            one_hot = torch.zeros(pairs, student, teacher, device=w.device)
            one_hot[:, torch.arange(student), torch.arange(student) * teacher // student] = 1.0
            self._set_real(w, one_hot)

    @torch.no_grad()
    def best_teacher_heads(self, pair: int) -> torch.Tensor:
        """One-hot head mixing [Hs, Ht] (w_q's dtype and device): row i picks the teacher head j with the largest
        weight pi[i, j] of ``reference.attention_mixture(w_q[pair])`` (ties: the lowest j). Passed as L_attn's w_q
        with target="teacher", it makes each student head's target the attention row of that one teacher head
        instead of the pi-weighted mixture (``LAidConfig.attn_heads = "best"``)."""
        w_q = self.w_q[pair]
        best = reference.attention_mixture(w_q).argmax(dim=1)  # [Hs]
        return F.one_hot(best, num_classes=w_q.shape[1]).to(w_q.dtype)

    def lstsq_statistics(self, student: torch.Tensor, teacher: torch.Tensor,
                         valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sufficient statistics of the ridge fit over valid tokens (``laid_kernels.reference.mixing_statistics``).

        student [B, N, Hs, D], teacher [B, N, Ht, D], valid [B, N] bool or None. Head mixing: (cross [Hs, Ht]
        = sum Q_s Q_t^T, gram [Ht, Ht] = sum Q_t Q_t^T) in fp64; frequency mixing: per frequency pair, complex
        (cross [D/2, Hs, Ht] = sum z_s z_t^H, gram [D/2, Ht, Ht] = sum z_t z_t^H).
        """
        weight = None if valid is None else valid.bool().to(torch.float64)
        return reference.mixing_statistics(student, teacher, weight, frequency=self.mixing == "frequency")

    @torch.no_grad()
    def init_lstsq(self, pair: int, query_stats: tuple[torch.Tensor, torch.Tensor],
                   key_stats: tuple[torch.Tensor, torch.Tensor], ridge: float = 1e-3) -> None:
        """W = cross (gram + eps I)^-1 for queries and keys of ``pair`` (from :meth:`lstsq_statistics`; per
        frequency pair for frequency mixing, ``laid_kernels.reference.fit_mixing``).

        eps = ridge * mean(diag(gram)): a ridge relative to the teacher's scale, so the fit is well posed even
        when the teacher heads are collinear on the first batch.
        """
        for w, (cross, gram) in ((self.w_q, query_stats), (self.w_k, key_stats)):
            w[pair].copy_(reference.fit_mixing(cross, gram, ridge).to(w.dtype))

    # ------------------------------------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write w_q, w_k, gain_raw and gain (= softplus(gain_raw)) as safetensors, with the shape as metadata."""
        tensors = {"w_q": self.w_q, "w_k": self.w_k, "gain_raw": self.gain_raw,
                   "gain": F.softplus(self.gain_raw)}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={**{k: str(v) for k, v in self.shape.items()}, "mixing": self.mixing})

    @classmethod
    def load(cls, path: str | Path) -> "HeadMixer":
        """Read a mixer written by :meth:`save` (files without a "mixing" entry are head mixing)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        mixing = metadata.pop("mixing", "head")
        mixer = cls(**{k: int(v) for k, v in metadata.items()}, mixing=mixing)
        tensors = load_file(str(path))
        mixer.load_state_dict({k: tensors[k] for k in ("w_q", "w_k", "gain_raw")})
        return mixer


def fold_gain(weight: torch.Tensor, bias: torch.Tensor | None, gain_channels: torch.Tensor,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q_proj weight [Hs * D, hidden] and bias [Hs * D] with output row (h, c) scaled by gain_channels[h, c], in
    ``dtype`` (None: the weight's): each is rounded to ``dtype`` first, multiplied by the fp32 gain, and rounded to
    ``dtype`` again.

    Rows are head-major, as Qwen2.5-VL views the q_proj output; gain_channels is [Hs, D]. Because a common scale on
    a rotated channel pair commutes with RoPE, the folded model computes what the model with the gain applied in
    its forward computes. The student's training forward (``laid.capture``) and the export both call this with the
    dtype the projection computes in, so the exported weight is the one training used. Differentiable in weight,
    bias and gain.
    """
    dtype = dtype or weight.dtype
    scale = gain_channels.reshape(-1).to(weight.device, torch.float32)
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"gain has {scale.numel()} channels, the q_proj weight has {weight.shape[0]} rows")
    folded = (weight.to(dtype).float() * scale[:, None]).to(dtype)
    return folded, None if bias is None else (bias.to(dtype).float() * scale).to(dtype)
