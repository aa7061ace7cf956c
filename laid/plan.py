"""``laid plan``: the per-GPU memory of a LAid run, estimated from the two models' configs alone.

    laid plan --teacher Qwen/Qwen2.5-VL-32B-Instruct --student Qwen/Qwen2.5-VL-7B-Instruct \
        --gpus 8 --gpu-memory-gb 80 --images 20 --strategy fsdp [--json]

A model is a local folder (its config.json) or one of the Qwen2.5-VL hub ids in :data:`QWEN25_VL`, whose real
config values are written here (nothing is downloaded). Parameter counts are exact: the real
``Qwen2_5_VLForConditionalGeneration`` is built on the meta device from the config (no memory, no weights) and its
parameters are counted per FSDP unit.

What is modelled is the paper's recipe as ``laid.train`` runs it (configs/qwen25vl_32b_to_7b.yaml): batch 1, the
language model (with embeddings and lm_head) trains, the vision tower is frozen, non-reentrant gradient checkpointing
of every decoder layer, one aligned layer pair, L_qk + L_attn + L_KL + L_SFT. Per GPU, in bytes:

- student weights: fp32 master weights (``laid.models.load_student``), sharded over the GPUs under FSDP;
- student gradients: fp32, one per trainable parameter (sharded under FSDP: laid keeps them
  sharded across gradient accumulation and reduces in fp32, which is what is modelled); DDP with several processes
  adds its reducer's fp32 buckets, one more copy (accelerate leaves ``gradient_as_bucket_view`` off);
- optimizer states: AdamW's exp_avg and exp_avg_sq, fp32 (sharded under FSDP); on the CPU also the step counters;
- mixer: W_q, W_k and the gain in fp32 with gradients and two AdamW moments;
- teacher weights: bf16 on CUDA (fp32 on CPU); under FSDP (``laid.models.shard_teacher``: accelerate's wrapping,
  the student's units) every parameter is sharded; its gathered units are counted below;
- inputs: pixel_values (fp32, 1176 values per patch, 4 patches per visual token) and the token tensors, twice on
  CUDA (accelerate's loader moves the next batch ahead) and three times on the CPU (train() also keeps the first
  batch, that of the mixer's init);
- then the largest of five moments of a micro-batch (``peak``), with the gradients and optimizer states above
  present (from the second micro-batch of a step, and from the second step on):
  * "teacher forward" (no grad): the live tensors of one decoder layer's MLP (three [N, I] tensors and three
    [N, h]) or of one vision block's MLP, whichever is larger, of the teacher or the frozen student vision tower;
  * "student forward end": the checkpoints (each decoder layer's input, [N, h]) plus, under DDP on CUDA, autocast's
    cache of bf16 copies of the trainable weights (held until the forward ends);
  * "loss backward": the checkpoints and the fused losses' buffers: the captured student and teacher Q/K, the
    gradients ``qk_align_loss`` saves and ``attn_match_loss`` returns, L_attn's query rows in fp32, on the CPU the
    C++ path's key blocks (:func:`attn_match_blocks`), logits only at the answer positions;
  * "layer backward": the checkpoints, the captured Q/K with their summed gradient, one decoder layer recomputed
    with everything autograd saves for it (:func:`layer_saved_bytes`) and the hidden-state gradients in and out;
  * "optimizer step": AdamW's foreach temporary (one fp32 copy of the moments on CUDA; one parameter's on the CPU);
- under FSDP, gathered parameters: each model's lm_head / final-norm unit and root (everything but the decoder
  layers, vision blocks and input embeddings) counted gathered (bf16), two decoder layers (the current one and the
  prefetched one) gathered at a time for each model, and the layer in
  its backward has its bf16 gradient and fp32 reduce-scatter copy;
- on CUDA, ``reserve_gb`` for the CUDA context, NCCL buffers and the caching allocator's fragmentation (an
  assumption, not a measurement).

Start-up is not modelled: the estimate is of training (``shard_teacher`` never holds a whole teacher on a GPU; host
memory, rank 0's full checkpoints under ``fsdp_cpu_ram_efficient_loading``, is not counted).

Dtypes on CUDA (bf16 autocast): DDP keeps the residual stream in fp32 (fp32 embeddings), FSDP2 in bf16 (bf16
gathered parameters). On the CPU everything is fp32 and nothing is sharded (one process): that is the case the
tests and benchmarks/plan_check.py measure against real tiny training runs.

Sizes are in GB = 1e9 bytes, like the trainer's ``peak_mem_gb``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from laid_kernels.attn_match import CPU_BLOCK_ELEMENTS, CPU_MIN_BLOCK

STRATEGIES = ("fsdp", "ddp")
DEVICES = ("cuda", "cpu")
# Everything one image adds to a Visual Haystacks prompt: its visual tokens and the vision start / end delimiters;
# about 54K tokens for 150 images (shared/notes/visual-haystacks.md).
TOKENS_PER_IMAGE = 360
# The rest of the prompt: system turn, VHs instruction, question, answer and chat scaffolding.
TEXT_TOKENS = 64
# Answer positions at which both models compute logits (logits_to_keep).
ANSWER_TOKENS = 4
RESERVE_GB = 2.0
PATCH_VALUES = 3 * 2 * 14 * 14  # pixel_values row: channels x temporal patch x patch x patch

# The real config values of the Qwen2.5-VL family (the hub repositories' config.json), for runs planned before any
# checkpoint is on disk. The vision towers share depth 32, width 1280, 16 heads, patch 14, merge 2 and
# full-attention blocks 7, 15, 23, 31; their MLP width is 3420 (3B, 7B) or 3456 (32B, 72B).
_VISION = dict(depth=32, hidden_size=1280, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
               window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
_TEXT = dict(hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128000,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _qwen(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
          vision_intermediate: int) -> dict:
    return dict(text_config=dict(_TEXT, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                 num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                 tie_word_embeddings=tied),
                vision_config=dict(_VISION, intermediate_size=vision_intermediate, out_hidden_size=hidden),
                tie_word_embeddings=tied, **_TOKENS)


QWEN25_VL = {
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen(2048, 11008, 36, 16, 2, 151936, True, 3420),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen(3584, 18944, 28, 28, 4, 152064, False, 3420),
    "Qwen/Qwen2.5-VL-32B-Instruct": _qwen(5120, 27648, 64, 40, 8, 152064, False, 3456),
    "Qwen/Qwen2.5-VL-72B-Instruct": _qwen(8192, 29568, 80, 64, 8, 152064, False, 3456),
}


def load_config(source: str, role: str) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config of a local model folder (its config.json) or of a built-in hub id; ValueError naming
    ``role`` otherwise."""
    folder = Path(source)
    if (folder / "config.json").is_file():
        try:
            return Qwen2_5_VLConfig.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{role}: {str(folder / 'config.json')!r} is not a Qwen2.5-VL config: {error}") from error
    if folder.is_dir():
        raise ValueError(f"{role}: folder {source!r} has no config.json")
    if source not in QWEN25_VL:
        raise ValueError(f"{role}: unknown model {source!r}: give a local model folder (with config.json) or one of "
                         f"{', '.join(QWEN25_VL)}")
    return Qwen2_5_VLConfig(**QWEN25_VL[source])


@dataclass(frozen=True)
class Shape:
    """What the estimate reads of one model: parameter counts (exact, from the meta-device model) and dimensions.

    ``trainable`` / ``trainable_tensors`` / ``largest_trainable``: the language model with its embeddings and
    lm_head, as ``load_student`` trains it. ``layer`` / ``vision_block``: parameters of one decoder layer / vision
    block (FSDP units); ``embed``: the input embeddings (and the lm_head when tied); ``whole``: everything outside
    decoder layers and vision blocks.
    """

    params: int
    trainable: int
    trainable_tensors: int
    largest_trainable: int
    layer: int
    vision_block: int
    embed: int
    whole: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    merge: int

    @classmethod
    def of(cls, config: Qwen2_5_VLConfig) -> "Shape":
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(config)
        text, vision = config.text_config, config.vision_config
        language = model.model.language_model
        # tied lm_head and embeddings: one tensor
        trainable = list({id(p): p for p in [*language.parameters(), *model.lm_head.parameters()]}.values())

        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        params = count(model)
        layers = count(language.layers)
        blocks = count(model.model.visual.blocks)
        return cls(params=params, trainable=sum(p.numel() for p in trainable), trainable_tensors=len(trainable),
                   largest_trainable=max(p.numel() for p in trainable), layer=count(language.layers[0]),
                   vision_block=count(model.model.visual.blocks[0]), embed=count(language.embed_tokens),
                   whole=params - layers - blocks, hidden=text.hidden_size, intermediate=text.intermediate_size,
                   layers=text.num_hidden_layers, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                   vocab=text.vocab_size, vision_hidden=vision.hidden_size,
                   vision_intermediate=vision.intermediate_size, merge=vision.spatial_merge_size)


def layer_saved_bytes(s: Shape, tokens: int, compute: int, residual: int, autocast: bool) -> int:
    """Bytes autograd saves for one student decoder layer run with gradients (its recomputation under checkpointing).

    ``compute``: bytes of the projections' outputs (2 under bf16 autocast or bf16 weights, 4 in fp32);
    ``residual``: bytes of the residual stream; ``autocast``: fp32 weights under autocast, so every linear layer
    saves its own bf16 copy of its input. Per token, for each of the two RMSNorms: the fp32 input (when the stream is
    not fp32 already) and the normalised input; then the projections' inputs (one shared tensor, or one cast per
    projection under autocast: q, k, v and gate, up), the attention's q, k, v after RoPE, its output and
    log-sum-exp, o_proj's input, and the MLP's gate, SiLU(gate), up and their product.
    """
    h, qkv = s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim
    norm = (0 if residual == 4 else 4 * h) + residual * h
    inputs = (3 + 2) * compute * h if autocast else 2 * compute * h
    attention = compute * qkv + 2 * compute * s.heads * s.head_dim + 4 * s.heads
    mlp = 4 * compute * s.intermediate
    return tokens * (2 * norm + inputs + attention + mlp)


def attn_match_blocks(student_heads: int, teacher_heads: int, rows: int, tokens: int, device: str) -> int:
    """Bytes of ``attn_match_loss``'s key-block temporaries: none of size N on CUDA (Triton keeps its tiles in
    registers); on the CPU two [Ht, rows, block] and two [Hs, rows, block] fp32 tensors, the block sized as
    ``laid_kernels.attn_match`` sizes it."""
    if device == "cuda":
        return 0
    block = min(tokens, max(CPU_MIN_BLOCK, CPU_BLOCK_ELEMENTS // (max(student_heads, teacher_heads) * rows)))
    return 2 * (student_heads + teacher_heads) * rows * block * 4


def plan(teacher: str, student: str, *, gpus: int, gpu_memory_gb: float, images: int, strategy: str,
         tokens_per_image: int = TOKENS_PER_IMAGE, text_tokens: int = TEXT_TOKENS, device: str = "cuda",
         reserve_gb: float = RESERVE_GB) -> dict:
    """The per-GPU memory of distilling ``student`` from ``teacher`` (folders or built-in hub ids).

    Returns a JSON-ready dict: ``per_gpu_gb`` (the estimated peak, GB), ``fits`` (``per_gpu_gb <= gpu_memory_gb``),
    ``breakdown_gb`` (each part, GB; the ``peak: ...`` entries are the largest of the four moments, the one in
    ``peak_moment``; ``moments_gb``: each moment's part), ``per_gpu_bytes``, ``tokens`` (the sequence length), the inputs, and the counts read from the configs.
    """
    for name, value in (("gpus", gpus), ("images", images), ("tokens_per_image", tokens_per_image)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1:
        raise ValueError(f"text_tokens must be an integer >= 1, got {text_tokens!r}")
    if tokens_per_image < 3:
        raise ValueError(f"tokens_per_image must be >= 3 (visual tokens plus the two delimiters), got "
                         f"{tokens_per_image}")
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb must be a number > 0, got {gpu_memory_gb!r}")
    if not reserve_gb >= 0:
        raise ValueError(f"reserve_gb must be a number >= 0, got {reserve_gb!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu" and (gpus != 1 or strategy != "ddp"):
        raise ValueError("device 'cpu' models one process (gpus 1, strategy ddp): laid.train shards only on GPUs")
    t, s = Shape.of(load_config(teacher, "teacher")), Shape.of(load_config(student, "student"))
    if t.head_dim != s.head_dim:
        raise ValueError(f"head_dim mismatch: teacher {t.head_dim}, student {s.head_dim}; LAid needs the same")

    cuda, fsdp = device == "cuda", strategy == "fsdp"
    shards = gpus if fsdp else 1
    teacher_bytes = compute = 2 if cuda else 4  # bf16 teacher and bf16 compute on CUDA; fp32 on the CPU
    residual = 2 if cuda and fsdp else 4
    autocast = cuda and not fsdp
    n = images * tokens_per_image + text_tokens
    patches = images * (tokens_per_image - 2) * s.merge ** 2
    d = s.head_dim
    mixer_params = s.heads * t.heads + s.kv_heads * t.kv_heads + s.heads * d // 2
    # The micro-batch and the one accelerate's loader has already moved ahead; on the CPU also the first batch,
    # which train() keeps for the mixer's least-squares init.
    input_copies = 2 if cuda else 3
    rows = text_tokens + 2 * images  # L_attn's query rows (attn_rows "text": every token that is not an image pad)

    parts = {
        "student weights": 4 * s.params / shards,
        "student gradients": 4 * s.trainable / shards + (4 * s.trainable if not fsdp and gpus > 1 else 0),
        "optimizer states": 8 * s.trainable / shards + (0 if cuda else 4 * s.trainable_tensors),
        "mixer": 16 * mixer_params + (0 if cuda else 4 * 3),
        "teacher weights": teacher_bytes * t.params / shards,
        "inputs": input_copies * (4 * patches * PATCH_VALUES + 8 * 6 * n),
    }
    if fsdp:
        gathered_layer = 2 * max(s.layer, s.vision_block)
        parts["FSDP gathered units"] = (2 * (s.whole - s.embed) + 2 * gathered_layer + 6 * s.layer
                                        + 2 * (t.whole - t.embed) + 2 * 2 * max(t.layer, t.vision_block))

    student_qk = n * (s.heads + s.kv_heads) * d * compute  # one [N, Hs + Hs_kv, D] tensor pair
    checkpoints = (s.layers + 1) * n * s.hidden * residual + n * s.hidden * 4  # layer inputs, output, final norm
    captured = student_qk + n * (t.heads + t.kv_heads) * d * teacher_bytes
    loss_buffers = (2 * student_qk + ANSWER_TOKENS * (s.vocab + t.vocab) * 12
                    + 3 * rows * (s.heads + t.heads) * d * 4 + attn_match_blocks(s.heads, t.heads, rows, n, device))
    teacher_mlp = 3 * n * (t.intermediate + t.hidden) * teacher_bytes
    vision_mlp = 3 * patches * (max(t.vision_intermediate, s.vision_intermediate) + s.vision_hidden) * teacher_bytes
    moments = {
        "teacher forward": {"teacher forward (no grad)": max(teacher_mlp, vision_mlp)},
        "student forward end": {"activations (checkpoints)": checkpoints, "captured Q/K": captured,
                                "autocast bf16 weight copies": 2 * (s.trainable - s.embed) if autocast else 0},
        "loss backward": {"activations (checkpoints)": checkpoints, "captured Q/K": captured,
                          "fused losses' buffers": loss_buffers},
        "layer backward": {"activations (checkpoints)": checkpoints, "captured Q/K": captured,
                           "activations (one layer recomputed)": layer_saved_bytes(s, n, compute, residual, autocast)
                           + 2 * n * s.hidden * residual + student_qk},
        "optimizer step": {"optimizer step temporaries": 4 * (s.trainable / shards if cuda else s.largest_trainable)},
    }
    peak_moment = max(moments, key=lambda name: sum(moments[name].values()))
    breakdown = {**parts, **{f"peak: {k}": v for k, v in moments[peak_moment].items() if v}}
    if cuda:
        breakdown["reserve (CUDA context, NCCL, fragmentation)"] = reserve_gb * 1e9
    per_gpu_bytes = sum(breakdown.values())
    per_gpu = per_gpu_bytes / 1e9
    return {
        "teacher": teacher, "student": student, "strategy": strategy, "gpus": gpus, "device": device,
        "gpu_memory_gb": gpu_memory_gb, "images": images, "tokens_per_image": tokens_per_image,
        "text_tokens": text_tokens, "tokens": n, "per_gpu_gb": round(per_gpu, 3),
        "per_gpu_bytes": round(per_gpu_bytes), "fits": per_gpu <= gpu_memory_gb,
        "peak_moment": peak_moment, "breakdown_gb": {k: v / 1e9 for k, v in breakdown.items()},
        "moments_gb": {k: round(sum(v.values()) / 1e9, 4) for k, v in moments.items()},
        "teacher_shape": asdict(t), "student_shape": asdict(s),
    }


def format_plan(result: dict) -> str:
    """The plan as a table: one row per part of ``breakdown_gb``, then the total and whether it fits."""
    width = max(len(k) for k in result["breakdown_gb"]) + 2
    lines = [f"{result['teacher']} -> {result['student']}: {result['strategy']} on {result['gpus']} x "
             f"{result['gpu_memory_gb']:g} GB, {result['images']} images ({result['tokens']:,} tokens), "
             f"peak at: {result['peak_moment']}", ""]
    lines += [f"{k:<{width}}{v:>10.2f} GB" for k, v in result["breakdown_gb"].items()]
    lines += [f"{'per GPU':<{width}}{result['per_gpu_gb']:>10.2f} GB",
              f"fits: {'yes' if result['fits'] else 'no'} ({result['per_gpu_gb']:.1f} of {result['gpu_memory_gb']:g} "
              f"GB)"]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """One JSON object (``per_gpu_gb``, ``fits``, the breakdown and the inputs)."""
    return json.dumps(result, indent=2)
