"""The demo family's training, stage by stage: mean SFT loss over the first and last 50 steps of each stage.

    python benchmarks/family_losses.py [--family laid/demo_family] [--out benchmarks/demo/family_losses.json]

Reads ``<family>/logs/<role>_<stage>_metrics.jsonl`` (written by ``laid demo family``), prints a markdown table and
writes the numbers as JSON. The loss is per supervised token: the caption tokens in the align stage, the yes/no
token and ``<|im_end|>`` in the haystack stages (chance on the yes/no token alone is about 0.35 per token there).
"""

import argparse
import json
from pathlib import Path

from laid.demo import FAMILY_DIR, FAMILY_STAGES

WINDOW = 50


def stage_losses(family: Path) -> list[dict]:
    rows = []
    for role in ("teacher", "student"):
        for stage in FAMILY_STAGES:
            lines = (family / "logs" / f"{role}_{stage}_metrics.jsonl").read_text().splitlines()
            losses = [json.loads(line)["sft"] for line in lines]
            rows.append({"model": role, "stage": stage, "steps": len(losses),
                         "first": sum(losses[:WINDOW]) / len(losses[:WINDOW]),
                         "last": sum(losses[-WINDOW:]) / len(losses[-WINDOW:])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default=str(FAMILY_DIR))
    parser.add_argument("--out", default="benchmarks/demo/family_losses.json")
    args = parser.parse_args()
    rows = stage_losses(Path(args.family))
    print(f"| model | stage | steps | first {WINDOW} steps | last {WINDOW} steps |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['steps']} | {r['first']:.3f} | {r['last']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
