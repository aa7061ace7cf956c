"""Q/K capture, the RoPE gain inside the forward, truncated forwards and M-RoPE positions, on a real tiny model."""

import pytest
import torch

from laid.capture import QKCapture, decoder_layers, mrope_positions, resolve_layer, stop_after
from laid.models import load_processor, load_student
from train_helpers import build_tiny_setup, first_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = build_tiny_setup(tmp_path_factory.mktemp("tiny"), n_entries=2)
    processor = load_processor(paths["processor"])
    student = load_student(paths["student"], device=torch.device("cpu"), attn_implementation="sdpa").eval()
    return student, first_batch(paths, processor)


def forward(model, batch, positions=None, **extra):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], position_ids=positions,
                 **extra).logits


def test_positions_are_the_models_own(setup):
    model, batch = setup
    positions = mrope_positions(model, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    assert positions.shape == (3, *batch["input_ids"].shape)
    assert (positions[1] != positions[2]).any()  # image tokens have distinct h / w rows
    with torch.no_grad():
        ours = forward(model, batch, positions)
        own = forward(model, batch, mm_token_type_ids=batch["mm_token_type_ids"])
    assert torch.equal(ours, own)


def test_capture_is_the_pre_rope_projection(setup):
    model, batch = setup
    layer = decoder_layers(model)[0]
    inputs = {}
    handle = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, args: inputs.update(x=args[0]))
    capture = QKCapture(model, [0])
    try:
        with torch.no_grad(), capture.record():
            forward(model, batch)
    finally:
        handle.remove()
        capture.remove()
    q, k = capture.queries[0], capture.keys[0]
    n = batch["input_ids"].shape[1]
    assert q.shape == (1, n, 4, 16) and k.shape == (1, n, 2, 16)
    assert torch.equal(q, layer.self_attn.q_proj(inputs["x"]).view(1, n, 4, 16))
    assert torch.equal(k, layer.self_attn.k_proj(inputs["x"]).view(1, n, 2, 16))


def test_gain_scales_queries_inside_the_forward(setup):
    model, batch = setup
    gain = torch.ones(4, 16)
    gain[1, 3] = gain[1, 11] = 3.0  # one rotated channel pair of head 1
    plain, gained = QKCapture(model, [1]), None
    try:
        with torch.no_grad(), plain.record():
            before = forward(model, batch)
        plain.remove()
        gained = QKCapture(model, [1], gain=lambda slot: gain)
        with torch.no_grad(), gained.record():
            after = forward(model, batch)
    finally:
        plain.remove()
        if gained is not None:
            gained.remove()
    # atol: the two forwards may block their matmuls differently (AVX2 vs AVX-512); a missing gain is off by 2x
    assert torch.allclose(gained.queries[0], plain.queries[0] * gain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)  # the model's own attention saw the gain


def test_stop_after_skips_later_layers(setup):
    model, batch = setup
    calls = [0, 0]
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad(), stop_after(model, 0):
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1, 0] and len(decoder_layers(model)) == 2  # restored afterwards


def test_layer_index_errors_name_the_argument():
    assert resolve_layer(-1, 28, "x") == 27
    with pytest.raises(ValueError, match=r"layer_pairs \(student\): layer 28 is out of range .* 28 decoder layers"):
        resolve_layer(28, 28, "layer_pairs (student)")
