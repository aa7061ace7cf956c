"""Run by tests/test_train_ddp.py under ``accelerate launch --multi_gpu --num_processes 2`` (ACCELERATE_USE_CPU=true): ``laid.train`` on a YAML
config, with each process writing its final student and mixer parameters to OUT/rank{i}.pt just before the export
(``laid.trainer.export`` is wrapped for that), so the test can compare the processes.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/ddp_train_script.py CONFIG.yaml OUT
"""

import sys

import torch

import laid.trainer as trainer

config_path, out = sys.argv[1], sys.argv[2]
real_export = trainer.export


def dump_then_export(accelerator, student, processor, mixer, student_layers, out_dir, summary):
    state = {f"student.{k}": v.detach().clone() for k, v in accelerator.unwrap_model(student).state_dict().items()}
    state.update({f"mixer.{k}": v.detach().clone() for k, v in mixer.state_dict().items()})
    state["num_processes"] = torch.tensor(accelerator.num_processes)
    torch.save(state, f"{out}/rank{accelerator.process_index}.pt")
    return real_export(accelerator, student, processor, mixer, student_layers, out_dir, summary)


trainer.export = dump_then_export
trainer.train(config_path)
