"""Test configuration: the Triton kernels run under the interpreter on this GPU-less machine.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is imported (the decorator reads
it), so it is set here, before the test modules import laid_kernels. Ahead-of-time compilation for real GPUs runs in
a subprocess without it (see tests/test_compile_aot.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
