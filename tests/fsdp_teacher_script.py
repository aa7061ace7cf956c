"""Run by tests/test_models_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): the teacher sharded by
``laid.models.shard_teacher`` (FSDP2) gives the same captured Q/K (truncated, decoder-only forward) and the same
answer logits (full forward) as the unsharded teacher. Prints "ok RANK" on success.

    torchrun --nproc_per_node 2 tests/fsdp_teacher_script.py TEACHER_FOLDER
"""

import sys

import torch
import torch.distributed as dist

from laid.capture import QKCapture, stop_after
from laid.models import load_teacher, shard_teacher

dist.init_process_group("gloo")
cpu = torch.device("cpu")
teacher = load_teacher(sys.argv[1], device=cpu, attn_implementation="sdpa")
input_ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
keep = torch.tensor([20, 22])


def run(model):
    capture = QKCapture(model, [1])
    with torch.no_grad(), stop_after(model, 1), capture.record():
        model.model(input_ids=input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, logits_to_keep=keep).logits
    capture.remove()
    return capture.queries[0].clone(), capture.keys[0].clone(), logits


expected = run(teacher)
shard_teacher(teacher, cpu)
assert type(teacher.model.language_model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
for name, a, b in zip(("queries", "keys", "logits"), expected, run(teacher)):
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), f"{name} differ after sharding: {(a - b).abs().max()}"
print(f"ok {dist.get_rank()}", flush=True)
dist.destroy_process_group()
