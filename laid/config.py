"""``LAidConfig``: every setting of a LAid distillation run, with its default in plain sight.

A run is described by one dataclass. It loads from YAML (:meth:`LAidConfig.from_yaml`), takes ``key=value``
overrides (:meth:`LAidConfig.with_overrides`, the command line's ``--key value``) and checks itself
(:meth:`LAidConfig.validate`) so that a wrong value fails with the field's name before any model is loaded.

The defaults are the paper's recipe (teacher Qwen2.5-VL-32B-Instruct, student 7B, last layers aligned, AdamW with
lr 1e-5 for the model and 1e-4 for the mixing weights, 10 epochs, batch 1 per device with 8 accumulation steps).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from laid_kernels.validation import ATTN_DIVERGENCES, ATTN_TARGETS

from .data import TASKS

PRECISIONS = ("auto", "bf16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
MIXER_INITS = ("lstsq", "uniform", "nearest")
KERNEL_BACKENDS = ("auto", "triton", "cpu", "reference")
ATTN_ROWS = ("text", "after_images")


@dataclass
class LAidConfig:
    """One LAid run. Layer indices may be negative (counted from the end, -1 = last layer)."""

    # --- models (a local folder or a hub id; nothing is downloaded unless the id is not a folder) ---
    teacher: str = "Qwen/Qwen2.5-VL-32B-Instruct"  # unused (not loaded) when lambda_laid = lambda_kl = 0
    student: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    processor: str | None = None  # default: the student's folder / id
    attn_implementation: str = "auto"  # "auto": flash_attention_2 on CUDA when flash-attn imports, else sdpa

    # --- data: a Visual Haystacks-format JSON (see laid.data) and the folder its image paths are relative to ---
    data: str = ""
    image_root: str = ""
    min_pixels: int | None = None  # per-image pixel bounds; None keeps the processor's own (the VHs protocol)
    max_pixels: int | None = None
    max_images: int = 20  # images per prompt; longer haystacks are cut (needles kept)
    task: str = "vhs"  # "vhs": yes/no answers after the official prompt; "free": any answer text (e.g. captions)

    # --- the objective (shared/laid-spec.md): L = lambda_laid (L_qk + beta L_attn) + lambda_kl L_KL + lambda_sft L_SFT
    #     (L_qk is multiplied by qk_weight, 1 unless L_qk is ablated)
    layer_pairs: list[list[int]] = field(default_factory=lambda: [[-1, -1]])  # [[student layer, teacher layer], ...]
    lambda_laid: float = 1.0
    qk_weight: float = 1.0  # weight of L_qk inside the LAid term (1 in the paper; 0 is the "without L_qk" ablation)
    beta: float = 1.0  # weight of L_attn (progressive attention matching)
    alpha: float = 1.0  # distance-weight exponent of L_attn, omega_p(d) = (1 + log2(1 + d)) ** (alpha * p)
    attn_target: str = "teacher"  # L_attn's target row: "teacher" (the teacher's own heads mixed by pi = W_q^2
    #                               row-normalised; version 2) or "mixed" (softmax of the mixed Q/K; version 1)
    attn_divergence: str = "forward"  # "forward" KL(target || student) or "reverse" KL(student || target)
    attn_rows: str = "text"  # L_attn's query rows: "text" (every valid token that is not an image pad token) or
    #                          "after_images" (only the tokens after the last image: the question and the answer)
    lambda_kl: float = 1.0
    tau: float = 1.0  # KL temperature
    lambda_sft: float = 1.0
    mixer_init: str = "lstsq"  # "lstsq" (ridge least squares on the first batch), "uniform", "nearest"
    mixer_ridge: float = 1e-3  # lstsq ridge, relative to the mean diagonal of the teacher Gram matrix
    kernel_backend: str = "auto"  # laid_kernels backend for the losses

    # --- optimisation ---
    lr: float = 1e-5  # student weights
    mixer_lr: float = 1e-4  # W_q, W_k and the RoPE gain
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = 10
    batch_size: int = 1  # per device
    grad_accum: int = 8  # micro-batches per optimizer step
    warmup_ratio: float = 0.03  # linear warmup over this fraction of the optimizer steps, then cosine
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clipping of all trainable parameters together; 0 disables
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs); the schedule still
    #                               spans all epochs, so a run stopped early resumes on the same curve

    # --- what trains: the language model (with its embeddings and lm_head) yes, the vision tower frozen ---
    train_language_model: bool = True
    train_vision: bool = False
    gradient_checkpointing: bool = True  # non-reentrant, on the student
    lora_rank: int = 0  # > 0: LoRA adapters of this rank (peft) on the language model's linear layers train instead
    #                     of its weights (the SFT (LoRA) baseline: lambda_laid = lambda_kl = 0); merged at export
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = lora_alpha / lora_rank)

    # --- precision: "auto" = bf16 autocast on CUDA (fp32 master weights, bf16 teacher), fp32 on CPU ---
    precision: str = "auto"

    # --- run bookkeeping ---
    seed: int = 0
    output_dir: str = "runs/laid"
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 keeps all
    resume_from: str | None = None  # a checkpoint folder, or "latest" (the newest under output_dir/checkpoints)
    log_every: int = 1  # optimizer steps between metrics.jsonl lines
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    num_workers: int = 0  # DataLoader workers

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "LAidConfig":
        """Read a YAML mapping of field names to values, apply ``overrides`` and validate."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of LAidConfig fields, got "
                             f"{type(loaded).__name__}")
        return cls().with_overrides(**{**loaded, **overrides})

    def with_overrides(self, **overrides: Any) -> "LAidConfig":
        """A validated copy with ``overrides`` applied; strings are parsed as YAML scalars / lists for typed fields.

        Unknown names raise ``ValueError`` listing the valid ones; dashes are accepted for underscores.
        """
        names = {f.name for f in dataclasses.fields(self)}
        hints = typing.get_type_hints(type(self))
        values = {}
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown LAidConfig field {key!r}; valid fields: {', '.join(sorted(names))}")
            values[name] = _coerce(name, value, hints[name])
        return dataclasses.replace(self, **values).validate()

    @property
    def needs_teacher(self) -> bool:
        """Whether the run loads the teacher: only L_qk / L_attn (lambda_laid) and L_KL (lambda_kl) use it; a pure
        SFT run (both 0) trains the student alone."""
        return self.lambda_laid > 0 or self.lambda_kl > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (YAML / JSON serialisable)."""
        return dataclasses.asdict(self)

    def validate(self) -> "LAidConfig":
        """Check every field; raises ``ValueError`` naming the field and what was expected. Returns self."""
        _choice("precision", self.precision, PRECISIONS)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("mixer_init", self.mixer_init, MIXER_INITS)
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _choice("task", self.task, TASKS)
        _choice("attn_target", self.attn_target, ATTN_TARGETS)
        _choice("attn_divergence", self.attn_divergence, ATTN_DIVERGENCES)
        _choice("attn_rows", self.attn_rows, ATTN_ROWS)
        for name in ("teacher", "student") if self.needs_teacher else ("student",):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a model folder or hub id, got {getattr(self, name)!r}")
        if (not isinstance(self.layer_pairs, list) or not self.layer_pairs
                or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(type(i) is int for i in p)
                           for p in self.layer_pairs)):
            raise ValueError(f"layer_pairs must be a non-empty list of [student_layer, teacher_layer] integer pairs, "
                             f"got {self.layer_pairs!r}")
        for name in ("lambda_laid", "qk_weight", "beta", "alpha", "lambda_kl", "lambda_sft", "weight_decay",
                     "warmup_ratio", "min_lr_ratio", "max_grad_norm", "mixer_ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tau", "lr", "mixer_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "log_every", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("keep_checkpoints", "num_workers", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if self.min_pixels is not None and self.max_pixels is not None and self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")
        if self.warmup_ratio > 1 or self.min_lr_ratio > 1:
            raise ValueError(f"warmup_ratio and min_lr_ratio must be <= 1, got {self.warmup_ratio}, "
                             f"{self.min_lr_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be None or >= 1, got {self.max_steps}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not (self.train_language_model or self.train_vision) and self.lambda_laid == 0:
            raise ValueError("nothing would train: train_language_model and train_vision are both false and "
                             "lambda_laid is 0 (the mixer is unused)")
        if self.lambda_laid > 0 and self.qk_weight == 0 and self.beta == 0:
            raise ValueError("lambda_laid > 0 but qk_weight and beta are both 0: the LAid term is empty")
        if self.lambda_laid + self.lambda_kl + self.lambda_sft == 0:
            raise ValueError("lambda_laid, lambda_kl and lambda_sft are all 0: the loss is empty")
        return self


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint``; strings (command line) are read as YAML first."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if isinstance(value, str) and base is not str:
        value = yaml.safe_load(value)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    origin = typing.get_origin(base) or base
    if origin is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if origin is str:
        return str(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [list(v) if isinstance(v, tuple) else v for v in value]
    return value
