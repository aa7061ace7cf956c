"""Test configuration: without a CUDA device the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is imported (the decorator reads
it), so it is set here, before the test modules import laid_kernels. Ahead-of-time compilation for real GPUs runs
in a subprocess without it (see tests/test_compile_aot.py). PYTHONPATH is set so that every process the tests
start imports this checkout.
"""

import os
import tempfile
from pathlib import Path

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


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_fp32_to_bf16_to_nearest_even_in_interpreter()
