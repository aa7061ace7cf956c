"""Checkpoints of a run (save, find, resume) and the final export.

A checkpoint is ``output_dir/checkpoints/step_{step:07d}/``: accelerate's ``save_state`` (the student weights and
its optimizer, the one prepared pair: sharded files under FSDP; RNG states of every process; the registered
objects: the mixer, its optimizer and the LR schedulers, written by the main process) plus ``run_state.json``
(optimizer step, epoch, micro-batches consumed in that epoch: the data position). It is written to
``step_XXXXXXX.tmp`` and renamed when complete, so a run killed while saving keeps its previous checkpoint; only
complete folders are ever resumed from.

The export (``output_dir/final/``) is a plain Qwen2.5-VL checkpoint in the training dtype: the RoPE gain folded
into the student's q_proj rows, ``save_pretrained`` of the student and the processor, ``mixer.safetensors`` and
``summary.json``.

A run folder that already holds something is refused unless the run resumes or ``overwrite`` is set
(:func:`check_output_dir`).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from .mixer import HeadMixer, fold_gain

STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class RunState:
    """Where a run is: ``step`` optimizer steps done, in ``epoch``, after ``batch`` micro-batches of that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def checkpoint_dir(output_dir: str | Path) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir``, or None."""
    folder = checkpoint_dir(output_dir)
    steps = sorted((int(m.group(1)), p) for p in folder.glob("step_*")
                   if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: None, "latest" (None when the run has none yet) or a path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / "run_state.json").is_file():
        raise FileNotFoundError(f"resume_from: {resume_from!r} is not a complete checkpoint folder "
                                f"(no run_state.json); expected a folder under {checkpoint_dir(output_dir)} or 'latest'")
    return path


def check_output_dir(output_dir: str | Path, resume_from: str | None, overwrite: bool) -> None:
    """FileExistsError when ``output_dir`` already holds something and the run neither resumes (``resume_from``)
    nor may overwrite it (``overwrite``): a new run would replace its metrics.jsonl and checkpoints."""
    folder = Path(output_dir)
    if resume_from is None and not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(f"output_dir {str(folder)!r} already exists and is not empty; resume it with "
                              f"resume_from=latest, choose another output_dir, or set overwrite=true to replace it")


def clear_run(output_dir: str | Path) -> None:
    """Delete what a previous run left in ``output_dir`` (checkpoints/, final/, metrics.jsonl, config.yaml) for
    ``overwrite``; other files stay."""
    folder = Path(output_dir)
    for name in ("checkpoints", "final"):
        shutil.rmtree(folder / name, ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml"):
        (folder / name).unlink(missing_ok=True)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: RunState, keep: int) -> Path:
    """Write checkpoint ``step_{state.step}`` atomically (tmp folder, then rename); keep the newest ``keep``."""
    folder = checkpoint_dir(output_dir)
    final = folder / f"step_{state.step:07d}"
    tmp = folder / f"{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "run_state.json").write_text(json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep:
            for old in sorted(p for p in folder.glob("step_*") if STEP_DIR.match(p.name))[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> RunState:
    """Restore everything ``save_checkpoint`` wrote; returns the run state to continue from."""
    accelerator.load_state(str(path))
    return RunState(**json.loads((path / "run_state.json").read_text()))


def export(accelerator: Accelerator, student, processor, mixer: HeadMixer | None, student_layers: list[int],
           out_dir: str | Path, summary: dict, dtype: torch.dtype = torch.float32) -> Path:
    """Write the distilled student as a plain Qwen2.5-VL checkpoint (gain folded) in ``dtype``, the mixer and a
    summary; a run without a mixer (pure SFT) writes the student as it is.

    ``student_layers[p]`` is the student layer of pair p (its q_proj receives gain(p)); empty when mixer is None.
    ``dtype`` is the dtype the student computed in (bf16 under bf16 precision): the gain is folded with
    :func:`laid.mixer.fold_gain` in that dtype, as the training forward applied it, so the exported q_proj weights
    are the ones training used. The state dict is gathered with ``accelerator.get_state_dict`` (full weights under
    FSDP); only the main process writes.
    """
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        for pair, layer in enumerate(student_layers):  # empty without a mixer
            prefix = f"model.language_model.layers.{layer}.self_attn.q_proj."
            with torch.no_grad():
                weight, bias = fold_gain(state_dict[prefix + "weight"], state_dict.get(prefix + "bias"),
                                         mixer.gain_channels(pair), dtype)
            state_dict[prefix + "weight"] = weight
            if bias is not None:
                state_dict[prefix + "bias"] = bias
        out.mkdir(parents=True, exist_ok=True)
        model = accelerator.unwrap_model(student)
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        config = copy.deepcopy(model.config)  # save_pretrained writes the fp32 master weights' dtype: the export's
        for part in [config, *(getattr(config, name) for name in config.sub_configs)]:
            part.dtype = dtype
        config.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        if mixer is not None:
            mixer.save(out / "mixer.safetensors")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    return out
