"""Peak memory and time of one forward + backward of L_qk (qk_align_loss) on a many-image prompt.

For each number of images (default 1, 10, 50, 100, 150; 357 visual tokens per image plus the chat text), with the
7B-student / 32B-teacher head counts (q 28 vs 40, kv 4 vs 8; ``--student 3b``: 16 vs 40, 2 vs 8), bf16 inputs laid
out as q_proj / k_proj outputs, D = 128 and real M-RoPE positions (transformers' ``get_rope_index`` on the token
layout of such a prompt, with a tiny Qwen2.5-VL config from ``laid.tiny``: nothing is downloaded), it runs the
loss with the defaults of objective version 2 (normalize="student", head mixing) as three variants, each in its own
fresh process: the plain PyTorch reference (eager), the reference under ``torch.compile`` (its compilation, on the
first full-size call, is timed apart) and the fused backend of the device (the C++ backend on CPU, Triton on CUDA),
and records:

- extra memory: on CPU the process's peak resident memory during the step minus its resident memory once the
  inputs exist; on CUDA
  ``torch.cuda.max_memory_allocated`` minus the allocation after the inputs; both after a warm-up step on 8 tokens
  (one-time set-up). Reported with and without the gradients the step must return (dq_s, dk_s, dW).
- time of the step: the first full-size step (after the compilation for the compiled one) is the one measured for
  memory, and is shown as "first"; the time is the median of the ``--repeats`` steps after it (eager reference: the
  one step after it), nearer to what a training loop sees. The first step is slower mostly in the operating
  system, which zeroes the fresh pages of the returned gradients and of the process's new heap: the kernel (system)
  CPU seconds of every step are recorded beside its time.

It also measures this machine's copy bandwidth (bytes read + written per second by a large tensor copy) and fp32
matrix-multiply rate (a 2048^3 ``torch.mm``), and prints the roofline floor of the fused step: the larger of
(inputs read once + gradients written once) / bandwidth and (the head mixing and its dW product,
4 (Hs Ht + Hs_kv Ht_kv) D FLOPs per token) / matmul rate; and the floor the fused step is held to: that compute
time plus the time this machine needs to write the gradients' bytes into freshly allocated memory (page faults and
zeroing by the operating system), a cost every implementation that returns new gradient tensors pays and that the
copy bandwidth does not include.

Outputs: a table on stdout (also as Markdown for benchmarks/RESULTS.md), ``<out>/memory_150img_<device>_<student>.json``
and a plot ``.png`` beside it. ``--quick`` (for the test suite): one timed step per variant, small calibration sizes.

Example::

    python benchmarks/memory_150img.py                     # the full run (CPU: several minutes)
    python benchmarks/memory_150img.py --images 1 2 --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from workload import (HEAD_DIM, SECTION, STUDENTS, TEACHER, inv_freq, proc_status_bytes, reset_peak_rss,
                      vhs_prompt)

VARIANTS = ("reference", "compiled", "fused")  # eager reference, torch.compile of the reference, fused backend


def worker(variant: str, student: str, positions_path: str, repeats: int) -> dict:
    """One variant in this (fresh) process: build inputs, measure one forward + backward, return the record."""
    import laid_kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "reference" if variant != "fused" else ("triton" if device.type == "cuda" else "cpu")
    # The compiled variant: torch.compile of the reference's definition (static shapes: one compilation per size).
    loss_fn = (torch.compile(laid_kernels.reference.qk_align_loss, dynamic=False) if variant == "compiled"
               else lambda *args: laid_kernels.qk_align_loss(*args, backend=backend))
    hs, hs_kv = STUDENTS[student]
    ht, ht_kv = TEACHER
    bf16 = dict(dtype=torch.bfloat16, device=device)
    frequencies = inv_freq(device)

    def inputs(positions: torch.Tensor) -> dict:
        """bf16 q / k of both models as views of q_proj / k_proj outputs [1, N, H * D], fp32 mixing weights."""
        seq = positions.shape[-1]

        def projection(heads: int) -> torch.Tensor:
            return torch.empty(1, seq, heads * HEAD_DIM, **bf16).normal_().view(1, seq, heads, HEAD_DIM)

        generator = torch.Generator().manual_seed(0)
        return dict(q_s=projection(hs).requires_grad_(), k_s=projection(hs_kv).requires_grad_(), q_t=projection(ht),
                    k_t=projection(ht_kv),
                    w_q=(torch.randn(hs, ht, generator=generator) / ht ** 0.5).to(device).requires_grad_(),
                    w_k=(torch.randn(hs_kv, ht_kv, generator=generator) / ht_kv ** 0.5).to(device).requires_grad_(),
                    positions=positions, inv_freq=frequencies)

    def step(x: dict) -> tuple[float, float]:
        """One forward + backward: (wall seconds, kernel (system) CPU seconds of all threads)."""
        for name in ("q_s", "k_s", "w_q", "w_k"):
            x[name].grad = None
        system_start = os.times().system
        start = time.perf_counter()
        loss = loss_fn(x["q_s"], x["k_s"], x["q_t"], x["k_t"], x["w_q"], x["w_k"], x["positions"], x["inv_freq"],
                       SECTION)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, os.times().system - system_start

    positions = torch.load(positions_path).to(device)
    # Warm-up on 8 tokens: one-time set-up of the first call (loading or building the compiled library, lazily
    # imported modules, dispatcher caches, the thread pool) is not memory of the step.
    step(inputs(positions[..., :8].contiguous()))
    x = inputs(positions)
    # The compiled reference compiles for this size on its first call: timed apart, not measured for memory.
    compile_s = step(x)[0] if variant == "compiled" else None
    seq = positions.shape[-1]
    input_bytes = sum(t.nbytes for t in x.values())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
        baseline = proc_status_bytes("VmRSS")
    steps = [step(x)]  # the memory step, then the timed ones
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_status_bytes("VmHWM")
    grad_bytes = sum(x[name].grad.nbytes for name in ("q_s", "k_s", "w_q", "w_k"))
    steps += [step(x) for _ in range(repeats)]
    times, system_s = (list(column) for column in zip(*steps))
    return dict(variant=variant, backend=backend, device=device.type, student=student, tokens=seq,
                input_bytes=input_bytes, grad_bytes=grad_bytes, extra_bytes=peak - baseline,
                extra_beyond_grads_bytes=peak - baseline - grad_bytes, time_s=statistics.median(times[1:]),
                times_s=times, system_s=system_s, threads=torch.get_num_threads(),
                compile_s=compile_s)


def machine_rates(quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and fp32 matmul rate (FLOP/s) of this machine, best of 5."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def best(fn, runs=5) -> float:
        fn()
        timings = []
        for _ in range(runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
        return min(timings)

    elements = (16 if quick else 256) * 2 ** 20 // 4
    src, dst = torch.empty(elements, device=device).normal_(), torch.empty(elements, device=device)
    bandwidth = 2 * src.nbytes / best(lambda: dst.copy_(src))
    n = 512 if quick else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    rate = 2 * n ** 3 / best(lambda: torch.mm(a, b))
    # Writing freshly allocated memory (what a returned gradient is): includes the operating system's page faults
    # and page zeroing, which the copy above (into memory already in use) does not pay.
    first_touch = src.nbytes / best(lambda: torch.empty(elements, device=device).fill_(1.0))
    return dict(copy_bytes_per_s=bandwidth, matmul_flop_per_s=rate, first_touch_bytes_per_s=first_touch)


def roofline_s(record: dict, rates: dict) -> float:
    """Floor of the fused step: max(minimal bytes / bandwidth, mixing FLOPs / matmul rate)."""
    hs, hs_kv = STUDENTS[record["student"]]
    ht, ht_kv = TEACHER
    flops = 4 * (hs * ht + hs_kv * ht_kv) * HEAD_DIM * record["tokens"]
    minimal_bytes = record["input_bytes"] + record["grad_bytes"]
    return max(minimal_bytes / rates["copy_bytes_per_s"], flops / rates["matmul_flop_per_s"])


def fresh_gradients_s(record: dict, rates: dict) -> float:
    """Time this machine takes to write the returned gradients into freshly allocated memory (first touch)."""
    return record["grad_bytes"] / rates["first_touch_bytes_per_s"]


def floor_s(record: dict, rates: dict) -> float:
    """The floor the fused step is held to (within 2x): the mixing FLOPs at this machine's measured fp32 matmul
    rate plus the first touch of the returned gradients' fresh memory."""
    hs, hs_kv = STUDENTS[record["student"]]
    ht, ht_kv = TEACHER
    flops = 4 * (hs * ht + hs_kv * ht_kv) * HEAD_DIM * record["tokens"]
    return flops / rates["matmul_flop_per_s"] + fresh_gradients_s(record, rates)


def machine_description() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}"


def run(images: list[int], student: str, repeats: int, quick: bool, out: Path) -> dict:
    """Every (images, variant) in a fresh process; returns and writes the results."""
    import laid_kernels

    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    rates = machine_rates(quick)
    # The workers import laid_kernels from where this process found it (an installed package or a checkout).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(laid_kernels.__file__).parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in images:
            positions_path = str(Path(tmp) / f"positions_{count}.pt")
            torch.save(vhs_prompt(count).positions, positions_path)
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--worker", variant, "--positions", positions_path,
                           "--student", student, "--repeats", str(1 if variant == "reference" else repeats)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode:
                    raise RuntimeError(f"{variant} at {count} images failed:\n{done.stderr[-4000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                record["images"] = count
                if variant == "fused":
                    record["roofline_s"] = roofline_s(record, rates)
                    record["fresh_gradients_s"] = fresh_gradients_s(record, rates)
                    record["floor_s"] = floor_s(record, rates)
                records.append(record)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=machine_description(), student=student, rates=rates, records=records,
                  load_average_start=load_start, load_average=os.getloadavg(),
                  loss=dict(normalize="student", mixing="head"))
    stem = out / f"memory_150img_{records[0]['device']}_{student}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    return result


def table(result: dict) -> str:
    """The results as a Markdown table, one row per image count."""
    by = {(r["images"], r["variant"]): r for r in result["records"]}
    gib = 2 ** 30
    lines = ["| images | tokens | inputs GiB | ref extra GiB | ref time s | compiled ref time s (compile s) "
             "| fused extra GiB (beyond grads) | fused extra beyond grads / inputs | fused time s, median (first) "
             "| fused kernel (OS) CPU s, median (first) | vs eager | vs compiled | floor s | fused / floor "
             "| roofline s | first touch of the gradients s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for count in sorted({r["images"] for r in result["records"]}):
        ref, compiled, fused = by[(count, "reference")], by[(count, "compiled")], by[(count, "fused")]
        lines.append(
            f"| {count} | {fused['tokens']} | {fused['input_bytes'] / gib:.3f} "
            f"| {ref['extra_bytes'] / gib:.3f} | {ref['time_s']:.3f} "
            f"| {compiled['time_s']:.3f} ({compiled['compile_s']:.1f}) "
            f"| {fused['extra_bytes'] / gib:.3f} ({fused['extra_beyond_grads_bytes'] / gib:.4f}) "
            f"| {fused['extra_beyond_grads_bytes'] / fused['input_bytes']:.2%} | {fused['time_s']:.3f} "
            f"({fused['times_s'][0]:.3f}) "
            f"| {statistics.median(fused['system_s'][1:]):.3f} ({fused['system_s'][0]:.3f}) "
            f"| {ref['time_s'] / fused['time_s']:.1f}x | {compiled['time_s'] / fused['time_s']:.1f}x "
            f"| {fused['floor_s']:.3f} | {fused['time_s'] / fused['floor_s']:.2f}x | {fused['roofline_s']:.3f} "
            f"| {fused['fresh_gradients_s']:.3f} |")
    rates = result["rates"]
    lines.append(f"\n{result['date']}, {result['machine']}, student {result['student']} against the 32B teacher, "
                 f"L_qk normalize={result['loss']['normalize']!r}, {result['loss']['mixing']} mixing; "
                 f"copy bandwidth {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), fp32 matmul "
                 f"{rates['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s, first-touch write of fresh memory "
                 f"{rates['first_touch_bytes_per_s'] / 1e9:.2f} GB/s; load average at the start "
                 f"{result['load_average_start'][0]:.1f}, at the end {result['load_average'][0]:.1f} (other "
                 f"processes share the cores).")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, timing) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        rows = sorted((r for r in result["records"] if r["variant"] == variant), key=lambda r: r["images"])
        images = [r["images"] for r in rows]
        memory.plot(images, [r["extra_bytes"] / 2 ** 30 for r in rows], "o-", label=f"{variant} ({rows[0]['backend']})")
        timing.plot(images, [r["time_s"] for r in rows], "o-", label=f"{variant} ({rows[0]['backend']})")
        if variant == "fused":
            memory.plot(images, [r["grad_bytes"] / 2 ** 30 for r in rows], "k:", label="returned gradients")
            timing.plot(images, [r["floor_s"] for r in rows], "k--", label="floor: matmul FLOPs + first touch")
    memory.set(xlabel="images", ylabel="extra memory beyond inputs (GiB)", title="Peak memory of L_qk fwd+bwd")
    timing.set(xlabel="images", ylabel="seconds", title="Time of L_qk fwd+bwd", yscale="log")
    for ax in (memory, timing):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['machine']} ({result['date']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 10, 50, 100, 150])
    parser.add_argument("--student", choices=sorted(STUDENTS), default="7b")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps of the fused and compiled variants after the memory step (median)")
    parser.add_argument("--quick", action="store_true", help="one timed step per variant, small calibration (tests)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--positions", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.student, args.positions, args.repeats)))
        return
    if any(count < 1 for count in args.images) or args.repeats < 1:
        parser.error("--images and --repeats must be positive")
    result = run(args.images, args.student, 1 if args.quick else args.repeats, args.quick, args.out)
    print(table(result))


if __name__ == "__main__":
    main()
