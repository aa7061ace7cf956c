"""Run by tests/test_train_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): ``laid.train`` with
accelerate's FSDP2 for the student and ``laid.models.shard_teacher`` for the teacher, with the FSDP settings of
configs/fsdp_8gpu.yaml (the environment accelerate launch would give each process, rank-0-only loading included).

accelerate 1.15 builds FSDP only on GPUs (on CPU it falls back to plain processes), so this script marks the
process group as a GPU group before the trainer builds its Accelerator; everything after that is accelerate's and
laid's own FSDP2 code (fully_shard, DTensor gradients, sharded save_state / load_state, the gathered export).
Each process writes rank{i}.pt beside CONFIG.yaml just before the export: its mixer, what it checked after every
backward (all student gradients already sharded DTensors), and the FSDP facts of the run. With
$LAID_TEST_KILL_AT_BACKWARD set, each process SIGKILLs itself at that backward (train_helpers.kill_at_backward).

    torchrun --nproc_per_node 2 tests/fsdp_train_script.py CONFIG.yaml
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from train_helpers import fsdp_launch_env, kill_at_backward, mark_cpu_group_as_gpu_group

os.environ.update(fsdp_launch_env(Path(__file__).parents[1] / "configs" / "fsdp_8gpu.yaml"))
mark_cpu_group_as_gpu_group()

import laid.trainer as trainer  # noqa: E402

config_path = sys.argv[1]
out = Path(config_path).parent
objectives, sharded_after_backward = [], []


class RecordingObjective(trainer.LAidObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        objectives.append(self)


real_make_accelerator, real_export = trainer.make_accelerator, trainer.export


def make_accelerator(*args):
    accelerator = real_make_accelerator(*args)
    backward = kill_at_backward(accelerator.backward)

    def checked_backward(loss, **kwargs):
        backward(loss, **kwargs)
        grads = [p.grad for p in objectives[0].student.parameters() if p.requires_grad]
        sharded_after_backward.append(all(isinstance(g, DTensor) for g in grads))

    accelerator.backward = checked_backward
    return accelerator


def dump_then_export(accelerator, student, processor, mixer, student_layers, out_dir, summary, **kwargs):
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    state = {f"mixer.{k}": v.detach().clone() for k, v in mixer.state_dict().items()}
    state.update(num_processes=accelerator.num_processes, distributed_type=str(accelerator.distributed_type),
                 reduce_dtype=str(accelerator.state.fsdp_plugin.mixed_precision_policy.reduce_dtype),
                 sharded_after_backward=sharded_after_backward,
                 student_weight=type(student.get_parameter(q_proj)).__name__,
                 teacher_weight=type(objectives[0].teacher.get_parameter(q_proj)).__name__)
    torch.save(state, f"{out}/rank{accelerator.process_index}.pt")
    return real_export(accelerator, student, processor, mixer, student_layers, out_dir, summary, **kwargs)


trainer.LAidObjective, trainer.make_accelerator, trainer.export = RecordingObjective, make_accelerator, dump_then_export
trainer.train(config_path)
