"""Where the demo's models look: the share of image attention that lands on the needle image, by haystack size.

    python benchmarks/needle_attention.py [--demo runs/demo] [--sizes 2 5 20 50 150] [--questions 20]

A thin front to ``laid analyze`` (``laid.analyze``) for a finished ``laid demo`` run: the family's teacher and base
student and the seed-0 SFT, LAid and LAid w/o L_qk students, on the demo's test haystacks laid out exactly as
``laid eval`` shows them. At the last prompt position (the one that predicts the answer) every head of every layer
gives an attention row; its needle share is the attention on the needle image's tokens divided by the attention on
all image tokens (chance, attention spread evenly over the images: 1 / size). The table gives, per model and size,
the best head's share (the (layer, head) with the highest mean over the questions) and the mean share over all
heads of the last layer. Prints a markdown table, writes JSON and a plot next to ``--out``, and the whole
``laid analyze`` output (attention by distance, RoPE spectrum, head flow) in the folder ``--out`` without suffix.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from laid.analyze import analyze
from laid.demo import BASELINE, FAMILY_DIR, family_paths, folder_name


def models_of(demo: Path, family: Path) -> dict[str, Path]:
    paths = family_paths(family)
    models = {"Teacher": paths["teacher"], BASELINE: paths["student"]}
    for name in ("SFT", "LAid", "LAid w/o L_qk"):
        models[f"{name} (seed 0)"] = demo / "students" / folder_name(name) / "seed0" / "final"
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished `laid demo` output folder")
    parser.add_argument("--family", default=str(FAMILY_DIR))
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 20, 50, 150])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/demo/full/needle_attention.json")
    args = parser.parse_args()
    demo, family, out = Path(args.demo), Path(args.family), Path(args.out)
    models = models_of(demo, family)
    analysis = out.with_suffix("")
    analyze(list(models.values()), demo / "data" / "test", sizes=args.sizes, out_dir=analysis,
            processor=family_paths(family)["processor"], names=list(models), teacher=family_paths(family)["teacher"],
            questions=args.questions)
    needle = json.loads((analysis / "needle.json").read_text())
    rows = [{k: v for k, v in row.items() if k != "needle"} for row in needle]  # without the per-head shares
    print("| model | " + " | ".join(f"{s} images: best head / last layer" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    print("| chance | " + " | ".join(f"{1 / s:.3f}" for s in args.sizes) + " |")
    for name in models:
        cells = [f"{r['best_head']:.3f} / {r['last_layer_mean']:.3f}" for r in rows if r["model"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    out.write_text(json.dumps({"demo": str(demo), "questions": args.questions, "rows": rows}, indent=1))
    print(shutil.copyfile(analysis / "needle.png", out.with_suffix(".png")))


if __name__ == "__main__":
    main()
