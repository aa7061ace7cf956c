"""Two CPU processes under ``accelerate launch`` (DDP over gloo): killed and resumed, the run reaches the
uninterrupted run's losses and parameters, the processes keep identical student and mixer parameters (the lstsq
fit broadcast from rank 0 even when rank 1's differs), and the export loads as a plain model."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from train_helpers import build_tiny_setup, check_kill_and_resume, free_port, subprocess_env

TESTS = Path(__file__).parent


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_ddp_run_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    paths = build_tiny_setup(tmp_path / "tiny", n_entries=8)
    # Two local processes through accelerate's multi-process launcher (torchrun); ACCELERATE_USE_CPU makes them
    # a MULTI_CPU (gloo) group instead of looking for GPUs.
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              str(TESTS / "ddp_train_script.py")]
    run = check_kill_and_resume(launch, subprocess_env(ACCELERATE_USE_CPU="true"), paths, tmp_path,
                                epochs=2, grad_accum=2, save_every=2, beta=1.0, mixer_init="lstsq")

    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]  # written by the resumed run
    assert int(ranks[0]["num_processes"]) == 2
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["student"]).state_dict()
    assert any(not torch.equal(initial[k], ranks[0][f"student.{k}"]) for k in initial), "nothing trained"
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{key} differs between the two processes"
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "final").state_dict()
    assert exported.keys() == initial.keys()
