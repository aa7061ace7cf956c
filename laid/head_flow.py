"""Head flow: which teacher heads each student head was aligned to, and how much of it they explain.

A run's ``mixer.safetensors`` (``laid.mixer.HeadMixer``) holds, per aligned layer pair p, W_q[p] and W_k[p] in one of
two forms (``shared/laid-spec.md``):

- head mixing [Hs, Ht]: student head i ~ sum_j W[i, j] teacher head j;
- frequency mixing [Hs, Ht, D/2, 2]: complex C[i, j, f] (last axis: real, imaginary) mixes the RoPE pair f of each
  teacher head, channels f and f + D/2 read as the complex number z_f = x_f + i x_{f + D/2}.

``pair_weights`` gives the [Hs, Ht] picture of either (W itself, or sum_f |C|^2), ``mix`` the mixed teacher heads and
``explained_share`` each student head's R^2 = 1 - sum_n ||s_i(n) - m_i(n)||^2 / sum_n ||s_i(n)||^2 (the fraction of
its energy its teacher mix explains; 1 - R^2 is its term of L_qk with normalize="student"). RoPE rotates every head
of a token alike and commutes with both mixings, so R^2 is computed on the pre-RoPE Q/K.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .mixer import HeadMixer

MIXER_FILE = "mixer.safetensors"


def load_mixing(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q [P, Hs, Ht, ...], W_k [P, Hs_kv, Ht_kv, ...]) of a mixer file, or of the run folder / model folder
    holding it (``final/mixer.safetensors``). FileNotFoundError names the path when there is none."""
    path = Path(path)
    for candidate in (path, path / MIXER_FILE, path / "final" / MIXER_FILE):
        if candidate.is_file():
            mixer = HeadMixer.load(candidate)
            return mixer.w_q.detach(), mixer.w_k.detach()
    raise FileNotFoundError(f"mixer: no {MIXER_FILE} at {str(path)!r} (a LAid run's final/ folder holds it; an SFT "
                            f"run, lambda_laid 0, has none)")


def _check(w: torch.Tensor) -> None:
    if w.dim() not in (2, 4) or (w.dim() == 4 and w.shape[-1] != 2):
        raise ValueError(f"mixing weight must be [Hs, Ht] or [Hs, Ht, D/2, 2], got {tuple(w.shape)}")


def pair_weights(w: torch.Tensor) -> torch.Tensor:
    """[Hs, Ht]: W for head mixing [Hs, Ht]; sum over f of |C[i, j, f]|^2 for frequency mixing [Hs, Ht, D/2, 2]."""
    _check(w)
    return w if w.dim() == 2 else w.square().sum((-1, -2))


def mix(teacher: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The student-head targets [T, Hs, D] from teacher heads [T, Ht, D] (fp32) by W [Hs, Ht] or C [Hs, Ht, D/2, 2]."""
    _check(w)
    teacher, w = teacher.float(), w.float().to(teacher.device)
    if w.dim() == 2:
        return torch.einsum("ij,tjd->tid", w, teacher)
    half = teacher.shape[-1] // 2
    if w.shape[2] != half:
        raise ValueError(f"frequency mixing has {w.shape[2]} pairs, the heads have D/2 = {half}")
    z = torch.complex(teacher[..., :half], teacher[..., half:])  # [T, Ht, D/2]
    mixed = torch.einsum("ijf,tjf->tif", torch.view_as_complex(w.contiguous()), z)
    return torch.cat((mixed.real, mixed.imag), dim=-1)


def explained_share(student: torch.Tensor, teacher: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """R^2 [Hs] of student heads [T, Hs, D] by their teacher mix of teacher heads [T, Ht, D] (tokens T pooled)."""
    student = student.float()
    residual = (student - mix(teacher, w)).square().sum((0, 2))
    return 1 - residual / student.square().sum((0, 2)).clamp_min(torch.finfo(torch.float32).tiny)
