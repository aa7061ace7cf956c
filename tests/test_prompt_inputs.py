"""laid.prompt_inputs.encode_prompt gives what the Qwen2.5-VL processor gives, with its own pixel path.

The processor is the definition: token ids, attention mask, multimodal token types and image grid must be equal,
pixel values equal up to fp32 rounding, for COCO-sized images (resized by qwen-vl-utils) at the real model's pixel
bounds and for small images at the tiny processor's bounds, for training prompts (with the answer) and evaluation
prompts (with the generation prompt). Images not at the processor's size take the processor's own path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import fetch_image

from laid.data import build_messages
from laid.prompt_inputs import encode_prompt
from laid.tiny import build_tiny_processor

QWEN_BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 14 * 14 * 4 * 16384}


def _images(tmp_path, count, size, bounds):
    rng = np.random.default_rng(count)
    paths = []
    for k in range(count):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    messages = build_messages(paths, "Is there a dog?", **bounds)
    return messages, [fetch_image(item) for item in messages[0]["content"] if "image" in item]


def _assert_same(mine: dict, expected) -> None:
    assert set(mine) == set(expected)
    for key, value in expected.items():
        if value.dtype.is_floating_point:
            assert mine[key].shape == value.shape and mine[key].dtype == value.dtype
            torch.testing.assert_close(mine[key], value, rtol=0, atol=2e-6)
        else:
            assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("bounds, size, count", [(QWEN_BOUNDS, (640, 480), 3), ({}, (56, 56), 4),
                                                 ({"max_pixels": 112 * 112}, (97, 61), 2)])
@pytest.mark.parametrize("generation", [False, True])
def test_equals_the_processor(tmp_path, bounds, size, count, generation):
    processor = build_tiny_processor(**bounds) if bounds else build_tiny_processor()
    messages, images = _images(tmp_path, count, size, bounds)
    if not generation:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "yes"}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    _assert_same(encode_prompt(processor, text, images), processor(text=[text], images=images, return_tensors="pt"))


def test_other_sizes_and_bounds_take_the_processor_path(tmp_path):
    processor = build_tiny_processor()
    messages, _ = _images(tmp_path, 2, (150, 90), {})
    images = [Image.open(item["image"]).convert("RGB") for item in messages[0]["content"] if "image" in item]
    text = processor.apply_chat_template(messages, tokenize=False)  # images not resized yet: the processor resizes
    _assert_same(encode_prompt(processor, text, images), processor(text=[text], images=images, return_tensors="pt"))
    small = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    _assert_same(encode_prompt(processor, text, images, size=small),
                 processor(text=[text], images=images, return_tensors="pt", size=small))


def test_image_count_must_match_the_text(tmp_path):
    processor = build_tiny_processor()
    messages, images = _images(tmp_path, 2, (56, 56), {})
    text = processor.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="2 image tokens for 1 images"):
        encode_prompt(processor, text, images[:1])
