"""Gated family builds side by side: their gate logs (accuracy against training time) and their ``laid eval`` results.

    python benchmarks/family_gates.py --log teacher=runs/family/logs/teacher_gates.jsonl \
        --log student=runs/family/logs/student_gates.jsonl \
        --eval Teacher=runs/eval/teacher --eval "Base student"=runs/eval/student --out runs/gates

``--log NAME=PATH``: a gated build's ``logs/<role>_gates.jsonl`` (``laid.demo.build_family`` with a
``FamilyRecipe.curriculum``: one row per trained chunk, its training minutes and teacher-forced accuracy on the
stage's held-out gate set). ``--eval NAME=DIR``: a ``laid eval`` output folder (its ``summary.json``). Prints and writes
``OUT/gates.md``, ``OUT/gates.png`` (each chunk's yes/no and "what else?" gate accuracy against the cumulative
training minutes of the gated stages), and, with ``--eval``, ``OUT/accuracy.md`` / ``OUT/accuracy.png`` (accuracy and
bootstrap std per haystack size, the means over 1-2 and 50-150 images); ``OUT/family_gates.json`` holds both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LONG, SHORT = (50, 100, 150), (1, 2)


def named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def gate_rows(name: str, log: Path) -> list[dict]:
    """The log's chunks with the cumulative training minutes of the gated stages (``minutes``)."""
    rows, minutes = [], 0.0
    for line in log.read_text().splitlines():
        row = json.loads(line)
        minutes += row["train_minutes"]
        rows.append({"model": name, **row, "minutes": round(minutes, 2)})
    return rows


def eval_row(name: str, folder: Path) -> dict:
    """Accuracy and bootstrap std (%) per size of a ``laid eval`` folder, with the 1-2 and 50-150 means."""
    results = json.loads((folder / "summary.json").read_text())["results"]
    accuracy = {int(size): 100 * r["accuracy"][0] for size, r in results.items()}
    std = {int(size): 100 * r["accuracy"][1] for size, r in results.items()}
    means = {f"mean_{s[0]}_{s[-1]}": sum(accuracy[k] for k in s) / len(s) for s in (SHORT, LONG)
             if all(k in accuracy for k in s)}
    return {"model": name, "accuracy": accuracy, "std": std, **means}


def accuracy_plot(path: Path, draw, xlabel: str, title: str) -> Path:
    """Write ``draw(axis)``'s lines to ``path`` on an accuracy (%) axis from 0 to 100, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    draw(axis)
    axis.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(0, 100), title=title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def draw_gates(rows: list[dict]):
    def draw(axis):
        for model in dict.fromkeys(row["model"] for row in rows):
            mine = [row for row in rows if row["model"] == model]
            x = [row["minutes"] for row in mine]
            line, = axis.plot(x, [100 * row["yes_no"] for row in mine], marker="o", ms=3, label=f"{model}, yes/no")
            axis.plot(x, [100 * row["what_else"] for row in mine], ls="--", color=line.get_color(),
                      label=f"{model}, what else?")
            for row in mine:
                if row["chunk"] == 1:
                    axis.annotate(row["stage"], (row["minutes"], 100 * row["yes_no"]), fontsize=7,
                                  textcoords="offset points", xytext=(2, -10))
    return draw


def draw_accuracy(rows: list[dict]):
    def draw(axis):
        for row in rows:
            sizes = sorted(row["accuracy"])
            axis.errorbar(range(len(sizes)), [row["accuracy"][s] for s in sizes], yerr=[row["std"][s] for s in sizes],
                          marker="o", ms=3, capsize=2, label=row["model"])
            axis.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        axis.axhline(50, color="grey", lw=0.5)
    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=named, action="append", default=[], help="NAME=logs/<role>_gates.jsonl")
    parser.add_argument("--eval", type=named, action="append", default=[], help="NAME=laid eval output folder")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if not args.log and not args.eval:
        parser.error("give at least one --log or --eval")
    args.out.mkdir(parents=True, exist_ok=True)

    gates = [row for name, log in args.log for row in gate_rows(name, log)]
    evals = [eval_row(name, folder) for name, folder in args.eval]
    (args.out / "family_gates.json").write_text(json.dumps({"gates": gates, "eval": evals}, indent=1))
    if gates:
        lines = ["| model | stage | chunk | gated-stage minutes (cumulative) | gate questions | yes/no | what else? |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['model']} | {g['stage']} | {g['chunk']} | {g['minutes']:.1f} | {g['questions']} | "
                  f"{100 * g['yes_no']:.1f} | {100 * g['what_else']:.1f} |" for g in gates]
        (args.out / "gates.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(accuracy_plot(args.out / "gates.png", draw_gates(gates),
                            "training minutes of the gated stages (cumulative)",
                            "gated curriculum: teacher-forced accuracy on each stage's gate set"))
    if evals:
        sizes = sorted({size for row in evals for size in row["accuracy"]})
        lines = ["| model | " + " | ".join(map(str, sizes)) + " | mean 1-2 | mean 50-150 |",
                 "|---|" + "---|" * (len(sizes) + 2)]
        for row in evals:
            cells = [f"{row['accuracy'][s]:.1f} ± {row['std'][s]:.1f}" if s in row["accuracy"] else "-" for s in sizes]
            means = [f"{row[key]:.1f}" if key in row else "-" for key in ("mean_1_2", "mean_50_150")]
            lines.append("| " + " | ".join([row["model"], *cells, *means]) + " |")
        (args.out / "accuracy.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(accuracy_plot(args.out / "accuracy.png", draw_accuracy(evals), "images in the haystack",
                            "laid eval (greedy), bootstrap std"))


if __name__ == "__main__":
    main()
