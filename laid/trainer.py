"""``laid.train``: LAid distillation of a Qwen2.5-VL student against a Qwen2.5-VL teacher, top to bottom.

    laid.train("configs/tiny_cpu.yaml")                           # a YAML file
    laid.train(LAidConfig(teacher=..., student=..., data=...))     # a config
    laid.train(teacher="t/", student="s/", data="vhs.json", image_root="imgs/", epochs=1)   # keyword fields

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` per process. Each micro-batch: the teacher runs
without gradient (up to its last aligned layer only when lambda_kl = 0), the student runs with Q/K capture and the
RoPE gain, ``LAidObjective`` gives the four terms, and the gradients accumulate (DDP synchronises on the last
micro-batch only; FSDP2 reduce-scatters every micro-batch in fp32, so that each process only ever keeps its shard
of the student's gradients). A pure SFT run (lambda_laid = lambda_kl = 0) loads no teacher and has no mixer: it fine-tunes
the student alone (the SFT baseline, or training a model from scratch). Then: the mixer's gradients are averaged over
processes (the mixer lives outside DDP / FSDP, the same on every process), the model's and the mixer's gradients are
clipped (each to ``max_grad_norm``), both AdamW optimizers step (weight decay on the student only), both warmup +
cosine schedules advance. Progress p = step / total steps feeds L_attn. Runs under ``accelerate launch`` unchanged:
DDP, or FSDP2 for both models (configs/fsdp_8gpu.yaml; the teacher sharded by ``laid.models.shard_teacher``).

Outputs in ``output_dir``: ``metrics.jsonl`` (one line per logged step), ``checkpoints/step_*/`` (see
``laid.checkpoint``) and ``final/`` (the export: a plain Qwen2.5-VL checkpoint with the gain folded in).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin,
                              LoggerType, broadcast, set_seed)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .capture import unwrap
from .checkpoint import RunState, check_output_dir, clear_run, export, load_checkpoint, resolve_resume, save_checkpoint
from .config import LAidConfig
from .data import VHsDataset, collate, first_missing_image
from .image_cache import ImageCache, image_cache_dir
from .loading import by_value, loader_options, prefetched
from .losses import LAidObjective
from .mixer import HeadMixer
from .models import head_dim, load_processor, load_student, load_teacher, merge_lora, shard_teacher, text_config
from .prompt_inputs import model_inputs


def resolve_config(config: LAidConfig | str | Path | None, overrides: dict) -> LAidConfig:
    """A validated LAidConfig from a config object, a YAML path or nothing, plus keyword overrides."""
    if config is None:
        return LAidConfig().with_overrides(**overrides)
    if isinstance(config, (str, Path)):
        return LAidConfig.from_yaml(config, **overrides)
    if isinstance(config, LAidConfig):
        return config.with_overrides(**overrides)
    raise TypeError(f"config must be a LAidConfig, a YAML path or None, got {type(config).__name__}")


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU (GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def metrics_until(path: Path, step: int) -> str:
    """The lines of a metrics.jsonl for steps <= ``step`` (a resumed run redoes the later ones); a line cut by a
    kill is dropped."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):
            continue
    return "".join(kept)


def check_trackers(trackers: list[str]) -> None:
    """ValueError, before anything loads, for a requested tracker that accelerate does not know or cannot use here
    (accelerate itself drops an unavailable one with a log line only)."""
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in trackers:
        if name not in LoggerType.list():
            raise ValueError(f"trackers: unknown tracker {name!r}; accelerate knows {LoggerType.list()}")
        if name != "all" and name not in available:
            raise ValueError(f"trackers: {name!r} is requested but its package is not installed (e.g. pip install "
                             f"{name}); usable here: {sorted(available) or 'none'}")


def tracker_hparams(config: LAidConfig) -> dict[str, int | float | str | bool]:
    """The config as flat scalar hyperparameters for ``init_trackers`` (TensorBoard's add_hparams takes only
    int, float, str and bool): lists and None become their JSON text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.to_dict().items()}


def make_accelerator(config: LAidConfig, precision: str, output_dir: Path) -> Accelerator:
    """The run's Accelerator. Under FSDP (``accelerate launch`` with an FSDP config) its plugin gets the mixed
    precision policy of laid: parameters gathered in bf16 under bf16 precision, gradients reduced in fp32
    (accelerate's default would reduce in bf16)."""
    fsdp_plugin = None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        fsdp_plugin = FullyShardedDataParallelPlugin(
            mixed_precision_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    return Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with=config.trackers or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        fsdp_plugin=fsdp_plugin,
        # A student without logits to compute (lambda_kl = lambda_sft = 0) stops after its last aligned layer:
        # DDP must then allow the later layers to get no gradient.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=config.lambda_kl + config.lambda_sft == 0)],
    )


def build_optimizers(student, mixer: HeadMixer | None, config: LAidConfig) -> list[torch.optim.Optimizer]:
    """AdamW for the student's trainable weights (lr, weight_decay) and, with a mixer, AdamW for W_q, W_k and the
    gain (mixer_lr, no weight decay: decay would pull the mixing to 0 and the gain to softplus(0) = 0.69)."""
    betas = tuple(config.adam_betas)
    optimizers = [torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                    betas=betas, weight_decay=config.weight_decay)]
    if mixer is not None:
        optimizers.append(torch.optim.AdamW(mixer.parameters(), lr=config.mixer_lr, betas=betas, weight_decay=0.0))
    return optimizers


def check_images(entries: list[dict], image_root: Path, data: str) -> None:
    """FileNotFoundError naming the first missing image of any entry, before training starts (not hours into it)."""
    for index, entry in enumerate(entries):
        missing = first_missing_image(entry, image_root)
        if missing is not None:
            raise FileNotFoundError(f"data {data!r}: entry {index}: image {str(missing)!r} not found "
                                    f"(image paths are relative to image_root {str(image_root)!r})")


# Where L_qk at the first step says that the teacher's mix explains too little of the student for L_qk and L_attn to
# help (in laid demo such runs made the student worse, see the README). Under normalize="student" L_qk of the
# least-squares mix is 1 - R^2, R^2 the share of the student's Q/K energy the mix explains: warn above 0.9 (R^2 < 10%).
# Under version 1's "target" it is about (1 - R^2) / R^2: warn above 10 (R^2 < 9%). "none" has no such meaning.
QK_UNEXPLAINED = {"student": 0.9, "target": 10.0}


def _qk_warning(qk: float, normalize: str) -> str:
    explained = 1.0 - qk if normalize == "student" else 1.0 / (1.0 + qk)
    meaning = ("L_qk = 1 - R^2 for a least-squares mixing" if normalize == "student"
               else "L_qk is about (1 - R^2) / R^2 for a least-squares mixing under qk_normalize='target'")
    return (f"warning: L_qk = {qk:.3g} at the first step: the teacher heads' mix explains only about "
            f"{100 * max(explained, 0.0):.2g}% of the student's queries and keys ({meaning}), so L_attn's target, "
            f"the attention of heads that do not explain the student, transfers little; in laid demo such runs made "
            f"the student worse (see the README)")


def train(config: LAidConfig | str | Path | None = None, /, **overrides) -> dict:
    """Run LAid distillation; returns the run summary (also written to ``output_dir/final/summary.json``)."""
    config = resolve_config(config, overrides)
    if not config.data:
        raise ValueError("data must be the path of a Visual Haystacks-format JSON file (see `laid data synth`)")
    output_dir = Path(config.output_dir)
    check_trackers(config.trackers)
    check_output_dir(output_dir, config.resume_from, config.overwrite)

    # --- devices, precision, processes -------------------------------------------------------------------------
    precision = config.precision if config.precision != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    accelerator = make_accelerator(config, precision, output_dir)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if config.overwrite and config.resume_from is None and accelerator.is_main_process:
        clear_run(output_dir)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    device = accelerator.device

    # --- data first (bad data fails before any model loads), then the frozen teacher and the student --------------
    processor = load_processor(config.processor or config.student)
    dataset = VHsDataset(config.data, config.image_root, processor, min_pixels=config.min_pixels,
                         max_pixels=config.max_pixels, max_images=config.max_images, seed=config.seed,
                         task=config.task, image_cache=ImageCache(image_cache_dir(config.image_cache)))
    check_images(dataset.entries, Path(config.image_root), config.data)
    collate_fn = partial(collate, pad_token_id=processor.tokenizer.pad_token_id)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, collate_fn=by_value(collate_fn),
                        **loader_options(config.num_workers, device))
    teacher = (load_teacher(config.teacher, device=device, attn_implementation=config.attn_implementation)
               if config.needs_teacher else None)
    student = load_student(config.student, device=device, attn_implementation=config.attn_implementation,
                           train_language_model=config.train_language_model, train_vision=config.train_vision,
                           gradient_checkpointing=config.gradient_checkpointing, lora_rank=config.lora_rank,
                           lora_alpha=config.lora_alpha)

    # --- the mixer (LAid runs only) and optimizers: model lr for the student, mixer_lr for W_q, W_k and the gain ---
    mixer = None
    if config.lambda_laid > 0:
        s_cfg, t_cfg = text_config(student), text_config(teacher)
        mixer = HeadMixer(len(config.layer_pairs), s_cfg.num_attention_heads, s_cfg.num_key_value_heads,
                          t_cfg.num_attention_heads, t_cfg.num_key_value_heads, head_dim(s_cfg),
                          mixing=config.mixing).to(device)
    optimizers = build_optimizers(student, mixer, config)
    if teacher is not None and fsdp:
        shard_teacher(teacher, accelerator)  # the student is sharded by accelerate below, the teacher here
    elif teacher is not None:
        teacher.to(device)
    # One prepared model with its optimizer (accelerate's save_state / load_state pair them by index); the mixer
    # and its optimizer are registered objects, the same on every process.
    student, optimizers[0], loader = accelerator.prepare(student, optimizers[0], loader)

    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    last_step = min(total_steps, config.max_steps or total_steps)
    factor = partial(lr_factor, total=total_steps, warmup_ratio=config.warmup_ratio, min_ratio=config.min_lr_ratio)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]
    accelerator.register_for_checkpointing(*([mixer, optimizers[1]] if mixer is not None else []), *schedulers)

    objective = LAidObjective(teacher, student, mixer, config, vocab=len(processor.tokenizer))
    student_layers = objective.student_capture.layers  # pair p's student layer (non-negative); none without LAid

    # --- start or resume ---------------------------------------------------------------------------------------
    resume = resolve_resume(config.resume_from, output_dir)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        accelerator.print(f"resumed from {resume} at step {state.step}")
    else:
        state = RunState()
        first = collate_fn([dataset[i] for i in range(min(config.batch_size, len(dataset)))])
        objective.init_mixer(model_inputs(first, device))
        if mixer is not None and accelerator.num_processes > 1:
            with torch.no_grad():  # every process starts from rank 0's fit, whatever its kernels computed
                for p in mixer.parameters():
                    p.copy_(broadcast(p.detach().clone(), from_process=0))
    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
        metrics_path.write_text(metrics_until(metrics_path, state.step))
    if config.trackers:
        accelerator.init_trackers("laid", config=tracker_hparams(config))
    accelerator.print(f"laid: {accelerator.distributed_type.value} x {accelerator.num_processes} processes, "
                      f"precision {precision}, attention {unwrap(student).config._attn_implementation}, "
                      f"{total_steps} optimizer steps of {config.grad_accum} x {config.batch_size} per process")
    if not config.needs_teacher:
        accelerator.print("note: lambda_laid = lambda_kl = 0, supervised fine-tuning without the teacher")
    if config.lambda_laid > 0 and config.beta == 0:
        accelerator.print("note: beta = 0, training without L_attn")

    # --- the loop ----------------------------------------------------------------------------------------------
    bar = tqdm(total=last_step, initial=state.step, disable=not accelerator.is_local_main_process, desc="laid")
    initial_qk = None  # L_qk at step 1 (1 - R^2 of the fitted mix under qk_normalize="student"); None when resumed
    last_metrics: dict = {}
    while state.step < last_step:
        loader.set_epoch(state.epoch)
        batches = prefetched(iter(accelerator.skip_first_batches(loader, state.batch) if state.batch else loader))
        while state.batch < len(loader) and state.step < last_step:
            window = min(config.grad_accum, len(loader) - state.batch)
            start, tokens, waited = time.perf_counter(), 0, 0.0
            sums: dict[str, torch.Tensor] = {}
            for micro in range(window):
                asked = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - asked  # time the step stood waiting for the loader
                # FSDP2 reduce-scatters after every micro-batch: its no_sync would keep unsharded gradients of the
                # whole student until the last one.
                sync = micro == window - 1 or fsdp
                with nullcontext() if sync else accelerator.no_sync(student):
                    terms = objective(model_inputs(batch, device), progress=state.step / total_steps)
                    accelerator.backward(terms["loss"] / window)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach() / window
                tokens += int(batch["attention_mask"].sum())
            if accelerator.num_processes > 1 and mixer is not None:
                for p in mixer.parameters():  # the mixer is not inside DDP: average its gradients here
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            grad_norm = (accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
                         if config.max_grad_norm > 0 else None)
            if config.max_grad_norm > 0 and mixer is not None:
                torch.nn.utils.clip_grad_norm_(mixer.parameters(), config.max_grad_norm)
            for optimizer, scheduler in zip(optimizers, schedulers):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch += window

            # --- logging: averaged over micro-batches and processes ---------------------------------------
            reduced = {k: float(v) for k, v in accelerator.reduce(sums, reduction="mean").items()}
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=device), reduction="sum"))
            last_metrics = {"step": state.step, "epoch": state.epoch, **reduced,
                            "grad_norm": None if grad_norm is None else float(grad_norm),
                            "lr": schedulers[0].get_last_lr()[0], "mixer_lr": schedulers[-1].get_last_lr()[0] if mixer else None,
                            "progress": state.step / total_steps,
                            "tokens_per_s": tokens / (time.perf_counter() - start),
                            "data_wait_share": waited / (time.perf_counter() - start),
                            "peak_mem_gb": peak_memory_gb(device)}
            if state.step == 1 and "qk" in reduced:
                # The mix was fitted on the first batch: under "student" this is 1 - R^2 of that fit (up to the ridge
                # and the other micro-batches of the step).
                initial_qk = reduced["qk"]
                last_metrics["qk_initial"] = initial_qk
                accelerator.print(f"L_qk at step 1: {initial_qk:.4g} (qk_normalize={config.qk_normalize!r}, "
                                  f"mixing={config.mixing!r}, mixer_init={config.mixer_init!r})")
                if initial_qk > QK_UNEXPLAINED.get(config.qk_normalize, float("inf")):
                    accelerator.print(_qk_warning(initial_qk, config.qk_normalize))
            if state.step % config.log_every == 0 or state.step == last_step:
                if accelerator.is_main_process:
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps(last_metrics) + "\n")
                if config.trackers:
                    accelerator.log(last_metrics, step=state.step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last_metrics.items()
                             if k in ("loss", "qk", "attn", "kl", "sft", "tokens_per_s", "peak_mem_gb")})
            bar.update(1)
            if state.step % config.save_every == 0 and state.step < last_step:
                save_checkpoint(accelerator, output_dir, state, config.keep_checkpoints)
        batches.close()  # joins the prefetch thread before the loader starts another epoch (or the run ends)
        if state.batch >= len(loader):
            state.epoch, state.batch = state.epoch + 1, 0
    bar.close()

    # --- the end: last checkpoint, export ------------------------------------------------------------------------
    save_checkpoint(accelerator, output_dir, state, config.keep_checkpoints)
    objective.remove_hooks()
    if config.lora_rank:
        merge_lora(accelerator.unwrap_model(student))  # the export is a plain model with the adapters folded in
    summary = {"steps": state.step, "total_steps": total_steps, "epochs_done": state.epoch, "qk_initial": initial_qk,
               "student_layers": student_layers, "gain_folded": True, "final_metrics": last_metrics,
               "config": config.to_dict()}
    export(accelerator, student, processor, mixer, student_layers, output_dir / "final", summary,
           dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if config.trackers:
        accelerator.end_training()
    return summary
