"""DataLoader settings that fit the machine, shared by training and evaluation.

Building a Visual Haystacks item (reading and resizing its images, then the processor) costs seconds of CPU for
a long haystack, so both loops build items in worker processes while the model computes:

- workers: ``num_workers`` when given, else :func:`default_workers` (half of this process's share of the CPUs,
  at most 4: 1 on a 2-core machine, 4 per process on a node with 8 cores per GPU process);
- ``prefetch_factor`` 2 (two items ready per worker) and persistent workers (training: no restart per epoch);
- pinned memory on CUDA only, so that the host-to-device copy of a batch (its images as uint8 ``image_pixels``,
  8x smaller than the fp32 ``pixel_values`` that ``laid.prompt_inputs.model_inputs`` makes on the GPU) is
  asynchronous; on CPU pinning would be one more copy of every batch for nothing;
- batches received ahead (:func:`prefetched`): the training loop takes its batches from a background thread
  that receives (unpickles) the next ``PREFETCH_BATCHES`` from the workers while the step computes, so the step
  does not stand waiting for a batch that a worker had already built;
- small tensors by value (:func:`by_value`): a worker hands each tensor of a batch to the main process through a
  shared-memory segment of its own, about a millisecond per tensor however small it is, and a batch of tiny items
  is mostly small tensors (ids, masks, labels, grids). Those of at most ``BY_VALUE_BYTES`` travel inside the
  pickled batch instead (copied three times, microseconds for a kilobyte: each received tensor owns its memory);
  larger ones, such as the 138 MB of ``image_pixels`` of a 150-image item, keep shared memory, which copies
  nothing.
"""

from __future__ import annotations

import os
import queue
import threading
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch

BY_VALUE_BYTES = 1 << 20  # tensors up to 1 MiB travel from a worker inside the pickled batch
PREFETCH_BATCHES = 2  # batches a background thread receives ahead of the training step (0: none)


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


class ByValue:
    """A tensor of a batch on its way from a DataLoader worker: pickled as its bytes, unpickled as the tensor
    (same dtype, shape and values, in ordinary memory) by the process that receives the batch."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        data = self.tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        return _tensor, (data, self.tensor.dtype, tuple(self.tensor.shape))


def _tensor(data: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of a pickled :class:`ByValue`: ``data`` (its bytes, uint8 [n]) seen as ``dtype`` [*shape]."""
    return torch.from_numpy(data).view(dtype).view(shape).clone()  # its own storage, not a view of the pickle's


def by_value(collate_fn: Callable) -> Callable:
    """``collate_fn`` for a DataLoader whose workers send the batch's tensors of at most ``BY_VALUE_BYTES`` by
    value (as :class:`ByValue`, tensors again when the main process receives the batch; in dicts, lists and
    tuples at any depth). Run in the main process (``num_workers=0``), it returns ``collate_fn``'s batch as it is."""
    return partial(_collate_by_value, collate_fn)


def _collate_by_value(collate_fn: Callable, items):
    batch = collate_fn(items)
    return batch if torch.utils.data.get_worker_info() is None else _small_by_value(batch)


def _small_by_value(value):
    if isinstance(value, torch.Tensor):
        return ByValue(value) if value.numel() * value.element_size() <= BY_VALUE_BYTES else value
    if isinstance(value, dict):
        return {key: _small_by_value(v) for key, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_small_by_value(v) for v in value)
    return value


def prefetched(batches: Iterator, depth: int | None = None) -> Iterator:
    """The items of the iterator ``batches``, in order, received up to ``depth`` (default ``PREFETCH_BATCHES``;
    0: none) ahead by a background thread while the caller works on the current one. The first item is taken on
    the caller's thread (accelerate's loaders synchronise random states across processes when iteration starts),
    the others on the thread; an exception raised by ``batches`` is raised here, at the item where it happened.
    Closing the generator (or dropping it) stops the thread."""
    depth = PREFETCH_BATCHES if depth is None else depth
    if depth < 0:
        raise ValueError(f"depth must be >= 0 (0: no prefetch), got {depth}")
    if depth == 0:
        yield from batches
        return
    try:
        first = next(batches)
    except StopIteration:
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def receive() -> None:
        try:
            for batch in batches:
                if not _put(ready, (True, batch), stop):
                    return
            _put(ready, (False, None), stop)
        except BaseException as error:  # handed to the caller's thread, raised there
            _put(ready, (False, error), stop)

    thread = threading.Thread(target=receive, name="laid-prefetch", daemon=True)
    thread.start()
    try:
        yield first
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` into ``ready``, waiting for room unless ``stop`` is set; whether it was put."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
