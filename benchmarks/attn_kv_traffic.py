"""Teacher kv heads in the attn_match Triton kernels: re-mixed and re-rotated per key block, or pre-mixed once?

Each row program of ``_fwd_kernel`` / ``_dq_kernel`` (and ``_lse_kernel``) loads, per key block it streams, the
teacher's kv heads of that block and rotates them (target="teacher": all Ht_kv heads; target="mixed": all Ht_kv
heads, mixed by one row of w_k, then rotated); ``_dk_kernel`` does so once per block of row lanes. The alternative is
a pre-pass that writes the rotated (and mixed) teacher keys once, fp32 (the kernels compute in fp32 from the inputs;
a bf16 buffer would round them a second time), which every program then reads instead.

This script counts both from the kernels' loop structure (:func:`model`, exact for the grid and masks the kernels
use) at the 150-image prompt of benchmarks/workload.py, 7B student (28 / 4) against the 32B teacher (40 / 8), bf16
keys: bytes the loads ask for, the kv work's FMA-unit FLOPs and, for scale, the tensor-core dot FLOPs. It checks the
model against benchmarks/bytecount.py on a small prompt under the Triton interpreter (the k_t and k_s bytes every
launch loads must agree exactly). Bytes requested are not DRAM bytes: the programs of a kv head stream the same keys
and a GPU's L2 serves most repeats; DRAM bytes lie between the unique bytes and the requested ones (not measured).

    python benchmarks/attn_kv_traffic.py [--images 150] [--out benchmarks/gpu_efficiency]

Prints the tables and writes <out>/attn_kv_traffic.json and <out>/attn_kv_traffic.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before laid_kernels defines its kernels (the cross-check)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's laid_kernels

import torch  # noqa: E402
from bytecount import ByteCounter  # noqa: E402
from workload import HEAD_DIM, SECTION, STUDENTS, TEACHER, vhs_prompt  # noqa: E402

from laid_kernels import aot, attn_match  # noqa: E402

HEADS = (*STUDENTS["7b"], *TEACHER)
BANDWIDTH = 3.0e12  # B/s, H100 HBM3: predictions only
ROTATE_FLOPS = 6  # per channel pair: lo cos - hi sin, lo sin + hi cos


def _row_programs(row_m: list[int], group: int, block_m: int) -> list[int]:
    """Keys streamed (n_end = last row's m + 1) by each row program over R * group lanes, rows ascending."""
    lanes = len(row_m) * group
    return [row_m[(min(lanes, p + block_m) - 1) // group] + 1 for p in range(0, lanes, block_m)]


def _dk_visits(row_m: list[int], seq: int, group: int, block_m: int, block_n: int) -> list[tuple[int, int]]:
    """(keys below seq, lane-block iterations) of each ``_dk_kernel`` key block (rows from the first reaching it)."""
    out = []
    for n0 in range(0, seq, block_n):
        first = next((i for i, m in enumerate(row_m) if m >= n0), len(row_m))
        out.append((min(block_n, seq - n0), math.ceil((len(row_m) - first) * group / block_m)))
    return out


def model(row_m: list[int], seq: int, heads=HEADS, dim: int = HEAD_DIM, element: int = 2) -> dict:
    """Per kernel and form: teacher-key bytes and student-key bytes the loads ask for, kv FLOPs (mixing + rotation
    of the teacher keys), dot FLOPs, and the same for the pre-mixed alternative; one sample, every key valid."""
    hs, hs_kv, ht, ht_kv = heads
    group, group_t, half = hs // hs_kv, ht // ht_kv, dim // 2
    bm, bn = attn_match.TRITON_BLOCK_M, attn_match.TRITON_BLOCK_N
    dbm, dbn = attn_match.TRITON_DK_BLOCK_M, attn_match.TRITON_DK_BLOCK_N
    row_keys = sum(_row_programs(row_m, group, bm)) * hs_kv  # key visits of all (lane block, kv head) programs
    lse_keys = sum(_row_programs(row_m, group_t, bm)) * ht_kv
    dk = _dk_visits(row_m, seq, group, dbm, dbn)
    dk_keys = sum(k * it for k, it in dk) * hs_kv  # key visits, re-done per lane-block iteration
    dk_once = seq * hs_kv  # each key block's own load and rotation of the student keys
    out = {}
    for target in ("teacher", "mixed"):
        teacher = target == "teacher"
        kv_heads = ht_kv  # teacher kv heads loaded per key visit (both forms)
        buffer_heads = ht_kv if teacher else 1  # heads of the pre-mixed buffer one program reads per key
        mix = 0 if teacher else ht_kv * dim * 2  # head mixing: a multiply-add per channel per teacher kv head
        rotate = (ht_kv if teacher else 1) * half * ROTATE_FLOPS
        lanes_dot = bm * dim * 2  # one [lanes, keys] logits dot per key, per head set
        logits = (1 + (ht if teacher else 1)) * lanes_dot
        kernels = {"forward": (row_keys, logits), "dq": (row_keys, logits + lanes_dot),
                   "dk": (dk_keys, (1 + (ht if teacher else 1)) * dbm * dim * 2 + dbm * dim * 2)}
        if teacher:
            kernels = {"teacher_lse": (lse_keys, None), **kernels}
        rows = {}
        for name, (visits, dot) in kernels.items():
            if name == "teacher_lse":  # one teacher kv head per program, no mixing
                kt, kv_flops, buffer, dots = visits * dim * element, visits * half * ROTATE_FLOPS, visits * dim * 4, \
                    visits * bm * dim * 2
            else:
                kt, kv_flops, buffer = visits * kv_heads * dim * element, visits * (mix + rotate), \
                    visits * buffer_heads * dim * 4
                dots = visits * dot
            ks = (dk_once if name == "dk" else visits if name != "teacher_lse" else 0) * dim * element
            rows[name] = dict(key_visits=visits, kt_bytes=kt, ks_bytes=ks, kv_flops=kv_flops, dot_flops=dots,
                              premixed_kt_bytes=buffer)
        buffer_bytes = seq * (ht_kv if teacher else hs_kv) * dim * 4
        out[target] = dict(kernels=rows, buffer_bytes=buffer_bytes,
                           prepass_bytes=seq * ht_kv * dim * element + buffer_bytes,
                           unique_kt_bytes=seq * ht_kv * dim * element)
    return out


def cross_check(seq: int = 96, rows: int = 5) -> dict:
    """Run the Triton kernels under the interpreter on a small prompt with the real heads, tiles and bf16 keys,
    counting each launch's k_t / k_s loads (benchmarks/bytecount.py), and compare them with :func:`model`."""
    g = torch.Generator().manual_seed(0)
    hs, hs_kv, ht, ht_kv = HEADS
    rand = lambda h: torch.randn(1, seq, h, HEAD_DIM, generator=g).to(torch.bfloat16)  # noqa: E731
    q_s, k_s, q_t, k_t = rand(hs).requires_grad_(), rand(hs_kv).requires_grad_(), rand(ht), rand(ht_kv)
    row_m = sorted(torch.randperm(seq, generator=g)[:rows].tolist())
    mask = torch.zeros(1, seq, dtype=torch.bool)
    mask[0, row_m] = True
    inv_freq = 1.0 / 1e6 ** (torch.arange(HEAD_DIM // 2) * 2 / HEAD_DIM)
    positions = torch.arange(seq).repeat(3, 1, 1)
    counted = {}
    original = aot.Launch.run

    def counting_run(launch):
        with ByteCounter({"k_t": k_t, "k_s": k_s}) as counter:
            original(launch)
        counted[launch.name] = dict(kt_bytes=counter.loads["k_t"], ks_bytes=counter.loads["k_s"])

    expected = model(row_m, seq)
    result = {}
    for target in ("teacher", "mixed"):
        counted.clear()
        aot.Launch.run = counting_run
        try:
            w_q = torch.randn(hs, ht, generator=g) / ht ** 0.5
            w_k = torch.randn(hs_kv, ht_kv, generator=g) / ht_kv ** 0.5
            attn_match.attn_match_loss(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, SECTION, mask,
                                       progress=0.5, target=target, backend="triton").backward()
        finally:
            aot.Launch.run = original
        for name, got in counted.items():
            kernel = name.split("/")[1]
            want = expected[target]["kernels"][kernel]
            if (got["kt_bytes"], got["ks_bytes"]) != (want["kt_bytes"], want["ks_bytes"]):
                raise AssertionError(f"{target} {name}: counted {got}, model {want['kt_bytes'], want['ks_bytes']}")
            result[f"{target} {kernel}"] = got
    return dict(seq=seq, row_m=row_m, counted=result)


def tables(counts: dict, seq: int, rows: int) -> str:
    lines = [f"150-image prompt: {seq:,} tokens, {rows} query rows; 7B / 32B heads, bf16 keys. Bytes and FLOPs "
             "summed over every program of the kernel (one forward + backward). 'requested': what the loads ask "
             "for (L2 or DRAM); kv FLOPs: the teacher keys' mixing and rotation (FMA units); dot FLOPs: TF32 mma.", "",
             "| target | kernel | key visits | teacher-key bytes requested (GB) | student-key bytes (GB) | kv GFLOP | "
             "dot GFLOP | kv / dot | pre-mixed: teacher-key bytes requested (GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for target, c in counts.items():
        for name, k in c["kernels"].items():
            lines.append(f"| {target} | {name} | {k['key_visits']:,} | {k['kt_bytes'] / 1e9:.2f} | "
                         f"{k['ks_bytes'] / 1e9:.3f} | {k['kv_flops'] / 1e9:.2f} | {k['dot_flops'] / 1e9:.1f} | "
                         f"{k['kv_flops'] / k['dot_flops']:.3f} | {k['premixed_kt_bytes'] / 1e9:.2f} |")
    lines += ["", "| target | unique teacher-key bytes (MB) | pre-mix buffer, fp32 (MB) | pre-pass DRAM bytes (MB) | "
              "pre-pass time, predicted (ms, bytes / 3.0e12) |", "|---|---|---|---|---|"]
    for target, c in counts.items():
        lines.append(f"| {target} | {c['unique_kt_bytes'] / 1e6:.0f} | {c['buffer_bytes'] / 1e6:.0f} | "
                     f"{c['prepass_bytes'] / 1e6:.0f} | {c['prepass_bytes'] / BANDWIDTH * 1e3:.3f} |")
    return "\n".join(lines)


def plot(counts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, now, premixed = [], [], []
    for target, c in counts.items():
        for name, k in c["kernels"].items():
            labels.append(f"{target}\n{name}")
            now.append(k["kt_bytes"] / 1e9)
            premixed.append(k["premixed_kt_bytes"] / 1e9)
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([i - 0.2 for i in x], now, 0.4, label="per key block (now): bf16 teacher kv heads")
    ax.bar([i + 0.2 for i in x], premixed, 0.4, label="pre-mixed fp32 buffer")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("teacher-key bytes requested (GB)")
    ax.set_title("attn_match at 150 images, 7B / 32B, bf16 (counted from the loop structure)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu_efficiency")
    args = parser.parse_args()
    check = cross_check()
    prompt = vhs_prompt(args.images)
    seq = prompt.query_mask.shape[-1]
    row_m = prompt.query_mask[0].nonzero().squeeze(1).tolist()
    counts = model(row_m, seq)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), images=args.images, tokens=seq,
                rows=len(row_m), heads=HEADS, tiles=[attn_match.TRITON_BLOCK_M, attn_match.TRITON_BLOCK_N,
                                                     attn_match.TRITON_DK_BLOCK_M, attn_match.TRITON_DK_BLOCK_N])
    (args.out / "attn_kv_traffic.json").write_text(json.dumps(dict(meta=meta, model=counts, cross_check=check),
                                                              indent=1))
    plot(counts, args.out / "attn_kv_traffic.png")
    print(f"{meta['date']}. Cross-check under the interpreter ({check['seq']} tokens, rows {check['row_m']}): every "
          f"launch's k_t / k_s bytes equal the model's ({len(check['counted'])} launches).\n")
    print(tables(counts, seq, len(row_m)))


if __name__ == "__main__":
    main()
