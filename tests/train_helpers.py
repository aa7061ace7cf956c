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


# accelerate launch's names for the fsdp_config keys of an accelerate config file (the rest: FSDP_ + KEY upper-cased).
_FSDP_ENV_NAMES = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}


def fsdp_launch_env(accelerate_config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file accelerate_config`` gives each process of an FSDP run
    (ACCELERATE_USE_FSDP and one FSDP_* variable per fsdp_config key), for a test that launches with torchrun."""
    import yaml

    config = yaml.safe_load(Path(accelerate_config).read_text())
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in config["fsdp_config"].items():
        name = _FSDP_ENV_NAMES.get(key, "FSDP_" + key.removeprefix("fsdp_").upper())
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


# Set in a launched script's environment: each process SIGKILLs itself at the start of this backward pass (counted
# from 1), a kill at a known point of the run (tests/*_train_script.py honour it).
KILL_AT_BACKWARD = "LAID_TEST_KILL_AT_BACKWARD"


def kill_at_backward(backward):
    """``backward`` (accelerator.backward) that SIGKILLs the process at call number $LAID_TEST_KILL_AT_BACKWARD."""
    import signal

    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ.get(KILL_AT_BACKWARD, 0)):
            os.kill(os.getpid(), signal.SIGKILL)
        return backward(*args, **kwargs)

    return wrapped


# accelerate releases (major.minor) whose PartialState internals mark_cpu_group_as_gpu_group was checked against.
TESTED_ACCELERATE = ("1.15", "1.16")


def mark_cpu_group_as_gpu_group() -> None:
    """Join the torchrun process group over gloo (CPU) and mark it as a GPU group, so that the next Accelerator
    builds FSDP from the environment as it does on GPUs (accelerate 1.15 leaves FSDP off for CPU groups).

    Writes accelerate's private shared state (``PartialState._shared_state["distributed_type"]``): checked against
    the accelerate releases whose state.py was read for it, ``TESTED_ACCELERATE``.
    """
    import accelerate
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if ".".join(accelerate.__version__.split(".")[:2]) not in TESTED_ACCELERATE:
        raise RuntimeError(f"mark_cpu_group_as_gpu_group reads the PartialState internals of accelerate "
                           f"{', '.join(v + '.x' for v in TESTED_ACCELERATE)}; accelerate {accelerate.__version__} is "
                           f"installed: check accelerate/state.py and update this helper")
    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected a MULTI_CPU (gloo) group under torchrun, got {state.distributed_type}")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def run_launcher(command: list[str], env: dict[str, str], log: Path, killed: bool = False,
                 timeout: float = 300) -> None:
    """Run a multi-process launch (torchrun / accelerate launch) to its end, asserting success, or with
    ``killed`` asserting that it died (its processes SIGKILLed themselves, see KILL_AT_BACKWARD)."""
    import subprocess

    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    if killed:
        assert result.returncode != 0, "the run was meant to be killed but ended normally"
    else:
        assert result.returncode == 0, log.read_text()[-4000:]


def read_metrics(run: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_kill_and_resume(launch: list[str], env: dict[str, str], paths: dict[str, str], tmp: Path,
                          **fields) -> Path:
    """Train the tiny pair three times with ``launch + [CONFIG.yaml]`` (4 steps of 2 micro-batches, a checkpoint
    every 2): uninterrupted; killed (SIGKILL) during step 4, its last checkpoint at step 2; resumed from it. Asserts
    that the resumed run logs the uninterrupted run's losses and ends with its parameters and mixer; returns the
    resumed run's folder."""
    import pytest
    import torch
    import yaml
    from safetensors.torch import load_file

    def config_file(name: str, **extra) -> str:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(paths, tmp / "killed" if name != "full" else tmp / "full",
                                                   **fields, **extra).to_dict()))
        return str(path)

    run_launcher(launch + [config_file("full")], env, tmp / "full.log")
    run = tmp / "killed"
    # killed in the first backward of step 4 (2 micro-batches per step), after step 3 was logged
    run_launcher(launch + [config_file("killed")], {**env, KILL_AT_BACKWARD: "7"}, tmp / "killed.log", killed=True)
    assert not (run / "final").exists() and len(read_metrics(run)) == 3
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    run_launcher(launch + [config_file("resumed", resume_from="latest")], env, tmp / "resumed.log")

    full, resumed = read_metrics(tmp / "full"), read_metrics(run)
    assert [m["step"] for m in resumed] == [m["step"] for m in full] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for term in ("qk", "attn", "kl", "sft", "loss", "grad_norm", "lr", "mixer_lr"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-8), (a["step"], term)
    for name in ("model.safetensors", "mixer.safetensors"):
        expected, got = load_file(tmp / "full" / "final" / name), load_file(run / "final" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.allclose(expected[key], got[key], rtol=1e-5, atol=1e-7), (name, key)
    return run
