"""Every Triton kernel of apply_mrope and qk_align_loss compiles ahead of time for sm_80 (A100) and sm_90 (H100),
with the block sizes and warps it launches with for the 7B-student / 32B-teacher shapes (q heads 28 / 40, kv heads
4 / 8, head_dim 128; qk_align in head and frequency mixing, also with the trainer's flags: 54K tokens, a valid
mask, no token weights, for bf16, fp16 and fp32 inputs, and without gradients as under torch.no_grad), the
backward's rescaling kernel included, without register spills, and with accurate (libdevice) cos / sin.

The launches come from each module's ``aot_launches``, built by the same code that launches on the GPU (meta tensors
stand in for the inputs), and are compiled in a subprocess without TRITON_INTERPRET (laid_kernels.aot).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laid_kernels.aot import compile_in_subprocess, why_cannot_compile
from laid_kernels.qk_align import aot_configurations

ARCHS = (80, 90)
SHAPES = {"heads": [28, 4, 40, 8], "tokens": 512, "head_dim": 128, "section": [16, 24, 24], "dtype": "bfloat16"}


pytestmark = pytest.mark.skipif(why_cannot_compile() is not None, reason=str(why_cannot_compile()))
PARAMS = {"mrope": ("laid_kernels.mrope:aot_launches", SHAPES),
          **{f"qk_align {label}".strip(): ("laid_kernels.qk_align:aot_launches", kwargs)
             for label, kwargs in aot_configurations(SHAPES).items()}}


@pytest.fixture(scope="module", params=list(PARAMS.values()), ids=list(PARAMS))
def compiled(request):
    factory, shapes = request.param
    return compile_in_subprocess(factory, shapes, ARCHS)


def test_every_launch_compiles_for_both_archs(compiled):
    names = {r.name for r in compiled}
    assert names, "no launches"
    for name in names:
        assert sorted(r.arch for r in compiled if r.name == name) == list(ARCHS), name
    for r in compiled:
        assert 0 < r.registers <= 255, (r.name, r.arch, r.registers)


def test_no_register_spills(compiled):
    for r in compiled:
        if r.arch == 90:
            assert r.local_bytes == 0, (r.name, "LOCAL", r.local_bytes)
        assert r.spill_store_bytes == 0 and r.spill_load_bytes == 0, (r.name, r.arch, r.spill_store_bytes,
                                                                      r.spill_load_bytes)


def test_accurate_cos_sin(compiled):
    for r in compiled:
        assert "cos.approx" not in r.ptx and "sin.approx" not in r.ptx, (r.name, r.arch)


def test_compile_report_script_small_run(tmp_path):
    """benchmarks/compile_report.py end to end on 64 interpreted tokens, so that the script cannot rot."""
    repo = Path(__file__).resolve().parent.parent
    script = repo / "benchmarks" / "compile_report.py"
    # This checkout's laid_kernels, not an installed copy (the script's own folder comes first on sys.path).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script), "--tokens", "64", "--frequency-counts", "2", "4", "--out",
                           str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert {row["arch"] for row in report["compile"]} == {"sm_80", "sm_90"}
    assert all(row["spill_stores"] == 0 and row["spill_loads"] == 0 for row in report["compile"])
    qk = report["qk_align"]
    assert qk["tokens"] == 64 and qk["minimal"] <= qk["fused"] <= 1.1 * qk["minimal"]
    frequency = report["qk_align_frequency"]  # counted at 2 and 4 tokens, combined for 54K (the 1.10 target)
    assert frequency["counted_at"] == [2, 4] and frequency["tokens"] == 54_000 and frequency["chunks"] > 1
    assert frequency["minimal"] <= frequency["fused"] <= 1.1 * frequency["minimal"]
    assert (tmp_path / "compile_report.png").stat().st_size > 0


def test_num_stages_reaches_the_compiler_and_is_recorded():
    """compile_in_subprocess(num_stages=...) compiles every launch at that pipeline depth: the fused L_qk pass of a
    small head set at depth 3 gets cp.async copies and more shared memory than at its launched depth (1, recorded as
    such), and a depth below 1 is rejected by name."""
    factory, shapes = "laid_kernels.qk_align:aot_launches", {"heads": [4, 4, 8, 8], "tokens": 512}
    launched = compile_in_subprocess(factory, shapes, (80,))
    deeper = compile_in_subprocess(factory, shapes, (80,), num_stages=3)
    assert [r.num_stages for r in launched] == [1] * len(launched)
    assert [r.num_stages for r in deeper] == [3] * len(deeper)
    for one, three in zip(launched, deeper):
        assert one.name == three.name and one.tma == three.tma == 0
        if "rescale" not in one.name:  # the fused pass has a token loop to pipeline; the rescaling has none
            assert one.cp_async == 0 < three.cp_async, (one.name, one.cp_async, three.cp_async)
            assert one.launch_shared_bytes < three.launch_shared_bytes, one.name
    with pytest.raises(ValueError, match="num_stages"):
        compile_in_subprocess(factory, shapes, (80,), num_stages=0)
