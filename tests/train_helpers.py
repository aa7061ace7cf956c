"""Shared set-up of the trainer tests: tiny real Qwen2.5-VL models and synthetic Visual Haystacks data on disk.

Everything is built offline with ``laid.tiny`` / ``laid.data``, saved, and loaded back by the code under test with
``from_pretrained``. The teacher (3 layers, 8 heads, 4 kv heads, vocab 512) and the student (2 layers, 4 heads,
2 kv heads, vocab 448) share head_dim 16, the tokenizer (407 tokens) and the image processor.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

from laid.config import LAidConfig
from laid.data import VHsDataset, collate, synth_haystacks
from laid.prompt_inputs import model_inputs
from laid.tiny import TINY_STUDENT, TINY_TEACHER, save_tiny_model, save_tiny_processor, tiny_qwen25vl_config


def build_tiny_setup(root: Path, n_entries: int = 8) -> dict[str, str]:
    """Write processor / teacher / student folders and a synthetic VHs set under ``root``; return their paths."""
    paths = {name: str(root / name) for name in ("processor", "teacher", "student")}
    save_tiny_processor(paths["processor"])
    save_tiny_model(paths["teacher"], tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    save_tiny_model(paths["student"], tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
    paths["data"] = str(synth_haystacks(root / "synth", n_entries=n_entries, min_images=2, max_images=3, seed=0))
    paths["image_root"] = str(root / "synth")
    return paths


def tiny_config(paths: dict[str, str], output_dir: Path, **overrides) -> LAidConfig:
    """A CPU config over the tiny setup (fp32, sdpa, reference kernels, small accumulation)."""
    fields = dict(teacher=paths["teacher"], student=paths["student"], processor=paths["processor"],
                  data=paths["data"], image_root=paths["image_root"], output_dir=str(output_dir), precision="fp32",
                  attn_implementation="sdpa", kernel_backend="reference", epochs=1, grad_accum=2, save_every=2,
                  lr=1e-4, mixer_lr=1e-3)
    return LAidConfig().with_overrides(**{**fields, **overrides})


def first_batch(paths: dict[str, str], processor, size: int = 1) -> dict:
    """The first ``size`` VHs items of the tiny data set, collated, as model inputs on the CPU."""
    dataset = VHsDataset(paths["data"], paths["image_root"], processor)
    batch = partial(collate, pad_token_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(size)])
    return model_inputs(batch, "cpu")


def free_port() -> int:
    """A free local TCP port for a multi-process launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a launched test process: this checkout and tests/ importable, one thread per process."""
    tests = Path(__file__).parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
