"""Compile and memory-traffic report for the apply_mrope and qk_align_loss Triton kernels (no GPU needed).

1. Every launch of both ops for the 7B-student / 32B-teacher shapes (q heads 28 / 40, kv heads 4 / 8, head_dim 128,
   bf16) is compiled ahead of time for sm_80 and sm_90 (laid_kernels.aot): registers, shared memory, LOCAL (cuobjdump)
   and spill bytes (ptxas -v).
2. The kernels run under the Triton interpreter on a 7B/32B-shaped input of a few hundred tokens, with the block sizes
   of the GPU launch, while benchmarks/bytecount.py counts the bytes of every unmasked load / store lane. That is
   compared with the minimal traffic: every input read once, every returned gradient written once.
   For qk_align_loss (normalize="student", the default of objective version 2, in head mixing and in frequency
   mixing) the host-side torch ops of the forward are added analytically (the reduction of the per-program
   partials), and the backward's rescaling
   kernel (dL/dx_s,i = alpha_i G_i + beta_i w_n x_s,i: one read and one write of dq_s, dk_s and, for "student", one
   read of q_s, k_s) is counted under the interpreter too and reported separately, because it cannot be fused
   into the one pass (the per-head sums are known only at its end, grad_output only in backward).

GPU times below are predictions (bytes / 3.0e12 B/s, an H100's bandwidth), never measurements.

    python benchmarks/compile_report.py [--tokens 384] [--frequency-counts 8 16] [--out benchmarks/out]

Frequency mixing writes one [Hs, Ht, D/2, 2] dC partial per chunk of at least 2048 tokens
(laid_kernels.qk_align.MIN_TOKENS_PER_CHUNK), more than the interpreter can run at its GPU block size: it is
counted at two small token counts and combined linearly for 54K tokens (:func:`qk_align_frequency_traffic`).

Prints the tables (markdown), writes <out>/compile_report.json and <out>/compile_report.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before laid_kernels defines its kernels

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's laid_kernels, not an installed one

import torch  # noqa: E402
from bytecount import ByteCounter  # noqa: E402
from workload import HEAD_DIM, SECTION, STUDENTS, TEACHER, inv_freq  # noqa: E402

from laid_kernels import qk_align  # noqa: E402
from laid_kernels.aot import compile_in_subprocess  # noqa: E402
from laid_kernels.mrope import mrope_launch  # noqa: E402

HEADS = (*STUDENTS["7b"], *TEACHER)  # student q, student kv, teacher q, teacher kv
DTYPE = torch.bfloat16
BANDWIDTH = 3.0e12  # B/s, H100 HBM3: for predictions only
PREDICT_TOKENS = 54_000  # about 150 Visual Haystacks images


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def projection_view(seq: int, heads: int, generator: torch.Generator) -> torch.Tensor:
    """[1, seq, heads, HEAD_DIM] bf16, laid out as ``q_proj(h).view(1, seq, heads, HEAD_DIM)``."""
    return torch.randn(1, seq, heads * HEAD_DIM, generator=generator).to(DTYPE).view(1, seq, heads, HEAD_DIM)


def rope_inputs(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(seq).repeat(3, 1, 1) + 50_000
    return positions, inv_freq()


def qk_align_traffic(seq: int, mixing: str = "head") -> dict:
    """Counted and minimal bytes of qk_align_loss's fused pass and of its backward rescaling (normalize="student") on
    one [1, seq] sample with a valid mask, head or frequency ``mixing``, at the GPU's block sizes."""
    g = torch.Generator().manual_seed(0)
    hs, hs_kv, ht, ht_kv = HEADS
    q_s, k_s = projection_view(seq, hs, g), projection_view(seq, hs_kv, g)
    q_t, k_t = projection_view(seq, ht, g), projection_view(seq, ht_kv, g)
    per_frequency = (HEAD_DIM // 2, 2) if mixing == "frequency" else ()
    w_q, w_k = torch.randn(hs, ht, *per_frequency, generator=g), torch.randn(hs_kv, ht_kv, *per_frequency, generator=g)
    block_f = qk_align.FREQUENCY_BLOCK_F if mixing == "frequency" else qk_align.BLOCK_F
    positions, inv_freq = rope_inputs(seq)
    valid = torch.ones(1, seq, dtype=torch.bool)
    weight = valid.float()
    named = dict(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, w_q=w_q, w_k=w_k, positions=positions, inv_freq=inv_freq,
                 valid=valid, weight=weight)
    launches, rescales, partials = [], [], []
    for x_s, x_t, w, part in ((q_s, q_t, w_q, "q"), (k_s, k_t, w_k, "k")):
        grad, dw, sums = qk_align._outputs(x_s, w, block_f=block_f)
        alpha, beta = torch.rand(x_s.shape[2], generator=g), torch.rand(x_s.shape[2], generator=g)
        named.update({f"d{part}_s": grad, f"dw_{part} partials": dw, f"sums_{part}": sums, f"alpha_{part}": alpha,
                      f"beta_{part}": beta})
        launches.append(qk_align.qk_align_launch(x_s, x_t, w, positions, inv_freq, SECTION, None, valid, True, grad,
                                                 dw, sums, f"qk_align/{part}", block_f=block_f))
        rescales.append(qk_align.qk_rescale_launch(grad, x_s, weight, alpha, beta, f"qk_align/rescale/{part}"))
        partials.append((dw, sums))
    with ByteCounter(named) as counter:
        for launch in launches:
            launch.run()
    with ByteCounter(named) as backward:
        for launch in rescales:
            launch.run()
    # Host side of the forward: dw.sum(0) and sums.double().sum(0) read the partials and write [Hs, Ht] / [3 Hs + 1].
    reduction = sum(nbytes(dw, sums) + dw[0].numel() * 4 + sums[0].numel() * 8 for dw, sums in partials)
    gradients = nbytes(q_s, k_s, w_q, w_k)  # dq_s, dk_s, dw_q, dw_k have the inputs' shapes and dtypes
    minimal = nbytes(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, valid) + gradients
    return dict(mixing=mixing, tokens=seq, loads=dict(counter.loads), stores=dict(counter.stores),
                kernel=counter.total(), reduction=reduction, fused=counter.total() + reduction, minimal=minimal,
                backward_loads=dict(backward.loads), backward_stores=dict(backward.stores),
                backward_scaling=backward.total() + 2 * nbytes(w_q, w_k), programs=launches[0].grid[0])


def qk_align_frequency_traffic(counts: Sequence[int], tokens: int = PREDICT_TOKENS) -> dict:
    """Frequency mixing's traffic at ``tokens`` tokens, from byte counts at two small token counts.

    The interpreter runs the frequency kernel at its GPU block size (2 channel pairs per program, 32 programs per
    token chunk) far too slowly for the 2048-token chunks the GPU launches, so it is counted at ``counts`` (two
    token counts within one chunk) and combined linearly: by construction every load and store of the kernel is
    either per token (inputs, positions, mask, G) or per chunk (C, dC, sums, inv_freq), so
    kernel(n, chunks) = n * per_token + chunks * per_chunk exactly. The host-side reduction and the minimal bytes
    are computed for the real chunk count at ``tokens``. Returns a dict like :func:`qk_align_traffic`'s."""
    small, large = (qk_align_traffic(n, "frequency") for n in counts)
    span = large["tokens"] - small["tokens"]
    per_token = {key: (large[key] - small[key]) / span for key in ("kernel", "minimal", "backward_scaling")}
    per_chunk = small["kernel"] - small["tokens"] * per_token["kernel"]
    hs, hs_kv, ht, ht_kv = HEADS
    chunks = qk_align.launch_shape(torch.empty(1, tokens, hs, HEAD_DIM, device="meta"),
                                   torch.empty(hs, ht, HEAD_DIM // 2, 2, device="meta"),
                                   qk_align.FREQUENCY_BLOCK_F)[1]
    assert small["programs"] == large["programs"], "the counts must fall within one chunk"
    # dC partials [chunks, H_s, H_t, D/2, 2] and sums [chunks * programs per chunk, 3 H_s + 1] read once (fp32), the
    # reduced [H_s, H_t, D/2, 2] (fp32) and [3 H_s + 1] (fp64) written once, per part.
    reduction = sum(chunks * (h_s * h_t * HEAD_DIM * 4 + small["programs"] * (3 * h_s + 1) * 4)
                    + h_s * h_t * HEAD_DIM * 4 + (3 * h_s + 1) * 8 for h_s, h_t in ((hs, ht), (hs_kv, ht_kv)))
    kernel = tokens * per_token["kernel"] + chunks * per_chunk
    minimal = small["minimal"] + (tokens - small["tokens"]) * per_token["minimal"]
    backward = small["backward_scaling"] + (tokens - small["tokens"]) * per_token["backward_scaling"]
    return dict(mixing="frequency", tokens=tokens, counted_at=list(counts), chunks=chunks,
                programs=small["programs"] * chunks, kernel=kernel, per_token=per_token["kernel"],
                per_chunk=per_chunk, reduction=reduction, fused=kernel + reduction, minimal=minimal,
                backward_scaling=backward, loads=small["loads"], stores=small["stores"],
                backward_loads=small["backward_loads"], backward_stores=small["backward_stores"])


def mrope_traffic(seq: int) -> dict:
    """Counted and minimal bytes of apply_mrope's forward (and, identical, backward) on [1, seq, 28, 128]."""
    x = projection_view(seq, HEADS[0], torch.Generator().manual_seed(0))
    positions, inv_freq = rope_inputs(seq)
    out = torch.empty(x.shape, dtype=x.dtype)
    launch = mrope_launch(x, out, positions, inv_freq, SECTION, inverse=False)
    named = dict(x=x, out=out, positions=positions, inv_freq=inv_freq)
    with ByteCounter(named) as counter:
        launch.run()
    return dict(tokens=seq, loads=dict(counter.loads), stores=dict(counter.stores), kernel=counter.total(),
                minimal=nbytes(x, out, positions, inv_freq))


def compile_rows() -> list[dict]:
    """Every launch compiled for sm_80 and sm_90: apply_mrope at 512 tokens, and qk_align in every specialisation
    it launches with (``qk_align.aot_configurations``: 512 tokens with token weights, the trainer's flags at about
    54K tokens for bf16 / fp16 / fp32, head and frequency mixing, and without gradients)."""
    shapes = {"heads": list(HEADS), "tokens": 512, "head_dim": HEAD_DIM, "section": list(SECTION),
              "dtype": "bfloat16"}
    configurations = [("laid_kernels.mrope:aot_launches", shapes, "")]
    configurations += [("laid_kernels.qk_align:aot_launches", kwargs, f" ({label})" if label.startswith("trainer")
                        else "") for label, kwargs in qk_align.aot_configurations(shapes).items()]
    rows = []
    for factory, kwargs, label in configurations:
        for r in compile_in_subprocess(factory, kwargs, (80, 90)):
            rows.append(dict(name=r.name + label, arch=f"sm_{r.arch}", warps=r.num_warps, registers=r.registers,
                             shared=r.shared_bytes, local=r.local_bytes, stack=r.stack_bytes,
                             spill_stores=r.spill_store_bytes, spill_loads=r.spill_load_bytes,
                             constexprs={k: v for k, v in r.constexprs.items() if k.isupper()},
                             cos_approx="cos.approx" in r.ptx or "sin.approx" in r.ptx))
    return rows


def markdown(rows: list[dict], qks: list[dict], mrope: dict) -> str:
    lines = ["| kernel launch | arch | warps | REG | SHARED (B) | LOCAL (B) | spill st/ld (B) | STACK (B) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['arch']} | {r['warps']} | {r['registers']} | {r['shared']} | {r['local']} "
                     f"| {r['spill_stores']}/{r['spill_loads']} | {r['stack']} |")
    lines += ["", "Memory traffic, counted under the interpreter with the GPU block sizes (bf16, 7B student / 32B "
              "teacher heads; " + "; ".join(f"qk_align {qk['mixing']} mixing: {qk['tokens']} tokens" + (
                  f" (counted at {qk['counted_at'][0]} and {qk['counted_at'][1]} tokens, combined linearly for "
                  f"{qk['chunks']} chunks)" if "counted_at" in qk else "") + f", {qk['programs']} programs per part"
                  for qk in qks) + "):", "",
              "| pass | counted bytes/token | minimal bytes/token | counted / minimal | predicted H100 time at "
              f"{PREDICT_TOKENS // 1000}K tokens (prediction: bytes / 3.0e12 B/s) |",
              "|---|---|---|---|---|"]

    def row(label, counted, minimal, tokens):
        time_ms = counted / tokens * PREDICT_TOKENS / BANDWIDTH * 1e3
        lines.append(f"| {label} | {counted / tokens:,.0f} | {minimal / tokens:,.0f} | "
                     f"{counted / minimal:.3f} | {time_ms:.2f} ms (predicted) |")

    row("apply_mrope forward (q, 28 heads)", mrope["kernel"], mrope["minimal"], mrope["tokens"])
    for qk in qks:
        n, mixing = qk["tokens"], qk["mixing"]
        row(f"qk_align {mixing} mixing: fused loss + gradients (kernel + partial-sum reduction)", qk["fused"],
            qk["minimal"], n)
        row(f"qk_align {mixing} mixing: backward rescaling (alpha_i G + beta_i w x_s, normalize='student'), alone",
            qk["backward_scaling"], qk["minimal"], n)
        row(f"qk_align {mixing} mixing: forward + backward in all", qk["fused"] + qk["backward_scaling"],
            qk["minimal"], n)
    lines.append("")
    for qk in qks:
        lines += [f"qk_align {qk['mixing']} mixing, fused pass: {qk['fused'] / qk['minimal']:.3f} x minimal (target "
                  f"<= 1.10); with the backward's scaling: {(qk['fused'] + qk['backward_scaling']) / qk['minimal']:.3f}"
                  " x.", "",
                  f"qk_align {qk['mixing']} mixing, bytes by tensor (loads / stores): " + ", ".join(
                      f"{k} {v:,}" for k, v in sorted(qk["loads"].items())) + " / " + ", ".join(
                      f"{k} {v:,}" for k, v in sorted(qk["stores"].items())), "",
                  f"qk_align {qk['mixing']} mixing, backward bytes by tensor (loads / stores): " + ", ".join(
                      f"{k} {v:,}" for k, v in sorted(qk["backward_loads"].items())) + " / " + ", ".join(
                      f"{k} {v:,}" for k, v in sorted(qk["backward_stores"].items())), ""]
    return "\n".join(lines)


def plot(rows: list[dict], qks: list[dict], mrope: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    labels, counted, minimal = ["mrope fwd"], [mrope["kernel"] / mrope["tokens"]], [mrope["minimal"] / mrope["tokens"]]
    for qk in qks:
        labels += [f"qk_align {qk['mixing']}\nfused", f"qk_align {qk['mixing']}\nfused + bwd rescaling"]
        counted += [qk["fused"] / qk["tokens"], (qk["fused"] + qk["backward_scaling"]) / qk["tokens"]]
        minimal += [qk["minimal"] / qk["tokens"]] * 2
    xs = range(len(labels))
    left.bar([x - 0.2 for x in xs], [m / 1e3 for m in minimal], 0.4, label="minimal")
    left.bar([x + 0.2 for x in xs], [c / 1e3 for c in counted], 0.4, label="counted (interpreter)")
    for x, c, m in zip(xs, counted, minimal):
        left.text(x + 0.2, c / 1e3, f"{c / m:.2f}x", ha="center", va="bottom")
    left.set_xticks(list(xs), labels, fontsize=7)
    left.set_ylabel("kB per token")
    left.set_title("Global memory traffic, 7B/32B shapes, bf16")
    left.legend()
    names = list(dict.fromkeys(r["name"] for r in rows))
    for offset, arch in ((-0.2, "sm_80"), (0.2, "sm_90")):
        regs = [next(r["registers"] for r in rows if r["name"] == n and r["arch"] == arch) for n in names]
        right.bar([i + offset for i in range(len(names))], regs, 0.4, label=arch)
    right.axhline(255, color="gray", linestyle="--", linewidth=1)
    right.set_xticks(range(len(names)), names, fontsize=5, rotation=60, ha="right")
    right.set_ylabel("registers per thread")
    right.set_title("Registers (no spills in any build)" if not any(r["spill_stores"] for r in rows)
                    else "Registers (SPILLS present)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=384, help="tokens of the interpreted input (default 384)")
    parser.add_argument("--frequency-counts", type=int, nargs=2, default=(8, 16),
                        help="the two token counts at which frequency mixing is counted (default 8 16)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = compile_rows()
    mrope = mrope_traffic(args.tokens)
    qk = qk_align_traffic(args.tokens)
    frequency = qk_align_frequency_traffic(args.frequency_counts)
    report = markdown(rows, [qk, frequency], mrope)
    print(report)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=platform.platform(),
                cpu_count=os.cpu_count(), torch=torch.__version__, triton=__import__("triton").__version__,
                seconds=round(time.time() - start, 1))
    (args.out / "compile_report.json").write_text(json.dumps(dict(meta=meta, compile=rows, qk_align=qk,
                                                                  qk_align_frequency=frequency, mrope=mrope), indent=1))
    plot(rows, [qk, frequency], mrope, args.out / "compile_report.png")
    print(f"\nwrote {args.out / 'compile_report.json'} and {args.out / 'compile_report.png'} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
