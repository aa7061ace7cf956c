"""Continue one family model on the long stage's data in chunks, scoring every chunk with ``laid eval``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/family_continue.py --model runs/family/student \
        --role student --processor runs/family/processor --test runs/test28 --chunk-steps 150 --chunks 4 \
        --out runs/continue_student

The protocol of ``shared/notes/demo-family-long-window.md``: chunks of ``--chunk-steps`` steps of the recipe's last
stage (``synth_retrieval``; the committed recipe's ``reach150``: 1 to 150 images, log-uniform, ``long_batch_size``
haystacks per micro-batch, ``long_grad_accum`` micro-batches per step, a fresh data seed per chunk: 900 + chunk), each
from the previous chunk's export, at that stage's learning rate (``family_config``: the student's rate scaled by
64 / hidden). ``--recipe`` takes ``FamilyRecipe`` fields as JSON (default: the committed recipe), e.g.
``'{"curriculum": [], "long_images": [10, 150], "long_grad_accum": 2}'`` for the fixed stages' long one. Prints and
writes ``OUT/continue.md`` /
``OUT/continue.json``: training minutes (cumulative over chunks) and accuracy (%) per size.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from laid import demo
from laid.evaluate import evaluate
from laid.trainer import train

LONG = (50, 100, 150)


def score(model: Path, args, name: str) -> dict[int, float]:
    summary = evaluate(model, args.test, sizes=args.sizes, output_dir=args.out / "eval" / name,
                       processor=args.processor, name=name, limit=args.limit, max_new_tokens=8, device="cpu",
                       attn_implementation="sdpa")
    return {int(k): round(100 * v["accuracy"][0], 1) for k, v in summary["results"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--role", choices=("teacher", "student"), required=True)
    parser.add_argument("--processor", required=True, type=Path)
    parser.add_argument("--test", required=True)
    parser.add_argument("--chunk-steps", type=int, default=150)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 50, 100, 150])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--recipe", default="{}", help="FamilyRecipe fields as a JSON object")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipe = demo.recipe_from_json(args.recipe)
    hidden = (demo.TEACHER_SHAPE if args.role == "teacher" else demo.STUDENT_SHAPE)["hidden"]
    stage = replace(demo._family_stages(recipe)[-1], steps=args.chunk_steps)
    rows, minutes, model = [], 0.0, args.model
    for chunk in range(1, args.chunks + 1):
        data = demo._family_data(args.out / "work", stage, recipe.image_size, 900 + chunk, recipe.retrieval_share)
        run_dir = args.out / f"chunk{chunk}"
        config = demo.family_config(model, args.processor, data, run_dir, stage, hidden, recipe.seed)
        if not demo._finished(run_dir, config):
            train(config)
        minutes += ((run_dir / "final" / "summary.json").stat().st_mtime -
                    (run_dir / "config.yaml").stat().st_mtime) / 60
        model = run_dir / "final"
        acc = score(model, args, f"chunk{chunk}")
        long = [acc[s] for s in LONG if s in acc]
        rows.append({"chunk": chunk, "steps": chunk * args.chunk_steps, "train_minutes": round(minutes, 1),
                     "accuracy": acc, "mean_50_150": round(sum(long) / len(long), 1) if long else None})
        lines = [f"| {args.role} | extra long-stage steps | training minutes | " +
                 " | ".join(map(str, args.sizes)) + " | mean 50-150 |", "|" + "---|" * (4 + len(args.sizes))]
        lines += [f"| chunk {r['chunk']} | {r['steps']} | {r['train_minutes']} | " +
                  " | ".join(f"{r['accuracy'][s]:.1f}" for s in args.sizes) + f" | {r['mean_50_150']} |" for r in rows]
        (args.out / "continue.md").write_text("\n".join(lines) + "\n")
        (args.out / "continue.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
