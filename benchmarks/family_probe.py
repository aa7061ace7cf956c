"""One probe of a demo-family design: build one role with a ``FamilyRecipe`` and score it with ``laid eval``.

    OMP_NUM_THREADS=1 python benchmarks/family_probe.py --out runs/probe1 --role teacher \
        --recipe '{"single_steps": 500}' --test runs/test28 --sizes 1 2 50 100 150 --limit 40

``--recipe`` is a JSON object of ``FamilyRecipe`` fields; ``--shape`` (JSON) overrides fields of the role's shape
(``TEACHER_SHAPE`` / ``STUDENT_SHAPE``). The test set (``laid data synth --sizes ... --image-size`` with its own
seed) must share no image with the training data: ``build_family`` draws its data from seeds ``recipe.seed + 303``
on. Prints one markdown row (stage wall times, accuracy per size, mean over 50-150) and writes it to
``OUT/probe.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from laid import demo
from laid.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--role", choices=("teacher", "student"), required=True)
    parser.add_argument("--recipe", default="{}", help="JSON object of FamilyRecipe fields")
    parser.add_argument("--shape", default="{}", help="JSON object overriding the role's shape")
    parser.add_argument("--test", required=True, help="folder written by `laid data synth --sizes`")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 20, 50, 100, 150])
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipe = demo.FamilyRecipe(**json.loads(args.recipe))
    shape_name = "TEACHER_SHAPE" if args.role == "teacher" else "STUDENT_SHAPE"
    setattr(demo, shape_name, {**getattr(demo, shape_name), **json.loads(args.shape)})
    out = Path(args.out)
    start = time.perf_counter()
    demo.build_family(out / "family", recipe=recipe, work_dir=out / "work", roles=(args.role,))
    build_s = time.perf_counter() - start
    summary = evaluate(out / "family" / args.role, args.test, sizes=args.sizes, output_dir=out / "eval",
                       processor=out / "family" / "processor", name=args.role, limit=args.limit, max_new_tokens=8,
                       device="cpu", attn_implementation="sdpa")
    acc = {int(k): round(100 * v["accuracy"][0], 1) for k, v in summary["results"].items()}
    long = [acc[s] for s in (50, 100, 150) if s in acc]
    row = {"role": args.role, "recipe": asdict(recipe), "shape": getattr(demo, shape_name),
           "build_minutes": round(build_s / 60, 1), "eval_minutes": round((time.perf_counter() - start - build_s) / 60, 1),
           "accuracy": acc, "mean_50_150": round(sum(long) / len(long), 1) if long else None, "limit": args.limit}
    (out / "probe.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
