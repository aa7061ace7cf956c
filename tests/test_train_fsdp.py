"""The paper's layout on two CPU processes: FSDP2 for the student (accelerate) and the teacher
(``laid.models.shard_teacher``), with the settings of configs/fsdp_8gpu.yaml, through ``laid.train``.

Under torchrun with gloo (tests/fsdp_train_script.py): the default lstsq mixer init through the FSDP root, training
with sharded fp32 gradient reduction every micro-batch, a sharded checkpoint, a SIGKILL, a resume that reaches the
uninterrupted run's losses and parameters, and an export that loads as a plain Qwen2.5-VL model; rank 1 starts from
a meta model (rank-0-only loading) and gets its shards by broadcast.

What only a GPU run covers: NCCL collectives, bf16 parameter gathering (MixedPrecisionPolicy param_dtype) and bf16
autocast on CUDA, flash-attn's kernels, real memory per GPU, and accelerate's own decision to build FSDP (on CPU it
falls back to plain processes, so the script marks the group as a GPU group first).
"""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from transformers import Qwen2_5_VLForConditionalGeneration

from train_helpers import build_tiny_setup, check_kill_and_resume, free_port, fsdp_launch_env, subprocess_env

ROOT = Path(__file__).parents[1]
TESTS = ROOT / "tests"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_fsdp2_run_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    paths = build_tiny_setup(tmp_path / "tiny", n_entries=8)
    launch = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
              str(TESTS / "fsdp_train_script.py")]
    # 8 entries / 2 processes / 2 micro-batches = 2 steps per epoch, 4 in all; checkpoints at steps 2 and 4.
    fields = dict(epochs=2, grad_accum=2, save_every=2, beta=1.0, mixer_init="lstsq")
    run = check_kill_and_resume(launch, subprocess_env(), paths, tmp_path, **fields)

    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]  # written by the resumed run
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["distributed_type"] == "DistributedType.FSDP"
        assert rank["student_weight"] == rank["teacher_weight"] == "DTensor"  # both models sharded
        assert rank["reduce_dtype"] == "torch.float32"
        # after every micro-batch, each gradient is already a shard: nothing unsharded is kept across micro-batches
        assert rank["sharded_after_backward"] == [True] * 4
    for key in [k for k in ranks[0] if k.startswith("mixer.")]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the processes"

    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "final")  # a plain model
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["student"]).state_dict()
    state = exported.state_dict()
    assert state.keys() == initial.keys()
    assert any(not torch.equal(initial[k], state[k]) for k in initial), "nothing trained"


def test_the_shipped_accelerate_config_is_fsdp2_for_one_node_of_8_gpus():
    path = ROOT / "configs" / "fsdp_8gpu.yaml"
    config = load_config_from_file(str(path))  # accelerate's own reader
    assert config.distributed_type == "FSDP" and config.num_processes == 8 and config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {"Qwen2_5_VLDecoderLayer",
                                                                            "Qwen2_5_VLVisionBlock"}
    env = fsdp_launch_env(path)  # what the two-process test runs with
    assert env["FSDP_VERSION"] == "2" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    paper = yaml.safe_load((ROOT / "configs" / "qwen25vl_32b_to_7b.yaml").read_text())
    assert "configs/fsdp_8gpu.yaml" in (ROOT / "configs" / "qwen25vl_32b_to_7b.yaml").read_text()
    assert paper["grad_accum"] == 8 and paper["batch_size"] == 1
