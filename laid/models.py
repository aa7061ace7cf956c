"""Loading the teacher, the student and the processor through transformers' real Qwen2.5-VL classes.

- Source: a local folder (``save_pretrained`` output) or a hub id; nothing is downloaded when a folder is given.
  Under FSDP with rank-0-only loading only rank 0 reads weights (:func:`reads_weights`); the others build the
  model on the meta device and :func:`shard_teacher` / accelerate broadcast their shards.
- Attention: ``flash_attention_2`` when flash-attn imports and the run is on CUDA, else ``sdpa``
  (:func:`choose_attention`).
- Teacher: frozen (``requires_grad_(False)``), eval mode, bf16 on CUDA (fp32 on CPU).
- Student: fp32 master weights (bf16 autocast on CUDA comes from accelerate), train mode, non-reentrant gradient
  checkpointing, and only the chosen parts trainable: the language model (embeddings, decoder, lm_head) by default,
  the vision tower (with its merger) frozen unless ``train_vision``.
- :func:`check_compatible` gives a clear error when the two models cannot be aligned (head_dim, RoPE, tokenizer).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from .capture import unwrap


def choose_attention(requested: str, device: torch.device) -> str:
    """``requested`` unless "auto": flash_attention_2 on CUDA when the flash_attn package imports, else sdpa."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(source: str, *, dtype: torch.dtype, attn_implementation: str, role: str,
               trains: bool = False) -> Qwen2_5_VLForConditionalGeneration:
    """``Qwen2_5_VLForConditionalGeneration.from_pretrained(source)`` with a clear error naming ``role``; on a
    process that reads no weights (:func:`reads_weights`) the model without them (``trains``: a model an optimizer
    will be built for, see :func:`_empty_model`).

    transformers' own "Loading weights" progress bar is silenced while it loads: laid's commands show their own bars,
    and a bar per model loaded would interleave with them.
    """
    try:
        if not reads_weights():
            return _empty_model(source, dtype=dtype, attn_implementation=attn_implementation, allocate=trains)
        with _no_transformers_progress_bars():
            return Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=dtype,
                                                                       attn_implementation=attn_implementation)
    except (OSError, ValueError) as error:
        raise ValueError(f"{role}: cannot load a Qwen2.5-VL model from {source!r} (a folder written by "
                         f"save_pretrained or a hub id was expected): {error}") from error


def reads_weights() -> bool:
    """Whether this process reads model weights from disk: False only on the processes other than rank 0 of an FSDP
    run with rank-0-only loading (accelerate's ``fsdp_cpu_ram_efficient_loading``), which get their shards by
    broadcast from rank 0 when the model is sharded (transformers 5.24 reads the whole checkpoint on every process
    otherwise)."""
    return not (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
                and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"
                and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)


def _empty_model(source: str, *, dtype: torch.dtype, attn_implementation: str, allocate: bool):
    """The model of ``source``'s config without its weights, its buffers (rotary frequencies) computed for real, as
    rank-0-only FSDP loading expects of the other ranks. Parameters on the meta device, or with ``allocate`` in
    CPU memory that is allocated but never written (the OS backs it with no RAM until touched): accelerate pairs a
    prepared optimizer with the model's parameters by their storage address, which meta tensors lack."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if not isinstance(model, Qwen2_5_VLForConditionalGeneration):
        raise ValueError(f"{source!r} holds a {type(model).__name__}, not a Qwen2.5-VL model")
    if allocate:
        allocated: dict[int, torch.nn.Parameter] = {}  # by id: a tied parameter stays one parameter
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in allocated:
                    allocated[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                              requires_grad=param.requires_grad)
                module.register_parameter(name, allocated[id(param)])
    return model


@contextlib.contextmanager
def _no_transformers_progress_bars():
    """Turn transformers' tqdm bars off for the ``with`` block, and back on after it if they were on."""
    were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_enabled:
            hf_logging.enable_progress_bar()


def load_teacher(source: str, *, device: torch.device, attn_implementation: str = "auto"):
    """The frozen teacher: eval mode, no gradients, bf16 on CUDA / fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = load_model(source, dtype=dtype, attn_implementation=choose_attention(attn_implementation, device),
                         role="teacher")
    teacher.requires_grad_(False)
    return teacher.eval()


def shard_teacher(teacher, accelerator):
    """Shard the frozen teacher over all processes with FSDP2, exactly as ``accelerator.prepare`` shards the
    student (accelerate's ``fsdp2_prepare_model`` with the run's FSDP plugin), for runs under FSDP2.

    Units: each decoder layer and vision block (the model's ``_no_split_modules``), the input embeddings, the final
    norm with the lm_head, and the root (the whole model: vision patch embedding, merger, rotary buffers), so every
    forward must call the model itself. The teacher is never moved to a device whole: ``fully_shard`` moves one
    unit at a time and keeps each process's shard; with ``fsdp_cpu_ram_efficient_loading`` (the paper's
    configs/fsdp_8gpu.yaml) only rank 0 has read the weights (:func:`reads_weights`; the other ranks hold a meta
    model), and accelerate broadcasts each tensor from rank 0 into the shards. The teacher is not one of
    accelerate's prepared models: it never enters checkpoints.
    """
    from accelerate.utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, teacher)


# The language model's linear layers that get LoRA adapters (a full match on the module name, as peft reads it).
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def load_student(source: str, *, device: torch.device, attn_implementation: str = "auto",
                 train_language_model: bool = True, train_vision: bool = False,
                 gradient_checkpointing: bool = True, lora_rank: int = 0, lora_alpha: float = 16.0):
    """The student in train mode with fp32 weights, the chosen parts trainable, non-reentrant checkpointing.

    ``lora_rank`` > 0: peft LoRA adapters (rank ``lora_rank``, ``lora_alpha``) are injected in place into the
    language model's linear layers (``LORA_TARGETS``) and only they train (``train_language_model`` then means the
    adapters); the model stays a Qwen2_5_VLForConditionalGeneration and :func:`merge_lora` folds them back.
    """
    student = load_model(source, dtype=torch.float32,
                         attn_implementation=choose_attention(attn_implementation, device), role="student",
                         trains=True)
    student.requires_grad_(False)
    inner = student.model
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS), student)
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(train_language_model and "lora_" in name)
    elif train_language_model:
        inner.language_model.requires_grad_(True)
        student.lm_head.requires_grad_(True)
    if train_vision:
        inner.visual.requires_grad_(True)
    if gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing drops the gradient of tensors captured inside the layer (the
        # student's Q/K) when the layer's inputs do not require grad.
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    return student.train()


def merge_lora(model) -> None:
    """Fold the LoRA adapters injected by :func:`load_student` into their base linear layers and put the plain
    layers back (in place): the model is then a plain Qwen2.5-VL model again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def load_processor(source: str):
    """The Qwen2.5-VL processor (tokenizer + image processor) from a folder or hub id."""
    try:
        return AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"processor: cannot load a processor from {source!r}: {error}") from error


def text_config(model):
    """The language-model config of a (possibly wrapped) Qwen2.5-VL model."""
    return unwrap(model).config.text_config


def head_dim(config) -> int:
    """Per-head dimension D of a text config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_compatible(teacher, student, vocab: int) -> None:
    """ValueError unless the pair can be aligned: equal head_dim, rope_theta and mrope_section, and both
    vocabularies at least ``vocab`` (the shared tokenizer length)."""
    t, s = text_config(teacher), text_config(student)
    if head_dim(t) != head_dim(s):
        raise ValueError(f"head_dim mismatch: teacher has head_dim {head_dim(t)}, student has {head_dim(s)}; "
                         f"LAid aligns per-head queries and keys and needs the same head_dim")
    for key in ("rope_theta", "mrope_section"):
        if t.rope_parameters.get(key) != s.rope_parameters.get(key):
            raise ValueError(f"{key} mismatch: teacher {t.rope_parameters.get(key)}, student "
                             f"{s.rope_parameters.get(key)}; both models must share M-RoPE")
    for key in ("image_token_id", "vision_config.spatial_merge_size"):
        values = [_attribute(unwrap(m).config, key) for m in (teacher, student)]
        if values[0] != values[1]:
            raise ValueError(f"{key} mismatch: teacher {values[0]}, student {values[1]}; both models must share "
                             f"the processor's image tokens")
    for role, config in (("teacher", t), ("student", s)):
        if config.vocab_size < vocab:
            raise ValueError(f"{role} vocab_size {config.vocab_size} is smaller than the tokenizer ({vocab} tokens)")


def _attribute(config, dotted: str):
    for name in dotted.split("."):
        config = getattr(config, name)
    return config
