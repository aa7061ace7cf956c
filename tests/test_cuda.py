"""The compiled Triton kernels on a real GPU (``pytest -m cuda``): the self-check's accuracy and determinism checks
at the real 7B / 3B against 32B shapes, fp32, bf16 and fp16. Skipped where there is no CUDA device; the
interpreter tests cover the numerics elsewhere, but only a GPU runs compiled code, TF32 dots and real races.
"""

from __future__ import annotations

import pytest
import torch

from laid_kernels import selfcheck

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run: pytest -m cuda)")]

CASES = [(op, form) for op in ("apply_mrope", "qk_align_loss", "attn_match_loss") for form in selfcheck.forms(op)]


@pytest.mark.parametrize("dtype", list(selfcheck.DTYPES))
@pytest.mark.parametrize("pair", list(selfcheck.PAIRS))
@pytest.mark.parametrize("op, form", CASES, ids=[f"{op}-{'-'.join(f.values()) or 'rope'}" for op, f in CASES])
def test_triton_within_the_error_of_the_same_precision_reference(op, form, pair, dtype):
    inputs = selfcheck.make_inputs(selfcheck.PAIRS[pair], 3, selfcheck.DTYPES[dtype], "cuda",
                                   first_position=selfcheck.ACCURACY_FIRST_POSITION)
    result = selfcheck.guarded(selfcheck.check_accuracy, op, form, inputs, "triton")
    assert result["passed"], result


@pytest.mark.parametrize("op, form", CASES, ids=[f"{op}-{'-'.join(f.values()) or 'rope'}" for op, f in CASES])
def test_triton_is_bitwise_deterministic_on_the_gpu(op, form):
    inputs = selfcheck.make_inputs(selfcheck.PAIRS["7b/32b"], 3, torch.bfloat16, "cuda")
    result = selfcheck.guarded(selfcheck.check_determinism, op, form, inputs, "triton", runs=20)
    assert result["passed"], result
