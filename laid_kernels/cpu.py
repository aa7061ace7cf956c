"""The native CPU backend: ``apply_mrope`` and the fused ``qk_align_loss`` in C++ (``csrc/``), built on first use.

Build: the first CPU call compiles ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja
are needed; about a minute with 2 cores, announced on stderr when it starts and ends) into
``TORCH_EXTENSIONS_DIR`` (default torch's build root, ``~/.cache/torch_extensions``)/<build name>; later processes
load the cached library. Importing ``laid_kernels`` never builds.
The code is compiled with ``-march=native``, so the cache entry's name carries a digest of the sources, of this
CPU's instruction-set flags and of the torch version. Without a compiler (or ninja) the backend is unavailable and
``backend="auto"`` falls back to the reference with one warning (``laid_kernels.backends``).

Ops (the C++ kernels are ``torch.ops.laid_cpu.*``, wrapped here as custom ops with autograd):

- ``laid_kernels::mrope_cpu``: R x or R^T x for x [B, N, H, D]; its gradient is the opposite rotation.
- ``laid_kernels::qk_align_cpu``: one pass over q_s, k_s, q_t, k_t (head or frequency mixing) that returns the loss,
  the per-head coefficients and the gradients of the squared error (same outputs as
  ``laid_kernels::qk_align_triton``, see ``laid_kernels.qk_align.finish_loss``; when no input needs a gradient,
  only the loss terms: no gradient is computed or allocated); the backward rescales them per head
  in place by ``laid_kernels::qk_rescale_cpu`` (the saved gradients are used once, so no second copy of dq_s / dk_s
  exists; a second backward through the same graph raises torch's in-place modification error).

Inputs are read through their strides (any strides with a contiguous last dimension; others are copied first);
results are bit-identical whatever the number of threads (fixed token blocks, partial sums reduced in block order).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import backends, reference
from .mrope import mrope_fake, mrope_setup_context, rotation_backward
from .qk_align import (finish_loss, no_grad_outputs, qk_align_backward_with, qk_align_fake, qk_align_setup_context,
                       wants_grads)
from .validation import mixing_form

# The sources: top-level csrc/ in a checkout (laid_kernels/csrc is a symlink to it), copied into installed wheels.
SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("register.cpp", "mrope.cpp", "qk_align.cpp")
HEADERS = ("common.h", "ops.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name() -> str:
    """Name of the cached build: a digest of the sources, the flags, this CPU and the torch version."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode() + _cpu_flags().encode() + torch.__version__.encode())
    return f"laid_kernels_cpu_{digest.hexdigest()[:16]}"


def toolchain_problem() -> str | None:
    """Why the extension cannot be built here (None if it can): files and programs looked up, nothing compiled."""
    missing = [name for name in SOURCES + HEADERS if not (SOURCE_DIR / name).is_file()]
    if missing:
        return f"the C++ sources {missing} are not in {SOURCE_DIR}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; set CXX)"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    return None


# Checked once at import (a few stat calls), so that dispatch reads a constant: torch.compile traces through it.
TOOLCHAIN_PROBLEM = toolchain_problem()


def device_problem(device: torch.device) -> str | None:
    """None on CPU, else why the "cpu" backend cannot run on ``device``."""
    return None if device.type == "cpu" else f"the cpu backend runs on CPU tensors, not {device.type}"


def why_unavailable(device: torch.device) -> str | None:
    """None when the native (C++) CPU ops can run on ``device``, else the reason they cannot."""
    return device_problem(device) or TOOLCHAIN_PROBLEM


def build_directory() -> Path:
    """Where the build of :func:`build_name` lives: ``TORCH_EXTENSIONS_DIR`` (default torch's build root)/name."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / build_name()


@functools.cache
def library():
    """``torch.ops.laid_cpu``, compiling the C++ sources on the first call (cached on disk across processes).

    A build (not a cached load) says so on stderr when it starts and when it ends, since it takes about a minute.
    """
    from torch.utils.cpp_extension import load

    directory = build_directory()
    cached = (directory / f"{build_name()}.so").is_file()
    if not cached:
        print(f"laid_kernels: building the native CPU backend (C++, about a minute; once per machine, CPU and "
              f"torch version) in {directory} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    load(build_name(), [str(SOURCE_DIR / name) for name in SOURCES], extra_cflags=list(CFLAGS),
         extra_ldflags=list(LDFLAGS), build_directory=str(directory), is_python_module=False)
    if not cached:
        print(f"laid_kernels: native CPU backend built in {time.perf_counter() - started:.0f} s, cached in "
              f"{directory}", file=sys.stderr, flush=True)
    return torch.ops.laid_cpu


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (the kernels read any other strides in place), else a copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


@torch.library.custom_op("laid_kernels::mrope_cpu", mutates_args=())
def mrope_cpu(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
              inverse: bool) -> torch.Tensor:
    """R x (or R^T x if ``inverse``) by the C++ kernel; x [B, N, H, D] -> contiguous [B, N, H, D], x's dtype."""
    return library().apply_mrope(_rows(x), positions, inv_freq.float().contiguous(), section[0], section[1],
                                 inverse)


mrope_cpu.register_fake(mrope_fake)
mrope_cpu.register_autograd(rotation_backward(mrope_cpu), setup_context=mrope_setup_context)


def _apply_mrope_cpu(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     section: Sequence[int]) -> torch.Tensor:
    return mrope_cpu(x, positions, inv_freq, list(section), False)


def _qk_align_kernel(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, weight, rope, grads=True,
                     rotated=None):
    """torch.ops.laid_cpu.qk_align with the mixing in the kernel's layout; returns (head sums [Hs + Hs_kv, 3] fp64,
    G_q, G_k, dE/dw_q, dE/dw_k) with the gradients of W in w_q's / w_k's layout; without ``grads`` the last four
    are None (neither computed nor allocated)."""
    frequency = mixing_form(w_q) == "frequency"

    def kernel_layout(w):  # frequency mixing [H_s, H_t, D/2, 2] -> [2, H_s, H_t, D/2] (real parts, imaginary parts)
        w = w.float()
        return (w.permute(3, 0, 1, 2) if frequency else w).contiguous()

    sums, grad_q, grad_k, dw_q, dw_k = library().qk_align(
        _rows(q_s), _rows(k_s), _rows(q_t), _rows(k_t), kernel_layout(w_q), kernel_layout(w_k), positions,
        inv_freq.float().contiguous(), section[0], section[1], weight, rope, frequency, 2.0, grads, rotated)
    if not grads:
        return sums, None, None, None, None
    if frequency:
        dw_q, dw_k = dw_q.permute(1, 2, 3, 0), dw_k.permute(1, 2, 3, 0)
    return sums, grad_q, grad_k, dw_q, dw_k


def qk_align_rotated_rows(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                          w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                          section: Sequence[int], valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The rotated rows R x of q_s, q_t, k_s, k_t (fp32, the inputs' shapes; 0 on padding) exactly as the fused
    L_qk kernel computes and uses them: a debug output for the tests, because the loss cannot see the rotation."""
    batch, seq = q_s.shape[:2]
    weight = reference.token_weights(valid, None, batch, seq, q_s.device).contiguous()
    rotated = [torch.zeros(x.shape) for x in (q_s, q_t, k_s, k_t)]
    _qk_align_kernel(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, weight, True, rotated=rotated)
    return dict(zip(("q_s", "q_t", "k_s", "k_t"), rotated))


@torch.library.custom_op("laid_kernels::qk_align_cpu", mutates_args=())
def qk_align_cpu(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, w_q: torch.Tensor,
                 w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                 token_weight: torch.Tensor | None, valid: torch.Tensor | None, normalize: str, rope: bool,
                 grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    """(loss, alpha, beta, G_q, G_k, grad_w_q, grad_w_k) by the C++ kernel, as ``laid_kernels::qk_align_triton``
    returns them (see ``laid_kernels.qk_align.finish_loss``; without ``grads`` the last four are empty [0]
    tensors, not computed). Shapes as in ``qk_align_loss``."""
    batch, seq = q_s.shape[:2]
    weight = reference.token_weights(valid, token_weight, batch, seq, q_s.device).contiguous()  # [B, N] fp32
    sums, grad_q, grad_k, dw_q, dw_k = _qk_align_kernel(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section,
                                                        weight, rope, grads)
    hs = q_s.shape[2]
    loss, alpha, beta, dw_q, dw_k = finish_loss(sums[:hs], sums[hs:], weight.double().sum(), dw_q, dw_k,
                                                q_s.shape[3], normalize)
    if grads:
        dw_q, dw_k = dw_q.to(w_q.dtype).contiguous(), dw_k.to(w_k.dtype).contiguous()
    return loss, alpha, beta, *no_grad_outputs(grad_q, grad_k, dw_q, dw_k, q_s)


@torch.library.custom_op("laid_kernels::qk_rescale_cpu", mutates_args=("grad",))
def qk_rescale_cpu(grad: torch.Tensor, x_s: torch.Tensor | None, weight: torch.Tensor | None, alpha: torch.Tensor,
                   beta: torch.Tensor) -> None:
    """grad [B, N, H, D] = alpha_i grad + beta_i w_n x_s (x_s None: alpha_i grad) in place, by the C++ kernel."""
    library().qk_align_rescale(grad, None if x_s is None else _rows(x_s), weight, alpha.contiguous(),
                               beta.contiguous())


@qk_rescale_cpu.register_fake
def _qk_rescale_fake(grad, x_s, weight, alpha, beta):
    return None


qk_align_cpu.register_fake(qk_align_fake)
qk_align_cpu.register_autograd(qk_align_backward_with(qk_rescale_cpu), setup_context=qk_align_setup_context)


def _qk_align_loss_cpu(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, section, *, token_weight=None,
                       valid=None, normalize="student", rope=True):
    return qk_align_cpu(q_s, k_s, q_t.detach(), k_t.detach(), w_q, w_k, positions, inv_freq, list(section),
                        token_weight, valid, normalize, rope, wants_grads(q_s, k_s, w_q, w_k))[0]


backends.register_availability("cpu", device_problem)  # every "cpu" op (pure-PyTorch ones included) needs CPU tensors
backends.register_availability("cpu", why_unavailable, ops=("apply_mrope", "qk_align_loss"))  # these need a compiler
backends.register("apply_mrope", "cpu", _apply_mrope_cpu)
backends.register("qk_align_loss", "cpu", _qk_align_loss_cpu)
