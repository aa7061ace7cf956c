"""Qwen2.5-VL model inputs for one prompt, with every image's pixels written once, straight into one tensor.

``encode_prompt(processor, text, images)`` returns what ``processor(text=[text], images=images,
return_tensors="pt")`` returns (tests/test_prompt_inputs.py checks it: equal ``input_ids``, ``attention_mask``,
``mm_token_type_ids`` and ``image_grid_thw``, ``pixel_values`` equal up to fp32 rounding), for images that are
already at the size the image processor would resize them to, which is what ``qwen_vl_utils.fetch_image`` (and so
``laid.image_cache``) gives within the same pixel bounds. Any other image makes it call the processor itself.

Why: for a 150-image prompt the image processor builds ``pixel_values`` [about 235K, 1176] fp32 (1.1 GB) through a
reshape copy per image and one ``torch.cat`` of them all, and those copies of fresh memory cost more than the
arithmetic. Here each image's uint8 pixels are permuted to the patch layout (a view) and rescaled, normalised and
repeated over the temporal patch straight into its rows of one preallocated output.

Layout (as the image processor's ``patchify``): an image of grid (gh, gw) = (H / 14, W / 14) patches gives gh * gw
rows ordered (block row, block column, row in the 2x2 merge block, column in it); a row holds channel, temporal
copy (2), patch row and patch column: 3 * 2 * 14 * 14 = 1176 values, (x / 255 - mean[c]) / std[c].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize


def _bounds(image_processor, size: dict | None) -> tuple[int, int]:
    size = size or image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def encode_prompt(processor, text: str, images: list[Image.Image], *, size: dict | None = None) -> dict:
    """``processor(text=[text], images=images, return_tensors="pt", size=size)`` as a dict of tensors.

    ``size``: the pixel bounds ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` given to the processor
    (None: its own). Returns ``input_ids`` [1, N], ``attention_mask`` [1, N], ``mm_token_type_ids`` [1, N],
    ``pixel_values`` [P, 1176] fp32 and ``image_grid_thw`` [len(images), 3].
    """
    ip = processor.image_processor
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    low, high = _bounds(ip, size)
    arrays = [np.array(image) for image in images]  # writable copies (torch.from_numpy below)
    fits = all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and
               smart_resize(a.shape[0], a.shape[1], factor=patch * merge, min_pixels=low, max_pixels=high) ==
               a.shape[:2] for a in arrays)
    if not (fits and ip.do_rescale and ip.do_normalize and ip.do_resize):
        extra = {"size": size} if size else {}
        return dict(processor(text=[text], images=images, return_tensors="pt", **extra))

    grids = [(a.shape[0] // patch, a.shape[1] // patch) for a in arrays]
    pixel_values = torch.empty(sum(h * w for h, w in grids), 3, temporal, patch * patch, dtype=torch.float32)
    std = torch.tensor(ip.image_std, dtype=torch.float32)
    scale = (ip.rescale_factor / std).view(3, 1)  # x * rescale / std - mean / std, per channel
    shift = (-torch.tensor(ip.image_mean, dtype=torch.float32) / std).view(3, 1)
    row = 0
    for array, (gh, gw) in zip(arrays, grids):
        pixels = torch.from_numpy(array).view(gh // merge, merge, patch, gw // merge, merge, patch, 3)
        # [bh, bw, mh, mw, C, ph, pw] -> rows [gh * gw, C, ph * pw], contiguous uint8 (a copy of 0.6 MB)
        pixels = pixels.permute(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, 3, patch * patch)
        normalized = torch.addcmul(shift, pixels.float(), scale)  # [gh * gw, C, ph * pw] fp32
        for copy in range(temporal):  # the image processor repeats a still image over the temporal patch
            pixel_values[row:row + gh * gw, :, copy] = normalized
        row += gh * gw
    image_grid_thw = torch.tensor([[1, gh, gw] for gh, gw in grids], dtype=torch.long)

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
            "mm_token_type_ids": (input_ids == processor.image_token_id).long(),
            "pixel_values": pixel_values.view(len(pixel_values), -1), "image_grid_thw": image_grid_thw}
