"""apply_mrope: every fused backend against the reference, and the reference against transformers' Qwen2.5-VL.

The transformers check builds a tiny Qwen2.5-VL config in the test (no download), takes positions from
``Qwen2_5_VLModel.get_rope_index`` for a batch of prompts with several images of different grid sizes and text
between them, and rotates with transformers' own ``Qwen2_5_VLRotaryEmbedding`` and ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import GRAD_FACTOR, VALUE_FACTOR, assert_within_pytorch_error

from laid_kernels import apply_mrope, available_backends, reference

OP = "apply_mrope"
FUSED = [b for b in available_backends(OP, "cpu") if b != "reference"]
QWEN_SECTION = (16, 24, 24)


def inv_freq_for(dim: int) -> torch.Tensor:
    return 1.0 / 1e6 ** (torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)


def projection_view(batch, seq, heads, dim, dtype, seed=0):
    """x [B, N, H, D] as a view of a wider fused projection output (non-contiguous strides), and positions."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, seq, (heads + 2) * dim, generator=g).to(dtype)
    x = fused[..., dim:(heads + 1) * dim].view(batch, seq, heads, dim)
    positions = torch.randint(0, 60_000, (3, batch, seq), generator=g)
    return x, positions


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seq,heads,dim,section,text_only", [
    (2, 131, 28, 128, QWEN_SECTION, False),
    (1, 1, 40, 128, QWEN_SECTION, True),
    (2, 37, 4, 64, (8, 12, 12), False),
    (1, 9, 3, 64, (0, 20, 12), True),  # an empty section
])
def test_matches_reference(backend, dtype, batch, seq, heads, dim, section, text_only):
    x, positions = projection_view(batch, seq, heads, dim, dtype)
    if text_only:
        positions = positions[0]
    inv_freq = inv_freq_for(dim)
    grad_out = torch.randn(batch, seq, heads, dim, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(x, backend):
        x = x.detach().clone().requires_grad_()
        y = apply_mrope(x, positions, inv_freq, section, backend=backend)
        return y.detach(), torch.autograd.grad(y, x, grad_out.to(x.dtype))[0]

    y, dx = run(x, backend)
    y_torch, dx_torch = run(x, "reference")
    y_exact, dx_exact = run(x.double(), "reference")
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert_within_pytorch_error("y", y, y_torch, y_exact, VALUE_FACTOR)
    assert_within_pytorch_error("dx", dx, dx_torch, dx_exact, GRAD_FACTOR)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_inverse_rotation_restores_input(backend):
    x, positions = projection_view(1, 7, 3, 64, torch.float32)
    y = apply_mrope(x, positions, inv_freq_for(64), (8, 12, 12), backend=backend)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)  # a rotation per head
    assert not torch.allclose(y, x, atol=1e-2)


def tiny_qwen25vl_positions():
    """positions [3, B, N] from transformers' get_rope_index for two prompts with three images of different grid
    sizes each (text around and between them), the second prompt left-padded; with the attention mask and config."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=256,
                           spatial_merge_size=2, patch_size=14, temporal_patch_size=2),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    model = transformers.Qwen2_5_VLModel(config).eval()
    # (kind, length or image grid (t, h, w) in patches): an image is (h / 2) * (w / 2) tokens after the 2x2 merge.
    prompts = [
        [("text", 5), ("image", (1, 4, 6)), ("text", 3), ("image", (1, 8, 4)), ("text", 2), ("image", (1, 2, 2)),
         ("text", 4)],
        [("text", 2), ("image", (1, 6, 6)), ("text", 1), ("image", (1, 2, 4)), ("text", 3), ("image", (1, 4, 4)),
         ("text", 2)],
    ]
    rows, grids = [], []
    for prompt in prompts:
        types = []
        for kind, size in prompt:
            if kind == "text":
                types += [0] * size
            else:
                types += [1] * (size[1] // 2 * size[2] // 2)
                grids.append(size)
        rows.append(types)
    seq = max(len(r) for r in rows)
    mm_token_type_ids = torch.zeros(2, seq, dtype=torch.int32)
    attention_mask = torch.zeros(2, seq, dtype=torch.long)
    for b, types in enumerate(rows):  # left padding
        mm_token_type_ids[b, seq - len(types):] = torch.tensor(types, dtype=torch.int32)
        attention_mask[b, seq - len(types):] = 1
    input_ids = torch.where(mm_token_type_ids == 1, 5, 10)
    positions, _ = model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=torch.tensor(grids),
                                        attention_mask=attention_mask)
    return positions, attention_mask, config


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_matches_transformers_qwen25vl(backend):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    positions, attention_mask, config = tiny_qwen25vl_positions()
    assert positions[1].ne(positions[2]).any() and positions[0].ne(positions[1]).any()  # real 3-D image positions
    batch, seq = attention_mask.shape
    rotary = Qwen2_5_VLRotaryEmbedding(config.text_config)
    section = tuple(config.text_config.rope_parameters["mrope_section"])
    g = torch.Generator().manual_seed(0)
    q32 = torch.randn(batch, seq, 2 * 128, generator=g).view(batch, seq, 2, 128)
    k32 = torch.randn(batch, seq, 128, generator=g).view(batch, seq, 1, 128)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = q32.to(dtype), k32.to(dtype)
        cos, sin = rotary(q, positions)  # [B, N, D] in q's dtype
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        q_ours = apply_mrope(q, positions, rotary.inv_freq, section, backend=backend)
        k_ours = apply_mrope(k, positions, rotary.inv_freq, section, backend=backend)
        if dtype == torch.float32:  # same angles, same formula: fp32 rounding only
            torch.testing.assert_close(q_ours, q_hf, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k_ours, k_hf, rtol=1e-5, atol=1e-5)
        else:  # transformers rounds cos / sin to bf16 and rotates in bf16: ours must be at least as accurate
            q_exact = reference.apply_mrope(q.double(), positions, rotary.inv_freq, section)
            k_exact = reference.apply_mrope(k.double(), positions, rotary.inv_freq, section)
            assert_within_pytorch_error("q", q_ours, q_hf, q_exact, 1.0)
            assert_within_pytorch_error("k", k_ours, k_hf, k_exact, 1.0)
