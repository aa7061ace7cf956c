"""Tolerance rule shared by the kernel tests (flash-attention style, see shared/notes/style-anchors.md).

A backend's result is compared with the exact answer (the reference run in float64 on the same, already rounded,
inputs) and must be within ``factor`` times the error of the plain PyTorch reference run in the input dtype (2x for
values, 3x for gradients), plus a small floor. The floor is fp32 rounding: every backend computes in fp32 whatever the
input dtype, in a different summation order than PyTorch, so where PyTorch happens to be almost exact (fp32 inputs,
short sums) the kernel may still differ by a few fp32 ulps of the largest magnitude; ``FLOOR`` = 2^-17 (64 ulps of
fp32) relative to the largest exact value covers reductions of up to a few thousand terms, and is far below any
bf16 / fp16 error (2^-9 / 2^-12 relative), so it never hides a low-precision mistake.
"""

from __future__ import annotations

import torch

FLOOR = 2.0 ** -17
VALUE_FACTOR = 2.0
GRAD_FACTOR = 3.0


def assert_within_pytorch_error(name: str, actual: torch.Tensor, pytorch: torch.Tensor, exact: torch.Tensor,
                                factor: float) -> None:
    """max|actual - exact| <= factor * max|pytorch - exact| + FLOOR * max|exact| (all compared in float64)."""
    actual, pytorch, exact = actual.double(), pytorch.double(), exact.double()
    assert actual.shape == exact.shape, f"{name}: shape {list(actual.shape)} != {list(exact.shape)}"
    error = (actual - exact).abs().max().item()
    pytorch_error = (pytorch - exact).abs().max().item()
    bound = factor * pytorch_error + FLOOR * exact.abs().max().item()
    assert error <= bound, (f"{name}: error {error:.3e} > {factor} x PyTorch same-dtype error {pytorch_error:.3e} "
                            f"+ floor = {bound:.3e}")
