"""torch.compile traces a training step through the fused ops (custom ops with fake implementations and autograd).

Compiled twice with fullgraph=True (any graph break fails the test), through public torch.compile arguments only:
with a backend that records Dynamo's graph (the fused ops must appear in it as single nodes), and with the
"aot_eager" backend, which runs the real AOTAutograd tracing of forward and backward with fake tensors but needs
no C++ compiler; the custom ops themselves run their backend's kernels (Triton under the interpreter here, and
the native CPU backend).
"""

from __future__ import annotations

import pytest
import torch

from laid_kernels import apply_mrope, available_backends, qk_align_loss

SECTION = (8, 12, 12)  # head_dim 64


FUSED_BACKENDS = [b for b in available_backends("qk_align_loss", "cpu") if b != "reference"]


@pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend here (neither the Triton interpreter nor a C++ compiler)")
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    torch.compiler.reset()
    g = torch.Generator().manual_seed(0)
    batch, seq, dim = 2, 6, 64
    hidden = torch.randn(batch, seq, 32, generator=g)
    q_proj = torch.nn.Linear(32, 4 * dim)
    k_proj = torch.nn.Linear(32, 2 * dim)
    q_t, k_t = torch.randn(batch, seq, 6, dim, generator=g), torch.randn(batch, seq, 3, dim, generator=g)
    w_q = torch.nn.Parameter(torch.randn(4, 6, generator=g) / 3)
    w_k = torch.nn.Parameter(torch.randn(2, 3, generator=g) / 2)
    positions = torch.arange(seq).repeat(3, batch, 1)
    inv_freq = 1.0 / 1e6 ** (torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, -2:] = False
    params = [q_proj.weight, q_proj.bias, k_proj.weight, k_proj.bias, w_q, w_k]

    def step(hidden):
        q_s = q_proj(hidden).view(batch, seq, 4, dim)
        k_s = k_proj(hidden).view(batch, seq, 2, dim)
        loss = qk_align_loss(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, SECTION, valid=valid,
                             backend=backend)
        rotated = apply_mrope(q_s, positions, inv_freq, SECTION, backend=backend)
        return loss + 1e-3 * rotated.square().mean()

    def loss_and_grads(fn):
        loss = fn(hidden)
        return loss.detach(), torch.autograd.grad(loss, params)

    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    eager_loss, eager_grads = loss_and_grads(step)
    loss_and_grads(torch.compile(step, backend=recording_backend, fullgraph=True))
    assert len(graphs) == 1 and f"qk_align_{backend}" in graphs[0] and f"mrope_{backend}" in graphs[0], graphs
    torch.compiler.reset()
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)
