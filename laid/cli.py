"""The ``laid`` command line.

Each top-level command is one ``add_<name>(commands)`` function that adds its sub-parser to ``commands`` and sets
``run`` (a function of the parsed arguments); ``COMMANDS`` lists them. Every command is plain argparse: options take
``--key value`` or ``--key=value``, are never abbreviated, and an unknown one is an error naming the nearest option.
``laid train``'s options are generated from the fields of ``LAidConfig`` (their help is the fields' metadata). Errors
about the user's input (``ValueError``, ``FileNotFoundError``) are printed as ``laid: error: ...`` with exit status 2.

    laid data synth --out DIR --n-entries 64 --min-images 2 --max-images 10
    laid data build-train --instances instances_train2017.json --exclude-vhs VHS.json ... --out train.json
    laid models tiny runs/tiny
    laid train configs/tiny_cpu.yaml --epochs 1 --lr=2e-5 --train_vision --layer_pairs "[[0, 1], [-1, -1]]"
    laid train configs/tiny_cpu.yaml --print-config      (the resolved configuration as YAML; nothing runs)
    laid eval runs/laid/final --data VHs_large --image-root coco --output runs/eval/laid --name LAid
    laid report runs/eval/baseline runs/eval/laid --baseline baseline --out report
    laid analyze TEACHER STUDENT runs/laid --data VHs_large --sizes 1 20 150 --out runs/analysis
    laid demo                      (--full for the complete grid; laid demo family --out DIR retrains the family)
    laid plan --teacher Qwen/Qwen2.5-VL-32B-Instruct --student Qwen/Qwen2.5-VL-7B-Instruct --gpus 8 \
        --gpu-memory-gb 80 --images 20 --strategy fsdp [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path

from . import __version__


class Parser(argparse.ArgumentParser):
    """The ``laid`` parser and its sub-parsers: options are never abbreviated (``--grad`` is not ``--grad_accum``),
    and an unknown option is an error that names the command's nearest option."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = next((extra.split("=", 1)[0] for extra in extras if extra.startswith("-")), None)
        if unknown is not None:
            options = [option for action in self._actions for option in action.option_strings]
            nearest = difflib.get_close_matches(unknown, options, n=1)
            self.error(f"unknown option {unknown}; " + (f"did you mean {nearest[0]}?" if nearest else
                                                        f"'{self.prog} --help' lists the options"))
        return namespace, extras


def _run_synth(args: argparse.Namespace) -> None:
    from .data import synth_benchmark, synth_haystacks

    if args.sizes:
        print(synth_benchmark(args.out, sizes=args.sizes, n_entries=args.n_entries, image_size=args.image_size,
                              seed=args.seed))
        return
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


def _run_cache(args: argparse.Namespace) -> None:
    from .image_cache import fill_cache, image_cache_dir

    folder = image_cache_dir(args.cache)
    if folder is None:
        raise ValueError("--cache none: there is no cache to fill")
    bounds = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    if args.processor:
        from .data import pixel_budget
        from .models import load_processor

        bounds = {k: v if v is not None else pixel_budget(load_processor(args.processor))[k] for k, v in bounds.items()}
    done = fill_cache(args.data, args.image_root, folder, **bounds, num_workers=args.num_workers)
    print(f"{done['images']} images ({done['added']} added, {done['bytes'] / 2 ** 30:.2f} GiB) in {folder}")


def add_data(commands) -> None:
    """``laid data synth``, ``laid data build-train`` (VHs-format data sets) and ``laid data cache``."""
    data = commands.add_parser("data", help="build Visual Haystacks-format data sets")
    steps = data.add_subparsers(dest="data_command", required=True)

    synth = steps.add_parser("synth", help="synthetic haystacks of coloured shapes (JSON + PNGs)")
    synth.add_argument("--out", required=True, help="output folder (also the image root)")
    synth.add_argument("--n-entries", type=int, required=True)
    synth.add_argument("--min-images", type=int, default=2)
    synth.add_argument("--max-images", type=int, default=10)
    synth.add_argument("--image-size", type=int, default=56)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sizes", type=int, nargs="+",
                       help="write a benchmark in the official layout instead: visual_haystack_{oracle,N}.json with "
                            "exactly N images per entry for each N (--min/--max-images are then unused)")
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

    cache = steps.add_parser("cache", help="fill the resized-image cache for VHs JSON files ahead of time")
    cache.add_argument("data", nargs="+", help="VHs JSON files, or folders of visual_haystack_*.json")
    cache.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    cache.add_argument("--processor", help="take the pixel bounds from this processor, as training and laid eval do "
                                           "(default: qwen-vl-utils' defaults, the real Qwen2.5-VL processor's)")
    cache.add_argument("--min-pixels", type=int, help="a training run's min_pixels (overrides --processor's)")
    cache.add_argument("--max-pixels", type=int, help="a training run's max_pixels (overrides --processor's)")
    cache.add_argument("--cache", default="auto", help="auto ($LAID_CACHE_DIR/images, default ~/.cache/laid/images) "
                                                       "or a folder")
    cache.add_argument("--num-workers", type=int, help="processes decoding images (default: the loaders' default)")
    cache.set_defaults(run=_run_cache)


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
    from .config import LAidConfig
    from .trainer import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(LAidConfig) if hasattr(args, f.name)}
    if args.print_config:
        print(LAidConfig.from_yaml(args.config, **overrides).to_yaml(), end="")
        return
    summary = train(args.config, **overrides)
    print(Path(summary["config"]["output_dir"]) / "final")


def _type_name(hint) -> str:
    """A field's type as declared, without spaces (the metavar of its option): ``float``, ``int|None``,
    ``list[list[int]]``."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace(" ", "")


def add_train(commands) -> None:
    """``laid train CONFIG.yaml [--field VALUE ...] [--print-config]``: LAid distillation; one option per LAidConfig
    field, ``--field VALUE`` or ``--field=VALUE`` (VALUE read as YAML, by ``LAidConfig.with_overrides``), a boolean
    also ``--field`` / ``--no-field``. Only the options given are set: they override the YAML file."""
    from .config import LAidConfig

    train = commands.add_parser(
        "train", help="LAid distillation from a YAML config",
        usage="%(prog)s CONFIG.yaml [--print-config] [--FIELD VALUE | --FIELD=VALUE | --FLAG | --no-FLAG ...]",
        description="Run LAid distillation: the YAML file's LAidConfig fields, overridden by the options given "
                    "(--field VALUE or --field=VALUE; VALUE is read as YAML: --lr=2e-5, --layer_pairs '[[0, 1]]', "
                    "--trackers '[tensorboard]', --max_steps null; a boolean is also a flag: --train_vision, "
                    "--no-train_vision). Dashes may replace underscores. The run writes the resolved configuration "
                    "to OUTPUT_DIR/config.yaml; --print-config prints it instead.")
    train.add_argument("config", metavar="CONFIG.yaml", help="YAML file of LAidConfig fields")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration as YAML (what the run would save) and exit")
    fields = train.add_argument_group("LAidConfig fields (VALUE is read as YAML; dashes may replace underscores)")
    defaults = LAidConfig()
    hints = typing.get_type_hints(LAidConfig)

    def add(option: str, **kwargs) -> None:  # --name, and its spelling with dashes, hidden from --help
        fields.add_argument(option, default=argparse.SUPPRESS, **kwargs)
        if "_" in option:
            fields.add_argument(option.replace("_", "-"), default=argparse.SUPPRESS,
                                **{**kwargs, "help": argparse.SUPPRESS})

    for f in dataclasses.fields(LAidConfig):
        kind = _type_name(hints[f.name])
        text = f"{f.metadata.get('help', '')} [default: {json.dumps(getattr(defaults, f.name))}]".replace("%", "%%")
        if hints[f.name] is bool:
            add(f"--{f.name}", dest=f.name, nargs="?", const=True, metavar=kind, help=text)
            add(f"--no-{f.name}", dest=f.name, action="store_const", const=False, help=f"set {f.name} to false")
        else:
            add(f"--{f.name}", dest=f.name, metavar=kind, help=text)
    train.set_defaults(run=_run_train)


def _run_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate

    summary = evaluate(args.model, args.data, sizes=args.sizes, method=args.method, output_dir=args.output,
                       image_root=args.image_root, processor=args.processor, name=args.name, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, n_resamples=args.n_resamples, limit=args.limit,
                       device=args.device, attn_implementation=args.attn_implementation,
                       yarn_factor=args.yarn_factor, selfextend_group=args.selfextend_group,
                       selfextend_window=args.selfextend_window, progress=True, num_workers=args.num_workers,
                       image_cache=args.image_cache)
    for size, m in summary["results"].items():
        print(f"{size} images: accuracy {100 * m['accuracy'][0]:.2f} +- {100 * m['accuracy'][1]:.2f}, "
              f"compliance {100 * m['compliance'][0]:.2f} +- {100 * m['compliance'][1]:.2f} (n={m['n']})")
    print(Path(args.output) / "summary.json")


def add_eval(commands) -> None:
    """``laid eval MODEL --data DIR --output OUT``: Visual Haystacks accuracy per haystack size (official protocol)."""
    from .evaluate import METHODS, SIZES

    ev = commands.add_parser("eval", help="Visual Haystacks evaluation (official protocol and output layout)")
    ev.add_argument("model", help="model folder or hub id (a merged LoRA export is a model folder)")
    ev.add_argument("--data", required=True, help="folder with visual_haystack_{oracle,N,500}.json")
    ev.add_argument("--output", required=True, help="run folder ({N}_images/{idx:03d}.json, summary.json/csv)")
    ev.add_argument("--image-root", help="folder the image paths are relative to (COCO root; default --data)")
    ev.add_argument("--processor", help="processor folder or hub id (default: the model's)")
    ev.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ev.add_argument("--method", choices=METHODS, default="baseline")
    ev.add_argument("--name", help="run name in the report (default: the method)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the haystack shuffles and the bootstrap")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--n-resamples", type=int, default=100)
    ev.add_argument("--limit", type=int, help="a seeded random LIMIT of each size's questions (default: all)")
    ev.add_argument("--device", default="auto", help="auto: cuda when available (bf16), else cpu (fp32)")
    ev.add_argument("--attn-implementation", default="auto",
                    help="auto: flash_attention_2 on CUDA when flash-attn imports (the official setting), else sdpa")
    ev.add_argument("--yarn-factor", type=float, default=4.0,
                    help="yarn: rope scaling factor over original_max_position_embeddings 32768")
    ev.add_argument("--selfextend-group", type=int, default=8, help="selfextend: position group size")
    ev.add_argument("--selfextend-window", type=int, default=1024, help="selfextend: neighbour window (positions)")
    ev.add_argument("--num-workers", type=int, help="DataLoader workers building the prompts (default: "
                                                     "min(4, CPUs per process // 2))")
    ev.add_argument("--image-cache", default="auto",
                    help="resized-image cache: auto ($LAID_CACHE_DIR/images, default ~/.cache/laid/images), none, "
                         "or a folder")
    ev.set_defaults(run=_run_eval)


def _run_report(args: argparse.Namespace) -> None:
    from .report import report

    print(report(args.runs, baseline=args.baseline, out_dir=args.out), end="")
    print(Path(args.out) / "accuracy.png")


def add_report(commands) -> None:
    """``laid report RUN_DIR... --out DIR``: the paper-style table (markdown) and accuracy plot (PNG) of eval runs."""
    rep = commands.add_parser("report", help="paper-style table and plot of 'laid eval' runs")
    rep.add_argument("runs", nargs="+", help="'laid eval' output folders")
    rep.add_argument("--baseline", help="name of the run gains are relative to (default: the method 'baseline' run)")
    rep.add_argument("--out", required=True, help="folder for report.md and accuracy.png")
    rep.set_defaults(run=_run_report)


def _run_analyze(args: argparse.Namespace) -> None:
    from .analyze import analyze

    summary = analyze(args.models, args.data, sizes=args.sizes, out_dir=args.out, processor=args.processor,
                      names=args.names, teacher=args.teacher, questions=args.questions, image_root=args.image_root,
                      seed=args.seed, device=args.device, layers_per_pass=args.layers_per_pass, progress=True)
    for name, numbers in summary.items():
        cells = [f"{size} images: distance {v['distance_last_layer']:.1f}, needle {v['needle_best_head']:.3f}, "
                 f"low-frequency {v['low_frequency_share']:.3f}" for size, v in numbers["sizes"].items()]
        print(f"{name}: " + "; ".join(cells))
    print(Path(args.out) / "analysis.md")


def add_analyze(commands) -> None:
    """``laid analyze MODEL_OR_RUN... --data DIR --sizes ... --out DIR``: attention by distance, needle share, RoPE
    spectrum per head and head flow of Qwen2.5-VL models, as figures (PNG + JSON) and one page (analysis.md)."""
    an = commands.add_parser("analyze", help="attention by distance, RoPE spectrum and head flow of models",
                             description="For each model folder or 'laid train' run folder: the attention of the "
                                         "question rows by token distance and on the needle, the RoPE frequency "
                                         "spectrum of every head and, for runs, the head flow from the teacher.")
    an.add_argument("models", nargs="+", help="model folders or 'laid train' run folders (final/ with mixer)")
    an.add_argument("--data", required=True, help="folder with visual_haystack_{oracle,N,500}.json, or one VHs JSON")
    an.add_argument("--sizes", type=int, nargs="+", required=True, help="haystack sizes (images per prompt)")
    an.add_argument("--out", required=True, help="folder for the figures (PNG + JSON) and analysis.md")
    an.add_argument("--processor", help="processor folder or hub id, for model folders that hold none")
    an.add_argument("--names", nargs="+", help="labels of the models (default: their folder names)")
    an.add_argument("--teacher", help="teacher of the runs' head flow (default: the one their summary.json names)")
    an.add_argument("--questions", type=int, default=8, help="prompts per size")
    an.add_argument("--image-root", help="folder the image paths are relative to (default: the data's folder)")
    an.add_argument("--seed", type=int, default=0, help="seed of the haystack shuffles (as laid eval)")
    an.add_argument("--device", default="auto", help="auto: cuda when available (bf16), else cpu (fp32)")
    an.add_argument("--layers-per-pass", type=int,
                    help="layers whose Q/K one forward holds (default: all; e.g. 8 for 150 images of a 32B model)")
    an.set_defaults(run=_run_analyze)


def _run_demo(args: argparse.Namespace) -> None:
    from .demo import FULL, QUICK, overridden, run_demo

    grid = overridden(FULL if args.full else QUICK, seeds=tuple(args.seeds) if args.seeds else None, steps=args.steps,
                     questions=args.questions, sizes=tuple(args.sizes) if args.sizes else None)
    print(run_demo(args.out, grid=grid, family=args.family), end="")
    print(Path(args.out) / "report" / "accuracy.png")


def _run_demo_family(args: argparse.Namespace) -> None:
    from .demo import FAMILY_STAGES, build_family, overridden, recipe_from_json

    steps = {f"{stage}_steps": getattr(args, f"{stage}_steps") for stage in FAMILY_STAGES}
    recipe = overridden(recipe_from_json(args.recipe), **steps, seed=args.seed)
    print(build_family(args.out, recipe=recipe, work_dir=args.work_dir, roles=tuple(args.roles)))


def add_demo(commands) -> None:
    """``laid demo [--full]``: distil, evaluate and report on the committed tiny family (the README's main job);
    ``laid demo family --out DIR``: train that family from scratch."""
    from .demo import FAMILY_DIR, FAMILY_STAGES

    demo = commands.add_parser("demo", help="the paper's experiment at CPU scale on a tiny Qwen2.5-VL family",
                               description="Distil SFT, LAid and ablation students from the committed tiny family, "
                                           "evaluate them with laid eval at every haystack size and print the "
                                           "report. 'laid demo family --out DIR' retrains the family from scratch.")
    demo.add_argument("--out", default="runs/demo", help="output folder (a rerun resumes from what is there)")
    demo.add_argument("--full", action="store_true", help="the complete grid: 3 training seeds, 50 questions per size")
    demo.add_argument("--family", default=str(FAMILY_DIR), help="folder with processor/, teacher/, student/")
    demo.add_argument("--seeds", type=int, nargs="+", help="training seeds of the students")
    demo.add_argument("--steps", type=int, help="optimizer steps per student")
    demo.add_argument("--questions", type=int, help="test questions per haystack size")
    demo.add_argument("--sizes", type=int, nargs="+", help="haystack sizes to evaluate")
    demo.set_defaults(run=_run_demo)
    steps = demo.add_subparsers(dest="demo_command")
    family = steps.add_parser("family", help="train the demo's teacher and base student from scratch")
    family.add_argument("--out", required=True, help="family folder to write (processor/, teacher/, student/, logs/)")
    family.add_argument("--work-dir", help="intermediate files (default: OUT/../family_work)")
    for stage in FAMILY_STAGES:
        family.add_argument(f"--{stage}-steps", type=int,
                            help=f"optimizer steps of the {stage} stage (each model; the align stage always runs, the "
                                 f"others with --recipe '{{\"curriculum\": []}}')")
    family.add_argument("--seed", type=int, help="teacher seed (the student uses seed + 1) and data seed")
    family.add_argument("--recipe", default="{}", help="FamilyRecipe fields as a JSON object, applied before the "
                        "--<stage>-steps and --seed flags, e.g. '{\"gate_accuracy\": 0.85, \"find_lr\": 5e-4}'")
    family.add_argument("--roles", nargs="+", choices=("teacher", "student"), default=["teacher", "student"],
                        help="train only these models; the student trains the teacher's chunks (its gate log), "
                             "so build the teacher first, or give \"stage_chunks\" in --recipe and run one process "
                             "per role side by side")
    family.set_defaults(run=_run_demo_family)


def _run_selfcheck(args: argparse.Namespace) -> None:
    from laid_kernels.selfcheck import check

    status = check(args)
    if status:
        raise SystemExit(status)


def add_selfcheck(commands) -> None:
    """``laid selfcheck``: every fused kernel against its reference and timed, on this machine's GPU."""
    from laid_kernels.selfcheck import add_arguments

    check = commands.add_parser("selfcheck", help="validate and time every fused kernel on this machine's GPU")
    add_arguments(check)
    check.set_defaults(run=_run_selfcheck)


def _run_plan(args: argparse.Namespace) -> None:
    from .plan import format_plan, plan, to_json

    result = plan(args.teacher, args.student, gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb, images=args.images,
                  strategy=args.strategy, tokens_per_image=args.tokens_per_image, text_tokens=args.text_tokens,
                  reserve_gb=args.reserve_gb)
    print(to_json(result) if args.json else format_plan(result))


def add_plan(commands) -> None:
    """``laid plan --teacher T --student S --gpus G --gpu-memory-gb M --images N --strategy fsdp|ddp [--json]``:
    the per-GPU memory of a run and whether it fits, from the models' configs alone (see laid.plan)."""
    from .plan import QWEN25_VL, RESERVE_GB, STRATEGIES, TEXT_TOKENS, TOKENS_PER_IMAGE

    known = ", ".join(QWEN25_VL)
    pl = commands.add_parser("plan", help="per-GPU memory of a LAid run before renting GPUs (from configs alone)",
                             description="Estimate the per-GPU memory of distilling STUDENT from TEACHER with the "
                                         "paper's recipe (batch 1, language model trained, vision frozen, gradient "
                                         "checkpointing): weights, gradients, AdamW states, activations, the "
                                         "teacher's forward, the fused losses' buffers and the mixer; and whether "
                                         "it fits. Nothing is downloaded or loaded: a model is a folder with "
                                         f"config.json or one of {known}.")
    pl.add_argument("--teacher", required=True, help="teacher: a model folder (config.json) or a built-in hub id")
    pl.add_argument("--student", required=True, help="student: a model folder (config.json) or a built-in hub id")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs (processes) of the run")
    pl.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU, GB (1e9 bytes)")
    pl.add_argument("--images", type=int, required=True, help="images per training prompt")
    pl.add_argument("--strategy", choices=STRATEGIES, required=True,
                    help="fsdp: both models sharded (FSDP2); ddp: each GPU holds both whole")
    pl.add_argument("--tokens-per-image", type=int, default=TOKENS_PER_IMAGE,
                    help="prompt tokens per image, visual tokens and the two delimiters (default: about 54K tokens "
                         "for 150 images, the Visual Haystacks protocol's COCO images at default pixels)")
    pl.add_argument("--text-tokens", type=int, default=TEXT_TOKENS,
                    help="prompt tokens besides the images (system turn, instruction, question, answer)")
    pl.add_argument("--reserve-gb", type=float, default=RESERVE_GB,
                    help="per GPU for the CUDA context, NCCL buffers and allocator fragmentation (an assumption)")
    pl.add_argument("--json", action="store_true", help="print one JSON object (per_gpu_gb, fits, breakdown_gb, ...)")
    pl.set_defaults(run=_run_plan)


COMMANDS = (add_data, add_models, add_train, add_eval, add_report, add_analyze, add_demo, add_selfcheck, add_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="laid", description="LAid distillation of Qwen2.5-VL models")
    parser.add_argument("--version", action="version", version=f"laid {__version__}")
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
