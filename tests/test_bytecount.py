"""benchmarks/bytecount.py counts exactly what a Triton kernel loads and stores under the interpreter.

The M-RoPE kernel is the yardstick: one program per token reads that token's x (all heads) once, its three
positions and the D/2 inverse frequencies, and writes its rotated x once, so every count is known in closed form.
The counter hooks private interpreter methods whose argument lists differ between Triton releases; this test runs
on whichever release is installed (CI: the one torch pins; `pip install --no-deps triton==3.9.0` for the newest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from laid_kernels.backends import TRITON_INTERPRET
from laid_kernels.mrope import mrope_launch
from laid_kernels.triton_support import untested_triton_reason

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bytecount import ByteCounter  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not TRITON_INTERPRET, reason="counts bytes under the Triton interpreter (TRITON_INTERPRET=1)"),
    pytest.mark.skipif(untested_triton_reason() is not None, reason=str(untested_triton_reason())),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_every_load_and_store_of_mrope(dtype):
    batch, seq, heads, dim = 2, 5, 3, 16
    x = torch.randn(batch, seq, heads, dim).to(dtype)
    out = torch.empty_like(x)
    positions = torch.arange(seq).repeat(3, batch, 1)
    inv_freq = 1.0 / 1e4 ** (torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)
    launch = mrope_launch(x, out, positions, inv_freq, (2, 3, 3), inverse=False)
    with ByteCounter({"x": x, "out": out, "positions": positions, "inv_freq": inv_freq}) as counter:
        launch.run()
    tokens = batch * seq
    assert dict(counter.loads) == {"x": x.numel() * x.element_size(), "positions": tokens * 3 * 8,
                                   "inv_freq": tokens * (dim // 2) * 4}
    assert dict(counter.stores) == {"out": out.numel() * out.element_size()}
    assert counter.total() == sum(counter.loads.values()) + sum(counter.stores.values())


def test_restores_the_interpreter_on_exit():
    from triton.runtime import interpreter

    before = (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store)
    with ByteCounter({}):
        assert interpreter.InterpreterBuilder.create_masked_load is not before[0]
    assert (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store) \
        == before
