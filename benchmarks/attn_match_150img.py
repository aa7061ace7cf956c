"""Benchmark of attn_match_loss (L_attn) from 1 to 150 images: peak memory and forward+backward time.

Variants (``--variants``; each (variant, size) in its own process): the fused backend of the device ("cpu" here,
"triton" on CUDA), the plain-PyTorch reference eager ("reference") and under ``torch.compile`` ("compiled"), all
with the default target="teacher" (the teacher's own heads mixed by pi), and the fused backend with
target="mixed" ("cpu-mixed" / "triton-mixed": version 1, the baseline of the time budget); divergence "forward".

One sample laid out like a Visual Haystacks prompt (``workload.vhs_prompt``: Qwen2.5-VL's chat template with 357
visual tokens per image, M-RoPE positions from transformers' ``get_rope_index``). Query rows: both delimiters of
every image and the question after the last image (2 per image + the question). 7B student heads (28 / 4) against
32B teacher heads (40 / 8), head_dim 128, bf16 inputs.

Every (variant, size) runs in a fresh process. Memory on CPU: peak RSS (VmHWM, reset after the inputs exist) minus
RSS after the inputs were created; "extra" subtracts the gradient tensors the loss must return (dq_s, dk_s). On CUDA:
torch.cuda.max_memory_allocated minus the allocation after the inputs. The reference materialises the logits: its
memory is predicted from a least-squares fit to the sizes it ran at (features: tokens and rows x tokens), and sizes
whose prediction exceeds the budget (min(--limit-gb, available memory - 3 GB)) are reported as out of memory
without being run; a watchdog also ends a worker whose RSS crosses the budget.

    python benchmarks/attn_match_150img.py                       # all sizes, every variant
    python benchmarks/attn_match_150img.py --images 1 10 --variants cpu cpu-mixed
    python benchmarks/attn_match_150img.py --compile             # no GPU needed: ahead-of-time compile report

Writes attn_match_150img.{json,md,png} to --out (default benchmarks/out/). ``--compile`` instead compiles every
launch of the Triton kernels at 150 images (``attn_match.aot_launches``: 53,590 tokens, 340 rows) for sm_80 and sm_90
with the 7B student in bf16, fp16 and fp32 and the 3B student in bf16 (laid_kernels.aot), and writes the registers,
spill bytes, local and stack memory, tiles, warps and dot precision of each to attn_match_compile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from workload import (HEAD_DIM, SECTION, STUDENTS, TEACHER, inv_freq, proc_status_bytes, reset_peak_rss,  # noqa: E402
                      vhs_prompt)

OUT = Path(__file__).resolve().parent / "out"
STUDENT = STUDENTS["7b"]
MARGIN_BYTES = 3 << 30
GIB = 1 << 30


def tokens_and_rows(images: int) -> tuple[int, int]:
    """(N, query rows) of the ``images``-image prompt."""
    query_mask = vhs_prompt(images).query_mask
    return query_mask.shape[-1], int(query_mask.sum())


def make_inputs(images: int, device: str) -> dict:
    prompt = vhs_prompt(images)
    seq = prompt.positions.shape[-1]
    g = torch.Generator(device=device).manual_seed(0)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(1, seq, heads * HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16).view(
            1, seq, heads, HEAD_DIM)

    inputs = dict(q_s=rand(STUDENT[0]).requires_grad_(True), k_s=rand(STUDENT[1]).requires_grad_(True),
                  q_t=rand(TEACHER[0]), k_t=rand(TEACHER[1]),
                  w_q=torch.randn(STUDENT[0], TEACHER[0], generator=g, device=device) / TEACHER[0] ** 0.5,
                  w_k=torch.randn(STUDENT[1], TEACHER[1], generator=g, device=device) / TEACHER[1] ** 0.5,
                  positions=prompt.positions.to(device), inv_freq=inv_freq(device), mrope_section=SECTION,
                  query_mask=prompt.query_mask.to(device))
    return inputs


def _watchdog(limit: int) -> None:
    """End this process (exit code 3) as soon as its RSS exceeds ``limit`` bytes."""
    def watch():
        while True:
            if proc_status_bytes("VmRSS") > limit:
                print(json.dumps({"error": "watchdog"}), flush=True)
                os._exit(3)
            time.sleep(0.005)
    threading.Thread(target=watch, daemon=True).start()


def variant_loss(variant: str):
    """The loss function of a variant: (fused backend | "reference" | "compiled")[-mixed]; returns
    loss(**inputs) -> 0-dim tensor."""
    import laid_kernels

    name, _, mixed = variant.partition("-")
    options = dict(progress=0.5, alpha=1.0, target="mixed" if mixed else "teacher")
    if name == "compiled":
        compiled = torch.compile(laid_kernels.reference.attn_match_loss, dynamic=True)
        return lambda **inputs: compiled(**inputs, **options)
    return lambda **inputs: laid_kernels.attn_match_loss(**inputs, **options, backend=name)


def worker(images: int, variant: str, device: str, limit: int) -> dict:
    """One forward+backward measurement after a 1-image warm-up (memory of the first measured run, time = best of the
    runs within ~30 s)."""
    if device == "cpu":
        _watchdog(limit)
    loss_fn = variant_loss(variant)
    warm_up = make_inputs(1, device)  # one-time costs (lazy library loading, thread pools, kernel compilation)
    loss_fn(**warm_up).backward()
    del warm_up
    inputs = make_inputs(images, device)
    input_bytes = sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))
    grad_bytes = sum(inputs[k].numel() * inputs[k].element_size() for k in ("q_s", "k_s"))
    if device == "cpu":
        base = proc_status_bytes("VmRSS")
        reset_peak_rss()
    else:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, peak = [], None
    while not times or (sum(times) < 30 and len(times) < 5):
        for k in ("q_s", "k_s"):
            inputs[k].grad = None
        start = time.perf_counter()
        loss = loss_fn(**inputs)
        loss.backward()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if peak is None:
            peak = (proc_status_bytes("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated()) - base
    seq, rows = inputs["positions"].shape[-1], int(inputs["query_mask"].sum())
    return dict(images=images, tokens=seq, rows=rows, variant=variant, device=device, seconds=min(times),
                runs=len(times), loss=loss.item(), peak_bytes=peak, extra_bytes=peak - grad_bytes,
                input_bytes=input_bytes, grad_bytes=grad_bytes)


def run_worker(images: int, variant: str, device: str, limit: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(images), variant, device, str(limit)]
    # Fixed glibc thresholds (this also turns off their dynamic growth): freed blocks go back to the system at
    # once, so RSS follows live memory instead of what the warm-up left in malloc's free lists.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    if threads is not None:  # intra-op threads of the worker (torch reads OMP_NUM_THREADS at start)
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]}
    if done.returncode != 0 and "error" not in result:
        result = {"error": done.stderr[-2000:]}
    return result


def fit_prediction(measured: list[dict]):
    """Least-squares peak bytes ~ a * tokens + b * rows * tokens + c over the measured runs; returns predict(images)."""
    x = torch.tensor([[r["tokens"], r["rows"] * r["tokens"], 1.0] for r in measured], dtype=torch.float64)
    y = torch.tensor([float(r["peak_bytes"]) for r in measured], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]

    def predict(images: int) -> float:
        seq, rows = tokens_and_rows(images)
        return float(coef @ torch.tensor([seq, rows * seq, 1.0], dtype=torch.float64))
    return predict


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def run_all(sizes: list[int], variants: list[str], device: str, limit_gb: float,
            threads: int | None = None) -> list[dict]:
    results = []
    for variant in variants:
        measured, stop_reason = [], None
        for images in sizes:
            seq, rows = tokens_and_rows(images)
            budget = min(int(limit_gb * GIB), available_bytes() - MARGIN_BYTES)
            row = dict(images=images, tokens=seq, rows=rows, variant=variant, device=device)
            if stop_reason is not None:
                results.append({**row, "skipped": stop_reason})
                continue
            predicted = None
            if variant in ("reference", "compiled") and len(measured) >= 3:
                predicted = fit_prediction(measured)(images)
                row["predicted_bytes"] = predicted
                if predicted > budget:
                    stop_reason = f"out of memory (predicted {predicted / GIB:.1f} GB > budget {budget / GIB:.1f} GB)"
                    results.append({**row, "skipped": stop_reason})
                    print(f"{variant} {images} images: {stop_reason}", flush=True)
                    continue
            result = run_worker(images, variant, device, budget, threads)
            if "error" in result:
                stop_reason = "failed"
                if "watchdog" in result["error"]:
                    stop_reason = f"out of memory (RSS passed the {budget / GIB:.1f} GB budget" + (
                        f"; predicted {predicted / GIB:.1f} GB)" if predicted is not None else ")")
                results.append({**row, "skipped": stop_reason, "detail": result["error"][-500:]})
                print(f"{variant} {images} images: {stop_reason}", flush=True)
                continue
            if predicted is not None:
                result["predicted_bytes"] = predicted
            measured.append(result)
            results.append(result)
            print(f"{variant} {images} images ({seq} tokens, {rows} rows): {result['seconds']:.2f} s, peak "
                  f"{result['peak_bytes'] / GIB:.3f} GiB, extra beyond grads {result['extra_bytes'] / GIB:.3f} GiB "
                  f"({100 * result['extra_bytes'] / result['input_bytes']:.1f}% of inputs)", flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| variant | images | tokens | rows | fwd+bwd (s) | peak memory beyond inputs (MiB) | beyond inputs and "
             "returned grads (MiB) | that / input bytes | predicted peak (MiB) |", "|---" * 9 + "|"]
    for r in results:
        head = f"| {r['variant']} | {r['images']} | {r['tokens']} | {r['rows']} |"
        predicted = f" {r['predicted_bytes'] / 2**20:.0f} |" if "predicted_bytes" in r else " |"
        if "skipped" in r:
            lines.append(f"{head} {r['skipped']} | | | |{predicted}")
        else:
            lines.append(f"{head} {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:.0f} | {r['extra_bytes'] / 2**20:.0f}"
                         f" | {100 * r['extra_bytes'] / r['input_bytes']:.1f}% |{predicted}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in results):
        ran = [r for r in results if r["variant"] == variant and "skipped" not in r]
        predicted = [r for r in results if r["variant"] == variant and "predicted_bytes" in r and "skipped" in r]
        ax_mem.plot([r["images"] for r in ran], [r["peak_bytes"] / GIB for r in ran], "o-", label=variant)
        if predicted:
            ax_mem.plot([r["images"] for r in predicted], [r["predicted_bytes"] / GIB for r in predicted], "x--",
                        label=f"{variant} (predicted; out of memory)")
        ax_time.plot([r["images"] for r in ran], [r["seconds"] for r in ran], "o-", label=variant)
    inputs = [r for r in results if "input_bytes" in r]
    ax_mem.plot([r["images"] for r in inputs], [r["input_bytes"] / GIB for r in inputs], ":", color="gray",
                label="input bytes")
    ax_mem.set(xlabel="images", ylabel="peak memory beyond inputs (GiB)", title="attn_match_loss memory")
    ax_time.set(xlabel="images", ylabel="forward + backward (s)", title="attn_match_loss time", yscale="log")
    ax_mem.legend()
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


COMPILE_CASES = (("7b", "bfloat16"), ("7b", "float16"), ("7b", "float32"), ("3b", "bfloat16"))


def compile_report(out: Path) -> None:
    """The ``--compile`` mode (see the module docstring)."""
    from laid_kernels import aot

    rows = []
    for student, dtype in COMPILE_CASES:
        heads = (*STUDENTS[student], *TEACHER)
        for r in aot.compile_in_subprocess("laid_kernels.attn_match:aot_launches", {"heads": heads, "dtype": dtype},
                                           archs=(80, 90), timeout=3600):
            rows.append(dict(kernel=r.name, student=student, dtype=dtype, arch=r.arch, registers=r.registers,
                             spill_store_bytes=r.spill_store_bytes, spill_load_bytes=r.spill_load_bytes,
                             local_bytes=r.local_bytes, stack_bytes=r.stack_bytes, num_warps=r.num_warps,
                             block_m=r.constexprs["BLOCK_M"], block_n=r.constexprs["BLOCK_N"],
                             precision=r.constexprs["PRECISION"]))
    lines = ["| kernel | student | dtype | arch | REG | spill st/ld (B) | LOCAL (B) | STACK (B) | tile (lanes x keys) "
             "| warps | dots |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['student']} | {r['dtype']} | sm_{r['arch']} | {r['registers']} | "
              f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['local_bytes']} | {r['stack_bytes']} | "
              f"{r['block_m']} x {r['block_n']} | {r['num_warps']} | {r['precision']} |" for r in rows]
    spilled = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"] or r["local_bytes"]]
    lines.append(f"\n{len(rows)} compilations, {len(spilled)} with spills or local memory.")
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=f"{cpu_name()} (no GPU needed)",
                load_average=os.getloadavg(), tokens=53590, rows=340)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn_match_compile.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    text = "\n".join(lines)
    (out / "attn_match_compile.md").write_text(f"{meta['date']}, {meta['machine']}\n\n{text}\n")
    print(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        images, variant, device, limit = int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
        print(json.dumps(worker(images, variant, device, limit)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 100, 150])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="default: the fused variant of the device (triton on CUDA, cpu here) with target "
                             "'teacher', reference, compiled, and the fused variant with target 'mixed' (<fused>-mixed)")
    parser.add_argument("--limit-gb", type=float, default=24.0, help="memory budget of one run (RAM on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per worker (OMP_NUM_THREADS; default: torch's); 1 gives steadier "
                             "times on a machine shared with other jobs")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the JSON, markdown and PNG")
    parser.add_argument("--compile", action="store_true", help="the ahead-of-time compile report instead")
    args = parser.parse_args()
    if args.compile:
        compile_report(args.out)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = "triton" if device == "cuda" else "cpu"
    variants = args.variants or [fused, f"{fused}-mixed", "reference", "compiled"]
    results = run_all(sorted(args.images), variants, device, args.limit_gb, args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name() if device == "cuda" else
               f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=machine, device=device,
                load_average=os.getloadavg(), threads=args.threads or torch.get_num_threads(), student_heads=STUDENT,
                teacher_heads=TEACHER, head_dim=HEAD_DIM, dtype="bfloat16", target="teacher (variants without -mixed)", divergence="forward")
    (out / "attn_match_150img.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = table(results)
    load = ", ".join(f"{x:.2f}" for x in meta["load_average"])
    (out / "attn_match_150img.md").write_text(f"{meta['date']}, {machine}, {meta['threads']} thread(s) per worker, "
                                              f"load average at the end {load}\n\n{text}\n")
    plot(results, out / "attn_match_150img.png")
    print(text)


if __name__ == "__main__":
    main()
