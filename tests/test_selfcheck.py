"""laid selfcheck: says so and exits 0 without a GPU; its whole code path runs on the CPU backends (--device cpu)."""

from __future__ import annotations

import json

import pytest
import torch

from laid.cli import main
from laid_kernels import selfcheck


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys):
    assert main(["selfcheck", "--out", str(tmp_path)]) == 0
    assert "no CUDA device on this machine: nothing was checked or timed" in capsys.readouterr().out
    assert not (tmp_path / "selfcheck.json").exists()


def test_cpu_run_checks_every_op_and_form(tmp_path, capsys):
    assert selfcheck.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "selfcheck.json").read_text())
    checked = {(r["op"], json.dumps(r["form"], sort_keys=True)) for r in report["accuracy"]}
    expected = {(op, json.dumps(form, sort_keys=True)) for op in ("apply_mrope", "qk_align_loss", "attn_match_loss")
                for form in selfcheck.forms(op)}
    assert checked == expected
    assert {r["dtype"] for r in report["accuracy"]} == set(selfcheck.DTYPES)
    assert all(r["passed"] for r in report["accuracy"] + report["determinism"] + report["training"])
    assert {r["variant"] for r in report["timing"]} == {"fused", "eager", "compiled"}
    assert set(report["phase_seconds"]) == {"accuracy", "determinism", "timing", "training"}
    assert "all checks passed" in capsys.readouterr().out


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    """The bound is not vacuous: an op off by 1e-3 of its scale fails, and the failure is reported."""
    inputs = selfcheck.make_inputs(selfcheck.PAIRS["3b/32b"], 1, torch.float32, "cpu")
    real = selfcheck.apply_mrope
    monkeypatch.setattr(selfcheck, "apply_mrope",
                        lambda x, *a, backend, **k: real(x, *a, backend=backend, **k) * (1 + 1e-3 * (backend != "reference")))
    result = selfcheck.check_accuracy("apply_mrope", {}, inputs, "cpu")
    assert not result["passed"] and result["value_error"] > result["value_bound"]
    report = {"accuracy": [{"op": "apply_mrope", "form": {}, "pair": "3b/32b", "dtype": "fp32", **result}],
              "determinism": [], "training": []}
    assert len(selfcheck.failures(report)) == 1


def test_positions_follow_the_mrope_rule():
    positions, query = selfcheck.vhs_positions(2, text=3)
    assert positions.shape == (3, 1, 3 + 357 + 3 + 357 + 3) and query.sum() == 3
    image = positions[:, 0, 3:3 + 357]
    assert (image[0] == 3).all() and image[1].max() == 3 + 16 and image[2].max() == 3 + 20
    assert positions[0, 0, 360].item() == 3 + 21  # text after the image resumes after its largest position


def test_a_form_the_backend_does_not_implement_is_a_failed_check():
    """NotImplementedError (e.g. a Triton form not merged yet) fails the check with its message; it is not skipped."""
    def lacking(*args, **kwargs):
        raise NotImplementedError("backend='triton' does not implement mixing='frequency'")

    result = selfcheck.guarded(lacking, "qk_align_loss", {"normalize": "student", "mixing": "frequency"}, {}, "triton")
    assert result == {"passed": False, "error": "NotImplementedError: backend='triton' does not implement "
                                                "mixing='frequency'"}
    report = {"accuracy": [{"op": "qk_align_loss", "form": {"mixing": "frequency"}, "pair": "7b/32b", "dtype": "bf16",
                            **result}], "determinism": [{"op": "qk_align_loss", "form": {}, **result}], "training": []}
    lines = selfcheck.failures(report)
    assert len(lines) == 2 and all(line.endswith(f": {result['error']}") for line in lines), lines
