"""Run by tests/test_train_ddp.py under ``accelerate launch --multi_gpu --num_processes 2`` (ACCELERATE_USE_CPU=true):
``laid.train`` on a YAML config, with each process writing its final student and mixer parameters to rank{i}.pt
beside CONFIG.yaml just before the export (``laid.trainer.export`` is wrapped for that), so the test can compare
the processes. Two test hooks: rank 1 perturbs its lstsq mixer fit (as nondeterministic kernels could), which the
trainer's broadcast from rank 0 must undo; with $LAID_TEST_KILL_AT_BACKWARD set, each process SIGKILLs itself at
that backward (train_helpers.kill_at_backward).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/ddp_train_script.py CONFIG.yaml
"""

import sys
from pathlib import Path

import torch

import laid.trainer as trainer
from train_helpers import kill_at_backward

config_path = sys.argv[1]
out = Path(config_path).parent
real_make_accelerator, real_export = trainer.make_accelerator, trainer.export


class PerturbedFit(trainer.LAidObjective):
    def init_mixer(self, batch):
        super().init_mixer(batch)
        if torch.distributed.get_rank() == 1:
            with torch.no_grad():
                self.mixer.w_q.add_(0.01)


def make_accelerator(*args):
    accelerator = real_make_accelerator(*args)
    accelerator.backward = kill_at_backward(accelerator.backward)
    return accelerator


def dump_then_export(accelerator, student, processor, mixer, student_layers, out_dir, summary, **kwargs):
    state = {f"student.{k}": v.detach().clone() for k, v in accelerator.unwrap_model(student).state_dict().items()}
    state.update({f"mixer.{k}": v.detach().clone() for k, v in mixer.state_dict().items()})
    state["num_processes"] = torch.tensor(accelerator.num_processes)
    torch.save(state, out / f"rank{accelerator.process_index}.pt")
    return real_export(accelerator, student, processor, mixer, student_layers, out_dir, summary, **kwargs)


trainer.LAidObjective, trainer.make_accelerator, trainer.export = PerturbedFit, make_accelerator, dump_then_export
trainer.train(config_path)
