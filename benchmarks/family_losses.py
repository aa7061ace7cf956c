"""The demo family's training, stage by stage: mean SFT loss over the first and last 50 steps of each stage.

    python benchmarks/family_losses.py [--family laid/demo_family] [--out benchmarks/demo/family_losses.json]

Reads ``<family>/logs/<role>_<stage>_metrics.jsonl`` (written by ``laid demo family``), prints a markdown table,
writes the numbers as JSON and plots both models' loss curves, stage after stage, next to it (``.png``). The loss is
per supervised token and ``<|im_end|>``: the caption in the align stage, the yes/no token in the single stage (about
0.35 per token is chance there), and in the find, wide and long stages the yes/no token or the object named in
answer to "what else is there?", half of the questions each.
"""

import argparse
import json
from pathlib import Path

from laid.demo import FAMILY_DIR, FAMILY_STAGES

WINDOW = 50


def sft_losses(family: Path, role: str, stage: str) -> list[float]:
    """The SFT loss of every optimizer step of one model's stage, from its metrics log."""
    lines = (family / "logs" / f"{role}_{stage}_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["sft"] for line in lines]


def stage_losses(family: Path) -> list[dict]:
    rows = []
    for role in ("teacher", "student"):
        for stage in FAMILY_STAGES:
            losses = sft_losses(family, role, stage)
            rows.append({"model": role, "stage": stage, "steps": len(losses),
                         "first": sum(losses[:WINDOW]) / len(losses[:WINDOW]),
                         "last": sum(losses[-WINDOW:]) / len(losses[-WINDOW:])})
    return rows


def plot_curves(family: Path, path: Path, smooth: int = 20) -> Path:
    """Both models' SFT loss against the step, stages one after the other (running mean over ``smooth`` steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    for role in ("teacher", "student"):
        losses = []
        for stage in FAMILY_STAGES:
            losses += sft_losses(family, role, stage)
            if role == "teacher":
                axis.axvline(len(losses), color="grey", lw=0.5)
                axis.text(len(losses), 3.0, f" {stage} ", ha="right", va="top", fontsize=8)
        means = [sum(losses[max(0, k - smooth + 1): k + 1]) / len(losses[max(0, k - smooth + 1): k + 1])
                 for k in range(len(losses))]
        axis.plot(range(1, len(means) + 1), means, label=role)
    axis.set(xlabel="optimizer step (stages in order)", ylabel=f"SFT loss per token, mean of {smooth} steps",
             yscale="log", title="demo family: training loss per stage")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default=str(FAMILY_DIR))
    parser.add_argument("--out", default="benchmarks/demo/family_losses.json")
    args = parser.parse_args()
    rows = stage_losses(Path(args.family))
    print(f"| model | stage | steps | first {WINDOW} steps | last {WINDOW} steps |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['steps']} | {r['first']:.3f} | {r['last']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(plot_curves(Path(args.family), out.with_suffix(".png")))


if __name__ == "__main__":
    main()
