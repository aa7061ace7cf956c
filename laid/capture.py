"""Capture of pre-RoPE queries and keys inside Qwen2.5-VL forwards, the student's RoPE gain, and M-RoPE positions.

- :class:`QKCapture` puts forward hooks on the ``q_proj`` / ``k_proj`` of chosen decoder layers. Their outputs are
  the queries / keys before RoPE, in the layout the projections give: q [B, N, H, D], k [B, N, H_kv, D] (a view,
  no copy). Given a ``gain``, the q_proj computes with its weight rows scaled (channel pair (f, f + D/2) of head h
  by G[h, f], :func:`laid.mixer.fold_gain` in the dtype the projection computes in), so the model's own attention
  and every loss see the gained queries, and the training forward uses bit for bit the q_proj weight the export
  writes. The gain is applied on every call (recomputation under gradient checkpointing included); recording
  happens only inside :meth:`QKCapture.record`, and :meth:`QKCapture.clear` drops the recordings.
- :func:`stop_after` runs a model's decoder only up to a layer: later layers never run (call the inner
  ``model.model`` so that no lm_head runs either).
- :func:`mrope_positions`: the [3, B, N] M-RoPE positions of transformers' ``get_rope_index``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .mixer import fold_gain


def unwrap(model: nn.Module) -> nn.Module:
    """The Qwen2_5_VLForConditionalGeneration inside a DDP / FSDP / compile wrapper (or the model itself)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a Qwen2.5-VL model."""
    return unwrap(model).model.language_model.layers


def resolve_layer(index: int, num_layers: int, name: str) -> int:
    """A layer index in [0, num_layers); negative counts from the end. ValueError names ``name`` when out of range."""
    if not -num_layers <= index < num_layers:
        raise ValueError(f"{name}: layer {index} is out of range for a model with {num_layers} decoder layers "
                         f"(valid: {-num_layers} .. {num_layers - 1})")
    return index % num_layers


class QKCapture:
    """Forward hooks recording q_proj / k_proj outputs of ``layers`` (and optionally applying the RoPE gain).

    Args:
        model: a Qwen2_5_VLForConditionalGeneration (possibly wrapped).
        layers: decoder layer indices (non-negative, distinct); captured tensors are returned in this order.
        gain: optional ``gain(i) -> [H, D]`` giving the per-channel query scale for ``layers[i]`` (each of their
            q_proj must be a plain nn.Linear).

    After a forward inside ``with capture.record():``, ``capture.queries[i]`` is [B, N, H, D] and
    ``capture.keys[i]`` is [B, N, H_kv, D] for ``layers[i]``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int],
                 gain: Callable[[int], torch.Tensor] | None = None):
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers to capture must be distinct, got {list(layers)}")
        config = unwrap(model).config.text_config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = list(layers)
        self.gain = gain
        self.recording = False
        self.queries: list[torch.Tensor | None] = [None] * len(self.layers)
        self.keys: list[torch.Tensor | None] = [None] * len(self.layers)
        modules = decoder_layers(model)
        self._handles = []
        self._gained: list[nn.Linear] = []
        for slot, index in enumerate(self.layers):
            attention = modules[index].self_attn
            if gain is not None:
                self._gain_q_proj(attention.q_proj, slot)
            self._handles.append(attention.q_proj.register_forward_hook(self._query_hook(slot)))
            self._handles.append(attention.k_proj.register_forward_hook(self._key_hook(slot)))

    def _gain_q_proj(self, q_proj: nn.Module, slot: int) -> None:
        """Make ``q_proj`` compute x W_g^T + b_g with (W_g, b_g) = fold_gain(W, b, gain(slot)) in its compute dtype
        (the autocast dtype inside autocast, else the weight's: FSDP2's param_dtype)."""
        if type(q_proj) is not nn.Linear:
            raise ValueError(f"the RoPE gain needs the aligned layers' q_proj to be a plain nn.Linear, got "
                             f"{type(q_proj).__name__} (LoRA adapters on an aligned layer: use lambda_laid = 0)")

        def forward(x: torch.Tensor) -> torch.Tensor:
            device = x.device.type
            dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else q_proj.weight.dtype)
            return F.linear(x, *fold_gain(q_proj.weight, q_proj.bias, self.gain(slot), dtype))

        q_proj.forward = forward  # an instance attribute: nn.Module.__call__ (and every hook) runs it
        self._gained.append(q_proj)

    def _heads(self, output: torch.Tensor) -> torch.Tensor:
        return output.view(*output.shape[:-1], -1, self.head_dim)  # [B, N, H * D] -> [B, N, H, D]

    def _query_hook(self, slot: int):
        def hook(module: nn.Module, args, output: torch.Tensor):
            if self.recording:
                self.queries[slot] = self._heads(output)
        return hook

    def _key_hook(self, slot: int):
        def hook(module: nn.Module, args, output: torch.Tensor):
            if self.recording:
                self.keys[slot] = self._heads(output)
        return hook

    def clear(self) -> None:
        """Drop the recorded q / k (the autograd graph keeps what backward needs; nothing else stays alive)."""
        self.queries = [None] * len(self.layers)
        self.keys = [None] * len(self.layers)

    @contextmanager
    def record(self) -> Iterator["QKCapture"]:
        """Record the q / k of the forwards run inside the block (previous recordings are dropped first)."""
        self.clear()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False
        missing = [self.layers[i] for i, q in enumerate(self.queries) if q is None or self.keys[i] is None]
        if missing:
            raise RuntimeError(f"layers {missing} did not run inside QKCapture.record()")

    def remove(self) -> None:
        """Remove the hooks (the gain stops being applied)."""
        for handle in self._handles:
            handle.remove()
        for q_proj in self._gained:
            del q_proj.forward  # back to nn.Linear.forward
        self._handles, self._gained = [], []


@contextmanager
def stop_after(model: nn.Module, last_layer: int | None) -> Iterator[None]:
    """Within the block, the model's decoder runs layers 0 .. last_layer only (None: all layers).

    The decoder iterates its ``layers`` ModuleList; it is temporarily replaced by the prefix (same modules), so the
    later layers are never called. The final norm still runs on the truncated hidden states; call the inner
    ``model.model`` (or pass an empty ``logits_to_keep``) so that the lm_head projects nothing.
    """
    if last_layer is None:
        yield
        return
    text_model = unwrap(model).model.language_model
    full = text_model.layers
    text_model.layers = full[: last_layer + 1]
    try:
        yield
    finally:
        text_model.layers = full


@torch.no_grad()
def mrope_positions(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """M-RoPE positions [3, B, N] (rows t, h, w) from transformers' ``get_rope_index``.

    input_ids, attention_mask [B, N]; image_grid_thw [num_images, 3]. Image tokens are the model's
    ``image_token_id``; padding (attention_mask 0) gets position 0.
    """
    inner = unwrap(model).model
    token_type = (input_ids == inner.config.image_token_id).int()
    if image_grid_thw is None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return positions[None].expand(3, -1, -1).contiguous()
    positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=token_type, image_grid_thw=image_grid_thw,
                                        attention_mask=attention_mask)
    return positions
