"""``laid demo``: the paper's experiment at CPU scale, end to end, on a tiny Qwen2.5-VL family trained by laid.

The family (``laid/demo_family``, committed): a teacher (4 layers, 8 heads, 4 kv heads, hidden 128) and a smaller base
student (2 layers, 4 heads, 2 kv heads, hidden 64), same head_dim (16), tokenizer and image processor, both trained
from random weights by ``laid.train`` (pure SFT, vision tower included) with the same recipe and data: captions of
single images (one visual token each), then haystacks of 1 to M images for M = 1, 4, 10, 30, 150, three "what else
is in the anchor's image?" questions in four, each size trained in chunks until the teacher answers held-out
haystacks of M images (``FamilyRecipe``: the student trains the teacher's chunks; ``build_family`` reproduces them
and reuses the stages a previous build finished; their training and gate logs are in ``demo_family/logs``).

The demo (``run_demo``), every number from the project's own code:

1. data: a training split of 2 to 20 images and test splits at ``SIZES`` (1 to 150 images) from ``laid data synth``,
   drawn from different seeds into different folders (no image file is shared);
2. distill: from the base student, with the same steps and data, one student per ``VARIANTS`` entry (SFT; LAid, the
   distillation study's choice: L_qk + L_KL + SFT; LAid with L_attn too; LAid without L_qk or L_KL) and per
   training seed;
3. eval: ``laid eval`` of the teacher, the base student and every trained student at every size;
4. report: ``laid report`` (runs of one variant over seeds are grouped: mean and std over seeds) and the plot.

Everything lands in ``out_dir``; a stage whose output exists is not redone, so an interrupted demo resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import LAidConfig
from .data import IGNORE_INDEX, pixel_budget, synth_benchmark, synth_captions, synth_haystacks, synth_retrieval
from .evaluate import SIZES, evaluate
from .models import load_processor
from .report import report
from .tiny import save_tiny_model, save_tiny_processor, tiny_qwen25vl_config
from .trainer import train

FAMILY_DIR = Path(__file__).with_name("demo_family")

# The family's shapes: the student is the smaller sibling (fewer layers, heads, kv heads and a narrower residual
# stream, a smaller padded vocabulary) with the same head_dim, tokenizer and vision tower shape.
TEACHER_SHAPE = dict(layers=4, hidden=128, heads=8, kv_heads=4, head_dim=16, vocab_size=512, vision_hidden=64,
                     vision_heads=2)
STUDENT_SHAPE = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab_size=448, vision_hidden=64,
                     vision_heads=2)

# The trained students: LAidConfig overrides on top of ``distill_config``'s full LAid objective. The demo's LAid is
# the distillation study's choice on the committed family (chosen on its validation split: every row with L_attn was
# 6 to 17 points below SFT at 50-150 images there; benchmarks/RESULTS.md, "The distillation study on the session-5
# family"): L_qk, L_KL and SFT without L_attn; the ablations drop one more term each, and "LAid + L_attn" is all four.
DEMO_LAID = dict(beta=0.0)
VARIANTS = {
    "SFT": dict(lambda_laid=0.0, lambda_kl=0.0),
    "LAid": DEMO_LAID,
    "LAid + L_attn": {},
    "LAid w/o L_qk": dict(lambda_laid=0.0),  # L_KL + SFT: without L_qk the choice has no LAid term left
    "LAid w/o L_KL": dict(DEMO_LAID, lambda_kl=0.0),
}
BASELINE = "Base student"


@dataclass(frozen=True)
class DemoGrid:
    """How much the demo does: training seeds, steps and data of each student, questions per test size."""

    seeds: tuple[int, ...] = (0,)
    steps: int = 150  # optimizer steps per student (batch_size examples each)
    batch_size: int = 4
    train_entries: int = 600  # training haystacks (2 to 20 images)
    questions: int = 20  # test questions per haystack size
    sizes: tuple[int, ...] = SIZES


QUICK = DemoGrid()
FULL = DemoGrid(seeds=(0, 1, 2), questions=50)


def folder_name(name: str) -> str:
    """The folder of a method's runs under ``students/`` and ``eval/``: "LAid w/o L_qk" -> "laid_wo_l_qk"."""
    return name.lower().replace(" ", "_").replace("/", "")


def family_paths(family: str | Path) -> dict[str, Path]:
    """The processor, teacher and base student folders of a family; FileNotFoundError names a missing one."""
    family = Path(family)
    paths = {name: family / name for name in ("processor", "teacher", "student")}
    for name, path in paths.items():
        if not path.is_dir():
            raise FileNotFoundError(f"family {str(family)!r} has no {name} folder ({str(path)!r}); build one with "
                                    f"`laid demo family --out DIR`")
    return paths


def family_image_size(family: str | Path) -> int:
    """The side in pixels of the images a family was trained on (``logs/recipe.json``; 56 for families built before
    the recipe recorded it): the demo's data are drawn at that size."""
    recipe = Path(family) / "logs" / "recipe.json"
    return json.loads(recipe.read_text()).get("image_size", 56) if recipe.is_file() else 56


def distill_config(family: dict[str, Path], data: Path, output_dir: Path, grid: DemoGrid, seed: int,
                   **overrides) -> LAidConfig:
    """The demo's LAid recipe for one student (CPU, fp32, last layers aligned, all four terms), plus overrides."""
    fields = dict(teacher=str(family["teacher"]), student=str(family["student"]), processor=str(family["processor"]),
                  data=str(data), image_root=str(data.parent), max_images=20, layer_pairs=[[-1, -1]],
                  lambda_laid=1.0, beta=1.0, alpha=1.0, lambda_kl=1.0, tau=1.0, lambda_sft=1.0, mixer_init="lstsq",
                  lr=3e-4, mixer_lr=1e-3, epochs=1, max_steps=grid.steps, batch_size=grid.batch_size, grad_accum=1,
                  warmup_ratio=0.1, precision="fp32", attn_implementation="sdpa", gradient_checkpointing=False,
                  save_every=10**9, keep_checkpoints=1, seed=seed, output_dir=str(output_dir))
    return LAidConfig().with_overrides(**{**fields, **overrides})


def _train_entries_for(grid: DemoGrid) -> int:
    # one epoch must hold the steps: steps * batch_size examples at least
    return max(grid.train_entries, grid.steps * grid.batch_size)


def _stage(name: str, items: list, timings: dict):
    """Iterate ``items`` under a progress bar named ``name``, adding the stage's seconds to ``timings``."""
    start = time.perf_counter()
    yield from tqdm(items, desc=name, unit="job")
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 1)


def run_demo(out_dir: str | Path = "runs/demo", *, grid: DemoGrid = QUICK, family: str | Path = FAMILY_DIR) -> str:
    """Distil, evaluate and report; returns the markdown table (also in ``out_dir/report/report.md``).

    ``out_dir/timings.json`` holds the seconds of each stage and ``out_dir/grid.json`` the grid that ran.
    """
    out = Path(out_dir)
    paths = family_paths(family)
    out.mkdir(parents=True, exist_ok=True)
    grid_file = out / "grid.json"
    if grid_file.is_file() and json.loads(grid_file.read_text()) != json.loads(json.dumps(asdict(grid))):
        raise ValueError(f"out_dir {str(out)!r} holds a demo with another grid ({grid_file}); use another out_dir")
    grid_file.write_text(json.dumps(asdict(grid), indent=1))
    timings: dict[str, float] = {}

    image_size = family_image_size(family)
    train_json = out / "data" / "train" / "visual_haystack_synth.json"
    test_dir = out / "data" / "test"
    for job in _stage("data", ["train", "test"], timings):
        if job == "train" and not train_json.is_file():
            synth_haystacks(train_json.parent, n_entries=_train_entries_for(grid), min_images=2, max_images=20,
                            image_size=image_size, seed=101)
        if job == "test" and not (test_dir / "done").is_file():
            synth_benchmark(test_dir, sizes=grid.sizes, n_entries=grid.questions, image_size=image_size, seed=202)
            (test_dir / "done").write_text("")

    students = [(name, seed) for seed in grid.seeds for name in VARIANTS]
    for name, seed in _stage("distill", students, timings):
        run_dir = out / "students" / folder_name(name) / f"seed{seed}"
        if not (run_dir / "final" / "summary.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            train(distill_config(paths, train_json, run_dir, grid, seed, **VARIANTS[name]))

    models = [("Teacher", paths["teacher"], 0), (BASELINE, paths["student"], 0)]
    models += [(name, out / "students" / folder_name(name) / f"seed{seed}" / "final", seed)
               for name, seed in students]
    eval_dirs = []
    for name, model, seed in _stage("eval", models, timings):
        eval_dir = out / "eval" / folder_name(name) / f"seed{seed}"
        if not (eval_dir / "summary.json").is_file():
            evaluate(model, test_dir, sizes=grid.sizes, output_dir=eval_dir, processor=paths["processor"], name=name,
                     limit=grid.questions, max_new_tokens=8, device="cpu", attn_implementation="sdpa")
        eval_dirs.append(eval_dir)

    for _ in _stage("report", [out / "report"], timings):
        table = report(eval_dirs, baseline=BASELINE, out_dir=out / "report")
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return table


# ----------------------------------------------------------------------------------------------------------------
# Reproducing the family from scratch.

@dataclass(frozen=True)
class FamilyRecipe:
    """How ``build_family`` trains both models: the same stages, data and settings for each.

    The default (the committed family's recipe, its ``logs/recipe.json``) is an accuracy-gated curriculum: every
    image is one visual token (``image_size`` 28), then

    1. align: captions of single images (``synth_captions``), so the vision tower learns the objects from a
       first-order signal (a yes/no answer depends on the image only through the question, which a model trained
       from scratch does not learn to use in any affordable number of steps);
    2. "reach<M>" for each size M in ``curriculum`` (1, 4, 10, 30, 150): haystacks of 1 to M images, three
       "what else is in the anchor's image?" questions (``synth_retrieval``, the first-order signal for attending
       to the needle) in four yes/no ones, trained in chunks of ``gate_chunk_steps`` until the teacher-forced yes/no
       accuracy on held-out haystacks of exactly M images reaches ``gate_accuracy`` (or ``gate_max_chunks``
       chunks), since a model moved to longer haystacks while its retrieval at the current size was still soft did
       not learn it there (benchmarks/RESULTS.md, "The family, session 3"). A stage at one image uses ``lr``, the
       others ``find_lr``; sizes up to 30 take ``batch_size`` haystacks a step, longer ones ``long_batch_size`` x
       ``long_grad_accum``.

    The teacher's gates set the schedule and the student trains the same chunks (``student_follows_teacher``): the
    same steps and data for both, up to ``student_max_images`` (a student pre-trained on shorter haystacks). The
    student's own gates are still scored and logged.

    ``curriculum=()`` gives the fixed stages of the first family instead (``single_steps`` of haystacks of one
    image, ``find_steps`` of 2 to 4 images, ``wide_steps`` of ``wide_images``, ``long_steps`` of ``long_images`` at
    ``long_lr``; measured in RESULTS.md, "laid demo" and "The family, session 3").

    Learning rates are those of the student's hidden size (64) and scale by ``64 / hidden`` (the teacher, 128,
    takes half), as muP scales Adam's step with width: at the student's rate the teacher stayed at chance for the
    whole single stage.
    """

    align_steps: int = 600
    single_steps: int = 3000
    find_steps: int = 2000
    wide_steps: int = 1000
    long_steps: int = 400
    batch_size: int = 16  # examples per step in every stage but the long one
    long_batch_size: int = 1  # haystacks per micro-batch in the long stage (padded to the longest)
    long_grad_accum: int = 8  # micro-batches per step in the long stage (and in gated stages beyond 30 images)
    lr: float = 2e-3  # align, single and reach1 stages
    find_lr: float = 1e-3  # find, wide and the gated stages beyond one image
    long_lr: float = 3e-4
    # pixels per side of every image, also the processor's minimum: 28 is one merged patch (one visual token an
    # image, the committed family), 56 is 2 x 2 merged patches (4 visual tokens an image, the first family)
    image_size: int = 28
    # haystack sizes (fewest, most images) of the wide and long stages: a curriculum moves most steps to long ones
    wide_images: tuple[int, int] = (2, 20)
    long_images: tuple[int, int] = (1, 150)
    retrieval_share: float = 0.75  # share of "what else is there?" questions in find, wide, long and reach<M>
    seed: int = 0
    # Accuracy-gated curriculum (empty: the fixed stages above). Haystack sizes reached one after another: the
    # stage "reach<M>" trains on 1 to M images (log-uniform, retrieval_share "what else?" questions) in chunks of
    # gate_chunk_steps until the teacher-forced accuracy on gate_questions held-out yes/no questions (the benchmark's)
    # on haystacks of exactly M images reaches gate_accuracy, or gate_max_chunks chunks. It replaces the single,
    # find, wide and long stages.
    curriculum: tuple[int, ...] = (1, 4, 10, 30, 150)
    gate_accuracy: float = 0.9
    gate_chunk_steps: int = 200
    gate_max_chunks: int = 10
    gate_questions: int = 100
    # Fixed chunks per gated stage instead of the gate, for both models (one count per curriculum size; gates are
    # still scored and logged); else, with student_follows_teacher, the student trains the teacher's counts (read
    # from out/logs/teacher_gates.jsonl, so the teacher builds first): the same steps and data for both, the
    # schedule set by the teacher's gates.
    stage_chunks: tuple[int, ...] = ()
    student_follows_teacher: bool = True
    # The student's gated curriculum ends at the last size <= this (None: the whole curriculum, as the teacher's): a
    # sibling pre-trained on shorter haystacks, whose window stops where its training did. The committed student
    # stops at 30 images: trained to 150 as the teacher, it kept most of the teacher's window (RESULTS.md, "The
    # family, session 5"), so capacity alone left little to distil. The fixed stages (curriculum=()) train both
    # roles alike; a recipe given as JSON may not set it without a curriculum.
    student_max_images: int | None = 30
    # The student's initial weights' seed (None: seed + 1); its data and training order stay those of ``seed``. The
    # committed student's, 2, was chosen among 1, 2 and 3 on a validation set: at 1-2 images the three inits land
    # 15 to 38 points apart (RESULTS.md, "The family, session 6").
    student_seed: int | None = 2


@dataclass(frozen=True)
class _Stage:
    name: str
    data: str  # "captions", "haystacks" (yes/no, task "vhs") or "retrieval" (task "free")
    steps: int  # per chunk for a gated stage
    batch_size: int
    grad_accum: int
    min_images: int
    max_images: int
    lr: float  # at the student's hidden size
    gated: bool = False  # trained in chunks until the gate (FamilyRecipe.gate_accuracy at max_images)

    @property
    def task(self) -> str:
        return "vhs" if self.data == "haystacks" else "free"


def _family_stages(recipe: FamilyRecipe) -> list[_Stage]:
    r = recipe
    for name, (low, high) in (("wide_images", r.wide_images), ("long_images", r.long_images)):
        if not 1 <= low <= high:
            raise ValueError(f"recipe: {name} must be (fewest, most) images with 1 <= fewest <= most, got "
                             f"{(low, high)}")
    align = _Stage("align", "captions", r.align_steps, r.batch_size, 1, 1, 1, r.lr)
    if r.curriculum:
        if r.student_max_images is not None and r.student_max_images < r.curriculum[0]:
            raise ValueError(f"recipe: student_max_images must be >= the curriculum's first size "
                             f"{r.curriculum[0]} (or null), got {r.student_max_images}")
        if list(r.curriculum) != sorted(set(r.curriculum)) or r.curriculum[0] < 1:
            raise ValueError(f"recipe: curriculum must be increasing haystack sizes >= 1, got {r.curriculum}")
        if not 0 < r.gate_accuracy <= 1 or min(r.gate_chunk_steps, r.gate_max_chunks, r.gate_questions) < 1:
            raise ValueError(f"recipe: need 0 < gate_accuracy <= 1 and gate_chunk_steps, gate_max_chunks, "
                             f"gate_questions >= 1, got {r.gate_accuracy}, {r.gate_chunk_steps}, "
                             f"{r.gate_max_chunks}, {r.gate_questions}")
        if r.stage_chunks and (len(r.stage_chunks) != len(r.curriculum) or min(r.stage_chunks) < 1):
            raise ValueError(f"recipe: stage_chunks needs one count >= 1 per curriculum size {r.curriculum}, got "
                             f"{r.stage_chunks}")
        return [align] + [_Stage(f"reach{m}", "retrieval", r.gate_chunk_steps,
                                 r.batch_size if m <= 30 else r.long_batch_size, 1 if m <= 30 else r.long_grad_accum,
                                 1, m, r.lr if m == 1 else r.find_lr, gated=True) for m in r.curriculum]
    return [align,
            _Stage("single", "haystacks", r.single_steps, r.batch_size, 1, 1, 1, r.lr),
            _Stage("find", "retrieval", r.find_steps, r.batch_size, 1, 2, 4, r.find_lr),
            _Stage("wide", "retrieval", r.wide_steps, r.batch_size, 1, *r.wide_images, r.find_lr),
            _Stage("long", "retrieval", r.long_steps, r.long_batch_size, r.long_grad_accum, *r.long_images, r.long_lr)]


# The fixed stages (``curriculum=()``), in order: FamilyRecipe.<name>_steps and the command line's --<name>-steps.
_FIXED_STAGES = {stage.name: stage for stage in _family_stages(replace(FamilyRecipe(), curriculum=()))}
FAMILY_STAGES = tuple(_FIXED_STAGES)
# Data folders are named against the first family's recipe (the fixed stages' sizes, this share of "what else?"
# questions), so that the folders of earlier builds keep their names and are reused.
_FIRST_RETRIEVAL_SHARE = 0.5


def _family_data(work: Path, stage: _Stage, image_size: int, seed: int, retrieval_share: float) -> Path:
    """The stage's training set under ``work/data/<stage>-<entries>-<image_size>px-seed<seed>``, with
    ``-images<fewest>-<most>`` / ``-share<retrieval_share>`` when those differ from the first family's (one epoch
    holds exactly its steps; a stage given more steps, other sizes, another image size or another seed gets a new
    set), written once."""
    n_entries = stage.steps * stage.batch_size * stage.grad_accum
    folder = f"{stage.name}-{n_entries}-{image_size}px-seed{seed}"
    default = _FIXED_STAGES.get(stage.name, stage)
    if (stage.min_images, stage.max_images) != (default.min_images, default.max_images):
        folder += f"-images{stage.min_images}-{stage.max_images}"
    write, name = {"captions": (synth_captions, "captions_synth.json"),
                   "haystacks": (synth_haystacks, "visual_haystack_synth.json"),
                   "retrieval": (synth_retrieval, "retrieval_synth.json")}[stage.data]
    options = {} if stage.data == "captions" else dict(min_images=stage.min_images, max_images=stage.max_images,
                                                        log_uniform=True)
    if stage.data == "retrieval":
        options["retrieval_share"] = retrieval_share
        if retrieval_share != _FIRST_RETRIEVAL_SHARE:
            folder += f"-share{retrieval_share:g}"
    folder = work / "data" / folder
    if not (folder / name).is_file():
        _write_once(folder, lambda tmp: write(tmp, n_entries=n_entries, image_size=image_size, seed=seed, **options))
    return folder / name


def _write_once(folder: Path, write) -> None:
    """``write(tmp)`` into a private folder, then rename it to ``folder``: two builds (one per role) writing the same
    folder at once never see each other's half-written files; the one that renames second discards its copy."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp)


def _chunks_trained(teacher_log: Path, stages: list[_Stage]) -> tuple[int, ...]:
    """How many chunks the teacher trained in each gated stage, from its gate log (``student_follows_teacher``)."""
    if not teacher_log.is_file():
        raise FileNotFoundError(f"student_follows_teacher: {teacher_log} not found; build the teacher first "
                                f"(roles teacher, then student, or both in one call)")
    rows = [json.loads(line) for line in teacher_log.read_text().splitlines()]
    counts = tuple(sum(row["stage"] == stage.name for row in rows) for stage in stages if stage.gated)
    if min(counts) < 1:
        raise ValueError(f"student_follows_teacher: {teacher_log} lacks a gated stage of this recipe "
                         f"({[stage.name for stage in stages if stage.gated]}); was the teacher built with it?")
    return counts


def _gate_data(work: Path, images: int, recipe: FamilyRecipe) -> Path:
    """The held-out gate set of a gated stage: ``2 * recipe.gate_questions`` haystacks of exactly ``images`` images,
    every other one a yes/no question and the others "what else is there?" (``synth_retrieval``), from a seed no
    training set uses, written once."""
    folder = work / "data" / f"gate-{images}-{recipe.gate_questions}yesno-{recipe.image_size}px-seed{recipe.seed}"
    if not (folder / "retrieval_synth.json").is_file():
        _write_once(folder, lambda tmp: synth_retrieval(tmp, n_entries=2 * recipe.gate_questions, min_images=images,
                                                        max_images=images, image_size=recipe.image_size,
                                                        seed=recipe.seed + 70_000 + images, retrieval_share=0.5))
    return folder / "retrieval_synth.json"


def stage_minutes(run_dir: Path) -> float:
    """Wall minutes of one finished ``laid.train`` run: from its config.yaml (written at the start) to its
    final/summary.json."""
    return ((run_dir / "final" / "summary.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime) / 60


def _gate(run_dir: Path, processor: Path, data: Path, retrained: bool) -> dict:
    """A gated chunk's record, ``run_dir/gate.json`` (computed once per gate set): its training minutes
    (``config.yaml`` to ``final/summary.json``), the gate set and ``answer_accuracy`` of ``run_dir/final`` on it."""
    path = run_dir / "gate.json"
    if retrained or not path.is_file() or json.loads(path.read_text()).get("gate_set") != str(data):
        record = {"train_minutes": round(stage_minutes(run_dir), 2), "gate_set": str(data),
                  **answer_accuracy(run_dir / "final", processor, data)}
        path.write_text(json.dumps(record, indent=1))
    return json.loads(path.read_text())


def answer_accuracy(model: Path, processor: Path, data: Path) -> dict:
    """Teacher-forced answers of ``model`` on the ``task="free"`` set ``data`` (images under its folder), CPU, fp32:
    a question counts as answered when the argmax at every answer token (and the closing ``<|im_end|>``) is the
    label. Returns ``accuracy`` over all questions, ``yes_no`` and ``what_else`` accuracy (the yes/no questions and
    the others), and ``questions``."""
    from .data import ANSWERS, VHsDataset, collate
    from .evaluate import load_for_eval
    from .prompt_inputs import model_inputs

    net = load_for_eval(str(model), method="baseline", device=torch.device("cpu"), attn_implementation="sdpa")
    dataset = VHsDataset(data, data.parent, load_processor(str(processor)), task="free")
    right = {"yes_no": [], "what_else": []}
    with torch.inference_mode():
        for k in range(len(dataset)):
            inputs = model_inputs(collate([dataset[k]], pad_token_id=dataset.pad_token_id), "cpu")
            labels = inputs.pop("labels")[0, 1:]
            predicted = net(**inputs).logits[0, :-1].argmax(-1)
            answered = labels != IGNORE_INDEX
            kind = "yes_no" if dataset.entries[k]["conversations"][1]["value"] in ANSWERS else "what_else"
            right[kind].append(bool((predicted[answered] == labels[answered]).all()))
    every = right["yes_no"] + right["what_else"]
    return {"accuracy": sum(every) / len(every), "questions": len(every),
            **{kind: (sum(v) / len(v) if v else None) for kind, v in right.items()}}


def family_config(init: Path, processor: Path, data: Path, output_dir: Path, stage: _Stage, hidden: int,
                  seed: int) -> LAidConfig:
    """Pure SFT (no teacher), vision tower included, of one family stage from the weights in ``init`` (a model of
    hidden size ``hidden``)."""
    return LAidConfig().with_overrides(
        student=str(init), processor=str(processor), data=str(data), image_root=str(data.parent), task=stage.task,
        max_images=stage.max_images, lambda_laid=0.0, lambda_kl=0.0, lambda_sft=1.0, train_vision=True,
        lr=stage.lr * STUDENT_SHAPE["hidden"] / hidden, weight_decay=0.0, epochs=1, max_steps=stage.steps,
        batch_size=stage.batch_size, grad_accum=stage.grad_accum, warmup_ratio=0.05, precision="fp32",
        attn_implementation="sdpa",
        gradient_checkpointing=False, save_every=10**9, keep_checkpoints=1, seed=seed, output_dir=str(output_dir))


def _finished(run_dir: Path, config: LAidConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``config`` (its ``config.yaml`` and final summary)."""
    saved = run_dir / "config.yaml"
    return (run_dir / "final" / "summary.json").is_file() and saved.is_file() and LAidConfig.from_yaml(saved) == config


def build_family(out_dir: str | Path, *, recipe: FamilyRecipe = FamilyRecipe(), work_dir: str | Path | None = None,
                 roles: tuple[str, ...] = ("teacher", "student")) -> Path:
    """Train the demo family from scratch into ``out_dir/{processor,teacher,student,logs}``; returns ``out_dir``.

    Random weights (``tiny_qwen25vl_config`` of ``TEACHER_SHAPE`` / ``STUDENT_SHAPE``, seeds ``recipe.seed`` and
    ``recipe.student_seed`` or ``recipe.seed + 1``), then ``laid.train`` with ``family_config`` through the recipe's
    stages, each from the previous one's exported weights, on the same synthetic data for both models. The final weights (safetensors) go
    to ``out_dir/<role>``; every stage's ``config.yaml`` and ``metrics.jsonl`` to ``out_dir/logs`` as
    ``<role>_<stage>_<name>``. Intermediate files go to ``work_dir`` (default ``out_dir/../family_work``): a stage
    that finished there with the same config and inputs is not trained again (an interrupted or extended build
    resumes). ``roles`` trains a subset: two processes, one per role, build the family side by side (each writes
    the shared data and processor once, atomically, if the other has not yet) when the student's schedule does not
    wait for the teacher's gates (``recipe.stage_chunks``, or ``student_follows_teacher`` off).
    """
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.parent / "family_work"
    processor = out / "processor"
    if not processor.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        _write_once(processor, lambda tmp: save_tiny_processor(tmp, min_pixels=recipe.image_size ** 2))
    built_for = pixel_budget(load_processor(str(processor)))["min_pixels"]
    if built_for != recipe.image_size ** 2:
        raise ValueError(f"{str(processor)!r} was built for {built_for}-pixel images, the recipe asks for image_size "
                         f"{recipe.image_size}; build this recipe into another out_dir")
    stages = _family_stages(recipe)
    shapes = {"teacher": TEACHER_SHAPE, "student": STUDENT_SHAPE}
    default_seeds = {"teacher": recipe.seed, "student": recipe.seed + 1}
    seeds = {**default_seeds, **({} if recipe.student_seed is None else {"student": recipe.student_seed})}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for role in roles:
        shape, seed = shapes[role], seeds[role]
        # Another initial seed gets its own folder (its stages' configs differ, so none is reused for another init);
        # the default seeds keep the first name, so existing work folders resume.
        weights = work / (f"{role}_init" if seed == default_seeds[role] else f"{role}_init_seed{seed}")
        save_tiny_model(weights, tiny_qwen25vl_config(**shape), seed=seed)
        retrain = False  # once a stage trains, the stages after it start from new weights
        fixed = recipe.stage_chunks
        if role == "student" and recipe.student_follows_teacher and recipe.curriculum and not fixed:
            fixed = _chunks_trained(out / "logs" / "teacher_gates.jsonl", stages)
        fixed_chunks = dict(zip([stage.name for stage in stages if stage.gated], fixed))
        gate_log = out / "logs" / f"{role}_gates.jsonl"
        gate_log.unlink(missing_ok=True)
        for k, stage in enumerate(stages):
            if role == "student" and stage.gated and stage.max_images > (recipe.student_max_images or math.inf):
                break
            chunks = (range(1, fixed_chunks.get(stage.name, recipe.gate_max_chunks) + 1) if stage.gated else [None])
            for chunk in chunks:
                name = stage.name if chunk is None else f"{stage.name}_{chunk}"
                data_seed = recipe.seed + 303 + k + (0 if chunk is None else 1000 * chunk)
                data = _family_data(work, stage, recipe.image_size, data_seed, recipe.retrieval_share)
                run_dir = work / f"{role}_{name}"
                config = family_config(weights, processor, data, run_dir, stage, shape["hidden"], recipe.seed)
                retrain = retrain or not _finished(run_dir, config)
                if retrain:
                    shutil.rmtree(run_dir, ignore_errors=True)
                    train(config)
                weights = run_dir / "final"
                for file in ("metrics.jsonl", "config.yaml"):
                    shutil.copy(run_dir / file, out / "logs" / f"{role}_{name}_{file}")
                if chunk is not None:
                    gate = _gate(run_dir, processor, _gate_data(work, stage.max_images, recipe), retrain)
                    with gate_log.open("a") as log:
                        log.write(json.dumps({"stage": stage.name, "chunk": chunk, **gate}) + "\n")
                    if not fixed_chunks and gate["yes_no"] >= recipe.gate_accuracy:
                        break
        shutil.rmtree(out / role, ignore_errors=True)
        shutil.copytree(weights, out / role,
                        ignore=shutil.ignore_patterns("*token*", "*processor*", "chat_template*", "vocab*", "merges*",
                                                      "summary.json"))
    (out / "logs" / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    return out


def recipe_from_json(text: str) -> FamilyRecipe:
    """``FamilyRecipe()`` with the fields of the JSON object ``text`` (``'{"image_size": 28}'``); ValueError names
    what is wrong (not JSON, not an object, an unknown field)."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe: not JSON ({error}): {text!r}") from error
    if not isinstance(fields, dict):
        raise ValueError(f"recipe: expected a JSON object of FamilyRecipe fields, got {text!r}")
    unknown = sorted(set(fields) - set(FamilyRecipe.__dataclass_fields__))
    if unknown:
        raise ValueError(f"recipe: unknown FamilyRecipe fields {unknown}")
    for name in ("wide_images", "long_images"):
        if name in fields:
            sizes = fields[name]
            if not (isinstance(sizes, list) and len(sizes) == 2 and all(isinstance(n, int) for n in sizes)):
                raise ValueError(f"recipe: {name} must be a list of two ints [fewest, most], got {sizes!r}")
            fields[name] = tuple(sizes)
    for name in ("curriculum", "stage_chunks"):
        if name in fields:
            values = fields[name]
            if not (isinstance(values, list) and all(isinstance(n, int) for n in values)):
                raise ValueError(f"recipe: {name} must be a list of ints, got {values!r}")
            fields[name] = tuple(values)
    recipe = replace(FamilyRecipe(), **fields)
    if fields.get("student_max_images") is not None and not recipe.curriculum:
        raise ValueError(f"recipe: student_max_images needs a curriculum (the fixed stages train both roles alike), "
                         f"got {fields['student_max_images']} with curriculum []")
    _family_stages(recipe)  # checks the sizes
    return recipe


def overridden(settings, **changes):
    """A ``DemoGrid`` or ``FamilyRecipe`` with the non-None ``changes`` applied (the command line's overrides)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
