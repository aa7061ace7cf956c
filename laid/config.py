"""``LAidConfig``: every setting of a LAid distillation run, with its default in plain sight.

Convention: declare every field as ``name: type = field(default=..., metadata={"help": "one line"})``; that help is
its description in ``laid train --help`` (beside its type and default), and tests/test_cli.py fails naming any field
that has none.

A run is described by one dataclass. It loads from YAML (:meth:`LAidConfig.from_yaml`), takes ``key=value``
overrides (:meth:`LAidConfig.with_overrides`, the command line's ``--key value`` and ``--key=value``), checks itself
(:meth:`LAidConfig.validate`) so that a wrong value fails with the field's name before any model is loaded, and
writes itself back as YAML (:meth:`LAidConfig.to_yaml`, what ``laid train --print-config`` prints and every run saves).

The defaults are the paper's recipe (teacher Qwen2.5-VL-32B-Instruct, student 7B, last layers aligned, AdamW with
lr 1e-5 for the model and 1e-4 for the mixing weights, 10 epochs, batch 1 per device with 8 accumulation steps).
"""

from __future__ import annotations

import dataclasses
import difflib
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
QK_NORMALIZES = ("student", "target", "none")
MIXINGS = ("head", "frequency")
KERNEL_BACKENDS = ("auto", "triton", "cpu", "reference")
ATTN_ROWS = ("text", "after_images")
ATTN_HEADS = ("mixture", "best")


@dataclass
class LAidConfig:
    """One LAid run. Layer indices may be negative (counted from the end, -1 = last layer)."""

    # --- models (a local folder or a hub id; nothing is downloaded unless the id is not a folder) ---
    teacher: str = field(default="Qwen/Qwen2.5-VL-32B-Instruct", metadata={
        "help": "teacher model, a local folder or a hub id (not loaded when lambda_laid = lambda_kl = 0)"})
    student: str = field(default="Qwen/Qwen2.5-VL-7B-Instruct", metadata={
        "help": "student model, a local folder or a hub id"})
    processor: str | None = field(default=None, metadata={
        "help": "processor folder or hub id (null: the student's)"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "attention of both models: auto (flash_attention_2 on CUDA when flash-attn imports, else sdpa), "
                "flash_attention_2, sdpa or eager"})

    # --- data: a Visual Haystacks-format JSON (see laid.data) and the folder its image paths are relative to ---
    data: str = field(default="", metadata={
        "help": "training data, a Visual Haystacks-format JSON file (laid data synth / build-train write one)"})
    image_root: str = field(default="", metadata={"help": "folder the data's image paths are relative to"})
    min_pixels: int | None = field(default=None, metadata={
        "help": "lower bound on the pixels of each image (null: the processor's own, the VHs protocol)"})
    max_pixels: int | None = field(default=None, metadata={
        "help": "upper bound on the pixels of each image (null: the processor's own, the VHs protocol)"})
    max_images: int = field(default=20, metadata={
        "help": "images per prompt; longer haystacks are cut (needles kept)"})
    task: str = field(default="vhs", metadata={
        "help": "vhs: yes/no answers after the official prompt; free: any answer text (e.g. captions)"})

    # --- the objective (shared/laid-spec.md): L = lambda_laid (L_qk + beta L_attn) + lambda_kl L_KL + lambda_sft L_SFT
    #     (L_qk is multiplied by qk_weight, 1 unless L_qk is ablated)
    layer_pairs: list[list[int]] = field(default_factory=lambda: [[-1, -1]], metadata={
        "help": "aligned layers, [[student layer, teacher layer], ...]; negative indices count from the end"})
    lambda_laid: float = field(default=1.0, metadata={
        "help": "weight of the LAid term, qk_weight L_qk + beta L_attn (0: no mixer)"})
    qk_weight: float = field(default=1.0, metadata={
        "help": "weight of L_qk inside the LAid term (1 in the paper; 0 is the 'without L_qk' ablation)"})
    beta: float = field(default=1.0, metadata={
        "help": "weight of L_attn (progressive attention matching) inside the LAid term"})
    alpha: float = field(default=1.0, metadata={
        "help": "distance-weight exponent of L_attn, omega_p(d) = (1 + log2(1 + d)) ** (alpha * p)"})
    attn_target: str = field(default="teacher", metadata={
        "help": "L_attn's target rows: teacher (the teacher's own heads mixed by pi = W_q^2 row-normalised, version 2) "
                "or mixed (the softmax of the mixed Q/K, version 1)"})
    attn_heads: str = field(default="mixture", metadata={
        "help": "with attn_target teacher, whose attention each student head learns: mixture (the teacher heads mixed "
                "by pi, the spec's) or best (only the teacher head with the largest pi[i, j]: a row as sharp as a "
                "teacher head's own)"})
    attn_divergence: str = field(default="forward", metadata={
        "help": "L_attn's divergence: forward KL(target || student) or reverse KL(student || target)"})
    attn_rows: str = field(default="text", metadata={
        "help": "L_attn's query rows: text (every valid token that is not an image pad token) or after_images (only "
                "the tokens after the last image: the question and the answer)"})
    lambda_kl: float = field(default=1.0, metadata={
        "help": "weight of L_KL, the teacher-student KL divergence at the answer positions"})
    tau: float = field(default=1.0, metadata={"help": "temperature of L_KL"})
    lambda_sft: float = field(default=1.0, metadata={
        "help": "weight of L_SFT, the cross-entropy of the answer tokens"})
    qk_normalize: str = field(default="student", metadata={
        "help": "L_qk normaliser: student (the share of each student head's Q/K energy its teacher mix leaves "
                "unexplained, version 2), target (version 1) or none"})
    mixing: str = field(default="head", metadata={
        "help": "teacher-head mixing W: head ([Hs, Ht], the paper's) or frequency (a complex weight per RoPE "
                "frequency pair, [Hs, Ht, D/2, 2])"})
    mixer_init: str = field(default="lstsq", metadata={
        "help": "initial head mixing: lstsq (ridge least squares on the first batch), uniform or nearest"})
    mixer_ridge: float = field(default=1e-3, metadata={
        "help": "ridge of the lstsq init, relative to the mean diagonal of the teacher Gram matrix"})
    kernel_backend: str = field(default="auto", metadata={
        "help": "laid_kernels backend of the losses: auto, triton, cpu or reference"})

    # --- optimisation ---
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the student weights"})
    mixer_lr: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate of the mixer (W_q, W_k and the RoPE gain)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay of the student's weights (never of the mixer and the gain)"})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={
        "help": "AdamW betas, [beta1, beta2]"})
    epochs: int = field(default=10, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=1, metadata={"help": "micro-batch size per device"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.03, metadata={
        "help": "linear warmup over this fraction of the optimizer steps, then cosine"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "the cosine ends at lr * min_lr_ratio"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "gradient-norm clipping of the student and of the mixer, each to this norm; 0 disables"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimizer steps (null: all epochs); the schedule still spans all epochs, so a "
                "run stopped early resumes on the same curve"})

    # --- what trains: the language model (with its embeddings and lm_head) yes, the vision tower frozen ---
    train_language_model: bool = field(default=True, metadata={
        "help": "train the language model (with its embeddings and lm_head)"})
    train_vision: bool = field(default=False, metadata={"help": "train the vision tower"})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "non-reentrant gradient checkpointing of the student"})
    lora_rank: int = field(default=0, metadata={
        "help": "> 0: LoRA adapters of this rank (peft) on the language model's linear layers train instead of its "
                "weights (the SFT (LoRA) baseline: lambda_laid = lambda_kl = 0); merged at export"})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA scaling numerator (scale = lora_alpha / lora_rank)"})

    # --- precision: "auto" = bf16 autocast on CUDA (fp32 master weights, bf16 teacher), fp32 on CPU ---
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast on CUDA with fp32 master weights and a bf16 teacher; fp32 on CPU), bf16 or fp32"})

    # --- run bookkeeping ---
    seed: int = field(default=0, metadata={"help": "seed of the run's random numbers and of the data order"})
    output_dir: str = field(default="runs/laid", metadata={
        "help": "run folder (config.yaml, metrics.jsonl, checkpoints/, final/)"})
    save_every: int = field(default=500, metadata={
        "help": "optimizer steps between checkpoints (and one at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept; 0 keeps all"})
    resume_from: str | None = field(default=None, metadata={
        "help": "a checkpoint folder, or latest (the newest under output_dir/checkpoints, if any); null starts afresh"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh in an output_dir that already holds a run (its checkpoints, final/ and metrics.jsonl "
                "are deleted); without it such a folder is refused unless resume_from is set"})
    log_every: int = field(default=1, metadata={"help": "optimizer steps between metrics.jsonl lines"})
    trackers: list[str] = field(default_factory=list, metadata={
        "help": "accelerate trackers, e.g. [tensorboard]"})
    num_workers: int | None = field(default=None, metadata={
        "help": "DataLoader workers; null: min(4, CPUs per process // 2), see laid.loading"})
    image_cache: str = field(default="auto", metadata={
        "help": "resized-image cache: auto ($LAID_CACHE_DIR/images, default ~/.cache/laid/images), none, or a folder"})

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

        Unknown names raise ``ValueError`` naming the nearest field (or listing them all); dashes are accepted for
        underscores.
        """
        names = [f.name for f in dataclasses.fields(self)]
        hints = typing.get_type_hints(type(self))
        values = {}
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if name not in names:
                nearest = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {nearest[0]!r}?" if nearest else f"valid fields: {', '.join(sorted(names))}"
                raise ValueError(f"unknown LAidConfig field {key!r}; {hint}")
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

    def to_yaml(self) -> str:
        """Every field as YAML, in declaration order: the run's ``config.yaml``, which :meth:`from_yaml` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "LAidConfig":
        """Check every field; raises ``ValueError`` naming the field and what was expected. Returns self."""
        _choice("precision", self.precision, PRECISIONS)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("mixer_init", self.mixer_init, MIXER_INITS)
        _choice("qk_normalize", self.qk_normalize, QK_NORMALIZES)
        _choice("mixing", self.mixing, MIXINGS)
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _choice("task", self.task, TASKS)
        _choice("attn_target", self.attn_target, ATTN_TARGETS)
        _choice("attn_divergence", self.attn_divergence, ATTN_DIVERGENCES)
        _choice("attn_rows", self.attn_rows, ATTN_ROWS)
        _choice("attn_heads", self.attn_heads, ATTN_HEADS)
        if self.attn_heads == "best" and self.attn_target != "teacher":
            raise ValueError(f"attn_heads='best' needs attn_target='teacher' (it picks one of the teacher's own "
                             f"heads), got attn_target={self.attn_target!r}")
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
            if getattr(self, name) is not None and getattr(self, name) < 0:
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
        if self.lora_rank and self.lambda_laid > 0:
            raise ValueError("lora_rank > 0 needs lambda_laid = 0: the RoPE gain of LAid computes the aligned layers' "
                             "q_proj with its weight rows scaled, which a LoRA q_proj does not have (use LoRA for the "
                             "SFT / KD baselines)")
        if self.lambda_laid + self.lambda_kl + self.lambda_sft == 0:
            raise ValueError("lambda_laid, lambda_kl and lambda_sft are all 0: the loss is empty")
        return self


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint``; strings (command line) are read as YAML first, except for a
    ``str`` field, where only ``null`` (for one that may be None) is read."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if isinstance(value, str) and base is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"{name} must be a YAML value, got {value!r}") from error
    elif optional and value == "null":
        value = None
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
