"""Two CPU processes under ``accelerate launch`` (DDP over gloo) keep identical student and mixer parameters."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Qwen2_5_VLForConditionalGeneration

from train_helpers import build_tiny_setup, free_port, subprocess_env, tiny_config

TESTS = Path(__file__).parent


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_two_processes_keep_identical_parameters(tmp_path):
    paths = build_tiny_setup(tmp_path / "tiny", n_entries=8)
    config = tiny_config(paths, tmp_path / "run", epochs=1, grad_accum=2, save_every=100, beta=1.0)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    # Two local processes through accelerate's multi-process launcher (torchrun); ACCELERATE_USE_CPU makes them
    # a MULTI_CPU (gloo) group instead of looking for GPUs.
    env = subprocess_env(ACCELERATE_USE_CPU="true")
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(TESTS / "ddp_train_script.py"), str(config_path), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert int(ranks[0]["num_processes"]) == 2
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["student"]).state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], ranks[0][f"student.{k}"])]
    assert changed, "no student parameter changed: nothing trained"
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{key} differs between the two processes"
    assert not torch.equal(ranks[0]["mixer.gain_raw"], torch.full_like(ranks[0]["mixer.gain_raw"], 0.5413248546129181))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # 8 entries / 2 processes / 2 micro-batches per step
