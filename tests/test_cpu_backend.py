"""The native CPU backend (csrc/, laid_kernels/cpu.py) beyond the shared per-op tests.

Values and gradients against the reference over the shape / dtype grid are in tests/test_qk_align.py and
tests/test_mrope.py (parametrised over every available backend, "cpu" included). Here: bit-identical results for
any thread count, inputs of other dtypes and strides, the in-place backward, dispatch and the one fallback warning,
the build never triggered by import, and a small run of benchmarks/memory_150img.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from kernel_checks import GRAD_FACTOR, VALUE_FACTOR, assert_within_pytorch_error
from test_qk_align import SMALL_SECTION, as_double, loss_and_grads, make_inputs

import laid_kernels
from laid_kernels import apply_mrope, backends, cpu, reference

REPO = Path(__file__).resolve().parents[1]
CPU_PROBLEM = cpu.why_unavailable(torch.device("cpu"))
needs_cpu_backend = pytest.mark.skipif(CPU_PROBLEM is not None, reason=f"native CPU backend: {CPU_PROBLEM}")


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_cpu_backend
def test_qk_align_bit_identical_for_any_thread_count():
    # 2 x 300 tokens = 10 blocks of 64 tokens, so several threads really split the work.
    inputs = make_inputs((28, 4, 40, 8), batch=2, seq=300, dtype=torch.bfloat16)
    runs = [_with_threads(n, lambda: loss_and_grads(inputs, 0.73, backend="cpu")) for n in (1, 2, 3, 4)]
    first_loss, first_grads = runs[0]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, first_loss)
        for name, grad in grads.items():
            assert torch.equal(grad, first_grads[name]), name


@needs_cpu_backend
def test_qk_align_frequency_mixing_bit_identical_for_any_thread_count():
    # 2 x 2100 tokens: two units of 4096 tokens (frequency mixing reduces its dC partials per unit).
    inputs = make_inputs((4, 2, 6, 3), batch=2, seq=2100, dim=16, section=(2, 3, 3), dtype=torch.bfloat16,
                         mixing="frequency")
    runs = [_with_threads(n, lambda: loss_and_grads(inputs, 0.73, backend="cpu")) for n in (1, 2, 3)]
    first_loss, first_grads = runs[0]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, first_loss)
        for name, grad in grads.items():
            assert torch.equal(grad, first_grads[name]), name
    torch_loss, torch_grads = loss_and_grads(inputs, 0.73, backend="reference")
    exact_loss, exact_grads = loss_and_grads(as_double(inputs), 0.73, backend="reference")
    assert_within_pytorch_error("loss", first_loss, torch_loss, exact_loss, VALUE_FACTOR)
    for name, grad in first_grads.items():
        assert_within_pytorch_error(f"d{name}", grad, torch_grads[name], exact_grads[name], GRAD_FACTOR)


@needs_cpu_backend
def test_apply_mrope_bit_identical_for_any_thread_count():
    inputs = make_inputs((28, 4, 40, 8), batch=2, seq=300, dtype=torch.bfloat16)
    args = (inputs["q_s"], inputs["positions"], inputs["inv_freq"], inputs["mrope_section"])
    one, three = (_with_threads(n, lambda: apply_mrope(*args, backend="cpu")) for n in (1, 3))
    assert torch.equal(one, three)


@needs_cpu_backend
@pytest.mark.parametrize("case", ["fp16", "fp32 student / bf16 teacher", "non-contiguous last dim", "rope=False",
                                  "head_dim 12"])
def test_qk_align_other_dtypes_and_layouts(case):
    dtype = torch.float16 if case == "fp16" else torch.float32
    dim, section = (12, (2, 2, 2)) if case == "head_dim 12" else (64, SMALL_SECTION)  # 12: chunk rows are padded
    inputs = make_inputs((16, 2, 40, 8), batch=2, seq=37, dim=dim, section=section, dtype=dtype)
    kwargs = {"rope": False} if case == "rope=False" else {}
    if case == "fp32 student / bf16 teacher":
        inputs["q_t"], inputs["k_t"] = inputs["q_t"].bfloat16(), inputs["k_t"].bfloat16()
    if case == "non-contiguous last dim":  # e.g. a [B, N, D, H] buffer seen as [B, N, H, D]
        for name in ("q_s", "q_t"):
            inputs[name] = inputs[name].transpose(2, 3).contiguous().transpose(2, 3)
            assert inputs[name].stride(-1) != 1
    loss, grads = loss_and_grads(inputs, 0.73, backend="cpu", **kwargs)
    torch_loss, torch_grads = loss_and_grads(inputs, 0.73, backend="reference", **kwargs)
    exact_loss, exact_grads = loss_and_grads(as_double(inputs), 0.73, backend="reference", **kwargs)
    assert_within_pytorch_error("loss", loss, torch_loss, exact_loss, VALUE_FACTOR)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_within_pytorch_error(f"d{name}", grad, torch_grads[name], exact_grads[name], GRAD_FACTOR)


@needs_cpu_backend
def test_second_backward_through_the_same_graph_is_refused():
    """The backward scales the saved gradients in place (no second copy); reusing the graph must fail loudly."""
    inputs = make_inputs((16, 2, 40, 8), batch=1, seq=20, dim=64, section=SMALL_SECTION)
    q_s = inputs["q_s"].detach().clone().requires_grad_()
    loss = laid_kernels.qk_align_loss(q_s, inputs["k_s"], inputs["q_t"], inputs["k_t"], inputs["w_q"],
                                      inputs["w_k"], inputs["positions"], inputs["inv_freq"], SMALL_SECTION,
                                      backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@needs_cpu_backend
def test_auto_picks_cpu_on_cpu_tensors():
    assert backends.auto_backend("qk_align_loss", torch.device("cpu")) == "cpu"
    assert backends.auto_backend("apply_mrope", torch.device("cpu")) == "cpu"
    assert "cpu" not in laid_kernels.available_backends("qk_align_loss", "meta")


def test_without_a_compiler_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    for op in ("qk_align_loss", "apply_mrope"):
        monkeypatch.setitem(backends._AVAILABILITY, (op, "cpu"), lambda device: "no C++ compiler found (test)")
    monkeypatch.setattr(backends, "_cpu_fallback_warned", False)
    inputs = make_inputs((16, 2, 40, 8), batch=1, seq=5, dim=64, section=SMALL_SECTION)
    args = [inputs[k] for k in ("q_s", "k_s", "q_t", "k_t", "w_q", "w_k", "positions", "inv_freq", "mrope_section")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [laid_kernels.qk_align_loss(*args) for _ in range(3)]
        apply_mrope(inputs["q_s"], inputs["positions"], inputs["inv_freq"], SMALL_SECTION)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler found (test)" in messages[0] and "reference" in messages[0]
    assert all(torch.equal(loss, reference.qk_align_loss(*args)) for loss in losses)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        laid_kernels.qk_align_loss(*args, backend="cpu")


def test_toolchain_check_names_the_missing_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-for-laid")
    problem = cpu.toolchain_problem()
    assert problem is not None and "no-such-compiler-for-laid" in problem
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX")
    assert "compiler" in cpu.toolchain_problem()
    assert "CPU tensors" in cpu.why_unavailable(torch.device("meta"))


def test_the_compiler_check_covers_only_the_cpp_ops(monkeypatch):
    """Another op's pure-PyTorch "cpu" implementation stays available without a compiler (only CPU tensors)."""
    monkeypatch.setattr(cpu, "TOOLCHAIN_PROBLEM", "no C++ compiler found (test)")
    monkeypatch.setitem(backends._IMPLEMENTATIONS, "some_torch_op", {"cpu": lambda: None})
    assert backends.available_backends("some_torch_op", "cpu") == ["cpu"]
    assert backends.available_backends("some_torch_op", "meta") == []
    assert "cpu" not in backends.available_backends("qk_align_loss", "cpu")


def test_import_builds_nothing():
    code = ("import laid_kernels, laid_kernels.cpu as c; "
            "assert c.library.cache_info().currsize == 0; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, TORCH_EXTENSIONS_DIR="/nonexistent/laid-must-not-build"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_sources_ship_with_the_package():
    assert cpu.SOURCE_DIR == Path(cpu.__file__).parent / "csrc"
    for name in cpu.SOURCES + cpu.HEADERS:
        assert (cpu.SOURCE_DIR / name).is_file(), name
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"laid_kernels.csrc" = ["*.cpp", "*.h"]' in pyproject


@needs_cpu_backend
def test_benchmark_script_small_run(tmp_path):
    """benchmarks/memory_150img.py end to end at 1 and 2 images (the full 150-image run is not a test)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_150img.py"), "--images", "1", "2",
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| images |" in done.stdout and "floor" in done.stdout and "vs compiled" in done.stdout
    result = json.loads((tmp_path / "memory_150img_cpu_7b.json").read_text())
    assert (tmp_path / "memory_150img_cpu_7b.png").stat().st_size > 0
    records = {(r["images"], r["variant"]): r for r in result["records"]}
    assert set(records) == {(n, v) for n in (1, 2) for v in ("reference", "compiled", "fused")}
    assert records[(1, "compiled")]["compile_s"] > 0 and records[(1, "compiled")]["backend"] == "reference"
    one, two = records[(1, "fused")], records[(2, "fused")]
    assert one["backend"] == "cpu" and records[(1, "reference")]["backend"] == "reference"
    # 357 visual tokens per image (+ 2 delimiters and a "Picture k: " prefix) on top of the same chat text.
    assert two["tokens"] - one["tokens"] >= 359
    assert one["input_bytes"] > 0 and one["grad_bytes"] > 0 and one["time_s"] > 0 and one["roofline_s"] > 0
    # The memory step first (not in the time), then the timed steps; kernel CPU seconds for each.
    for record in (one, two, records[(1, "compiled")], records[(1, "reference")]):
        assert len(record["times_s"]) == len(record["system_s"]) == 2 and record["time_s"] == record["times_s"][1]
    assert one["floor_s"] > one["fresh_gradients_s"] > 0 and result["loss"] == {"normalize": "student", "mixing": "head"}
    assert result["rates"]["copy_bytes_per_s"] > 0 and result["rates"]["matmul_flop_per_s"] > 0


def test_a_build_is_announced_on_stderr_and_a_cached_load_is_silent(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension

    def fake_build(name, sources, *, build_directory, **options):  # writes the library a real build would
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_build)
    cpu.library.cache_clear()
    try:
        cpu.library()
        said = capsys.readouterr().err
        assert "building the native CPU backend" in said and f"cached in {tmp_path / cpu.build_name()}" in said, said
        cpu.library.cache_clear()
        cpu.library()
        assert capsys.readouterr().err == ""
    finally:
        cpu.library.cache_clear()  # the next call loads the real library again


def test_laid_kernels_imports_and_runs_without_triton():
    """A process where ``import triton`` fails (macOS, Windows, CPU-only containers): the reference and the C++
    backend work, and backend="triton" is a clear error naming the cause."""
    script = """
import sys
sys.modules["triton"] = None  # any 'import triton' now raises ImportError
import torch
import laid_kernels
from laid_kernels import apply_mrope, available_backends, qk_align_loss
import laid
x = torch.randn(1, 3, 2, 8)
positions, inv_freq = torch.arange(3)[None], torch.ones(4)
expected = apply_mrope(x, positions, inv_freq, (2, 1, 1), backend="reference")
for backend in available_backends("apply_mrope", "cpu"):
    torch.testing.assert_close(apply_mrope(x, positions, inv_freq, (2, 1, 1), backend=backend), expected)
print("backends", available_backends("qk_align_loss", "cpu"))
try:
    apply_mrope(x, positions, inv_freq, (2, 1, 1), backend="triton")
except RuntimeError as error:
    print("error", error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    expected_backends = ["reference"] + (["cpu"] if CPU_PROBLEM is None else [])
    assert f"backends {expected_backends}" in done.stdout, done.stdout
    assert "error apply_mrope: backend='triton' cannot run on cpu: triton cannot be imported" in done.stdout, \
        done.stdout
