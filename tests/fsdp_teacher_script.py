"""Run by tests/test_models_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): the teacher sharded by
``laid.models.shard_teacher`` (FSDP2, accelerate's wrapping, the settings of configs/fsdp_8gpu.yaml) gives the same
captured Q/K (truncated forward) and the same answer logits (full forward) as the whole teacher. With rank-0-only
loading (fsdp_cpu_ram_efficient_loading) rank 1 reads no weights: its teacher is a meta model until its shards
arrive by broadcast, and it is never materialised whole. Prints "ok RANK" on success.

    torchrun --nproc_per_node 2 tests/fsdp_teacher_script.py TEACHER_FOLDER
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType

from laid.capture import QKCapture, stop_after
from laid.config import LAidConfig
from laid.models import load_teacher, shard_teacher
from laid.trainer import make_accelerator
from train_helpers import fsdp_launch_env, mark_cpu_group_as_gpu_group

os.environ.update(fsdp_launch_env(Path(__file__).parents[1] / "configs" / "fsdp_8gpu.yaml"))
mark_cpu_group_as_gpu_group()
accelerator = make_accelerator(LAidConfig(), "fp32", Path("."))
assert accelerator.distributed_type == DistributedType.FSDP
cpu = torch.device("cpu")
os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
whole = load_teacher(sys.argv[1], device=cpu, attn_implementation="sdpa")
os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
teacher = load_teacher(sys.argv[1], device=cpu, attn_implementation="sdpa")
q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
assert teacher.get_parameter(q_proj).is_meta == (dist.get_rank() != 0)  # only rank 0 has read the weights
input_ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
keep = torch.tensor([20, 22])


def run(model):
    capture = QKCapture(model, [1])
    with torch.no_grad(), stop_after(model, 1), capture.record():
        model(input_ids=input_ids, logits_to_keep=keep[:0])
    with torch.no_grad():
        logits = model(input_ids=input_ids, logits_to_keep=keep).logits
    capture.remove()
    return capture.queries[0].clone(), capture.keys[0].clone(), logits


expected = run(whole)
shard_teacher(teacher, accelerator)
assert type(teacher.get_parameter(q_proj)).__name__ == "DTensor"
for name, a, b in zip(("queries", "keys", "logits"), expected, run(teacher)):
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), f"{name} differ after sharding: {(a - b).abs().max()}"
print(f"ok {dist.get_rank()}", flush=True)
dist.destroy_process_group()
