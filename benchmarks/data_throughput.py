"""Benchmark of building Visual Haystacks training items: items per second for 20- and 150-image prompts.

COCO-sized images (640 x 480 JPEGs of noise, which qwen-vl-utils resizes to 644 x 476: 391 visual tokens each)
and Qwen2.5-VL's image processor at its default pixel bounds, with the tiny tokenizer (the text side is a few
hundred tokens besides the image tokens, so the tokenizer does not matter). Variants, each through a DataLoader
with 0, 1 and 2 workers (batch 1, as the paper's recipe), timed over --items items after one warm-up item:

- ``before``: what laid did until 2026-12: ``qwen_vl_utils.fetch_image`` for every image, then
  ``processor(text, images)`` (the batch holds the fp32 ``pixel_values``);
- ``cold``: ``laid.data.VHsDataset`` with an empty ``laid.image_cache`` (decode, resize and store every image);
  the batch holds the images' uint8 pixels (``laid.prompt_inputs.encode_prompt``);
- ``warm``: the same with every image already cached.

The time per item is what the consuming process waits for the loader. For ``cold`` / ``warm`` the fp32
``pixel_values`` are then made where the model runs (``laid.prompt_inputs.model_inputs``): on a GPU, on the
device; this script also times ``model_inputs`` on the CPU (one thread) on the last batch, which is what a CPU run
pays in its training step (the ``before`` batch already holds them: about 0).

Then the tiny-model CPU training run of ``configs/tiny_cpu.yaml`` (tiny random models, 32 synthetic haystacks of
2 to 6 images, 2 epochs of 8 steps of 4 batches) with each of ``--train-workers``, ``--train-repeats`` times: the
share of each step the trainer waited for the loader (``data_wait_share`` in its metrics.jsonl): mean, mean after
step 1 (which includes starting the workers), at the first step of the later epochs, at the other steps, and max.
With workers, three variants: ``after``, laid as it is (small tensors leave a worker by value,
``laid.loading.by_value``, and a thread receives the next batches during the step, ``laid.loading.prefetched``);
``by value``, without that thread (``laid.loading.PREFETCH_BATCHES`` 0); and ``before``, without either: every
tensor through its own shared-memory segment, as until 2026-12-02 (``laid.loading.BY_VALUE_BYTES`` set to -1 for
that run; the workers are forked, so they see it). Without workers: ``in process`` (the thread builds the next
batches) and ``in process, no thread``.

    python benchmarks/data_throughput.py                  # 20 and 150 images, 0 / 1 / 2 workers
    python benchmarks/data_throughput.py --sizes 20 --workers 0 --items 2 --train-workers
    python benchmarks/data_throughput.py --sizes --train-repeats 3   # only the training runs, 3 of each

Writes data_throughput.{json,md,png} (the training wait in the same JSON and page) and data_wait.png to --out
(default benchmarks/out/). Timings on a shared machine are noisy: compare variants of the same run (the ratios),
not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import fetch_image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import laid.loading  # noqa: E402
from laid.data import VHsDataset, build_messages, collate, haystack_order, pixel_budget, synth_haystacks  # noqa: E402
from laid.image_cache import ImageCache, fill_cache  # noqa: E402
from laid.prompt_inputs import model_inputs  # noqa: E402
from laid.tiny import (TINY_STUDENT, TINY_TEACHER, build_tiny_processor, save_tiny_model,  # noqa: E402
                       save_tiny_processor, tiny_qwen25vl_config)
from laid.trainer import train  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
QWEN_PIXEL_BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 14 * 14 * 4 * 16384}  # Qwen2.5-VL's processor defaults


class BeforeDataset(VHsDataset):
    """VHsDataset as it built items before the cache and encode_prompt: fetch_image, then the processor."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        order = haystack_order(entry, seed=self.seed, index=index, max_images=self.max_images)
        messages = build_messages([self.image_root / p for p in order], entry["conversations"][0]["value"])
        images = [fetch_image(item) for item in messages[0]["content"] if "image" in item]
        answer = entry["conversations"][1]["value"]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = self.processor.apply_chat_template(messages, tokenize=False)
        enc = self.processor(text=[text], images=images, return_tensors="pt")
        item = {k: v[0] for k, v in enc.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        item["pixel_values"], item["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
        item["labels"] = self._answer_labels(item["input_ids"], index)
        return item


def write_images(folder: Path, count: int) -> list[str]:
    """``count`` 640 x 480 noise JPEGs in ``folder`` (kept between runs); their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(count):
        path = folder / f"{k:04d}.jpg"
        if not path.is_file():
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        names.append(path.name)
    return names


def write_entries(path: Path, names: list[str], size: int, count: int) -> Path:
    """``count`` VHs entries of ``size`` images each (one needle, the rest negatives; no image in two entries, so
    that a cold cache stays cold for every item), as a JSON file."""
    entries = [{"conversations": [{"from": "human", "value": "For the image with a dog, is there a cat?"},
                                  {"from": "gpt", "value": "yes"}],
                "pos_image": [names[k * size]], "neg_image": names[k * size + 1:(k + 1) * size]} for k in range(count)]
    path.write_text(json.dumps(entries))
    return path


def time_loader(dataset, workers: int, items: int) -> tuple[float, float]:
    """(seconds per item over ``items`` items of a DataLoader (batch 1) after its first item, seconds of
    ``model_inputs`` on the CPU for the last batch)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers,
                                         collate_fn=lambda batch: collate(batch, pad_token_id=0),
                                         prefetch_factor=2 if workers else None)
    batches = iter(loader)
    next(batches)  # worker start-up and the first item
    start = time.perf_counter()
    for _ in range(items):
        batch = next(batches)
    per_item = (time.perf_counter() - start) / items
    del batches, loader  # workers gone before the CPU conversion is timed
    start = time.perf_counter()
    model_inputs(batch, "cpu")
    return per_item, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[20, 150],
                        help="images per item of the throughput runs (none: only the training runs)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--items", type=int, default=3, help="timed items per variant (after one warm-up item)")
    parser.add_argument("--train-workers", type=int, nargs="*", default=[0, 1, 2],
                        help="DataLoader workers of the tiny CPU training runs (none: no training run)")
    parser.add_argument("--train-repeats", type=int, default=1, help="runs of each training variant (interleaved)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.train_repeats < 1:
        parser.error(f"--train-repeats must be >= 1, got {args.train_repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "data_throughput_work"
    names = write_images(work / "images", max(args.sizes, default=0) * (args.items + 1))
    processor = build_tiny_processor(**QWEN_PIXEL_BOUNDS)
    torch.set_num_threads(1)
    results = []
    for size in args.sizes:
        data = write_entries(work / f"vhs_{size}.json", names, size, args.items + 1)
        for workers in args.workers:
            for variant in ("before", "cold", "warm"):
                cache_dir = work / "cache"
                if variant == "cold":
                    shutil.rmtree(cache_dir, ignore_errors=True)
                cls = BeforeDataset if variant == "before" else VHsDataset
                dataset = cls(data, work / "images", processor,
                              image_cache=None if variant == "before" else ImageCache(cache_dir))
                seconds, to_fp32 = time_loader(dataset, workers, args.items)
                results.append({"images": size, "workers": workers, "variant": variant, "seconds_per_item": seconds,
                                "items_per_s": 1 / seconds, "model_inputs_cpu_s": to_fp32,
                                "load_average": os.getloadavg()[0]})
                print(f"{size} images, {workers} workers, {variant}: {seconds:.2f} s per item, model_inputs on CPU "
                      f"{to_fp32:.2f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?",
            "cores": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "items": args.items}
    waits = []
    if args.train_workers:
        setup = train_setup(work / "train")
        for repeat in range(args.train_repeats):
            for workers in args.train_workers:
                variants = ("before", "by value", "after") if workers else ("in process, no thread", "in process")
                for variant in variants:
                    waits.append(train_wait(setup, workers, variant, repeat))
    (args.out / "data_throughput.json").write_text(json.dumps({"meta": meta, "results": results,
                                                               "training_wait": waits}, indent=1))
    table = "\n\n".join(([report(results)] if results else []) + ([wait_report(waits)] if waits else []))
    (args.out / "data_throughput.md").write_text(table + "\n")
    print(table)
    if results:
        plot(results, args.out / "data_throughput.png")
    if waits:
        plot_wait(waits, args.out / "data_wait.png")


def train_setup(work: Path) -> dict[str, str]:
    """Tiny models, their processor and 32 synthetic haystacks of 2 to 6 images (cached) under ``work``: the
    paths of configs/tiny_cpu.yaml's fields."""
    processor = save_tiny_processor(work / "processor")
    save_tiny_model(work / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    save_tiny_model(work / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
    data = synth_haystacks(work / "synth", n_entries=32, min_images=2, max_images=6, seed=0)
    fill_cache([data], work / "synth", work / "cache", **pixel_budget(processor))  # as `laid data cache` would
    return {"teacher": str(work / "teacher"), "student": str(work / "student"), "processor": str(work / "processor"),
            "data": str(data), "image_root": str(work / "synth"), "image_cache": str(work / "cache")}


# The training variants: (laid.loading.BY_VALUE_BYTES, laid.loading.PREFETCH_BATCHES) for the run; None: laid's.
TRAIN_VARIANTS = {"before": (-1, 0), "by value": (None, 0), "after": (None, None),
                  "in process, no thread": (None, 0), "in process": (None, None)}


def train_wait(setup: dict[str, str], workers: int, variant: str, repeat: int) -> dict:
    """``laid.train`` of configs/tiny_cpu.yaml on ``setup`` with ``workers`` DataLoader workers and the settings of
    ``TRAIN_VARIANTS[variant]``; its steps' ``data_wait_share``."""
    if variant == "before" and torch.multiprocessing.get_start_method() != "fork":
        raise RuntimeError("the 'before' training variant needs forked DataLoader workers (they must see "
                           f"laid.loading.BY_VALUE_BYTES = -1); this Python starts them by "
                           f"{torch.multiprocessing.get_start_method()!r}")
    run = Path(setup["image_cache"]).parent / f"run_{workers}_workers_{variant.replace(' ', '_')}"
    shutil.rmtree(run, ignore_errors=True)
    defaults = laid.loading.BY_VALUE_BYTES, laid.loading.PREFETCH_BATCHES
    settings = [default if value is None else value for value, default in zip(TRAIN_VARIANTS[variant], defaults)]
    laid.loading.BY_VALUE_BYTES, laid.loading.PREFETCH_BATCHES = settings
    start = time.perf_counter()
    try:
        train(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml", **setup, output_dir=str(run),
              num_workers=workers, save_every=1000)
    finally:
        laid.loading.BY_VALUE_BYTES, laid.loading.PREFETCH_BATCHES = defaults
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shares = [m["data_wait_share"] for m in metrics]
    epoch_start = [s for k, (m, s) in enumerate(zip(metrics, shares)) if k and m["epoch"] != metrics[k - 1]["epoch"]]
    within = [s for k, (m, s) in enumerate(zip(metrics, shares)) if k and m["epoch"] == metrics[k - 1]["epoch"]]
    result = {"workers": workers, "variant": variant, "repeat": repeat, "steps": len(shares), "seconds": seconds,
              "wait_share_mean": float(np.mean(shares)), "wait_share_mean_after_step_1": float(np.mean(shares[1:])),
              "wait_share_epoch_starts": float(np.mean(epoch_start)) if epoch_start else None,
              "wait_share_within_epochs": float(np.mean(within)), "wait_share_max": max(shares),
              "wait_shares": shares, "load_average": os.getloadavg()[0]}
    print(f"training with {workers} workers, {variant} (run {repeat + 1}): {len(shares)} steps in {seconds:.0f} s, "
          f"data_wait_share after step 1 {result['wait_share_mean_after_step_1']:.3f}, max "
          f"{result['wait_share_max']:.3f} (load average {result['load_average']:.1f})", flush=True)
    return result


def wait_report(waits: list[dict]) -> str:
    """Markdown table of the tiny CPU training runs' data_wait_share per worker count and variant: the mean over
    runs (the range over runs in brackets when there are several)."""
    columns = ("wait_share_mean_after_step_1", "wait_share_epoch_starts", "wait_share_within_epochs",
               "wait_share_max", "seconds")
    lines = ["| training workers | variant | runs | steps | wait share after step 1 | at epoch starts | "
             "within epochs | max | run s |", "|---|---|---|---|---|---|---|---|---|"]
    for workers, variant in sorted({(w["workers"], w["variant"]) for w in waits}, key=lambda k: (k[0], k[1])):
        runs = [w for w in waits if (w["workers"], w["variant"]) == (workers, variant)]
        cells = []
        for column in columns:
            values = [w[column] for w in runs if w[column] is not None]
            digits = 0 if column == "seconds" else 3
            cell = f"{np.mean(values):.{digits}f}" if values else "-"
            cells.append(cell + (f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""))
        lines.append(f"| {workers} | {variant} | {len(runs)} | {runs[0]['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_wait(waits: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for workers, variant in sorted({(w["workers"], w["variant"]) for w in waits}):
        runs = [w["wait_shares"] for w in waits if (w["workers"], w["variant"]) == (workers, variant)]
        steps = min(len(r) for r in runs)
        ax.plot(range(1, steps + 1), np.mean([r[:steps] for r in runs], axis=0), marker="o",
                linestyle="--" if variant == "before" else "-", label=f"{workers} workers, {variant}")
    ax.set_title("tiny CPU training (configs/tiny_cpu.yaml): waiting for data, mean of runs", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("data_wait_share")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: list[dict]) -> str:
    """Markdown table: seconds per item of each variant, the speed-up of warm over before, and warm's
    ``model_inputs`` on the CPU, per size and workers."""
    lines = ["| images | workers | before s/item | cold s/item | warm s/item | warm items/s | warm vs before | "
             "warm model_inputs on CPU s |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["images"], r["workers"]) for r in results})
    for size, workers in keys:
        row = {r["variant"]: r for r in results if (r["images"], r["workers"]) == (size, workers)}
        lines.append(f"| {size} | {workers} | {row['before']['seconds_per_item']:.2f} | "
                     f"{row['cold']['seconds_per_item']:.2f} | {row['warm']['seconds_per_item']:.2f} | "
                     f"{row['warm']['items_per_s']:.2f} | "
                     f"{row['before']['seconds_per_item'] / row['warm']['seconds_per_item']:.1f}x | "
                     f"{row['warm']['model_inputs_cpu_s']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["images"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for variant in ("before", "cold", "warm"):
            rows = sorted((r for r in results if r["images"] == size and r["variant"] == variant),
                          key=lambda r: r["workers"])
            ax.plot([r["workers"] for r in rows], [r["items_per_s"] for r in rows], marker="o", label=variant)
        rows = sorted((r for r in results if r["images"] == size and r["variant"] == "warm"),
                      key=lambda r: r["workers"])
        ax.plot([r["workers"] for r in rows], [1 / (r["seconds_per_item"] + r["model_inputs_cpu_s"]) for r in rows],
                marker="o", linestyle="--", label="warm + model_inputs on the CPU")
        ax.set_title(f"{size}-image training items")
        ax.set_xlabel("DataLoader workers")
        ax.set_ylabel("items / s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
