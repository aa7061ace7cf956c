"""The interpreter's fp32 -> bf16 conversion rounds to nearest even, as the GPU does (tests/conftest.py's patch).

Without the patch the interpreter truncates, and every bf16 tolerance test of the kernels would measure that.
"""

from __future__ import annotations

import pytest
import torch

from laid_kernels.backends import TRITON_INTERPRET
from laid_kernels.triton_support import IMPORT_ERROR, tl, triton

pytestmark = pytest.mark.skipif(IMPORT_ERROR is not None or not TRITON_INTERPRET,
                                reason="needs triton and the interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _to_bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, x.to(tl.bfloat16), mask=offsets < n)


def test_fp32_to_bf16_rounds_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    # Random values, plus exact ties between two bf16 neighbours (1 + 2^-8 and 1 + 3 * 2^-8 round to even).
    x = torch.cat([torch.randn(250, generator=g), torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)])])
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, out, x.numel(), BLOCK=256)
    expected = x.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), (out - expected).abs().max()
