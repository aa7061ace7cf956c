"""Argument checks shared by every op and every backend.

Each check raises ``ValueError`` (shapes, values) or ``TypeError`` (dtypes) with a message that names the op, the
argument and what was expected, so that a wrong call never turns into a silent wrong answer. The checks only read
shapes, dtypes and devices (no data-dependent synchronisation), except where a message says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: gradcheck of the references
INT_DTYPES = (torch.int64, torch.int32)
NORMALIZE_MODES = ("student", "target", "none")  # L_qk normalisations (shared/laid-spec.md)
ATTN_TARGETS = ("teacher", "mixed")
ATTN_DIVERGENCES = ("forward", "reverse")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_float_tensor(op: str, name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    """Require ``x`` to be a floating tensor (fp32, bf16 or fp16) with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have shape {layout}, got {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_same_device(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.device:
    """Require every given tensor to live on one device; return that device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")
    return first.device


def check_mrope_section(op: str, mrope_section: Sequence[int], head_dim: int) -> tuple[int, int, int]:
    """Require three non-negative ints summing to ``head_dim // 2``; return them as a tuple."""
    section = tuple(int(s) for s in mrope_section)
    if len(section) != 3 or any(s < 0 for s in section):
        raise ValueError(f"{op}: mrope_section must be three non-negative ints (t, h, w), got {list(mrope_section)}")
    if head_dim % 2 or sum(section) != head_dim // 2:
        raise ValueError(f"{op}: mrope_section {list(section)} must sum to head_dim / 2 = {head_dim / 2} "
                         f"(head_dim {head_dim})")
    return section  # type: ignore[return-value]


def check_rope_inputs(op: str, positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                      batch: int, seq: int, head_dim: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Check M-RoPE inputs and return ``(positions3, section)``.

    positions: [3, B, N] or [B, N] integer positions (rows t, h, w); a [B, N] tensor becomes a stride-0 [3, B, N]
    view (no copy). inv_freq: [D/2] floating.
    """
    if not isinstance(positions, torch.Tensor) or positions.dtype not in INT_DTYPES:
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise TypeError(f"{op}: positions must be an int64 or int32 tensor, got {got}")
    if positions.dim() == 2:
        positions = positions.unsqueeze(0).expand(3, -1, -1)
    if positions.dim() != 3 or positions.shape != (3, batch, seq):
        raise ValueError(f"{op}: positions must have shape [3, B, N] = [3, {batch}, {seq}] or [B, N] = "
                         f"[{batch}, {seq}], got {_shape(positions)}")
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.is_floating_point():
        raise TypeError(f"{op}: inv_freq must be a floating tensor [D/2]")
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"{op}: inv_freq must have shape [D/2] = [{head_dim // 2}], got {_shape(inv_freq)}")
    return positions, check_mrope_section(op, mrope_section, head_dim)


def check_token_mask(op: str, name: str, mask: torch.Tensor | None, batch: int, seq: int) -> None:
    """Require ``mask`` (if given) to be a bool or 0/1 integer tensor [B, N]."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"{op}: {name} must be a bool (or 0/1 integer) tensor [B, N]")
    if mask.shape != (batch, seq):
        raise ValueError(f"{op}: {name} must have shape [B, N] = [{batch}, {seq}], got {_shape(mask)}")


def check_token_weight(op: str, token_weight: torch.Tensor | None, batch: int, seq: int) -> None:
    """Require ``token_weight`` (if given) to be a floating tensor [B, N]."""
    if token_weight is None:
        return
    if not isinstance(token_weight, torch.Tensor) or not token_weight.is_floating_point():
        raise TypeError(f"{op}: token_weight must be a floating tensor [B, N]")
    if token_weight.shape != (batch, seq):
        raise ValueError(f"{op}: token_weight must have shape [B, N] = [{batch}, {seq}], got {_shape(token_weight)}")


def check_mixing(op: str, name: str, w: torch.Tensor, student_heads: int, teacher_heads: int,
                 head_dim: int | None = None) -> None:
    """Require a floating mixing tensor: head mixing [student_heads, teacher_heads], or, when ``head_dim`` is given,
    also frequency mixing [student_heads, teacher_heads, head_dim / 2, 2] (complex weights as real, imaginary)."""
    head = f"[{student_heads}, {teacher_heads}]"
    frequency = None if head_dim is None else f"[{student_heads}, {teacher_heads}, {head_dim // 2}, 2]"
    expected = head if frequency is None else f"{head} (head mixing) or {frequency} (frequency mixing)"
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor {expected}")
    if w.dim() == 4 and frequency is not None:
        if w.shape[:2] != (student_heads, teacher_heads) or w.shape[3] != 2:
            raise ValueError(f"{op}: {name} must have shape [student heads, teacher heads, D/2, 2] = {frequency} "
                             f"(frequency mixing), got {_shape(w)}")
        if w.shape[2] != head_dim // 2:
            raise ValueError(f"{op}: {name} must have shape {frequency} (frequency mixing): it has {w.shape[2]} "
                             f"frequency pairs but head_dim {head_dim} has D/2 = {head_dim // 2}")
        return
    if w.shape != (student_heads, teacher_heads):
        raise ValueError(f"{op}: {name} must have shape [student heads, teacher heads] = {expected}, "
                         f"got {_shape(w)}")


def mixing_form(w_q: torch.Tensor) -> str:
    """"head" for head mixing W [Hs, Ht], "frequency" for frequency mixing C [Hs, Ht, D/2, 2] (already checked)."""
    return "frequency" if w_q.dim() == 4 else "head"


def check_student_teacher(op: str, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                          w_q: torch.Tensor, w_k: torch.Tensor,
                          frequency_mixing: bool = False) -> tuple[int, int, int, int, int, int, int]:
    """Check the four Q/K tensors and both mixing tensors; return ``(B, N, Hs, Hs_kv, Ht, Ht_kv, D)``.

    frequency_mixing: also accept w_q [Hs, Ht, D/2, 2] and w_k [Hs_kv, Ht_kv, D/2, 2] (both of one form)."""
    check_float_tensor(op, "q_s", q_s, 4, "[B, N, Hs, D]")
    batch, seq, hs, dim = q_s.shape
    for name, x, layout in (("k_s", k_s, "[B, N, Hs_kv, D]"), ("q_t", q_t, "[B, N, Ht, D]"),
                            ("k_t", k_t, "[B, N, Ht_kv, D]")):
        check_float_tensor(op, name, x, 4, layout)
        if x.shape[:2] != (batch, seq):
            raise ValueError(f"{op}: {name} must have the same [B, N] = [{batch}, {seq}] as q_s, "
                             f"got {_shape(x)}")
        if x.shape[3] != dim:
            raise ValueError(f"{op}: {name} has head_dim {x.shape[3]} but q_s has {dim}; student and teacher "
                             "head_dim must match")
    if dim % 2:
        raise ValueError(f"{op}: head_dim must be even, got {dim}")
    hs_kv, ht, ht_kv = k_s.shape[2], q_t.shape[2], k_t.shape[2]
    mixing_dim = dim if frequency_mixing else None
    check_mixing(op, "w_q", w_q, hs, ht, mixing_dim)
    check_mixing(op, "w_k", w_k, hs_kv, ht_kv, mixing_dim)
    if w_q.dim() != w_k.dim():
        raise ValueError(f"{op}: w_q {_shape(w_q)} and w_k {_shape(w_k)} must use the same mixing (both head mixing "
                         "[H_student, H_teacher] or both frequency mixing [H_student, H_teacher, D/2, 2])")
    return batch, seq, hs, hs_kv, ht, ht_kv, dim


def check_backend(op: str, backend: str, choices: Sequence[str]) -> None:
    """Require ``backend`` to be one of ``choices``."""
    if backend not in choices:
        raise ValueError(f"{op}: backend must be one of {list(choices)}, got {backend!r}")


def check_normalize(op: str, normalize: str) -> None:
    """Require ``normalize`` to be one of :data:`NORMALIZE_MODES`."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"{op}: normalize must be one of {list(NORMALIZE_MODES)}, got {normalize!r}")


def check_apply_mrope_args(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                           mrope_section: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """All checks of ``apply_mrope``; returns ``(positions3 [3, B, N], section)``."""
    op = "apply_mrope"
    check_float_tensor(op, "x", x, 4, "[B, N, H, D]")
    batch, seq, _, dim = x.shape
    positions, section = check_rope_inputs(op, positions, inv_freq, mrope_section, batch, seq, dim)
    check_same_device(op, {"x": x, "positions": positions, "inv_freq": inv_freq})
    return positions, section


def check_qk_align_args(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                        mrope_section: Sequence[int], token_weight: torch.Tensor | None,
                        valid: torch.Tensor | None, normalize: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """All checks of ``qk_align_loss``; returns ``(positions3 [3, B, N], section)``."""
    op = "qk_align_loss"
    batch, seq, _, _, _, _, dim = check_student_teacher(op, q_s, k_s, q_t, k_t, w_q, w_k, frequency_mixing=True)
    positions, section = check_rope_inputs(op, positions, inv_freq, mrope_section, batch, seq, dim)
    check_token_weight(op, token_weight, batch, seq)
    check_token_mask(op, "valid", valid, batch, seq)
    check_normalize(op, normalize)
    check_same_device(op, {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t, "w_q": w_q, "w_k": w_k,
                           "positions": positions, "inv_freq": inv_freq, "token_weight": token_weight,
                           "valid": valid})
    return positions, section


def check_attn_match_args(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                          w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                          mrope_section: Sequence[int], query_mask: torch.Tensor, valid: torch.Tensor | None,
                          progress: float, alpha: float, target: str = "teacher",
                          divergence: str = "forward") -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor]:
    """All checks of ``attn_match_loss``; returns ``(positions3 [3, B, N], section, rows [B, N] bool)``.

    ``rows`` = query_mask & valid: the query rows that count (selected padding rows are ignored). Reads that mask's
    data once (a device synchronisation) to reject a call that selects no valid row, which would give a NaN; with
    target="teacher" also reads w_q to reject a student head whose mixing weights are all zero (its attention
    mixture pi[i, :] would be 0 / 0).
    """
    op = "attn_match_loss"
    if target not in ATTN_TARGETS:
        raise ValueError(f"{op}: target must be one of {list(ATTN_TARGETS)}, got {target!r}")
    if divergence not in ATTN_DIVERGENCES:
        raise ValueError(f"{op}: divergence must be one of {list(ATTN_DIVERGENCES)}, got {divergence!r}")
    batch, seq, hs, hs_kv, ht, ht_kv, dim = check_student_teacher(op, q_s, k_s, q_t, k_t, w_q, w_k,
                                                                  frequency_mixing=True)
    if hs % hs_kv:
        raise ValueError(f"{op}: student query heads Hs = {hs} (q_s) must be a multiple of student kv heads "
                         f"Hs_kv = {hs_kv} (k_s) for grouped-query attention")
    if target == "teacher" and ht % ht_kv:
        raise ValueError(f"{op}: teacher query heads Ht = {ht} (q_t) must be a multiple of teacher kv heads "
                         f"Ht_kv = {ht_kv} (k_t) for the teacher's own grouped-query attention (target='teacher')")
    positions, section = check_rope_inputs(op, positions, inv_freq, mrope_section, batch, seq, dim)
    if query_mask is None:
        raise TypeError(f"{op}: query_mask is required (a bool tensor [B, N] selecting the query rows)")
    check_token_mask(op, "query_mask", query_mask, batch, seq)
    check_token_mask(op, "valid", valid, batch, seq)
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"{op}: progress must be a float in [0, 1] (training progress), got {progress!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0.0 or alpha == float("inf"):
        raise ValueError(f"{op}: alpha must be a finite float >= 0, got {alpha!r}")
    check_same_device(op, {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t, "w_q": w_q, "w_k": w_k,
                           "positions": positions, "inv_freq": inv_freq, "query_mask": query_mask, "valid": valid})
    rows = query_mask.bool() if valid is None else query_mask.bool() & valid.bool()
    if not bool(rows.any()):
        raise ValueError(f"{op}: query_mask selects no valid row (after excluding padding with valid); the loss "
                         "is a mean over selected rows and would be NaN")
    if target == "teacher":
        energy = w_q.detach().square().flatten(1).sum(1)  # [Hs]
        if not bool(((energy > 0) & energy.isfinite()).all()):
            bad = (~((energy > 0) & energy.isfinite())).nonzero().flatten().tolist()
            raise ValueError(f"{op}: w_q row(s) {bad} are all zero (or not finite): "
                             "target='teacher' weights the teacher heads by pi[i, j] = w_q[i, j]^2 / sum_j' "
                             "w_q[i, j']^2, which is undefined for a zero row")
    return positions, section, rows
