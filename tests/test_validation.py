"""Bad arguments to apply_mrope and qk_align_loss raise a clear error naming the argument, on every backend.

Validation runs before dispatch, so every case is checked with every backend that can run here ("auto" included).
Tensors on a second device are simulated with the "meta" device.
"""

from __future__ import annotations

import pytest
import torch

from laid_kernels import apply_mrope, available_backends, qk_align_loss

BACKENDS = ["auto", *available_backends("qk_align_loss", "cpu")]
SECTION = (8, 12, 12)  # head_dim 64


def qk_inputs(batch=2, seq=5, heads=(4, 2, 6, 3), dim=64):
    hs, hs_kv, ht, ht_kv = heads
    return dict(q_s=torch.randn(batch, seq, hs, dim), k_s=torch.randn(batch, seq, hs_kv, dim),
                q_t=torch.randn(batch, seq, ht, dim), k_t=torch.randn(batch, seq, ht_kv, dim),
                w_q=torch.randn(hs, ht), w_k=torch.randn(hs_kv, ht_kv),
                positions=torch.arange(seq).repeat(3, batch, 1), inv_freq=torch.rand(dim // 2),
                mrope_section=SECTION)


def call_qk(backend, **changes):
    args = {**qk_inputs(), **changes}
    keywords = {k: args.pop(k) for k in ("token_weight", "valid", "normalize") if k in args}
    return qk_align_loss(*args.values(), backend=backend, **keywords)


# (changes to the valid arguments, expected exception, words the message must contain)
QK_CASES = [
    (dict(k_s=torch.randn(2, 6, 2, 64)), ValueError, ["k_s", "[B, N]"]),
    (dict(q_t=torch.randn(3, 5, 6, 64)), ValueError, ["q_t", "[B, N]"]),
    (dict(k_t=torch.randn(2, 5, 3, 32)), ValueError, ["k_t", "head_dim"]),
    (dict(q_s=torch.randn(2, 5, 4)), ValueError, ["q_s", "[B, N, Hs, D]"]),
    (dict(mrope_section=(8, 12, 11)), ValueError, ["mrope_section", "head_dim / 2"]),
    (dict(mrope_section=(16, 16)), ValueError, ["mrope_section", "three"]),
    (dict(w_q=torch.randn(6, 4)), ValueError, ["w_q", "[4, 6]"]),
    (dict(w_k=torch.randn(2, 2)), ValueError, ["w_k", "[2, 3]"]),
    (dict(positions=torch.zeros(3, 2, 4, dtype=torch.long)), ValueError, ["positions", "[3, B, N]"]),
    (dict(positions=torch.zeros(2, 2, 5, dtype=torch.long)), ValueError, ["positions", "[3, B, N]"]),
    (dict(positions=torch.zeros(3, 2, 5)), TypeError, ["positions", "int64"]),
    (dict(inv_freq=torch.rand(64)), ValueError, ["inv_freq", "[D/2]"]),
    (dict(q_s=torch.randn(2, 5, 4, 64).to(torch.int32)), TypeError, ["q_s", "float32"]),
    (dict(valid=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["valid", "[B, N]"]),
    (dict(token_weight=torch.ones(2, 5, dtype=torch.long)), TypeError, ["token_weight", "floating"]),
    (dict(normalize="mean"), ValueError, ["normalize", "student", "target", "none"]),
    (dict(w_q=torch.randn(4, 6, 16, 2), w_k=torch.randn(2, 3, 16, 2)), ValueError,
     ["w_q", "frequency mixing", "16 frequency pairs", "head_dim 64", "[4, 6, 32, 2]"]),
    (dict(w_q=torch.randn(4, 6, 32, 3), w_k=torch.randn(2, 3, 32, 3)), ValueError, ["w_q", "[4, 6, 32, 2]"]),
    (dict(w_q=torch.randn(4, 6, 32, 2)), ValueError, ["w_q", "w_k", "same mixing"]),
    (dict(w_k=torch.randn(2, 3, 32)), ValueError, ["w_k", "[2, 3]", "[2, 3, 32, 2]"]),
    (dict(k_t=torch.randn(2, 5, 3, 64, device="meta")), ValueError, ["k_t", "meta", "one device"]),
    (dict(w_q=torch.randn(4, 6, device="meta")), ValueError, ["w_q", "meta", "one device"]),
    (dict(positions=torch.zeros(3, 2, 5, dtype=torch.long, device="meta")), ValueError, ["positions", "meta"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changes,error,words", QK_CASES, ids=[f"{i}-{next(iter(c[0]))}" for i, c in enumerate(QK_CASES)])
def test_qk_align_loss_rejects(backend, changes, error, words):
    with pytest.raises(error) as info:
        call_qk(backend, **changes)
    message = str(info.value)
    assert message.startswith("qk_align_loss:"), message
    for word in words:
        assert word in message, (word, message)


def test_qk_align_loss_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        call_qk("cuda")


MROPE_CASES = [
    (dict(x=torch.randn(2, 5, 64)), ValueError, ["x", "[B, N, H, D]"]),
    (dict(positions=torch.zeros(2, 4, dtype=torch.long)), ValueError, ["positions", "[B, N]"]),
    (dict(positions=torch.zeros(3, 2, 5, dtype=torch.float32)), TypeError, ["positions", "int64"]),
    (dict(mrope_section=(8, 12, 13)), ValueError, ["mrope_section", "head_dim / 2"]),
    (dict(inv_freq=torch.rand(31)), ValueError, ["inv_freq", "[D/2]"]),
    (dict(inv_freq=torch.rand(32, device="meta")), ValueError, ["inv_freq", "meta", "one device"]),
]


@pytest.mark.parametrize("backend", ["auto", *available_backends("apply_mrope", "cpu")])
@pytest.mark.parametrize("changes,error,words", MROPE_CASES, ids=[next(iter(c[0])) for c in MROPE_CASES])
def test_apply_mrope_rejects(backend, changes, error, words):
    args = dict(x=torch.randn(2, 5, 3, 64), positions=torch.arange(5).repeat(3, 2, 1), inv_freq=torch.rand(32),
                mrope_section=SECTION)
    args.update(changes)
    with pytest.raises(error) as info:
        apply_mrope(*args.values(), backend=backend)
    message = str(info.value)
    assert message.startswith("apply_mrope:"), message
    for word in words:
        assert word in message, (word, message)
