"""GPU truth: validate and time every fused op against its reference on this machine, in one command.

    python -m laid_kernels.selfcheck [--out DIR] [--quick]      (also: laid selfcheck)

On a CUDA machine (budget: under 8 minutes on one H100 / H200) it runs, for the Triton backend:

1. Accuracy: every op and form (``apply_mrope``; ``qk_align_loss`` with each ``normalize`` and head / frequency
   mixing; ``attn_match_loss`` with each ``target`` and ``divergence`` under head mixing, and both targets under
   frequency mixing) at the real shapes of the 7B and 3B students against the 32B teacher (q / kv heads 28 / 4 and
   16 / 2 against 40 / 8, head_dim 128) on a 3-image prompt (1,119 tokens) whose M-RoPE positions start at
   ACCURACY_FIRST_POSITION (4,900: where the last images of a 150-image prompt are, so the angles are as large),
   fp32, bf16 and fp16 inputs, with random upstream gradients. A form a backend does not implement
   (NotImplementedError) is a failed check. The six (pair, dtype) jobs run in parallel processes (spawn), so that
   their Triton compilations (each job compiles its own specialisations) share the CPU cores.
   Flash-attention-style tolerance: the error of the kernel against a float64 evaluation of the reference must be
   within 2x (3x for gradients) of the error of the reference itself on the same inputs, run in the same precision
   (the larger of its errors with and without TF32 matmuls), plus a floor of 1e-6 of the result's scale.
2. Determinism: 20 runs of each op give the same bits (loss and every gradient).
3. Timing: forward + backward at 1, 10, 50, 100 and 150 images (a Visual Haystacks-shaped prompt, 7B / 32B) for the
   fused kernels, eager PyTorch (the reference) and ``torch.compile`` of the reference (``dynamic=True``, compiled
   once per op), with ``triton.testing.do_bench`` and ``torch.cuda.max_memory_allocated``; a variant that runs out
   of memory is reported as such.
4. One bf16 training step of tiny Qwen2.5-VL models with sdpa and, when flash-attn imports, flash_attention_2.

It prints a table, writes ``selfcheck.json`` to ``--out`` (with each phase's seconds), and exits 1 if any check
failed. On a machine without a GPU it says so and exits 0 without checking anything.

Time budget, by design (a prediction: no GPU has run this yet): accuracy about 1.5 min (about 45 Triton
specialisations per (pair, dtype) job at 1 to 2 s of compilation each, six jobs on at least six cores, plus the
float64 references at 1,119 tokens), determinism under 0.5 min (13 op forms, 20 runs at 1,119 tokens),
timing about 3.5 min (dominated by ``torch.compile`` of the three references, about 1 min each; the largest
eager run, 150 images, takes well under a second per call), the training steps under 1 min: about 6.5 min on one
H100 / H200, under the 8-minute budget; the JSON's ``phase_seconds`` shows where a real run differs.

``--device cpu`` runs the same code on the CPU backends at small shapes (the test suite uses it, so that the script
cannot rot); ``--quick`` keeps only the smallest shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from . import apply_mrope, attn_match_loss, available_backends, qk_align_loss

SECTION = (16, 24, 24)
HEAD_DIM = 128
PAIRS = {"7b/32b": (28, 4, 40, 8), "3b/32b": (16, 2, 40, 8)}
TOKENS_PER_IMAGE = 357  # a 17 x 21 merged grid
TIMING_IMAGES = (1, 10, 50, 100, 150)
ACCURACY_FIRST_POSITION = 4900  # about where the last images of a 150-image prompt sit (150 x 33 positions)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VALUE_FACTOR, GRAD_FACTOR, FLOOR = 2.0, 3.0, 1e-6
QK_FORMS = [dict(normalize=n, mixing=m) for n in ("student", "target", "none") for m in ("head", "frequency")]
ATTN_FORMS = [dict(target=t, divergence=d, mixing="head") for t in ("teacher", "mixed") for d in ("forward", "reverse")]
ATTN_FORMS += [dict(target=t, divergence="forward", mixing="frequency") for t in ("teacher", "mixed")]


# --- inputs ---------------------------------------------------------------------------------------------------
def vhs_positions(images: int, text: int = 12, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, 1, N] of a prompt of ``images`` 17 x 21-token images between text runs of ``text``
    tokens, following Qwen2.5-VL's rule (text: t = h = w = index; an image: t fixed, h / w its grid, offset by
    the next free index; text after it resumes at the largest position + 1), starting at position ``first``, and
    its query rows [1, N] (the closing text run: what the trainer's L_attn matches)."""
    rows, query, start = [], [], first
    for _ in range(images):
        rows.append(torch.arange(start, start + text).repeat(3, 1))
        query += [False] * text
        start += text
        h, w = torch.meshgrid(torch.arange(17), torch.arange(21), indexing="ij")
        rows.append(torch.stack([torch.full((17 * 21,), start), start + h.flatten(), start + w.flatten()]))
        query += [False] * (17 * 21)
        start += 21
    rows.append(torch.arange(start, start + text).repeat(3, 1))
    query += [True] * text
    return torch.cat(rows, dim=1)[:, None], torch.tensor(query)[None]


def inv_freq(device) -> torch.Tensor:
    return 1.0 / 1e6 ** (torch.arange(HEAD_DIM // 2, dtype=torch.float32, device=device) * 2 / HEAD_DIM)


def make_inputs(pair: tuple[int, int, int, int], images: int, dtype: torch.dtype, device, seed: int = 0,
                first_position: int = 0) -> dict:
    """Random Q/K at the pair's head counts (scaled like real q_proj outputs), head- and frequency-mixing weights,
    positions (from ``first_position``) and query rows of an ``images``-image prompt, all on ``device``."""
    g = torch.Generator().manual_seed(seed)
    hs, hs_kv, ht, ht_kv = pair
    positions, query = vhs_positions(images, first=first_position)
    n = positions.shape[-1]

    def heads(h):
        return (3 * torch.randn(1, n, h, HEAD_DIM, generator=g)).to(device=device, dtype=dtype)

    def weights(rows, cols):
        return {"head": torch.randn(rows, cols, generator=g) / cols ** 0.5,
                "frequency": torch.randn(rows, cols, HEAD_DIM // 2, 2, generator=g) / cols ** 0.5}

    return {"q_s": heads(hs), "k_s": heads(hs_kv), "q_t": heads(ht), "k_t": heads(ht_kv),
            "w_q": {k: v.to(device) for k, v in weights(hs, ht).items()},
            "w_k": {k: v.to(device) for k, v in weights(hs_kv, ht_kv).items()},
            "positions": positions.to(device), "query_mask": query.to(device), "inv_freq": inv_freq(device)}


# --- one op as a function of its differentiable inputs -------------------------------------------------------------
def op_runner(op: str, form: dict, inputs: dict, backend: str) -> tuple[Callable, list[torch.Tensor]]:
    """(fn, leaves): ``fn(*leaves)`` evaluates the op in ``form`` with ``backend``; leaves are its
    differentiable inputs (fresh copies that require grad)."""
    section, positions, freq = SECTION, inputs["positions"], inputs["inv_freq"]
    if op == "apply_mrope":
        leaves = [inputs["q_s"].detach().clone().requires_grad_()]
        return (lambda x: apply_mrope(x, positions, freq, section, backend=backend)), leaves
    mixing = form.get("mixing", "head")
    w_q, w_k = inputs["w_q"][mixing], inputs["w_k"][mixing]
    q_t, k_t = inputs["q_t"], inputs["k_t"]
    if op == "qk_align_loss":
        leaves = [inputs[k].detach().clone().requires_grad_() for k in ("q_s", "k_s")]
        leaves += [w.detach().clone().requires_grad_() for w in (w_q, w_k)]
        return (lambda q, k, wq, wk: qk_align_loss(q, k, q_t, k_t, wq, wk, positions, freq, section,
                                                   normalize=form["normalize"], backend=backend)), leaves
    leaves = [inputs[k].detach().clone().requires_grad_() for k in ("q_s", "k_s")]
    return (lambda q, k: attn_match_loss(q, k, q_t, k_t, w_q, w_k, positions, freq, section, inputs["query_mask"],
                                         progress=0.5, target=form["target"], divergence=form["divergence"],
                                         backend=backend)), leaves


def value_and_grads(fn: Callable, leaves: list[torch.Tensor], upstream: torch.Tensor | None = None):
    """(output, upstream, gradients of every leaf) for ``(output * upstream).sum()`` (random upstream if None)."""
    out = fn(*leaves)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, torch.float64)
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
    return out.detach(), upstream, [g.detach() for g in grads]


def _error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-30))


# --- 1. accuracy --------------------------------------------------------------------------------------------------
def check_accuracy(op: str, form: dict, inputs: dict, backend: str) -> dict:
    """The op's error against float64 truth, beside the reference's own error in the inputs' precision."""
    fn, leaves = op_runner(op, form, inputs, backend)
    out, upstream, grads = value_and_grads(fn, leaves)
    ref_fn, ref_leaves = op_runner(op, form, inputs, "reference")
    truth_leaves = [leaf.detach().double().requires_grad_() for leaf in ref_leaves]
    true_out, _, true_grads = value_and_grads(ref_fn, truth_leaves, upstream)
    baseline = []
    for tf32 in (False, True):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            baseline.append(value_and_grads(ref_fn, ref_leaves, upstream))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    value_error = _error(out, true_out)
    value_bound = VALUE_FACTOR * max(_error(b[0], true_out) for b in baseline) + FLOOR
    grad_errors = [_error(g, t) for g, t in zip(grads, true_grads)]
    grad_bounds = [GRAD_FACTOR * max(_error(b[2][k], t) for b in baseline) + FLOOR for k, t in enumerate(true_grads)]
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    passed = finite and value_error <= value_bound and all(e <= b for e, b in zip(grad_errors, grad_bounds))
    return {"value_error": value_error, "value_bound": value_bound, "grad_errors": grad_errors,
            "grad_bounds": grad_bounds, "finite": finite, "passed": passed}


# --- 2. determinism -----------------------------------------------------------------------------------------------
def check_determinism(op: str, form: dict, inputs: dict, backend: str, runs: int = 20) -> dict:
    """Whether ``runs`` evaluations give the same bits for the output and every gradient."""
    fn, leaves = op_runner(op, form, inputs, backend)
    first_out, upstream, first_grads = value_and_grads(fn, leaves)
    differing = 0
    for _ in range(runs - 1):
        out, _, grads = value_and_grads(fn, leaves, upstream)
        same = torch.equal(out, first_out) and all(torch.equal(g, f) for g, f in zip(grads, first_grads))
        differing += not same
    return {"runs": runs, "differing_runs": differing, "passed": differing == 0}


# --- 3. timing ----------------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA, the median of 3 timed calls on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=50))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[1]


def time_variant(op: str, form: dict, inputs: dict, variant: str, backend: str, device: torch.device,
                 compiled: dict) -> dict:
    """Forward + backward time and peak memory of ``variant`` ("fused", "eager" or "compiled")."""
    fn, leaves = op_runner(op, form, inputs, "reference" if variant != "fused" else backend)
    if variant == "compiled":
        fn = compiled.setdefault((op, json.dumps(form)), torch.compile(fn, dynamic=True))

    def step():
        out = fn(*leaves)
        torch.autograd.grad(out.float().sum(), leaves)

    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        ms = time_ms(step, device)
        extra = (torch.cuda.max_memory_allocated() - before) / 2 ** 30 if device.type == "cuda" else None
        return {"ms": ms, "peak_extra_gib": extra}
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_extra_gib": None, "error": "out of memory"}


# --- 4. a training step -------------------------------------------------------------------------------------------
def training_step(attn_implementation: str, device: torch.device) -> dict:
    """One LAid optimizer step of tiny Qwen2.5-VL models (bf16 on CUDA); whether every logged loss is finite."""
    from laid import train
    from laid.data import synth_haystacks
    from laid.tiny import TINY_STUDENT, TINY_TEACHER, save_tiny_model, save_tiny_processor, tiny_qwen25vl_config

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        save_tiny_processor(root / "processor")
        save_tiny_model(root / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
        save_tiny_model(root / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
        data = synth_haystacks(root / "synth", n_entries=2, min_images=2, max_images=3, seed=0)
        start = time.perf_counter()
        summary = train(teacher=str(root / "teacher"), student=str(root / "student"),
                        processor=str(root / "processor"), data=str(data), image_root=str(root / "synth"),
                        output_dir=str(root / "run"), attn_implementation=attn_implementation,
                        precision="bf16" if device.type == "cuda" else "fp32", max_steps=1, grad_accum=1,
                        num_workers=0)
        losses = {k: v for k, v in summary["final_metrics"].items() if k in ("qk", "attn", "kl", "sft", "loss")}
    finite = all(math.isfinite(v) for v in losses.values())
    return {"attn_implementation": attn_implementation, "seconds": time.perf_counter() - start, "losses": losses,
            "passed": finite}


# --- the command --------------------------------------------------------------------------------------------------
OPS = ("apply_mrope", "qk_align_loss", "attn_match_loss")


def forms(op: str) -> list[dict]:
    return {"apply_mrope": [{}], "qk_align_loss": QK_FORMS, "attn_match_loss": ATTN_FORMS}[op]


def fused_backend(op: str, device: torch.device) -> str:
    """The fused backend checked for ``op``: Triton on CUDA; on CPU the native backend (else Triton under the
    interpreter, else the reference)."""
    choices = ("triton",) if device.type == "cuda" else ("cpu", "triton")
    return next((b for b in choices if b in available_backends(op, device)), "reference")


def guarded(check: Callable, op: str, form: dict, inputs: dict, backend: str, **kwargs) -> dict:
    """``check(op, form, inputs, backend)``, or a failed result naming the error where the backend does not
    implement the form (NotImplementedError: a failed check, never skipped)."""
    try:
        return check(op, form, inputs, backend, **kwargs)
    except NotImplementedError as error:
        return {"passed": False, "error": f"NotImplementedError: {error}"}


def accuracy_job(device: str, pair: str, dtype: str, images: tuple[int, ...]) -> list[dict]:
    """The accuracy checks of every op and form for one student / teacher pair and input dtype (on CUDA each such
    job runs in its own process, so that the Triton compilations of the jobs run in parallel)."""
    rows = []
    for count in images:
        inputs = make_inputs(PAIRS[pair], count, DTYPES[dtype], torch.device(device),
                             first_position=ACCURACY_FIRST_POSITION)
        for op in OPS:
            backend = fused_backend(op, inputs["q_s"].device)
            for form in forms(op):
                rows.append({"op": op, "form": form, "pair": pair, "dtype": dtype, "images": count, "backend": backend,
                             **guarded(check_accuracy, op, form, inputs, backend)})
    return rows


def run(device: torch.device, quick: bool) -> dict:
    """Every check and timing on ``device`` (see the module docstring); the JSON-able report."""
    from . import selfcheck  # this module by its import name (also under ``python -m``), for worker processes

    cuda = device.type == "cuda"
    report = {"accuracy": [], "determinism": [], "timing": [], "training": []}
    phases, started = {}, time.perf_counter()
    jobs = [(str(device), pair, dtype, (1,) if quick or not cuda else (3,))
            for pair in (list(PAIRS)[:1] if quick else PAIRS) for dtype in DTYPES]
    if cuda:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=context) as pool:
            results = list(pool.map(selfcheck.accuracy_job, *zip(*jobs)))
    else:
        results = [accuracy_job(*job) for job in jobs]
    report["accuracy"] = [row for rows in results for row in rows]
    phases["accuracy"] = time.perf_counter() - started
    started = time.perf_counter()
    inputs = make_inputs(PAIRS["7b/32b"], jobs[0][3][-1], torch.bfloat16, device)
    for op in OPS:
        backend = fused_backend(op, device)
        for form in forms(op):
            report["determinism"].append({"op": op, "form": form, "backend": backend,
                                          **guarded(check_determinism, op, form, inputs, backend,
                                                    runs=20 if cuda else 3)})
    phases["determinism"] = time.perf_counter() - started
    started = time.perf_counter()
    compiled: dict = {}
    for op, form in (("apply_mrope", {}), ("qk_align_loss", QK_FORMS[0]), ("attn_match_loss", ATTN_FORMS[0])):
        backend = fused_backend(op, device)
        for images in (1,) if quick or not cuda else TIMING_IMAGES:
            inputs = make_inputs(PAIRS["7b/32b"], images, torch.bfloat16, device)
            for variant in ("fused", "eager", "compiled"):
                report["timing"].append({"op": op, "form": form, "images": images, "variant": variant,
                                         "tokens": inputs["positions"].shape[-1],
                                         **time_variant(op, form, inputs, variant, backend, device, compiled)})
    phases["timing"] = time.perf_counter() - started
    started = time.perf_counter()
    implementations = ["sdpa"]
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    report["training"] = [training_step(impl, device) for impl in implementations]
    phases["training"] = time.perf_counter() - started
    report["phase_seconds"] = phases
    return report


def failures(report: dict) -> list[str]:
    """One line per failed check."""
    lines = [f"accuracy {r['op']} {r['form']} {r['pair']} {r['dtype']}: " + (r["error"] if "error" in r else
             f"value {r['value_error']:.2e} (bound {r['value_bound']:.2e}), grads "
             f"{[f'{e:.2e}' for e in r['grad_errors']]} (bounds {[f'{b:.2e}' for b in r['grad_bounds']]})")
             for r in report["accuracy"] if not r["passed"]]
    lines += [f"determinism {r['op']} {r['form']}: " + (r["error"] if "error" in r else
              f"{r['differing_runs']} of {r['runs']} runs differ") for r in report["determinism"] if not r["passed"]]
    lines += [f"training step ({r['attn_implementation']}): losses {r['losses']}" for r in report["training"]
              if not r["passed"]]
    return lines


def table(report: dict) -> str:
    """The timing table (ms per forward + backward, and the fused speed-ups) as markdown."""
    lines = ["| op | images | tokens | fused ms | eager ms | compiled ms | fused vs eager | fused vs compiled |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["op"], r["images"]) for r in report["timing"]}, key=lambda k: (k[0], k[1]))
    for op, images in keys:
        row = {r["variant"]: r for r in report["timing"] if (r["op"], r["images"]) == (op, images)}

        def ms(variant):
            value = row[variant]["ms"]
            return "OOM" if value is None else f"{value:.3f}"

        def ratio(variant):
            fused, other = row["fused"]["ms"], row[variant]["ms"]
            return "-" if fused is None or other is None else f"{other / fused:.1f}x"

        lines.append(f"| {op} | {images} | {row['fused']['tokens']} | {ms('fused')} | {ms('eager')} | "
                     f"{ms('compiled')} | {ratio('eager')} | {ratio('compiled')} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The self-check's options (``python -m laid_kernels.selfcheck`` and ``laid selfcheck``)."""
    parser.add_argument("--out", type=Path, default=Path("selfcheck"), help="folder for selfcheck.json")
    parser.add_argument("--device", help="cuda (default when available) or cpu (small shapes, for tests)")
    parser.add_argument("--quick", action="store_true", help="only the smallest shapes and one pair")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m laid_kernels.selfcheck", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return check(parser.parse_args(argv))


def check(args: argparse.Namespace) -> int:
    """Run the self-check for parsed options; the exit status (0: passed, or no GPU)."""
    if args.device is None and not torch.cuda.is_available():
        print("laid selfcheck: no CUDA device on this machine: nothing was checked or timed, and no GPU figure "
              "exists from this run (use --device cpu for the CPU backends at small shapes)")
        return 0
    device = torch.device(args.device or "cuda")
    started = time.perf_counter()
    report = run(device, args.quick)
    report["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": (torch.cuda.get_device_name(device)
                      if device.type == "cuda" else platform.processor() or platform.machine()),
                      "torch": torch.__version__, "seconds": time.perf_counter() - started}
    failed = failures(report)
    report["failed"] = failed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selfcheck.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"laid selfcheck on {report['meta']['device']} ({report['meta']['date']}, "
          f"{report['meta']['seconds']:.0f} s): {len(report['accuracy'])} accuracy checks, "
          f"{len(report['determinism'])} determinism loops, {len(report['training'])} training steps")
    print(table(report))
    for line in failed:
        print(f"FAILED {line}")
    print("all checks passed" if not failed else f"{len(failed)} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
