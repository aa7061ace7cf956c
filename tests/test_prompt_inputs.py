"""laid.prompt_inputs: encode_prompt in the loader, then model_inputs on a device, give what the Qwen2.5-VL
processor gives.

The processor is the definition: token ids, attention mask, multimodal token types and image grid must be equal,
and pixel values bitwise equal (the same fp32 operations), for COCO-sized images (resized by qwen-vl-utils) at the
real model's pixel bounds and for small images at the tiny processor's bounds, for training prompts (with the
answer) and evaluation prompts (with the generation prompt), on the CPU and (when there is one) on CUDA. What
crosses the loader is uint8; images not at the processor's size take the processor's own path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import fetch_image

from laid.data import build_messages
from laid.prompt_inputs import PIXEL_KEYS, encode_prompt, model_inputs
from laid.tiny import build_tiny_processor

QWEN_BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 14 * 14 * 4 * 16384}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


def _images(tmp_path, sizes, bounds):
    rng = np.random.default_rng(len(sizes))
    paths = []
    for k, (width, height) in enumerate(sizes):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    messages = build_messages(paths, "Is there a dog?", **bounds)
    return messages, [fetch_image(item) for item in messages[0]["content"] if "image" in item]


def _assert_same(mine: dict, expected) -> None:
    assert set(mine) == set(expected)
    for key, value in expected.items():
        assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
        assert torch.equal(mine[key].cpu(), value), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bounds, sizes", [(QWEN_BOUNDS, [(640, 480), (480, 640), (333, 500)]),
                                           ({}, [(56, 56)] * 4), ({"max_pixels": 112 * 112}, [(97, 61), (61, 97)])])
@pytest.mark.parametrize("generation", [False, True])
def test_equals_the_processor(tmp_path, bounds, sizes, generation, device):
    processor = build_tiny_processor(**bounds) if bounds else build_tiny_processor()
    messages, images = _images(tmp_path, sizes, bounds)
    if not generation:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "yes"}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    encoded = encode_prompt(processor, text, [np.asarray(image) for image in images])  # arrays, as the cache gives
    assert encoded["image_pixels"].dtype == torch.uint8 and "pixel_values" not in encoded  # uint8 to the loader
    assert encoded["image_pixels"].numel() == sum(image.width * image.height * 3 for image in images)
    inputs = model_inputs(encoded, device)
    assert all(value.device.type == device for value in inputs.values())
    _assert_same(inputs, processor(text=[text], images=images, return_tensors="pt"))
    _assert_same(model_inputs(encode_prompt(processor, text, images), device), inputs)  # PIL images: the same


def test_other_sizes_and_bounds_take_the_processor_path(tmp_path):
    processor = build_tiny_processor()
    messages, _ = _images(tmp_path, [(150, 90)] * 2, {})
    images = [Image.open(item["image"]).convert("RGB") for item in messages[0]["content"] if "image" in item]
    text = processor.apply_chat_template(messages, tokenize=False)  # images not resized yet: the processor resizes
    expected = processor(text=[text], images=images, return_tensors="pt")
    encoded = encode_prompt(processor, text, images)
    assert "pixel_values" in encoded and not set(PIXEL_KEYS) & set(encoded)
    _assert_same(model_inputs(encoded, "cpu"), expected)
    small = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    _assert_same(model_inputs(encode_prompt(processor, text, images, size=small), "cpu"),
                 processor(text=[text], images=images, return_tensors="pt", size=small))


def test_image_count_must_match_the_text(tmp_path):
    processor = build_tiny_processor()
    messages, images = _images(tmp_path, [(56, 56)] * 2, {})
    text = processor.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="2 image tokens for 1 images"):
        encode_prompt(processor, text, images[:1])


def test_model_inputs_rejects_inconsistent_pixels(tmp_path):
    processor = build_tiny_processor()
    messages, images = _images(tmp_path, [(56, 56)] * 2, {})
    encoded = encode_prompt(processor, processor.apply_chat_template(messages, tokenize=False), images)
    with pytest.raises(ValueError, match=r"image_pixels must be uint8 \[18816\]"):
        model_inputs({**encoded, "image_pixels": encoded["image_pixels"][:-3]}, "cpu")
    with pytest.raises(ValueError, match="image_pixels must be uint8"):
        model_inputs({**encoded, "image_pixels": encoded["image_pixels"].float()}, "cpu")
    with pytest.raises(ValueError, match="one temporal patch"):
        model_inputs({**encoded, "image_grid_thw": encoded["image_grid_thw"] * torch.tensor([2, 1, 1])}, "cpu")
    without_format = {k: v for k, v in encoded.items() if k != "pixel_format"}
    with pytest.raises(ValueError, match="need each other and image_grid_thw"):
        model_inputs(without_format, "cpu")
