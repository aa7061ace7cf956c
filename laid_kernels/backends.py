"""The one dispatch point: which implementation of an op runs, for a device and a ``backend=`` argument.

Backends:

- ``"reference"``: plain PyTorch (``laid_kernels.reference``), any device, differentiable by autograd.
- ``"triton"``: the fused Triton kernels. CUDA tensors; CPU tensors only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``laid_kernels`` is imported).
- ``"cpu"``: the native C++ implementation in ``csrc/`` (CPU tensors).
- ``"auto"``: ``"triton"`` on CUDA, ``"cpu"`` on CPU when it can be built, else ``"reference"``.

Op modules register their implementations with :func:`register`; backends announce whether they can run on a
device with :func:`register_availability`. Public functions call :func:`resolve` once per call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .triton_support import IMPORT_ERROR
from .validation import check_backend

BACKENDS = ("auto", "triton", "cpu", "reference")

# True when the Triton kernels were (or will be) defined in interpreter mode: the jit decorator reads this at import.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}
# backend -> function(device) returning None when the backend can run there, else the reason it cannot.
# Keys: a backend (every op of it), or (op, backend) for a check that only some ops of a backend need.
_AVAILABILITY: dict[str | tuple[str, str], Callable[[torch.device], str | None]] = {}


def register(op: str, backend: str, implementation: Callable) -> None:
    """Make ``implementation`` the ``backend`` version of ``op`` (same signature as the public function)."""
    check_backend("register", backend, BACKENDS[1:])
    _IMPLEMENTATIONS.setdefault(op, {})[backend] = implementation


def register_availability(backend: str, why_unavailable: Callable[[torch.device], str | None],
                          ops: tuple[str, ...] = ()) -> None:
    """Declare when ``backend`` can run: ``why_unavailable(device)`` returns None if it can, else a reason.

    With ``ops``, the check applies to those ops only (and replaces the backend-wide one for them), e.g. the C++
    ops of the "cpu" backend need a compiler where its pure-PyTorch ops do not.
    """
    for key in [(op, backend) for op in ops] or [backend]:
        _AVAILABILITY[key] = why_unavailable


def _why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    if backend not in _IMPLEMENTATIONS.get(op, {}):
        return f"{op} has no {backend!r} implementation"
    check = _AVAILABILITY.get((op, backend), _AVAILABILITY.get(backend))
    return None if check is None else check(device)


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The explicit backends (not ``"auto"``) that can run ``op`` on ``device`` here, reference first."""
    device = torch.device(device)
    return [b for b in ("reference", "cpu", "triton") if _why_unavailable(op, b, device) is None]


def auto_backend(op: str, device: torch.device) -> str:
    """The backend ``"auto"`` picks for ``op`` on ``device``."""
    preferred = ("triton",) if device.type == "cuda" else ("cpu",)
    for backend in preferred:
        if _why_unavailable(op, backend, device) is None:
            return backend
    if device.type == "cpu" and "cpu" in _IMPLEMENTATIONS.get(op, {}):
        _warn_cpu_fallback(_why_unavailable(op, "cpu", device))
    return "reference"


_cpu_fallback_warned = False


def _warn_cpu_fallback(reason: str | None) -> None:
    """Warn once per process that ``"auto"`` runs the reference on CPU because the native backend cannot run."""
    global _cpu_fallback_warned
    if not _cpu_fallback_warned:
        _cpu_fallback_warned = True
        warnings.warn(f"laid_kernels: the native CPU backend is unavailable ({reason}); backend='auto' falls back to "
                      "the plain PyTorch reference on CPU, which is far slower and uses far more memory",
                      RuntimeWarning, stacklevel=4)


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to call for ``backend`` (one of :data:`BACKENDS`) on ``device``."""
    check_backend(op, backend, BACKENDS)
    if backend == "auto":
        backend = auto_backend(op, device)
    reason = _why_unavailable(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={backend!r} cannot run on {device}: {reason}")
    return _IMPLEMENTATIONS[op][backend]


def _triton_unavailable(device: torch.device) -> str | None:
    if IMPORT_ERROR is not None:
        return f"triton cannot be imported ({IMPORT_ERROR}); on Linux it ships with torch (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and TRITON_INTERPRET:
        return None
    return ("Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before importing "
            "laid_kernels (the interpreter)")


register_availability("triton", _triton_unavailable)
