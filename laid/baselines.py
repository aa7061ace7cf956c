"""Training-free context-extension baselines for Qwen2.5-VL: YaRN and SelfExtend, applied to a loaded model.

YaRN (``apply_yarn``): the text model's rope parameters become ``rope_type="yarn"`` with ``factor`` and
``original_max_position_embeddings=32768`` as the Qwen2.5-VL model card gives (``mrope_section`` kept), and the
rotary module is rebuilt from them. transformers' YaRN then interpolates the low frequencies of ``inv_freq`` [D/2]
(those with fewer than ``beta_slow`` = 1 rotation over 32768 positions are divided by ``factor``, those with more than
``beta_fast`` = 32 are kept, a linear ramp between) and multiplies cos and sin by ``0.1 ln(factor) + 1``; M-RoPE
still takes frequency f from position row r(f) of ``mrope_section``.

SelfExtend (``apply_selfextend``, Jin et al. 2024, "LLM Maybe LongLM"), ported to M-RoPE. For a query at M-RoPE
positions m = (m_t, m_h, m_w) and a key at n:

- neighbour keys, ``m_t - n_t < window`` (distance along the temporal/text row, which is the token distance on text):
  the model's own rotations, unchanged;
- farther keys: all three rows grouped, the key rotated at ``n_r // group_size`` and the query at
  ``m_r // group_size + window - window // group_size`` (the shift makes the grouped distance continue the neighbour
  one at the window's edge).

The queries and keys reaching attention are already rotated at their true positions (the KV cache holds them so),
so the grouped ones are obtained by a further exact rotation by the position difference (grouped - true) per
M-RoPE row, in (at least) fp32: rotations compose, R(a) R(b) = R(a + b), and with ``group_size=1`` the difference
is 0, the extra rotation the identity (cos 0 = 1, sin 0 = 0) and the logits bit-equal to eager attention's. Logits
of both kinds are merged per (query, key) before one softmax, computed in query chunks so that no [heads, N, N]
tensor exists (eager-style, ``QUERY_CHUNK_BYTES`` of logits at a time: slower than flash attention). In bf16 the
grouped queries / keys carry one extra rounding (rotated in fp32, cast back). The M-RoPE positions of the cached keys
are recorded from the rotary module's input at every forward (``generate`` included); the first decoder layer
appends them. The vision tower keeps its own attention.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv, rotate_half

SELFEXTEND = "laid_selfextend"
QWEN25VL_ORIGINAL_MAX_POSITIONS = 32768
QUERY_CHUNK_BYTES = 2**28  # fp32 logits held at once by one SelfExtend attention call (both kinds)


def _language_model(model):
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def apply_yarn(model, factor: float = 4.0, original_max_position_embeddings: int = QWEN25VL_ORIGINAL_MAX_POSITIONS):
    """Switch the text model of ``model`` to YaRN rope scaling in place (see the module docstring); returns it."""
    if not factor > 1:
        raise ValueError(f"yarn factor must be > 1, got {factor}")
    language_model = _language_model(model)
    config = language_model.config
    config.rope_parameters = {**config.rope_parameters, "rope_type": "yarn", "factor": float(factor),
                              "original_max_position_embeddings": original_max_position_embeddings}
    config.max_position_embeddings = int(factor * original_max_position_embeddings)
    old = language_model.rotary_emb
    language_model.rotary_emb = type(old)(config=config).to(old.inv_freq.device)
    return model


class _Positions:
    """M-RoPE positions [3, B, K] of the keys the attention of the current forward sees (cache included)."""

    def __init__(self, rotary):
        self.rotary = rotary
        self.pending = None
        self.keys = None

    def record(self, module, args):
        """Forward pre-hook of the rotary module: ``args = (x, position_ids)``, positions of the new tokens."""
        self.pending = args[1].expand(3, -1, -1)

    def commit(self, n_queries: int, n_keys: int) -> torch.Tensor:
        """Append the new tokens' positions (called by the first layer); returns the keys' positions [3, B, K]."""
        if n_keys == n_queries:
            self.keys = self.pending
        elif self.keys is not None and self.keys.shape[-1] == n_keys - n_queries:
            self.keys = torch.cat([self.keys, self.pending], dim=-1)
        else:
            raise RuntimeError(f"SelfExtend: {n_keys} keys but positions recorded for "
                               f"{None if self.keys is None else self.keys.shape[-1]} + {n_queries}")
        return self.keys


def mrope_rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, mrope_section) -> torch.Tensor:
    """Rotate ``x`` [B, H, L, D] further by M-RoPE position offsets ``delta`` [3, B, L] (in at least fp32, cast
    back). Frequency f (channels f and f + D/2, rotate-half convention) turns by ``delta[r(f)] * inv_freq[f]``.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    angles = delta[..., None].to(dtype) * inv_freq.to(dtype)  # [3, B, L, D/2]
    rows = torch.cat([part[i % 3] for i, part in enumerate(angles.split(list(mrope_section), dim=-1))], dim=-1)
    rows = torch.cat([rows, rows], dim=-1)[:, None]  # [B, 1, L, D]
    wide = x.to(dtype)
    return (wide * rows.cos() + rotate_half(wide) * rows.sin()).to(x.dtype)


def selfextend_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """SelfExtend attention (AttentionInterface signature): query [B, H, q, D], key / value [B, H_kv, K, D] rotated
    at their true positions, ``attention_mask`` additive [B, 1, q, K] or None. Returns ([B, q, H, D], None)."""
    group, window, positions = module.laid_selfextend
    n_queries, n_keys = query.shape[2], key.shape[2]
    key_pos = positions.commit(n_queries, n_keys) if module.layer_idx == 0 else positions.keys
    query_pos = key_pos[..., n_keys - n_queries:]
    shift = window - window // group
    rotary = positions.rotary
    query_grouped = mrope_rotate(query, query_pos // group + shift - query_pos, rotary.inv_freq, rotary.mrope_section)
    key_grouped = mrope_rotate(key, key_pos // group - key_pos, rotary.inv_freq, rotary.mrope_section)
    groups = module.num_key_value_groups
    key, key_grouped, value = repeat_kv(key, groups), repeat_kv(key_grouped, groups), repeat_kv(value, groups)
    chunk = max(1, QUERY_CHUNK_BYTES // (8 * query.shape[0] * query.shape[1] * n_keys))
    outputs = []
    for start in range(0, n_queries, chunk):
        rows = slice(start, start + chunk)
        near = torch.matmul(query[:, :, rows], key.transpose(2, 3)) * scaling
        far = torch.matmul(query_grouped[:, :, rows], key_grouped.transpose(2, 3)) * scaling
        distance = query_pos[0, :, rows, None] - key_pos[0, :, None, :]  # [B, rows, K]
        logits = torch.where((distance < window)[:, None], near, far)
        if attention_mask is not None:
            logits = logits + attention_mask[:, :, rows, :n_keys]
        else:
            index = torch.arange(start, min(start + chunk, n_queries), device=query.device) + n_keys - n_queries
            causal = torch.arange(n_keys, device=query.device)[None, :] <= index[:, None]
            logits = logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.matmul(weights, value))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def apply_selfextend(model, group_size: int = 8, window: int = 1024):
    """Give the text model of ``model`` SelfExtend attention in place (see the module docstring); returns it.

    ``group_size`` >= 1 (1: exactly the model's own attention), ``window`` >= 1 neighbour distance in positions.
    """
    if group_size < 1 or window < 1:
        raise ValueError(f"selfextend group_size and window must be >= 1, got {group_size}, {window}")
    AttentionInterface.register(SELFEXTEND, selfextend_attention)
    AttentionMaskInterface.register(SELFEXTEND, eager_mask)
    language_model = _language_model(model)
    positions = _Positions(language_model.rotary_emb)
    language_model.rotary_emb.register_forward_pre_hook(positions.record)
    for layer in language_model.layers:
        layer.self_attn.laid_selfextend = (group_size, window, positions)
    model.set_attn_implementation({"text_config": SELFEXTEND})
    return model
