"""``laid plan``'s estimate against the measured peak of real tiny training runs on the CPU.

For each image count: tiny real Qwen2.5-VL models (``laid.tiny``, wider than the test family so that activations
outweigh the fixed costs) and a synthetic Visual Haystacks set with exactly that many images per prompt are written;
``laid.train`` runs two optimizer steps of two micro-batches (fp32, one process, the fused C++ kernels) under ``torch.profiler`` with
``profile_memory``, and the peak of the live bytes of all tensor allocations made during the run is compared with
``laid.plan.plan(..., device="cpu")`` for the same models and prompt length. Parameter, gradient and optimizer bytes
are also counted exactly on the trainer's own objects (``student_state_bytes``).

    PYTHONPATH=. python benchmarks/plan_check.py --images 2 8 32 --out benchmarks/out/plan_check

prints a table and writes ``plan_check.json`` and ``plan_check.png`` under ``--out``.

    PYTHONPATH=. python benchmarks/plan_check.py --readme-table

prints instead the README's table: ``laid plan --json`` for 32B -> 7B and 32B -> 3B at 20 and 150 images on
8 x 80 GB, FSDP and DDP (nothing is trained).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from laid.data import VHsDataset, synth_haystacks
from laid.plan import plan
from laid.tiny import save_tiny_model, save_tiny_processor, tiny_qwen25vl_config
from laid.trainer import train

# Tiny teacher / student with real Qwen2.5-VL structure: width and depth enough for activations to dominate.
TEACHER = dict(layers=3, hidden=256, heads=8, kv_heads=4, head_dim=32, mrope_section=(4, 6, 6), intermediate=768,
               vocab_size=512, vision_depth=2, vision_hidden=64, vision_heads=2)
STUDENT = dict(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, mrope_section=(4, 6, 6), intermediate=512,
               vocab_size=448, vision_depth=2, vision_hidden=64, vision_heads=2)
IMAGE_SIZE = 112  # pixels; with max_pixels 112 * 112 an image is 8 x 8 patches, 16 visual tokens
TOLERANCE = 0.10  # |estimate / measured - 1| the test accepts


def build(root: Path, images: int) -> dict[str, str]:
    """Processor, teacher, student and a 4-entry data set with ``images`` images per prompt, under ``root``."""
    paths = {name: str(root / name) for name in ("processor", "teacher", "student")}
    save_tiny_processor(paths["processor"], max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    save_tiny_model(paths["teacher"], tiny_qwen25vl_config(**TEACHER), seed=0)
    save_tiny_model(paths["student"], tiny_qwen25vl_config(**STUDENT), seed=1)
    paths["data"] = str(synth_haystacks(root / "synth", n_entries=4, min_images=images, max_images=images,
                                        image_size=IMAGE_SIZE, seed=0))
    paths["image_root"] = str(root / "synth")
    return paths


def run_config(paths: dict[str, str], output_dir: Path, images: int) -> dict:
    """laid.train fields of the measured run: two optimizer steps of two micro-batches (the last micro-batch runs
    with gradients and AdamW states present, as every later one does), fp32, the C++ kernels."""
    return dict(teacher=paths["teacher"], student=paths["student"], processor=paths["processor"], data=paths["data"],
                image_root=paths["image_root"], output_dir=str(output_dir), precision="fp32",
                attn_implementation="sdpa", kernel_backend="cpu", epochs=1, grad_accum=2, max_steps=2,
                max_images=images, num_workers=0, image_cache="none", save_every=1000)


def prompt_tokens(paths: dict[str, str], images: int) -> tuple[int, int]:
    """(tokens per image with its two delimiters, other tokens) of the data set's first prompt."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(paths["processor"])
    item = VHsDataset(paths["data"], paths["image_root"], processor, max_images=images)[0]
    visual = int((item["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    per_image = visual // images + 2
    return per_image, int(item["input_ids"].numel()) - images * per_image


def peak_tensor_bytes(run) -> int:
    """The largest sum of live tensor bytes allocated (and not yet freed) during ``run()``: the profiler's memory
    events (``profile_memory``; every allocation and free of the CPU allocator, with its size) from its exported
    trace, summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        trace = json.loads((Path(tmp) / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def student_state_bytes(paths: dict[str, str]) -> dict[str, int]:
    """Student weight, gradient and AdamW state bytes of the trainer's objects after one optimizer step, exactly."""
    from laid.models import load_student

    student = load_student(paths["student"], device=torch.device("cpu"), attn_implementation="sdpa")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"student weights": sum(p.numel() * p.element_size() for p in student.parameters()),
            "student gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "optimizer states": sum(t.numel() * t.element_size() for t in state)}


def check(images: int, work: Path) -> dict:
    """Estimate and measurement for one image count."""
    paths = build(work / f"{images}", images)
    per_image, text = prompt_tokens(paths, images)
    estimate = plan(paths["teacher"], paths["student"], gpus=1, gpu_memory_gb=1.0, images=images,
                    strategy="ddp", tokens_per_image=per_image, text_tokens=text, device="cpu")
    start = time.perf_counter()
    measured = peak_tensor_bytes(lambda: train(**run_config(paths, work / f"run{images}", images)))
    return {"images": images, "tokens": estimate["tokens"], "estimate_mb": estimate["per_gpu_bytes"] / 1e6,
            "measured_mb": measured / 1e6, "ratio": estimate["per_gpu_bytes"] / measured,
            "peak_moment": estimate["peak_moment"], "seconds": time.perf_counter() - start,
            "breakdown_mb": {k: v * 1e3 for k, v in estimate["breakdown_gb"].items()},
            "exact": {k: [student_state_bytes(paths)[k], round(estimate["breakdown_gb"][k] * 1e9)]
                      for k in ("student weights", "student gradients", "optimizer states")}}


def readme_table() -> str:
    """The README's table, one ``laid plan ... --json`` run per row."""
    import contextlib
    import io

    from laid.cli import main as laid_main

    lines = ["| teacher -> student | images (tokens) | strategy | per GPU (GB) | fits 80 GB | student weights + "
             "grads + AdamW | teacher weights | activations, teacher forward, losses (peak moment) |",
             "|---|---|---|---|---|---|---|---|"]
    for student in ("7B", "3B"):
        for images in (20, 150):
            for strategy in ("fsdp", "ddp"):
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    laid_main(["plan", "--teacher", "Qwen/Qwen2.5-VL-32B-Instruct", "--student",
                               f"Qwen/Qwen2.5-VL-{student}-Instruct", "--gpus", "8", "--gpu-memory-gb", "80",
                               "--images", str(images), "--strategy", strategy, "--json"])
                r = json.loads(out.getvalue())
                gb = r["breakdown_gb"]
                state = gb["student weights"] + gb["student gradients"] + gb["optimizer states"]
                peak = sum(v for k, v in gb.items() if k.startswith("peak: "))
                lines.append(f"| 32B -> {student} | {images} ({r['tokens']:,}) | {strategy} | {r['per_gpu_gb']:.1f} | "
                             f"{'yes' if r['fits'] else 'no'} | {state:.1f} | {gb['teacher weights']:.1f} | "
                             f"{peak:.1f} ({r['peak_moment']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--out", default="benchmarks/out/plan_check")
    parser.add_argument("--readme-table", action="store_true", help="print the README's laid plan table and exit")
    args = parser.parse_args()
    if args.readme_table:
        print(readme_table())
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check(images, Path(tmp)) for images in args.images]
    print("| images | tokens | estimate MB | measured peak MB | estimate / measured | peak moment |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['tokens']} | {r['estimate_mb']:.1f} | {r['measured_mb']:.1f} | "
              f"{r['ratio']:.3f} | {r['peak_moment']} |")
    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, torch {torch.__version__}, load average "
          f"{load:.1f}; tolerance {TOLERANCE:.0%}")
    (out / "plan_check.json").write_text(json.dumps({"rows": rows, "load_average": load,
                                                     "teacher": TEACHER, "student": STUDENT}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["measured_mb"] for r in rows], "o-", label="measured peak (profiler)")
    ax.plot(tokens, [r["estimate_mb"] for r in rows], "s--", label="laid plan estimate")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("MB")
    ax.set_title("tiny Qwen2.5-VL pair, one CPU training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plan_check.png", dpi=120)
    print(out / "plan_check.json")


if __name__ == "__main__":
    main()
