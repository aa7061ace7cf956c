"""The one place laid_kernels imports Triton, and the Triton versions whose private parts laid relies on.

Triton is optional: pyproject installs it on Linux only, and CPU-only containers, macOS and Windows may lack it.
Where ``import triton`` fails, :data:`triton` and :data:`tl` are stand-ins that let the kernel modules import:
``@triton.jit`` turns each kernel into a :class:`MissingKernel` that raises an ImportError naming the cause when
it is launched. The reference and the native CPU backend then work as usual, and ``backend="triton"`` is refused
by the dispatch (``laid_kernels.backends``) with that cause. The kernel modules use ``from __future__ import
annotations``, so ``tl.constexpr`` annotations are never evaluated.

A few tools read Triton internals that have no public equivalent: the ahead-of-time compiler (``aot.py``: the
launch binder and ``JITFunction._pack_args``) and the interpreter hooks of ``benchmarks/bytecount.py`` and of the
test suite. Each calls :func:`require_tested_triton`, which raises a clear error on a Triton release outside
:data:`TESTED_TRITON`; tests use :func:`untested_triton_reason` to skip with that reason.
"""

from __future__ import annotations

# Triton releases (major.minor) whose private APIs used here were checked: 3.8 is what torch 2.14 (pyproject's
# floor) pins; 3.9 is the newest on PyPI on 2026-12-01.
TESTED_TRITON = ("3.8", "3.9")

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # no triton: stand-ins so that the kernel modules still import
    IMPORT_ERROR = error

    class MissingKernel:
        """What ``@triton.jit`` makes of a kernel when Triton is missing: launching it raises the import error."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__

        def __getitem__(self, grid):
            raise ImportError(f"Triton kernel {self.__name__} cannot run: triton cannot be imported "
                              f"({IMPORT_ERROR}); use backend='cpu' or backend='reference'")

        __call__ = __getitem__

    class _MissingTriton:
        """The ``triton`` module's stand-in: only ``jit`` exists."""

        @staticmethod
        def jit(fn=None, **options):
            return MissingKernel(fn) if fn is not None else MissingKernel

    triton = _MissingTriton()
    tl = None


def untested_triton_reason() -> str | None:
    """None when Triton imports and is one of :data:`TESTED_TRITON`, else why the tools that read its internals
    cannot be trusted here."""
    if IMPORT_ERROR is not None:
        return f"triton cannot be imported ({IMPORT_ERROR})"
    release = ".".join(triton.__version__.split(".")[:2])
    if release not in TESTED_TRITON:
        return (f"triton {triton.__version__} is not one of the tested releases "
                f"({', '.join(v + '.x' for v in TESTED_TRITON)}) whose private APIs this tool reads")
    return None


def require_tested_triton(tool: str) -> None:
    """Raise RuntimeError naming ``tool`` and the tested releases unless :func:`untested_triton_reason` is None."""
    reason = untested_triton_reason()
    if reason is not None:
        raise RuntimeError(f"{tool}: {reason}")
