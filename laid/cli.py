"""The ``laid`` command line.

Each top-level command is one ``add_<name>(commands)`` function that adds its sub-parser to ``commands`` and sets
``run`` (a function of the parsed arguments); ``COMMANDS`` lists them. Errors about the user's input
(``ValueError``, ``FileNotFoundError``) are printed as ``laid: error: ...`` with exit status 2.

    laid data synth --out DIR --n-entries 64 --min-images 2 --max-images 10
    laid data build-train --instances instances_train2017.json --exclude-vhs VHS.json ... --out train.json
    laid models tiny runs/tiny
    laid train configs/tiny_cpu.yaml --epochs 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_synth(args: argparse.Namespace) -> None:
    from .data import synth_haystacks

    path = synth_haystacks(
        args.out,
        n_entries=args.n_entries,
        min_images=args.min_images,
        max_images=args.max_images,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(path)


def _run_build_train(args: argparse.Namespace) -> None:
    from .data import build_train_from_coco

    path = build_train_from_coco(
        args.instances,
        args.out,
        exclude_vhs_files=args.exclude_vhs,
        n_entries=args.n_entries,
        min_images=args.min_images,
        max_images=args.max_images,
        seed=args.seed,
    )
    print(path)


def add_data(commands) -> None:
    """``laid data synth`` and ``laid data build-train``: write VHs-format data sets."""
    data = commands.add_parser("data", help="build Visual Haystacks-format data sets")
    steps = data.add_subparsers(dest="data_command", required=True)

    synth = steps.add_parser("synth", help="synthetic haystacks of coloured shapes (JSON + PNGs)")
    synth.add_argument("--out", required=True, help="output folder (also the image root)")
    synth.add_argument("--n-entries", type=int, required=True)
    synth.add_argument("--min-images", type=int, default=2)
    synth.add_argument("--max-images", type=int, default=10)
    synth.add_argument("--image-size", type=int, default=56)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_run_synth)

    build = steps.add_parser("build-train", help="leak-free training haystacks from COCO instances_*2017.json")
    build.add_argument("--instances", nargs="+", required=True, help="COCO instances_<split>.json files")
    build.add_argument("--exclude-vhs", nargs="+", required=True, help="VHs JSON files whose images are excluded")
    build.add_argument("--out", required=True, help="output JSON path")
    build.add_argument("--n-entries", type=int, required=True, help="even: one yes and one no per category pair")
    build.add_argument("--min-images", type=int, default=2)
    build.add_argument("--max-images", type=int, default=20)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(run=_run_build_train)


def _run_models_tiny(args: argparse.Namespace) -> None:
    from .tiny import TINY_STUDENT, TINY_TEACHER, save_tiny_model, save_tiny_processor, tiny_qwen25vl_config

    out = Path(args.out_dir)
    save_tiny_processor(out / "processor")
    save_tiny_model(out / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=args.seed)
    save_tiny_model(out / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=args.seed + 1)
    print(out)


def add_models(commands) -> None:
    """``laid models tiny OUT_DIR``: tiny random Qwen2.5-VL teacher, student and processor for CPU runs."""
    models = commands.add_parser("models", help="build local model folders")
    kinds = models.add_subparsers(dest="models_command", required=True)
    tiny = kinds.add_parser("tiny", help="OUT_DIR/{teacher,student,processor}: tiny random Qwen2.5-VL models")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0, help="teacher seed (the student uses seed + 1)")
    tiny.set_defaults(run=_run_models_tiny)


def _run_train(args: argparse.Namespace) -> None:
    from .trainer import train

    if len(args.overrides) % 2:
        raise ValueError(f"overrides must be --key value pairs, got {' '.join(args.overrides)}")
    overrides = {}
    for key, value in zip(args.overrides[::2], args.overrides[1::2]):
        if not key.startswith("--"):
            raise ValueError(f"expected --key before {value!r}, got {key!r}")
        overrides[key[2:]] = value
    summary = train(args.config, **overrides)
    print(Path(summary["config"]["output_dir"]) / "final")


def add_train(commands) -> None:
    """``laid train CONFIG.yaml [--key value ...]``: LAid distillation (any LAidConfig field can be overridden)."""
    train = commands.add_parser("train", help="LAid distillation from a YAML config",
                                description="Run LAid distillation. Every LAidConfig field can be overridden with "
                                            "--field value (values are read as YAML: --layer_pairs '[[-1, -1]]').")
    train.add_argument("config", help="YAML file of LAidConfig fields")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs")
    train.set_defaults(run=_run_train)


COMMANDS = (add_data, add_models, add_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laid", description="LAid distillation of Qwen2.5-VL models")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``laid`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"laid: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
