"""The workload of the 150-image benchmarks: Qwen2.5-VL shapes and a Visual Haystacks-shaped prompt.

Shared by ``memory_150img.py``, ``attn_match_150img.py`` and ``compile_report.py`` so that all three measure the same
thing: 7B student (28 q / 4 kv heads; 3B: 16 / 2) against the 32B teacher (40 / 8), head_dim 128, M-RoPE with
theta 1e6 and sections (16, 24, 24), 357 visual tokens per image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENS_PER_IMAGE = 357
IMAGE_GRID = (1, 34, 42)  # patches (t, h, w) before the 2x2 merge: 17 * 21 = 357 tokens
HEAD_DIM = 128
SECTION = (16, 24, 24)
ROPE_THETA = 1e6
STUDENTS = {"7b": (28, 4), "3b": (16, 2)}  # (q heads, kv heads) of the student
TEACHER = (40, 8)  # 32B


def inv_freq(device: torch.device | str = "cpu") -> torch.Tensor:
    """[HEAD_DIM / 2] fp32 inverse frequencies 1 / theta^(2f / D) of Qwen2.5-VL."""
    return 1.0 / ROPE_THETA ** (torch.arange(HEAD_DIM // 2, dtype=torch.float32, device=device) * 2 / HEAD_DIM)


@dataclass
class Prompt:
    """A chat prompt with images: positions [3, 1, N] (M-RoPE rows t, h, w) and query_mask [1, N] (bool: the image
    delimiters and the question after the last image, the rows L_attn matches)."""

    positions: torch.Tensor
    query_mask: torch.Tensor


@functools.cache
def _tokenizer_and_model():
    """The tiny tokenizer and a tiny Qwen2.5-VL model (for its ``get_rope_index``), built once per process."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from laid.tiny import build_tiny_tokenizer, tiny_qwen25vl_config

    tokenizer = build_tiny_tokenizer()
    return tokenizer, Qwen2_5_VLModel(tiny_qwen25vl_config(tokenizer=tokenizer))


def vhs_prompt(images: int) -> Prompt:
    """The M-RoPE positions of a Visual Haystacks-shaped prompt with ``images`` images, from transformers'
    ``get_rope_index`` (with a tiny Qwen2.5-VL config from ``laid.tiny``: nothing is downloaded).

    Layout (Qwen2.5-VL's chat template): system turn, user turn with "Picture k: <|vision_start|>" + 357 image pad
    tokens + "<|vision_end|>" per image, then the question, then the open assistant turn; text is tokenised by the
    tiny tokenizer of ``laid.tiny``.
    """
    tokenizer, model = _tokenizer_and_model()
    config = model.config

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    ids: list[int] = text("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    for k in range(images):
        ids += text(f"Picture {k + 1}: ") + [config.vision_start_token_id]
        ids += [config.image_token_id] * TOKENS_PER_IMAGE + [config.vision_end_token_id]
    question_start = len(ids)
    ids += text("\nFor the image with the anchor object, is there a dog in the image? Answer yes or no.<|im_end|>\n"
                "<|im_start|>assistant\n")
    input_ids = torch.tensor([ids])
    kinds = (input_ids == config.image_token_id).int()
    positions, _ = model.get_rope_index(input_ids, kinds, image_grid_thw=torch.tensor([IMAGE_GRID] * images))
    delimiters = (input_ids == config.vision_start_token_id) | (input_ids == config.vision_end_token_id)
    question = torch.arange(len(ids)).unsqueeze(0) >= question_start
    return Prompt(positions=positions, query_mask=delimiters | question)


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (e.g. "VmRSS", "VmHWM"), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak resident set size (VmHWM) of this process to its current size."""
    Path("/proc/self/clear_refs").write_text("5")
