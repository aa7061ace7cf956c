"""Qwen2.5-VL model inputs for one prompt: uint8 pixels through the loader, ``pixel_values`` made on the device.

Two steps, so that a DataLoader never builds (nor copies between processes, nor pins) the fp32 ``pixel_values``:

1. ``encode_prompt(processor, text, images)`` (in the loader) tokenizes the prompt and packs the images' uint8 RGB
   pixels, as they are, into one tensor: ``image_pixels`` (138 MB for 150 COCO images, against 1.1 GB of fp32
   ``pixel_values``), with ``pixel_format``, what the processor would normalise and patch them with (plain Python
   numbers, not tensors: a DataLoader worker sends each tensor through its own shared-memory segment, which costs
   milliseconds per tensor on a loaded machine). This is for images already at the size the image processor
   would resize them to, which is what ``qwen_vl_utils.fetch_image`` (and so ``laid.image_cache``) gives within
   the same pixel bounds; for any other image it returns the processor's own output (with ``pixel_values``).
2. ``model_inputs(batch, device)`` (in the process that runs the model) moves a batch to ``device`` and there turns
   ``image_pixels`` into ``pixel_values``: patch layout, fp32, normalised, repeated over the temporal patch.

Together they give exactly what ``processor(text=[text], images=images, return_tensors="pt")`` gives
(tests/test_prompt_inputs.py: equal ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``image_grid_thw``
and bitwise equal ``pixel_values``: the same fp32 operations, ``(x - mean * 255) / (std * 255)``, as the processor).

``pixel_values`` layout (the image processor's ``patchify``): an image of grid (gh, gw) = (H / 14, W / 14) patches
gives gh * gw rows ordered (block row, block column, row in the 2x2 merge block, column in it); a row holds
channel, temporal copy (2), patch row and patch column: 3 * 2 * 14 * 14 = 1176 values.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

PIXEL_KEYS = ("image_pixels", "pixel_format")  # what model_inputs turns into pixel_values


def _bounds(image_processor, size: dict | None) -> tuple[int, int]:
    size = size or image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def encode_prompt(processor, text: str, images: list, *, size: dict | None = None) -> dict:
    """The prompt's token ids and its images' uint8 pixels; ``model_inputs`` of it is ``processor(text=[text],
    images=images, return_tensors="pt", size=size)`` on a device.

    ``images``: RGB images (PIL images or uint8 arrays [H, W, 3]); ``size``: the pixel bounds ``{"shortest_edge":
    min_pixels, "longest_edge": max_pixels}`` given to the processor (None: its own). Returns ``input_ids``,
    ``attention_mask``, ``mm_token_type_ids`` [1, N] and ``image_grid_thw`` [len(images), 3], and

    - ``image_pixels`` uint8 [sum of H * W * 3]: each image's pixels, row-major H x W x 3, one after the other;
    - ``pixel_format``: ``{"mean": (3 floats), "std": (3 floats), "patch_size", "merge_size",
      "temporal_patch_size"}``: the per-channel mean and std on the 0-255 scale (fp32 values, as the processor
      computes them) and the processor's patch, merge and temporal patch sizes;

    or, for images not at the processor's size (or a processor that does not rescale, normalise and resize), the
    processor's output with ``pixel_values`` [P, 1176] fp32 instead of those two.
    """
    ip = processor.image_processor
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    low, high = _bounds(ip, size)
    arrays = [np.asarray(image) for image in images]
    fits = all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and
               smart_resize(a.shape[0], a.shape[1], factor=patch * merge, min_pixels=low, max_pixels=high) ==
               a.shape[:2] for a in arrays)
    if not (fits and ip.do_rescale and ip.do_normalize and ip.do_resize):
        extra = {"size": size} if size else {}
        return dict(processor(text=[text], images=images, return_tensors="pt", **extra))

    grids = [(a.shape[0] // patch, a.shape[1] // patch) for a in arrays]
    flat = [a.reshape(-1) for a in arrays]
    image_pixels = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.uint8))
    # The processor's fused rescale and normalisation: (x - mean / rescale) / (std / rescale), in fp32.
    mean, std = (tuple((torch.tensor(v, dtype=torch.float32) * (1.0 / ip.rescale_factor)).tolist())
                 for v in (ip.image_mean, ip.image_std))
    image_grid_thw = torch.tensor([[1, gh, gw] for gh, gw in grids], dtype=torch.long).view(len(grids), 3)

    # Text: the pieces between images tokenized as they are, and one run of image tokens per image (the image
    # token is a special token, so the tokenizer never merges across it; the whole prompt is thus tokenized once,
    # without encoding the tens of thousands of image tokens one by one).
    pieces = text.split(processor.image_token)
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the text holds {len(pieces) - 1} image tokens for {len(images)} images")
    encoded = processor.tokenizer(pieces, add_special_tokens=False)["input_ids"]
    ids = list(encoded[0])
    for (gh, gw), piece in zip(grids, encoded[1:]):
        ids += [processor.image_token_id] * (gh * gw // merge ** 2) + piece
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == processor.image_token_id).long(), "image_grid_thw": image_grid_thw,
            "image_pixels": image_pixels, "pixel_format": {"mean": mean, "std": std, "patch_size": patch,
                                                           "merge_size": merge, "temporal_patch_size": temporal}}


def model_inputs(batch: dict, device: str | torch.device) -> dict:
    """A loader batch (``encode_prompt``'s output, a ``laid.data.VHsDataset`` item or a ``laid.data.collate``
    batch) as model inputs on ``device``: every tensor moved there, and ``image_pixels`` / ``pixel_format``
    replaced by ``pixel_values`` [P, 3 * T * p * p] fp32, built on ``device`` (a batch that already holds
    ``pixel_values`` keeps them). The one way training, evaluation and analysis feed a model."""
    device = torch.device(device)
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in PIXEL_KEYS}
    present = [k for k in PIXEL_KEYS if k in batch]
    if present and (len(present) != len(PIXEL_KEYS) or "pixel_values" in batch or "image_grid_thw" not in batch):
        raise ValueError(f"batch: {present} need each other and image_grid_thw, without pixel_values; got keys "
                         f"{sorted(batch)}")
    if present:
        inputs["pixel_values"] = _pixel_values(batch["image_pixels"].to(device, non_blocking=True),
                                               batch["image_grid_thw"].tolist(), batch["pixel_format"])
    return inputs


def _pixel_values(pixels: torch.Tensor, grids: list, form: dict) -> torch.Tensor:
    """pixel_values [P, 3 * temporal * patch ** 2] fp32 on ``pixels``' device from the uint8 images ``pixels``
    [sum of H * W * 3] of grids ``grids`` [[1, gh, gw], ...] in the ``pixel_format`` ``form``."""
    patch, merge, temporal = form["patch_size"], form["merge_size"], form["temporal_patch_size"]
    norm = torch.tensor([form["mean"], form["std"]], dtype=torch.float32, device=pixels.device)  # [2, 3]
    if any(t != 1 for t, _, _ in grids):
        raise ValueError(f"image_grid_thw: images have one temporal patch (t = 1), got {grids}")
    expected = sum(gh * gw for _, gh, gw in grids) * patch * patch * 3
    if pixels.dtype != torch.uint8 or pixels.shape != (expected,):
        raise ValueError(f"image_pixels must be uint8 [{expected}] for image_grid_thw {grids} (patch {patch}), got "
                         f"{pixels.dtype} {list(pixels.shape)}")
    values = torch.empty(expected // 3 // patch ** 2, 3, temporal, patch, patch, dtype=torch.float32,
                         device=pixels.device)
    first = values[:, :, 0]  # [P, C, ph, pw]: the first temporal copy, written once, then repeated
    start = row = 0
    for _, gh, gw in grids:
        count = gh * gw
        image = pixels[start:start + count * 3 * patch ** 2].view(gh // merge, merge, patch, gw // merge, merge,
                                                                  patch, 3)
        # [bh, mh, ph, bw, mw, pw, C] -> [bh, bw, mh, mw, C, ph, pw], converted to fp32 as it is copied
        first[row:row + count].view(gh // merge, gw // merge, merge, merge, 3, patch, patch).copy_(
            image.permute(0, 3, 1, 4, 6, 2, 5))
        start, row = start + count * 3 * patch ** 2, row + count
    first.sub_(norm[0].view(3, 1, 1)).div_(norm[1].view(3, 1, 1))  # the processor's operations, in its order
    for copy in range(1, temporal):  # the processor repeats a still image over the temporal patch
        values[:, :, copy] = first
    return values.view(len(values), 3 * temporal * patch * patch)
