"""The Visual Haystacks evaluation, faithful to the official benchmark (visual-haystacks/vhs_benchmark).

For every haystack size N the questions of the official single-needle file are answered one at a time: the N images
(needle + negatives) in a seeded shuffle (``laid.data.haystack_order``), then one text item
``VHS_PROMPT + question`` (``laid.data.build_messages``), images read by ``qwen_vl_utils.process_vision_info`` as the
official Qwen adapter does (within the processor's pixel bounds, ``laid.data.pixel_budget``: the loader's defaults for
the real processor), greedy ``generate`` with the KV cache (``max_new_tokens`` 128). Responses are scored by
``laid.scoring`` (nltk word tokens, the official quirks) and summarised as the mean and standard deviation over 100
bootstrap resamples, per size.

Data layout (the official dataset folder, e.g. ``single_needle/VHs_large``)::

    DATA/visual_haystack_oracle.json    size 1
    DATA/visual_haystack_{N}.json       size N (2, 3, 5, 10, 20, 50, 100, 500, ...)

Size 150 has no official file: it is cut from ``visual_haystack_500.json`` as the needle + a seeded random 149 of
each entry's negatives (``CUT_FROM``; ``laid.data.haystack_order`` says which), unless the folder has a
``visual_haystack_150.json`` (a synthetic benchmark). Image paths are relative to ``image_root`` (the COCO root;
default ``DATA``). ``limit`` asks a seeded random subset of each size's questions (:func:`question_indices`).

Speed: the prompts (images read through ``laid.image_cache``, tokens and uint8 pixels by ``laid.prompt_inputs``;
the fp32 ``pixel_values`` are made on the model's device) are built by DataLoader workers while the model
answers, and under ``accelerate launch`` / ``torchrun`` the questions are split across processes (question k of
the run's list goes to process k mod the number of processes), each writing the answers it computed; after all
processes finish, the summary is computed once, by the main process.

Output (``output_dir``), readable by the official scorer::

    {N}_images/{idx:03d}.json   the entry + result {image_paths (relative, in the order shown), response, log}
    run.json                    what was evaluated (a resumed run must match it)
    summary.json, summary.csv   accuracy and compliance (fractions) per size

A run that stopped half-way resumes, with any number of processes: answered questions (their ``{idx:03d}.json``
exists) are not asked again.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .data import build_messages, first_missing_image, haystack_order, load_vhs, pixel_budget, vhs_json_name
from .image_cache import ImageCache, image_cache_dir
from .loading import by_value, loader_options
from .prompt_inputs import encode_prompt, model_inputs
from .scoring import vhs_metrics

SIZES = (1, 2, 5, 10, 20, 50, 100, 150)
CUT_FROM = {150: 500}  # size -> the official file it is cut from (needle + a seeded random size - 1 negatives)
METHODS = ("baseline", "yarn", "selfextend")


def haystack_file(data: str | Path, size: int) -> Path:
    """The JSON file that holds haystacks of ``size`` images: ``vhs_json_name(size)`` when the folder has it (every
    official size, and any size ``laid data synth --sizes`` wrote), else for ``CUT_FROM`` sizes the file they are cut
    from."""
    if size < 1:
        raise ValueError(f"sizes must be >= 1, got {size}")
    exact = Path(data) / vhs_json_name(size)
    return exact if exact.is_file() or size not in CUT_FROM else Path(data) / vhs_json_name(CUT_FROM[size])


def haystack_entries(data: str | Path, size: int) -> list[dict]:
    """The entries of ``size`` images: the file of ``haystack_file``, checked to hold ``size`` images per entry
    (at least ``size`` for a file the size is cut from). FileNotFoundError names the size and the expected file."""
    path = haystack_file(data, size)
    if not path.is_file():
        raise FileNotFoundError(f"size {size}: data file {str(path)!r} does not exist (the data folder needs "
                                f"visual_haystack_oracle.json for size 1, visual_haystack_N.json for size N and "
                                f"visual_haystack_500.json for 150)")
    entries = load_vhs(path)
    for index, entry in enumerate(entries):
        count = len(entry["pos_image"]) + len(entry["neg_image"])
        if count < size or (count != size and path.name == vhs_json_name(size)):  # a cut-from file may hold more
            raise ValueError(f"{path}: entry {index} has {count} images, size {size} expects {size}")
    return entries


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or for None / "auto" cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def load_for_eval(model_or_path, *, method: str, device: torch.device, attn_implementation: str = "auto",
                  yarn_factor: float = 4.0, selfextend_group: int = 8, selfextend_window: int = 1024):
    """The model to evaluate in eval mode on ``device`` (bf16 on CUDA, fp32 on CPU), with ``method`` applied.

    ``model_or_path``: a loaded ``Qwen2_5_VLForConditionalGeneration`` (changed in place by "yarn" / "selfextend")
    or a folder / hub id. ``method``: "baseline" (untouched), "yarn" (``laid.baselines.apply_yarn``) or
    "selfextend" (``laid.baselines.apply_selfextend``).
    """
    from .baselines import apply_selfextend, apply_yarn
    from .models import choose_attention, load_model

    _check_method(method)
    if isinstance(model_or_path, (str, Path)):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = load_model(str(model_or_path), dtype=dtype, role="model",
                           attn_implementation=choose_attention(attn_implementation, device))
    else:
        model = model_or_path
    model.to(device).eval()
    if method == "yarn":
        apply_yarn(model, factor=yarn_factor)
    elif method == "selfextend":
        apply_selfextend(model, group_size=selfextend_group, window=selfextend_window)
    return model


def prompt_inputs(processor, image_paths: list[Path], question: str, *,
                  image_cache: ImageCache | None = None) -> dict:
    """The model inputs of one question as the official Qwen adapter builds them: ``build_messages`` within the
    processor's pixel bounds (``pixel_budget``: for the real processor, qwen-vl-utils' defaults), every image read
    as ``qwen_vl_utils.process_vision_info`` reads it (through ``image_cache`` when given), the chat template with
    the generation prompt, then ``laid.prompt_inputs.encode_prompt``: ``input_ids`` / ``attention_mask`` /
    ``mm_token_type_ids`` [1, N], ``image_grid_thw`` [images, 3] and the images' uint8 ``image_pixels`` (with their
    ``pixel_format``), which ``laid.prompt_inputs.model_inputs`` turns into the processor's
    ``pixel_values`` on the model's device."""
    messages = build_messages(image_paths, question, **pixel_budget(processor))
    cache = image_cache if image_cache is not None else ImageCache(None)
    images = [cache.load(item) for item in messages[0]["content"] if "image" in item]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode_prompt(processor, text, images)


def question_indices(n_entries: int, limit: int | None, *, seed: int, size: int) -> list[int]:
    """The entries asked at ``size``: all of them, or a seeded random ``limit`` of them (drawn without replacement
    by ``numpy.random.default_rng([seed, size])``), in file order."""
    if limit is None or limit >= n_entries:
        return list(range(n_entries))
    return sorted(np.random.default_rng([seed, size]).choice(n_entries, size=limit, replace=False).tolist())


class HaystackPrompts(torch.utils.data.Dataset):
    """The prompts of the questions to ask, built where the DataLoader runs them (its workers, or in process).

    ``jobs``: (size, index, entry) triples. Item k: ``{"size", "index", "order"}`` (the relative image paths in
    the order shown) and ``"inputs"``, :func:`prompt_inputs` of the official messages with the generation prompt
    (uint8 pixels: the loader never builds the fp32 ``pixel_values``; ``answer`` does, on the model's device).
    Images are read through ``image_cache`` exactly as ``qwen_vl_utils.process_vision_info`` reads them.
    """

    def __init__(self, jobs: list[tuple[int, int, dict]], image_root: Path, processor, *, seed: int,
                 image_cache: ImageCache):
        self.jobs, self.image_root, self.processor = jobs, image_root, processor
        self.seed, self.image_cache = seed, image_cache

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, k: int) -> dict:
        size, index, entry = self.jobs[k]
        order = haystack_order(entry, seed=self.seed, index=index, max_images=size)
        inputs = prompt_inputs(self.processor, [self.image_root / p for p in order], entry["conversations"][0]["value"],
                               image_cache=self.image_cache)
        return {"size": size, "index": index, "order": order, "inputs": inputs}


@torch.inference_mode()
def answer(model, processor, inputs: dict[str, torch.Tensor], *, max_new_tokens: int = 128) -> dict:
    """Greedy answer of ``model`` to one prompt (``HaystackPrompts`` item ``"inputs"``).

    Sampling is off; the model's other generation settings (e.g. Qwen2.5-VL-Instruct's repetition_penalty 1.05)
    apply as in a plain ``generate`` call. Returns ``{"response": str, "input_tokens": N, "output_tokens": T}``.
    Only this question's tensors live: the prompt and the KV cache of ``generate``.
    """
    inputs = model_inputs(inputs, model.device)
    n_input = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                            temperature=None, top_p=None, top_k=None)
    new_tokens = output[0, n_input:]
    response = processor.batch_decode(new_tokens[None], skip_special_tokens=True)[0]
    return {"response": response, "input_tokens": n_input, "output_tokens": int(new_tokens.shape[0])}


def _write_json(path: Path, value) -> None:
    """Write atomically (temporary file + rename): an interrupted run never leaves half a JSON file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _check_run(output_dir: Path, run: dict, *, write: bool = True) -> None:
    """Check that a resumed run asks what ``output_dir/run.json`` records, and (``write``) record ``run`` there."""
    path = output_dir / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in run.items() if k != "sizes" and previous.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"output_dir {str(output_dir)!r} holds a run with other settings ({details}); "
                             f"use another output_dir")
    if write:
        _write_json(path, run)


def write_summary(output_dir: Path, run: dict, metrics: dict[int, dict]) -> dict:
    """``summary.json`` (``run`` + per-size metrics) and ``summary.csv`` (one row per size). Returns the summary."""
    summary = {**run, "results": {str(size): m for size, m in metrics.items()}}
    _write_json(output_dir / "summary.json", summary)
    with open(output_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["size", "n", "accuracy_mean", "accuracy_std", "compliance_mean", "compliance_std"])
        for size, m in metrics.items():
            writer.writerow([size, m["n"], *m["accuracy"], *m["compliance"]])
    return summary


def evaluate(model_or_path, data: str | Path, sizes=SIZES, method: str = "baseline", *,
             output_dir: str | Path, image_root: str | Path | None = None, processor=None, name: str | None = None,
             seed: int = 0, max_new_tokens: int = 128, n_resamples: int = 100, limit: int | None = None,
             device: str | None = "auto", attn_implementation: str = "auto", yarn_factor: float = 4.0,
             selfextend_group: int = 8, selfextend_window: int = 1024, progress: bool = False,
             num_workers: int | None = None, image_cache: str | None = "auto") -> dict:
    """Evaluate a model on Visual Haystacks (single needle) at every size in ``sizes``; returns the summary.

    ``model_or_path``: a model or a folder / hub id; ``processor``: a processor or its folder / hub id (default:
    the model's folder). ``data``: the folder of the official JSON files (see the module docstring). ``limit``: a
    seeded random ``limit`` of each size's questions (:func:`question_indices`). ``num_workers``: DataLoader
    workers that build the prompts (None: ``laid.loading.default_workers``); ``image_cache``: "auto", "none" or a
    folder (``laid.image_cache``). Under ``accelerate launch`` / ``torchrun`` the questions are split across the
    processes. The summary is ``{"name", "method", "model", ..., "results": {"N": {"accuracy": (mean, std),
    "compliance": (mean, std), "n": questions}}}`` with fractions in [0, 1], also written to ``output_dir``.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .models import load_processor

    _check_method(method)
    data, output_dir = Path(data), Path(output_dir)
    image_root = Path(image_root) if image_root is not None else data
    if not data.is_dir():
        raise FileNotFoundError(f"data {str(data)!r} is not a folder of visual_haystack_*.json files")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_root {str(image_root)!r} is not a folder")
    sizes = [int(s) for s in sizes]
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be a non-empty list of distinct sizes, got {sizes}")
    if max_new_tokens < 1 or (limit is not None and limit < 1):
        raise ValueError(f"max_new_tokens and limit must be >= 1, got {max_new_tokens}, {limit}")
    per_size = {size: haystack_entries(data, size) for size in sizes}  # every file checked before any model loads
    asked = {size: question_indices(len(entries), limit, seed=seed, size=size) for size, entries in per_size.items()}
    is_path = isinstance(model_or_path, (str, Path))
    source = str(model_or_path) if is_path else getattr(model_or_path, "name_or_path", "")
    processor_source = str(processor or source) if processor is None or isinstance(processor, (str, Path)) else ""
    if processor is None or isinstance(processor, (str, Path)):
        if not processor_source:
            raise ValueError("processor is required when the model was not loaded from a folder")
        processor = load_processor(processor_source)
    options = {"yarn": {"yarn_factor": yarn_factor},
               "selfextend": {"selfextend_group": selfextend_group, "selfextend_window": selfextend_window}}
    pixel_bounds = getattr(getattr(processor, "image_processor", None), "size", None)
    run = {"name": name or method, "method": method, "model": source, "data": str(data), "seed": seed,
           "max_new_tokens": max_new_tokens, "options": options.get(method, {}), "sizes": sizes, "limit": limit,
           "image_root": str(image_root), "processor": processor_source,
           "pixel_bounds": dict(pixel_bounds) if pixel_bounds else None,
           "cut": {str(size): f"the needle + a seeded random {size - 1} of the negatives of "
                              f"{vhs_json_name(CUT_FROM[size])} (laid.data.haystack_order)"
                   for size in sizes if haystack_file(data, size).name != vhs_json_name(size)}}

    # --- the run folder, checked by the main process first; this process's share of the questions -------------
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # CPU processes: a gloo group, as Accelerator
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise RuntimeError(f"launched as {launched} processes, but accelerate sees {state.num_processes} (on CPU, "
                           f"set ACCELERATE_USE_CPU=true): each process would answer every question")
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _check_run(output_dir, run)
    state.wait_for_everyone()
    if not state.is_main_process:
        _check_run(output_dir, run, write=False)
    jobs = [(size, index, per_size[size][index]) for size in sizes for index in asked[size]]
    pending = [(size, index, entry) for size, index, entry in jobs[state.process_index::state.num_processes]
               if not _answer_path(output_dir, size, index).is_file()]
    for size, index, entry in pending:  # a missing image fails before the model loads
        missing = first_missing_image(entry, image_root)
        if missing is not None:
            raise FileNotFoundError(f"size {size}: entry {index}: image {str(missing)!r} not found (paths are "
                                    f"relative to image_root {str(image_root)!r})")

    if pending:
        device = state.device if state.num_processes > 1 and device in (None, "auto") else resolve_device(device)
        model = load_for_eval(model_or_path, method=method, device=device,
                              attn_implementation=attn_implementation, yarn_factor=yarn_factor,
                              selfextend_group=selfextend_group, selfextend_window=selfextend_window)
        prompts = HaystackPrompts(pending, image_root, processor, seed=seed,
                                  image_cache=ImageCache(image_cache_dir(image_cache)))
        loader = torch.utils.data.DataLoader(prompts, batch_size=None,
                                             collate_fn=by_value(torch.utils.data.default_convert),
                                             **loader_options(num_workers, device, persistent=False))
        for item in loader:
            start = time.perf_counter()
            out = answer(model, processor, item["inputs"], max_new_tokens=max_new_tokens)
            log = {"method": method, "seed": seed, "input_tokens": out["input_tokens"],
                   "output_tokens": out["output_tokens"], "seconds": round(time.perf_counter() - start, 3),
                   "process": state.process_index}
            result = {"image_paths": item["order"], "response": out["response"], "log": log}  # relative paths
            path = _answer_path(output_dir, item["size"], item["index"])
            path.parent.mkdir(exist_ok=True)
            _write_json(path, {**per_size[item["size"]][item["index"]], "result": result})
            if progress:
                print(f"{item['size']} images, question {item['index']}: {out['response']!r}", flush=True)

    # --- every process done: the summary, from the answer files ------------------------------------------------
    state.wait_for_everyone()
    metrics = {}
    for size, indices in asked.items():
        records = [json.loads(_answer_path(output_dir, size, index).read_text()) for index in indices]
        metrics[size] = vhs_metrics([r["result"]["response"] for r in records],
                                    [r["conversations"][1]["value"] for r in records],
                                    n_resamples=n_resamples, seed=seed)
    summary = write_summary(output_dir, run, metrics) if state.is_main_process else {
        **run, "results": {str(size): m for size, m in metrics.items()}}
    state.wait_for_everyone()
    return summary


def _answer_path(output_dir: Path, size: int, index: int) -> Path:
    """The official layout's answer file of question ``index`` at ``size``."""
    return output_dir / f"{size}_images" / f"{index:03d}.json"
