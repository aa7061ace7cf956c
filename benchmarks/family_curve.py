"""Accuracy against training time of a demo-family build: ``laid eval`` of every finished stage of every role.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/family_curve.py --work runs/family_work \
        --processor runs/family/processor --test runs/test28 --sizes 1 2 50 100 150 --limit 40 --out runs/curve

``--work`` is ``build_family``'s work folder (``<role>_<stage>/final`` per finished stage, in the order they were
trained; a gated curriculum's stages train in chunks, ``<role>_reach<M>_<chunk>``, and only each stage's last chunk
is scored); ``--test`` a ``laid data synth --sizes`` benchmark drawn with its own seed (no image shared with the
training data). A stage's training time is the time between its ``config.yaml`` (written when the stage starts) and
its ``final/summary.json``; the curve's x axis adds them up per role. Answers are kept under ``OUT/eval`` (a rerun
scores only new stages);
``OUT/curve.json`` and ``OUT/curve.md`` hold the table: one row per (role, stage), accuracy (%) per size and the
mean over 50-150; ``OUT/curve.png`` plots, per role, the mean over 1 and 2 images and the mean over 50-150 against
the cumulative training minutes. A gated build's own gate records are tabulated by
``benchmarks/family_gates.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from family_gates import accuracy_plot
from laid.demo import stage_minutes
from laid.evaluate import evaluate

LONG = (50, 100, 150)


def trained_runs(work: Path, role: str) -> list[tuple[str, Path]]:
    """``(stage, run folder)`` of every finished stage or chunk of ``role`` in ``work``, in training order; the
    stage of a gated chunk ``reach<M>_<chunk>`` is ``reach<M>``."""
    runs = sorted((run for run in work.glob(f"{role}_*") if (run / "final" / "summary.json").is_file()),
                  key=lambda run: (run / "config.yaml").stat().st_mtime)
    stages = [run.name[len(role) + 1:] for run in runs]
    return [(stage.rsplit("_", 1)[0] if stage.startswith("reach") else stage, run) for stage, run in zip(stages, runs)]


def plot(rows: list[dict], path: Path) -> Path:
    """Per role: mean accuracy at 1-2 images (dashed) and at 50-150 images (solid) against training minutes."""
    def draw(axis):
        for role in dict.fromkeys(row["role"] for row in rows):
            mine = [row for row in rows if row["role"] == role]
            minutes = [row["train_minutes"] for row in mine]
            short = [sum(row["accuracy"].get(s, float("nan")) for s in (1, 2)) / 2 for row in mine]
            line, = axis.plot(minutes, [row["mean_50_150"] for row in mine], marker="o",
                              label=f"{role}, 50-150 images")
            axis.plot(minutes, short, marker="o", ls="--", color=line.get_color(), label=f"{role}, 1-2 images")
            for row, x, y in zip(mine, minutes, short):
                axis.annotate(row["stage"], (x, y), fontsize=7, textcoords="offset points", xytext=(2, 4))
        axis.axhline(50, color="grey", lw=0.5)
    return accuracy_plot(path, draw, "training minutes (cumulative, this machine)",
                         "family build: accuracy after each stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--processor", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 50, 100, 150])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--roles", nargs="+", default=["teacher", "student"])
    parser.add_argument("--stages", nargs="+", help="stages to score (default: all; time counts all)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for role in args.roles:
        minutes = 0.0
        runs = trained_runs(args.work, role)
        for k, (stage, run_dir) in enumerate(runs):
            minutes += stage_minutes(run_dir)
            last_chunk = k + 1 == len(runs) or runs[k + 1][0] != stage
            if not last_chunk or (args.stages and stage not in args.stages):
                continue
            summary = evaluate(run_dir / "final", args.test, sizes=args.sizes, output_dir=args.out / "eval" /
                               f"{role}_{stage}", processor=args.processor, name=f"{role} {stage}", limit=args.limit,
                               max_new_tokens=8, device="cpu", attn_implementation="sdpa")
            acc = {int(k): round(100 * v["accuracy"][0], 1) for k, v in summary["results"].items()}
            long = [acc[s] for s in LONG if s in acc]
            rows.append({"role": role, "stage": stage, "train_minutes": round(minutes, 1), "accuracy": acc,
                         "mean_50_150": round(sum(long) / len(long), 1) if long else None})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))
    header = ("| model | stage | training minutes (cumulative) | " + " | ".join(map(str, args.sizes)) +
              " | mean 50-150 |")
    lines = [header, "|" + "---|" * (4 + len(args.sizes))]
    for row in rows:
        cells = [row["role"], row["stage"], f"{row['train_minutes']:.1f}",
                 *(f"{row['accuracy'][s]:.1f}" for s in args.sizes), f"{row['mean_50_150']}"]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(row["mean_50_150"] is not None for row in rows):
        print(plot(rows, args.out / "curve.png"))


if __name__ == "__main__":
    main()
