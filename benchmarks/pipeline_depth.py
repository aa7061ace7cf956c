"""Software-pipeline depth (``num_stages``) of the L_qk and L_attn Triton kernels, compiled ahead of time (no GPU).

Every launch of qk_align_loss at the trainer's specialisation (one sample of 53,590 tokens, a valid mask, no token
weights, head and frequency mixing, with gradients) and of attn_match_loss (every form, 340 query rows), 7B student
(28 / 4 heads) against the 32B teacher (40 / 8), bf16 and fp32 inputs, is compiled for sm_80 and sm_90 at each
``--stages`` depth (laid_kernels.aot, one compile process at a time). Recorded per launch: registers, spill bytes
(ptxas -v), the shared memory the launch asks for (Triton's metadata.shared; cuobjdump's SHARED is the static part
only) and the cp.async / TMA copies in the PTX. A depth is "fits" when no launch spills and every launch's shared
memory is under the arch's limit per block (164 KiB sm_80, 227 KiB sm_90). Whether a fitting deeper pipeline is
faster is a GPU question: nothing here is a time.

    python benchmarks/pipeline_depth.py [--stages 1 2 3] [--out benchmarks/gpu_efficiency]

Prints a markdown table (one row per kernel, dtype, arch and depth; ranges over the launches of that kernel) and
writes <out>/pipeline_depth.json (every launch) and <out>/pipeline_depth.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's laid_kernels

from laid_kernels.aot import compile_in_subprocess  # noqa: E402

HEADS = [28, 4, 40, 8]
TOKENS = 53_590
ARCHS = (80, 90)
SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use (opt-in maximum)
DTYPES = ("bfloat16", "float32")


def configurations() -> list[tuple[str, str, dict]]:
    """(op label, factory, kwargs) of every compiled configuration."""
    out = []
    for dtype in DTYPES:
        for mixing in ("head", "frequency"):
            out.append((f"qk_align {mixing}", "laid_kernels.qk_align:aot_launches",
                        dict(heads=HEADS, tokens=TOKENS, dtype=dtype, token_weight=False, mixing=mixing)))
        out.append(("attn_match", "laid_kernels.attn_match:aot_launches", dict(heads=HEADS, tokens=TOKENS,
                                                                              dtype=dtype)))
    return out


def compile_all(stages: list[int]) -> list[dict]:
    rows = []
    for op, factory, kwargs in configurations():
        for depth in stages:
            started = time.time()
            for r in compile_in_subprocess(factory, kwargs, ARCHS, timeout=3600, num_stages=depth):
                rows.append(dict(op=op, launch=r.name, kernel=r.kernel, dtype=kwargs["dtype"], arch=r.arch,
                                 num_stages=r.num_stages, num_warps=r.num_warps, registers=r.registers,
                                 spill_stores=r.spill_store_bytes, spill_loads=r.spill_load_bytes,
                                 local=r.local_bytes, shared_static=r.shared_bytes,
                                 shared_launch=r.launch_shared_bytes, cp_async=r.cp_async, tma=r.tma))
            print(f"{op} {kwargs['dtype']} num_stages={depth}: {time.time() - started:.0f} s", file=sys.stderr,
                  flush=True)
    return rows


def fits(r: dict) -> bool:
    return r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local"] == 0 and \
        r["shared_launch"] <= SHARED_LIMIT[r["arch"]]


def span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


def summary(rows: list[dict]) -> list[dict]:
    """One row per (op, kernel, dtype, arch, depth): ranges over that kernel's launches (forms, parts)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["kernel"], r["dtype"], r["arch"], r["num_stages"]), []).append(r)
    return [dict(op=op, kernel=kernel, dtype=dtype, arch=arch, num_stages=depth, launches=len(g),
                 registers=span([r["registers"] for r in g]), spills=span([r["spill_stores"] for r in g]),
                 shared_kib=span([round(r["shared_launch"] / 1024) for r in g]),
                 cp_async=span([r["cp_async"] for r in g]), tma=span([r["tma"] for r in g]),
                 fits=all(fits(r) for r in g))
            for (op, kernel, dtype, arch, depth), g in groups.items()]


def markdown(groups: list[dict]) -> str:
    lines = ["| op | kernel | dtype | arch | num_stages | launches | REG | spill stores (B) | shared (KiB, launch) "
             "| cp.async | TMA | fits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['op']} | {g['kernel']} | {g['dtype']} | sm_{g['arch']} | {g['num_stages']} | {g['launches']} | "
              f"{g['registers']} | {g['spills']} | {g['shared_kib']} | {g['cp_async']} | {g['tma']} | "
              f"{'yes' if g['fits'] else 'no'} |" for g in groups]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARCHS), figsize=(12, 4.5), sharey=True)
    for ax, arch in zip(axes, ARCHS):
        kernels = sorted({(r["op"], r["kernel"]) for r in rows if r["arch"] == arch})
        for op, kernel in kernels:
            mine = [r for r in rows if r["arch"] == arch and (r["op"], r["kernel"]) == (op, kernel)]
            depths = sorted({r["num_stages"] for r in mine})
            worst = [max(r["shared_launch"] for r in mine if r["num_stages"] == d) / 1024 for d in depths]
            spilled = [any(not fits(r) for r in mine if r["num_stages"] == d) for d in depths]
            line, = ax.plot(depths, worst, marker="o", label=f"{op}: {kernel}")
            ax.scatter([d for d, s in zip(depths, spilled) if s], [w for w, s in zip(worst, spilled) if s],
                       marker="x", s=80, color=line.get_color())
        ax.axhline(SHARED_LIMIT[arch] / 1024, color="k", linestyle="--", label="shared limit per block")
        ax.set_title(f"sm_{arch} (x: a launch spills or exceeds the limit)")
        ax.set_xlabel("num_stages")
        ax.set_xticks(sorted({r["num_stages"] for r in rows}))
    axes[0].set_ylabel("largest launch shared memory (KiB)")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu_efficiency")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = compile_all(args.stages)
    groups = summary(rows)
    meta = dict(started=started, finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=f"{platform.processor() or platform.machine()}, no GPU", load_average=os.getloadavg(),
                heads=HEADS, tokens=TOKENS, stages=args.stages)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline_depth.json").write_text(json.dumps(dict(meta=meta, launches=rows, summary=groups), indent=1))
    plot(rows, args.out / "pipeline_depth.png")
    print(f"{meta['started']} to {meta['finished']}, {meta['machine']}, load average {meta['load_average']}\n")
    print(markdown(groups))


if __name__ == "__main__":
    main()
