"""Count the global-memory bytes a Triton kernel moves, by running it under the interpreter.

Every ``tl.load`` / ``tl.store`` of the interpreter goes through ``InterpreterBuilder.create_masked_load`` /
``create_masked_store`` (unmasked ones too, with an all-true mask); :class:`ByteCounter` wraps both and adds the bytes
of the unmasked lanes, attributed to the named tensor whose storage holds the first address of the access. The
wrappers read only the pointers and the mask and forward every other argument unchanged, because the rest of the
argument list differs between Triton releases (3.8 passes cache modifier and eviction policy, 3.9 one cache
policy); that the two they read are there is checked on entry, and the Triton release is checked against
``laid_kernels.triton_support.TESTED_TRITON``. This is
what the kernel asks of memory, lane by lane: it does not model caches (a GPU would serve repeated reads of a small
tensor such as inv_freq from L1 / L2), so it is an upper bound on DRAM traffic for such reads and exact for the
streamed inputs and outputs.

Needs ``TRITON_INTERPRET=1`` before the kernels are imported, and CPU tensors.

    with ByteCounter({"x": x, "out": out}) as counter:
        apply_mrope(x, positions, inv_freq, section, backend="triton")
    counter.loads["x"], counter.stores["out"], counter.total()
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch


class ByteCounter:
    """Context manager counting interpreted load / store bytes per named tensor ("other" for unnamed memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._ranges = []
        for name, t in tensors.items():
            if t is None or t.numel() == 0:
                continue
            start = t.untyped_storage().data_ptr()
            self._ranges.append((start, start + t.untyped_storage().nbytes(), name))
        self.loads: dict[str, int] = defaultdict(int)
        self.stores: dict[str, int] = defaultdict(int)

    def _name(self, address: int) -> str:
        for start, end, name in self._ranges:
            if start <= address < end:
                return name
        return "other"

    def _count(self, table: dict[str, int], ptrs, mask) -> None:
        lanes = ptrs.data[mask.data] if mask is not None else ptrs.data.reshape(-1)
        if lanes.size:
            table[self._name(int(lanes.flat[0]))] += lanes.size * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def __enter__(self) -> "ByteCounter":
        from triton.runtime import interpreter

        from laid_kernels.triton_support import require_tested_triton

        require_tested_triton("ByteCounter")
        builder = interpreter.InterpreterBuilder
        self._originals = (builder.create_masked_load, builder.create_masked_store)
        load, store = self._originals
        for method, first in ((load, ("self", "ptrs", "mask")), (store, ("self", "ptrs", "value", "mask"))):
            names = tuple(inspect.signature(method).parameters)[:len(first)]
            if names != first:
                raise RuntimeError(f"ByteCounter: InterpreterBuilder.{method.__name__} takes {names}, expected "
                                   f"{first} first (a Triton release whose interpreter changed)")
        counter = self

        def create_masked_load(self, ptrs, mask, *args, **kwargs):
            counter._count(counter.loads, ptrs, mask)
            return load(self, ptrs, mask, *args, **kwargs)

        def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
            counter._count(counter.stores, ptrs, mask)
            return store(self, ptrs, value, mask, *args, **kwargs)

        builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter

        interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store = \
            self._originals

    def total(self) -> int:
        """All bytes loaded and stored."""
        return sum(self.loads.values()) + sum(self.stores.values())
