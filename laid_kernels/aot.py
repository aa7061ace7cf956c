"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one.

A kernel module describes every launch it makes as a :class:`Launch` (the jit kernel, its grid, the exact
arguments and launch options). The same object launches the kernel (:meth:`Launch.run`) and, with meta tensors in
place of the real ones, is compiled here for a GPU architecture: Triton's own binder derives the signature, the
specialisations (ints equal to 1, 16-divisible ints and 16-byte-aligned pointers) and the constexprs from those
arguments, exactly as a launch on the GPU would, so what is compiled is what runs.

Under ``TRITON_INTERPRET=1`` (the tests) the kernels are interpreter objects that cannot be compiled, so
:func:`compile_in_subprocess` runs the compilation in a fresh interpreter-free Python process::

    results = compile_in_subprocess("laid_kernels.qk_align:aot_launches", {"heads": (28, 4, 40, 8)}, archs=(80, 90))
    results[0].registers, results[0].local_bytes, "cos.approx" in results[0].ptx

The factory named there is a function returning ``list[Launch]`` built from meta tensors.
Resource usage (REG, SHARED, LOCAL, STACK) is read from the cubin with the ``cuobjdump`` shipped in the Triton wheel.
SHARED there is the static shared memory only; what a launch really asks for (Triton allocates its software
pipeline's buffers and its reduction / layout-conversion scratch dynamically) is the compiled kernel's
``metadata.shared``, recorded as ``launch_shared_bytes``. ``num_stages`` (the software pipeline's depth) can be
overridden for every launch of a factory, to compare depths; the asynchronous copies the pipeline emits are counted
in the PTX (``cp.async`` to shared memory; ``cp.async.bulk.tensor``: TMA, sm_90).
LOCAL 0 is not enough to rule out register spills (ptxas puts them in the stack frame, which the accurate
libdevice cos/sin also use for their 28-byte argument-reduction array), so the PTX is also assembled again with
Triton's own ptxas and flags, with ``-v``, and its "spill stores" / "spill loads" byte counts are reported.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# fp fusion (a * b + c -> fma) is set explicitly on every launch: Triton 3.9 warns that its default changes in 3.10.
# Fused multiply-add rounds once instead of twice, so it is never less accurate; the kernels' tolerances hold with
# it on (GPU) and off (the interpreter does not fuse).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@dataclasses.dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``.

    name: a label for reports ("qk_align/query"); args: positional kernel arguments (tensors, ints, floats) in
    parameter order; constexprs: the ``tl.constexpr`` parameters by name; maxnreg: a register limit per thread
    for ptxas (None: ptxas's own choice, which for some kernels is 128 registers with spills where 255 are
    allowed).
    """

    name: str
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 1
    maxnreg: int | None = None

    def options(self) -> dict[str, Any]:
        """The launch options: warps, stages, LAUNCH_OPTIONS and maxnreg when set."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **LAUNCH_OPTIONS,
                **({} if self.maxnreg is None else {"maxnreg": self.maxnreg})}

    def run(self) -> None:
        """Launch the kernel (on the GPU, or under the interpreter for CPU tensors)."""
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())


@dataclasses.dataclass
class CompileResult:
    """What one launch compiles to for one architecture (``arch`` 80 = A100, 90 = H100).

    shared_bytes: static shared memory (cuobjdump SHARED); launch_shared_bytes: the shared memory the launch asks
    for (Triton's ``metadata.shared``, static and dynamic: what must fit the arch's limit per block); cp_async /
    tma: ``cp.async`` copies to shared memory and ``cp.async.bulk.tensor`` (TMA) copies in the PTX.
    """

    name: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    grid: list[int]
    constexprs: dict[str, Any]
    registers: int
    shared_bytes: int
    launch_shared_bytes: int
    local_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    cp_async: int
    tma: int
    ptx: str


def why_cannot_compile() -> str | None:
    """None when this machine can compile and inspect kernels ahead of time, else the reason (for skips)."""
    from .triton_support import untested_triton_reason

    reason = untested_triton_reason()
    if reason is not None:
        return reason
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        if not get_ptxas(90).path:
            return "Triton's ptxas is missing"
    except Exception as error:  # noqa: BLE001 - any failure here means no NVIDIA compiler
        return f"Triton's NVIDIA backend / ptxas is not available: {error}"
    if cuobjdump_path() is None:
        return "cuobjdump is missing (it ships in triton/backends/nvidia/bin)"
    return None


def cuobjdump_path() -> Path | None:
    """The cuobjdump inside the Triton wheel (or on PATH), or None if there is none."""
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if shipped.exists():
        return shipped
    found = subprocess.run(["which", "cuobjdump"], capture_output=True, text=True).stdout.strip()
    return Path(found) if found else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, SHARED, LOCAL and STACK of the (single) function in ``cubin``, from ``cuobjdump --dump-resource-usage``."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}
    missing = {"REG", "SHARED", "LOCAL", "STACK"} - usage.keys()
    if missing:
        raise RuntimeError(f"cuobjdump output lacks {sorted(missing)}:\n{text}")
    return usage


def ptxas_spills(ptx: str, arch: int, enable_fp_fusion: bool = True) -> dict[str, int]:
    """Spill store / load bytes and stack frame of ``ptx``, from Triton's ptxas run as Triton runs it, with -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "k.ptx"
        source.write_text(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v",
                   "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o",
                   str(Path(tmp) / "k.cubin")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if found is None:
        raise RuntimeError(f"no spill report in ptxas -v output:\n{log}")
    stack, stores, loads = (int(g) for g in found.groups())
    return {"stack": stack, "spill_stores": stores, "spill_loads": loads}


def async_copies(ptx: str) -> dict[str, int]:
    """Asynchronous global-to-shared copies in ``ptx``: "cp_async" (``cp.async.ca`` / ``cp.async.cg``, sm_80+) and
    "tma" (``cp.async.bulk.tensor``, sm_90); the commit / wait instructions are not counted."""
    return {"cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx)),
            "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))}


def compile_launch(launch: Launch, arch: int) -> CompileResult:
    """Compile ``launch`` for ``GPUTarget("cuda", arch, 32)`` in this process (needs real JIT kernels, i.e. no
    ``TRITON_INTERPRET=1``) and read its resource usage."""
    from .triton_support import require_tested_triton

    require_tested_triton("laid_kernels.aot (it binds launch arguments with Triton's private launch binder)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{launch.name}: {kernel!r} is not a JIT kernel (TRITON_INTERPRET=1 set?); "
                           "use compile_in_subprocess")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constexprs, **launch.options()}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    spills = ptxas_spills(compiled.asm["ptx"], arch, options.enable_fp_fusion)
    return CompileResult(name=launch.name, kernel=kernel.__name__, arch=arch, num_warps=launch.num_warps,
                         num_stages=compiled.metadata.num_stages, grid=list(launch.grid),
                         constexprs={k: _jsonable(v) for k, v in launch.constexprs.items()},
                         registers=usage["REG"], shared_bytes=usage["SHARED"],
                         launch_shared_bytes=compiled.metadata.shared, local_bytes=usage["LOCAL"],
                         stack_bytes=usage["STACK"], spill_store_bytes=spills["spill_stores"],
                         spill_load_bytes=spills["spill_loads"], **async_copies(compiled.asm["ptx"]),
                         ptx=compiled.asm["ptx"])


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _factory(spec: str):
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def compile_in_subprocess(factory: str, kwargs: dict[str, Any], archs: Sequence[int] = (80, 90),
                          timeout: float = 600, num_stages: int | None = None) -> list[CompileResult]:
    """Compile every launch of ``factory(**kwargs)`` ("module:function" returning ``list[Launch]``, JSON-able
    kwargs) for each arch, in a child process without ``TRITON_INTERPRET``; with ``num_stages`` (>= 1), every launch
    at that pipeline depth instead of its own. Results in launch order, then arch."""
    if num_stages is not None and (isinstance(num_stages, bool) or not isinstance(num_stages, int)
                                   or num_stages < 1):
        raise ValueError(f"num_stages: expected None or an int >= 1, got {num_stages!r}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    request = json.dumps({"factory": factory, "kwargs": kwargs, "archs": list(archs), "num_stages": num_stages})
    done = subprocess.run([sys.executable, "-m", "laid_kernels.aot"], input=request, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compilation of {factory} failed:\n{done.stderr[-4000:]}")
    return [CompileResult(**r) for r in json.loads(done.stdout)]


def _main() -> None:
    request = json.loads(sys.stdin.read())
    launches = _factory(request["factory"])(**request["kwargs"])
    if request["num_stages"] is not None:
        launches = [dataclasses.replace(launch, num_stages=request["num_stages"]) for launch in launches]
    results = [dataclasses.asdict(compile_launch(launch, arch)) for launch in launches for arch in request["archs"]]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    _main()
