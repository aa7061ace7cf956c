"""Tests for laid.baselines: SelfExtend on M-RoPE (exact with group size 1, equal to a naive per-pair reference,
consistent with the KV cache) and YaRN (rotary parameters changed as documented)."""

import copy
import math
import types

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from laid.baselines import apply_selfextend, apply_yarn, selfextend_attention
from laid.baselines import _Positions
from laid.data import build_messages, synth_haystacks
from laid.tiny import TINY_STUDENT, build_tiny_processor, tiny_qwen25vl_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_qwen25vl_config(**TINY_STUDENT)
    config._attn_implementation = "eager"
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real multi-image prompt (3 images + the VHs question): M-RoPE rows differ on the image tokens."""
    from qwen_vl_utils import process_vision_info

    root = tmp_path_factory.mktemp("images")
    path = synth_haystacks(root, n_entries=1, min_images=3, max_images=3, image_size=56)
    entry = __import__("json").loads(path.read_text())[0]
    messages = build_messages([root / p for p in entry["pos_image"] + entry["neg_image"]],
                              entry["conversations"][0]["value"])
    processor = build_tiny_processor()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=process_vision_info(messages)[0], return_tensors="pt")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_selfextend_group_1_is_exactly_the_baseline(model, inputs):
    base = _logits(model, inputs)
    extended = apply_selfextend(copy.deepcopy(model), group_size=1, window=4)
    assert extended.model.language_model.config._attn_implementation == "laid_selfextend"
    assert extended.config.vision_config._attn_implementation == model.config.vision_config._attn_implementation
    assert torch.equal(_logits(extended, inputs), base)
    # A window wider than every distance keeps every key a neighbour: exact too, whatever the group size.
    wide = apply_selfextend(copy.deepcopy(model), group_size=4, window=10**6)
    assert torch.equal(_logits(wide, inputs), base)
    # A real grouping changes the logits.
    grouped = apply_selfextend(copy.deepcopy(model), group_size=4, window=8)
    assert (_logits(grouped, inputs) - base).abs().max() > 1e-4


def test_selfextend_generation_uses_the_cache_consistently(model, inputs):
    grouped = apply_selfextend(copy.deepcopy(model), group_size=4, window=8)
    out = grouped.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    sequence = out.sequences
    n = inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": sequence[:, :-1], "attention_mask": torch.ones_like(sequence[:, :-1])}
    if "mm_token_type_ids" in inputs:
        pad = torch.zeros(1, sequence.shape[1] - 1 - n, dtype=inputs["mm_token_type_ids"].dtype)
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
    logits = _logits(grouped, full)
    for step, scores in enumerate(out.scores):  # cached step logits == one forward over the whole sequence
        torch.testing.assert_close(scores[0], logits[0, n - 1 + step], atol=2e-5, rtol=1e-5)


def _rotate(x, pos, inv_freq, section):
    """The spec's M-RoPE rotation of x [D] at positions pos (3 ints): frequency f pairs channels f, f + D/2 and turns
    by pos[r(f)] * inv_freq[f]."""
    half = x.shape[-1] // 2
    rows = [0] * section[0] + [1] * section[1] + [2] * section[2]
    out = x.clone()
    for f in range(half):
        angle = pos[rows[f]] * inv_freq[f]
        c, s = math.cos(angle), math.sin(angle)
        out[f] = x[f] * c - x[f + half] * s
        out[f + half] = x[f + half] * c + x[f] * s
    return out


def test_selfextend_attention_matches_a_per_pair_reference():
    torch.manual_seed(1)
    heads, kv_heads, dim, n, group, window = 4, 2, 8, 12, 3, 4
    section = (1, 1, 2)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    # Text, then a 2x3 "image" (t constant, h/w a grid), then text: M-RoPE style positions [3, 1, n].
    t = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7, 8]
    h = [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7, 8]
    w = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8]
    pos = torch.tensor([t, h, w])[:, None]
    q, k, v = (torch.randn(1, c, n, dim, dtype=torch.float64) for c in (heads, kv_heads, kv_heads))
    rot = lambda x: torch.stack([torch.stack([_rotate(x[0, i, j], pos[:, 0, j].tolist(), inv_freq, section)
                                              for j in range(n)]) for i in range(x.shape[1])])[None]
    rotary = types.SimpleNamespace(inv_freq=inv_freq, mrope_section=section)
    positions = _Positions(rotary)
    positions.record(None, (None, pos))
    module = types.SimpleNamespace(laid_selfextend=(group, window, positions), layer_idx=0, num_key_value_groups=2)
    out, _ = selfextend_attention(module, rot(q), rot(k), v, None, scaling=dim**-0.5)

    shift = window - window // group
    expected = torch.zeros(n, heads, dim, dtype=torch.float64)
    for i in range(heads):
        for m in range(n):
            logits = []
            for j in range(m + 1):
                pm, pj = pos[:, 0, m].tolist(), pos[:, 0, j].tolist()
                if pm[0] - pj[0] >= window:
                    pm, pj = [p // group + shift for p in pm], [p // group for p in pj]
                qm = _rotate(q[0, i, m], pm, inv_freq, section)
                kj = _rotate(k[0, i // 2, j], pj, inv_freq, section)
                logits.append(qm @ kj * dim**-0.5)
            weights = torch.softmax(torch.stack(logits), dim=0)
            expected[m, i] = weights @ v[0, i // 2, : m + 1]
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=1e-5)  # the softmax is fp32, as in eager
    # The far keys really were grouped here (some t distances reach the window).
    assert (pos[0, 0, :, None] - pos[0, 0, None, :]).max() >= window


def test_yarn_changes_rotary_parameters_as_documented(model, inputs):
    base_rotary = model.model.language_model.rotary_emb
    yarn = apply_yarn(copy.deepcopy(model), factor=4.0)
    rotary = yarn.model.language_model.rotary_emb
    params = yarn.model.language_model.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 32768
    assert params["mrope_section"] == base_rotary.mrope_section == rotary.mrope_section
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    rotations = 32768 * base_rotary.inv_freq / (2 * math.pi)  # turns over the original context
    fast, slow = rotations > 32, rotations < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    assert torch.equal(rotary.inv_freq[fast], base_rotary.inv_freq[fast])
    torch.testing.assert_close(rotary.inv_freq[slow], base_rotary.inv_freq[slow] / 4)
    middle = ~fast & ~slow
    assert ((rotary.inv_freq[middle] < base_rotary.inv_freq[middle])
            & (rotary.inv_freq[middle] > base_rotary.inv_freq[middle] / 4)).all()
    # cos at position 0 carries the attention scaling; the model still runs and its logits change.
    cos, sin = rotary(torch.zeros(1), torch.zeros(3, 1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, rotary.attention_scaling))
    assert (_logits(yarn, inputs) - _logits(model, inputs)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="yarn factor must be > 1"):
        apply_yarn(copy.deepcopy(model), factor=1.0)
