"""Test configuration: without a CUDA device the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is imported (the decorator reads
it), so it is set here, before the test modules import laid_kernels. Ahead-of-time compilation for real GPUs runs
in a subprocess without it (see tests/test_compile_aot.py). PYTHONPATH is set so that every process the tests
start imports this checkout.
"""

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU machine the Triton tests run compiled kernels (tests/test_cuda.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# laid's resized-image cache (laid.image_cache, "auto") goes to a folder of this test session, not ~/.cache.
os.environ.setdefault("LAID_CACHE_DIR", tempfile.mkdtemp(prefix="laid-test-cache-"))
# Processes the tests start (benchmark scripts, torchrun workers, subprocess checks) import this checkout's laid and
# laid_kernels, not an installed copy that may be older.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH")]))


def _round_fp32_to_bf16_to_nearest_even_in_interpreter() -> None:
    """Make the interpreter's fp32 -> bf16 ``.to()`` round to nearest even, as the GPU's cvt.rn.bf16.f32 does.

    Triton's interpreter (3.8 and 3.9) truncates there (``InterpreterBuilder.create_fp_trunc`` converts with no rounding mode),
    which adds up to one bf16 ulp to every bf16 output and would make the tolerance tests measure the interpreter,
    not the kernel. fp16 and fp32 conversions already round correctly (numpy).
    """
    import inspect

    import numpy as np
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    from laid_kernels.triton_support import TESTED_TRITON

    truncate = interpreter.InterpreterBuilder.create_fp_trunc
    if tuple(inspect.signature(truncate).parameters) != ("self", "src", "dst_type"):
        raise RuntimeError(f"tests/conftest.py: triton {triton.__version__}'s InterpreterBuilder.create_fp_trunc is "
                           f"{inspect.signature(truncate)}, not (self, src, dst_type) as in the tested releases "
                           f"{', '.join(TESTED_TRITON)}: update the bf16 rounding patch for this release")

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncate(self, src, dst_type)

    interpreter.InterpreterBuilder.create_fp_trunc = create_fp_trunc


def _interpreter_create_dot():
    """The interpreter's ``InterpreterBuilder.create_dot``, after checking its signature is the tested one."""
    import inspect

    import triton
    from triton.runtime import interpreter

    from laid_kernels.triton_support import TESTED_TRITON

    create_dot = interpreter.InterpreterBuilder.create_dot
    expected = ("self", "a", "b", "d", "input_precision", "max_num_imprecise_acc")
    if tuple(inspect.signature(create_dot).parameters) != expected:
        raise RuntimeError(f"tests/conftest.py: triton {triton.__version__}'s InterpreterBuilder.create_dot is "
                           f"{inspect.signature(create_dot)}, not ({', '.join(expected)}) as in the tested releases "
                           f"{', '.join(TESTED_TRITON)}: update the TF32 emulation (gpu_dots) for this release")
    return create_dot


def truncate_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> the TF32 operand an sm_80 / sm_90 mma reads from an fp32 register: sign, 8-bit exponent and
    the top 10 mantissa bits, the low 13 bits dropped (truncation: Triton's fp32 ``tl.dot`` feeds the registers to
    ``mma ... tf32`` with no ``cvt.rna.tf32``)."""
    return (x.contiguous().view(torch.int32) & -0x2000).view(torch.float32)


def _tf32(x):
    """:func:`truncate_to_tf32` of an fp32 numpy array (the interpreter's operands)."""
    import numpy as np

    return truncate_to_tf32(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


@contextlib.contextmanager
def tf32_einsum():
    """Every fp32 ``torch.einsum`` in the block multiplies TF32-truncated operands (the forward value; gradients pass
    straight through): the same-precision PyTorch implementation of a kernel whose dots are TF32, as PyTorch with
    TF32 matmuls allowed is on a GPU."""
    einsum = torch.einsum

    def truncated(equation, *operands):
        if all(o.dtype == torch.float32 for o in operands):
            operands = [o + (truncate_to_tf32(o.detach()) - o.detach()) for o in operands]
        return einsum(equation, *operands)

    torch.einsum = truncated
    try:
        yield
    finally:
        torch.einsum = einsum


@pytest.fixture
def gpu_dots(monkeypatch):
    """Interpreted fp32 ``tl.dot`` computes what the GPU computes for its ``input_precision``: "tf32" multiplies
    TF32-truncated operands (:func:`_tf32`; fp32 accumulation), "tf32x3" the three-term split
    big * big + big * small + small * big (small = x - tf32(x), itself truncated), "ieee" exact fp32. The
    interpreter itself ignores ``input_precision`` (every fp32 dot is exact there), which hides TF32 errors.
    Without the interpreter (a GPU run) the kernels run compiled, with the real dots: nothing to do."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    create_dot = _interpreter_create_dot()

    def emulated(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or b.data.dtype != np.float32 or input_precision == ir.INPUT_PRECISION.IEEE:
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        a_big, b_big = _tf32(a.data), _tf32(b.data)
        out = np.matmul(a_big, b_big, dtype=np.float32)
        if input_precision == ir.INPUT_PRECISION.TF32x3:
            a_small, b_small = _tf32(a.data - a_big), _tf32(b.data - b_big)
            out = np.matmul(a_big, b_small, dtype=np.float32) + np.matmul(a_small, b_big, dtype=np.float32) + out
        elif input_precision != ir.INPUT_PRECISION.TF32:
            raise NotImplementedError(f"gpu_dots: no emulation of input_precision {input_precision}")
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", emulated)


class TritonAccesses:
    """What interpreted Triton launches do to global memory, per program: for every launch (by its
    ``laid_kernels.aot.Launch`` name) the (program id, byte addresses of the unmasked lanes) of each load and store,
    and every atomic operation (none may occur: an atomic is where the order of programs would change bits)."""

    def __init__(self):
        self.loads: dict[str, list] = {}
        self.stores: dict[str, list] = {}
        self.atomics: list[str] = []
        self.launch = "(no Launch)"

    def record(self, table, builder, ptrs, mask) -> None:
        import numpy as np

        lanes = ptrs.data[mask.data] if mask is not None else ptrs.data.reshape(-1)
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        table.setdefault(self.launch, []).append((builder.grid_idx, np.asarray(lanes, dtype=np.int64), width))

    def touched(self, table, launch: str, tensor: torch.Tensor) -> dict[tuple, int]:
        """Per program id: how many lanes of launch ``launch`` in ``table`` (loads or stores) fell in ``tensor``."""
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        counts: dict[tuple, int] = {}
        for program, lanes, _ in table.get(launch, []):
            counts[program] = counts.get(program, 0) + int(((lanes >= start) & (lanes < end)).sum())
        return counts


@pytest.fixture
def triton_accesses(monkeypatch):
    """A :class:`TritonAccesses` recording every interpreted launch of ``laid_kernels.aot.Launch.run`` while the
    test runs (interpreter hooks: the signatures they read are checked, as for the bf16 rounding patch)."""
    import inspect

    from triton.runtime import interpreter

    from laid_kernels import aot
    from laid_kernels.triton_support import require_tested_triton

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records the interpreter's memory accesses (kernels run compiled here)")
    require_tested_triton("tests/conftest.py triton_accesses (interpreter hooks)")
    builder = interpreter.InterpreterBuilder
    accesses = TritonAccesses()
    load, store = builder.create_masked_load, builder.create_masked_store
    for method, first in ((load, ("self", "ptrs", "mask")), (store, ("self", "ptrs", "value", "mask"))):
        names = tuple(inspect.signature(method).parameters)[:len(first)]
        if names != first:
            raise RuntimeError(f"triton_accesses: InterpreterBuilder.{method.__name__} takes {names}, expected "
                               f"{first} first (a Triton release whose interpreter changed)")

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        accesses.record(accesses.loads, self, ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        accesses.record(accesses.stores, self, ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def atomic(name):
        original = getattr(builder, name)

        def wrapper(self, *args, **kwargs):
            accesses.atomics.append(f"{accesses.launch}: {name}")
            return original(self, *args, **kwargs)
        return wrapper

    run = aot.Launch.run

    def launch_run(self):
        accesses.launch = self.name
        try:
            run(self)
        finally:
            accesses.launch = "(no Launch)"

    monkeypatch.setattr(builder, "create_masked_load", create_masked_load)
    monkeypatch.setattr(builder, "create_masked_store", create_masked_store)
    for name in ("create_atomic_rmw", "create_atomic_cas"):
        monkeypatch.setattr(builder, name, atomic(name))
    monkeypatch.setattr(aot.Launch, "run", launch_run)
    return accesses


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_fp32_to_bf16_to_nearest_even_in_interpreter()
