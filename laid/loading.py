"""DataLoader settings that fit the machine, shared by training and evaluation.

Building a Visual Haystacks item (reading and resizing its images, then the processor) costs seconds of CPU for
a long haystack, so both loops build items in worker processes while the model computes:

- workers: ``num_workers`` when given, else :func:`default_workers` (half of this process's share of the CPUs,
  at most 4: 1 on a 2-core machine, 4 per process on a node with 8 cores per GPU process);
- ``prefetch_factor`` 2 (two items ready per worker) and persistent workers (training: no restart per epoch);
- pinned memory on CUDA only, so that the host-to-device copy of a batch (its images as uint8 ``image_pixels``,
  8x smaller than the fp32 ``pixel_values`` that ``laid.prompt_inputs.model_inputs`` makes on the GPU) is
  asynchronous; on CPU pinning would be one more copy of every batch for nothing.
"""

from __future__ import annotations

import os

import torch


def default_workers() -> int:
    """min(4, (CPUs this process may use / processes on this node) // 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, cpus // max(1, local_processes) // 2)


def loader_options(num_workers: int | None, device: torch.device, *, persistent: bool = True) -> dict:
    """Keyword arguments for ``torch.utils.data.DataLoader``: workers, prefetch, pinning (see the module doc)."""
    workers = default_workers() if num_workers is None else num_workers
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0 (or None for the default), got {workers}")
    options = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        options.update(prefetch_factor=2, persistent_workers=persistent)
    return options
