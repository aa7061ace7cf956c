"""A miniature of `laid demo` (a handful of steps and questions), so that the README's main job cannot rot.

The family is retrained from scratch in miniature by ``build_family`` (the same code that made the committed one),
then the demo distils every variant, evaluates every model and reports, exactly as the full run does.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from laid.cli import main
from laid.config import LAidConfig
from laid.data import pixel_budget
from laid.demo import (BASELINE, FAMILY_DIR, FAMILY_STAGES, VARIANTS, DemoGrid, FamilyRecipe, build_family,
                       family_image_size, family_paths, folder_name, recipe_from_json, run_demo)
from laid.models import load_processor

MINI = DemoGrid(seeds=(0,), steps=2, batch_size=2, train_entries=8, questions=2, sizes=(1, 150))
MINI_RECIPE = FamilyRecipe(align_steps=2, single_steps=1, find_steps=1, wide_steps=1, long_steps=2, batch_size=2,
                           long_batch_size=2, long_grad_accum=2, image_size=28, curriculum=())  # the fixed stages
REPO = Path(__file__).resolve().parent.parent
STAGE_TASKS = {"align": "free", "single": "vhs", "find": "free", "wide": "free", "long": "free"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return build_family(root / "family", recipe=MINI_RECIPE, work_dir=root / "work")


def test_build_family_trains_both_models_from_scratch(family):
    paths = family_paths(family)
    init = {"teacher": "teacher_init", "student": f"student_init_seed{MINI_RECIPE.student_seed}"}
    for role in ("teacher", "student"):
        trained = load_file(paths[role] / "model.safetensors")
        initial = load_file(family.parent / "work" / init[role] / "model.safetensors")
        assert trained.keys() == initial.keys()
        changed = [k for k in trained if not (trained[k] == initial[k]).all()]
        assert any(k.startswith("visual.") for k in changed)  # the vision tower trains too
        assert any(k.startswith("model.layers.") for k in changed)
        assert list(STAGE_TASKS) == list(FAMILY_STAGES)
        for stage, task in STAGE_TASKS.items():
            steps = getattr(MINI_RECIPE, f"{stage}_steps")
            log = family / "logs" / f"{role}_{stage}_metrics.jsonl"
            metrics = [json.loads(line) for line in log.read_text().splitlines()]
            assert [m["step"] for m in metrics] == list(range(1, steps + 1)) and set(metrics[0]) >= {"sft", "loss"}
            config = (family / "logs" / f"{role}_{stage}_config.yaml").read_text()
            assert f"task: {task}" in config
    assert json.loads((family / "logs" / "recipe.json").read_text())["long_steps"] == 2
    # images of MINI_RECIPE.image_size (28) are one visual token: the processor's minimum is one merged patch
    assert pixel_budget(load_processor(str(paths["processor"])))["min_pixels"] == MINI_RECIPE.image_size ** 2 == 784
    images = list((family.parent / "work" / "data").rglob("*.png"))
    assert images and {Image.open(path).size for path in images} == {(28, 28)}


def test_demo_data_are_drawn_at_the_familys_image_size(family, tmp_path):
    assert family_image_size(family) == 28
    legacy = tmp_path / "legacy"
    (legacy / "logs").mkdir(parents=True)
    (legacy / "logs" / "recipe.json").write_text(json.dumps({"long_steps": 400}))  # built before image_size existed
    assert family_image_size(legacy) == 56
    with pytest.raises(ValueError, match="built for 784-pixel images, the recipe asks for image_size 56"):
        build_family(family, recipe=replace(MINI_RECIPE, image_size=56), work_dir=tmp_path / "work")


def test_build_family_reuses_finished_stages_of_the_same_config(tmp_path, monkeypatch):
    """A rerun over the same work folder trains nothing; a changed stage retrains that stage and the ones after it."""
    import laid.demo as demo

    trained, real_train = [], demo.train

    def recording_train(config):
        trained.append(Path(config.output_dir).name)
        return real_train(config)

    monkeypatch.setattr(demo, "train", recording_train)
    build = partial(build_family, tmp_path / "family", work_dir=tmp_path / "work", roles=("student",))
    build(recipe=MINI_RECIPE)
    assert trained == [f"student_{stage}" for stage in FAMILY_STAGES]
    trained.clear()
    build(recipe=MINI_RECIPE)
    assert trained == []
    build(recipe=replace(MINI_RECIPE, wide_steps=2))
    assert trained == ["student_wide", "student_long"]
    wide_log = (tmp_path / "work" / "student_wide" / "metrics.jsonl").read_text().splitlines()
    assert len(wide_log) == 2  # the longer stage got a training set that holds its steps

    def data_of(stage: str) -> str:
        return LAidConfig.from_yaml(tmp_path / "work" / f"student_{stage}" / "config.yaml").data

    seed0_data = {stage: data_of(stage) for stage in FAMILY_STAGES}
    trained.clear()
    build(recipe=replace(MINI_RECIPE, wide_steps=2, seed=1))
    assert trained == [f"student_{stage}" for stage in FAMILY_STAGES]
    assert all(data_of(stage) != seed0_data[stage] for stage in FAMILY_STAGES)  # another seed draws its own data


def test_family_data_are_written_once_and_atomically(tmp_path):
    """Two builds (one per role) may write the same folder at once: each writes a private copy and renames it; the
    second rename finds the folder there and discards its copy, and the folder never holds half-written files."""
    from laid.demo import _write_once

    def write(tmp: Path, text: str) -> None:
        tmp.mkdir()
        (tmp / "data.json").write_text(text)

    folder = tmp_path / "data"
    _write_once(folder, lambda tmp: write(tmp, "first"))
    _write_once(folder, lambda tmp: write(tmp, "second"))
    assert (folder / "data.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_demo_family_cli_builds_one_role(tmp_path, capsys):
    steps = [arg for stage in FAMILY_STAGES for arg in (f"--{stage}-steps", "1")]
    recipe = '{"curriculum": [], "batch_size": 2, "long_grad_accum": 1}'
    assert main(["demo", "family", "--out", str(tmp_path / "family"), "--roles", "student", "--recipe", recipe,
                 *steps]) == 0
    assert (tmp_path / "family" / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "family" / "teacher").exists()
    written = json.loads((tmp_path / "family" / "logs" / "recipe.json").read_text())
    assert (written["image_size"], written["batch_size"], written["find_steps"]) == (28, 2, 1)
    assert main(["demo", "family", "--out", str(tmp_path / "bad"), "--recipe", '{"image_sise": 28}']) == 2
    assert "unknown FamilyRecipe fields ['image_sise']" in capsys.readouterr().err


def test_default_recipe_is_the_committed_familys():
    committed = (FAMILY_DIR / "logs" / "recipe.json").read_text()
    assert set(json.loads(committed)) == set(asdict(FamilyRecipe()))  # every field recorded
    assert recipe_from_json(committed) == FamilyRecipe()
    assert FamilyRecipe().curriculum and FamilyRecipe().student_follows_teacher  # gated; the teacher sets the steps


def test_recipe_haystack_sizes_and_retrieval_share_reach_the_stage_data(tmp_path):
    """wide_images / long_images set the stages' haystack sizes and retrieval_share the share of "what else is
    there?" questions of the fixed stages; a stage whose data differ from the first family's gets its own folder."""
    from laid.demo import _family_data, _family_stages

    recipe = recipe_from_json('{"curriculum": [], "long_images": [20, 30], "retrieval_share": 0.75, "long_steps": 2, '
                              '"long_grad_accum": 2}')
    assert recipe.long_images == (20, 30)
    long = _family_stages(recipe)[-1]
    assert (long.min_images, long.max_images) == (20, 30)
    path = _family_data(tmp_path, long, 28, 0, recipe.retrieval_share)
    assert path.parent.name == "long-4-28px-seed0-images20-30-share0.75"
    entries = json.loads(path.read_text())
    assert all(20 <= len(e["pos_image"]) + len(e["neg_image"]) <= 30 for e in entries)
    asks = ["what else is there?" in e["conversations"][0]["value"] for e in entries]
    assert asks == [True, False, True, True]  # entry k asks when floor(k * 0.75) steps up
    first = FamilyRecipe(long_steps=2, long_grad_accum=2, curriculum=())
    default = _family_data(tmp_path, _family_stages(first)[-1], 28, 0, 0.5)
    assert default.parent.name == "long-4-28px-seed0"  # the first family's folder names are unchanged
    reach = _family_data(tmp_path, replace(_family_stages(FamilyRecipe())[-1], steps=1), 28, 0, 0.75)
    assert reach.parent.name == "reach150-8-28px-seed0-share0.75"  # nor the committed family's
    for bad, message in (('{"long_images": [30, 20]}', "long_images must be"),
                         ('{"wide_images": 20}', "wide_images must be a list of two ints")):
        with pytest.raises(ValueError, match=message):
            recipe_from_json(bad)
    with pytest.raises(ValueError, match="retrieval_share must be in"):
        _family_data(tmp_path, long, 28, 1, 1.5)


def test_miniature_demo_distils_evaluates_and_reports(family, tmp_path, capsys):
    table = run_demo(tmp_path / "demo", grid=MINI, family=family)
    rows = table.strip().split("\n")[2:]
    names = [row.strip("|").split("|")[0].strip() for row in rows]
    assert names == ["Teacher", BASELINE, *VARIANTS]
    assert (tmp_path / "demo" / "report" / "accuracy.png").is_file()
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert set(timings) == {"data", "distill", "eval", "report"}
    for name in VARIANTS:
        student = tmp_path / "demo" / "students" / folder_name(name) / "seed0"
        summary = json.loads((student / "final" / "summary.json").read_text())
        assert summary["steps"] == MINI.steps
    # Evaluated through laid eval: one answer file per question and size.
    assert {Image.open(path).size for path in (tmp_path / "demo" / "data").rglob("*.png")} == {(28, 28)}
    answers = sorted((tmp_path / "demo" / "eval" / "laid" / "seed0").glob("*_images/*.json"))
    assert len(answers) == len(MINI.sizes) * MINI.questions

    # A rerun finds everything done and only reports again; another grid in the same folder is refused.
    before = (tmp_path / "demo" / "students" / "sft" / "seed0" / "final" / "model.safetensors").stat().st_mtime_ns
    assert run_demo(tmp_path / "demo", grid=MINI, family=family) == table
    after = (tmp_path / "demo" / "students" / "sft" / "seed0" / "final" / "model.safetensors").stat().st_mtime_ns
    assert before == after
    with pytest.raises(ValueError, match="holds a demo with another grid"):
        run_demo(tmp_path / "demo", grid=DemoGrid(seeds=(0,), steps=3, questions=2, sizes=(1, 150)), family=family)

    # benchmarks/needle_attention.py runs on a finished demo: at one image all image attention is on the needle.
    out = tmp_path / "needle.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "needle_attention.py"), "--demo",
                           str(tmp_path / "demo"), "--family", str(family), "--sizes", "1", "150", "--questions", "1",
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's laid, not an installed one
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 5 and out.with_suffix(".png").is_file()
    for row in rows:
        assert row["best_head"] == pytest.approx(1.0) if row["size"] == 1 else 0 < row["best_head"] < 1


def test_demo_cli_errors_name_the_missing_family(tmp_path, capsys):
    assert main(["demo", "--family", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "has no processor folder" in capsys.readouterr().err


def test_the_committed_family_is_complete():
    """Weights and config of both models; every stage's (and gated chunk's) config and metrics, and the gate logs:
    the student trained the teacher's chunks (student_follows_teacher) up to student_max_images, and no more."""
    paths, logs = family_paths(FAMILY_DIR), FAMILY_DIR / "logs"
    chunks = {}
    for role in ("teacher", "student"):
        assert (paths[role] / "model.safetensors").is_file() and (paths[role] / "config.json").is_file()
        gates = [json.loads(line) for line in (logs / f"{role}_gates.jsonl").read_text().splitlines()]
        chunks[role] = [(row["stage"], row["chunk"]) for row in gates]
        runs = ["align"] + [f"{stage}_{chunk}" for stage, chunk in chunks[role]]
        for run in runs:
            assert (logs / f"{role}_{run}_metrics.jsonl").is_file() and (logs / f"{role}_{run}_config.yaml").is_file()
    recipe = FamilyRecipe()
    within_reach = [(stage, chunk) for stage, chunk in chunks["teacher"]
                    if int(stage.removeprefix("reach")) <= recipe.student_max_images]
    assert chunks["student"] == within_reach and len(within_reach) < len(chunks["teacher"])
    assert not list(logs.glob(f"student_reach{recipe.curriculum[-1]}_*"))  # no stale logs of a longer student
    first_chunks = [stage for stage, chunk in chunks["teacher"] if chunk == 1]
    assert first_chunks == [f"reach{m}" for m in FamilyRecipe().curriculum]


def test_family_probe_places_the_needle_and_reads_its_attention(family, tmp_path):
    """benchmarks/family_probe.py: the needle lands where asked, and at one image all image attention is on it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from family_probe import place_needle
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    entry = {"pos_image": ["n"], "neg_image": ["a", "b", "c"]}
    assert [place_needle(entry, 0, place).index("n") for place in ("first", "middle", "last")] == [0, 1, 3]
    assert sorted(place_needle(entry, 0, "shuffled")) == ["a", "b", "c", "n"]
    out = tmp_path / "probe"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "family_probe.py"), "--model",
                           str(family / "teacher"), "--processor", str(family / "processor"), "--image-size", "28",
                           "--sizes", "1", "3", "--questions", "2", "--places", "first", "last", "--blank",
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "probe.json").read_text())["rows"]
    assert [(r["size"], r["distractors"], r["needle"]) for r in rows] == [
        (1, "normal", "first"), (1, "blank", "first"), (3, "normal", "first"), (3, "normal", "last"),
        (3, "blank", "first"), (3, "blank", "last")]
    layers = json.loads((family / "teacher" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for row in rows:
        shares = row["needle_share_best_head_per_layer"]
        assert len(shares) == layers and 0 <= row["p_right"] <= 1
        assert shares == pytest.approx([1.0] * layers) if row["size"] == 1 else all(0 < s < 1 for s in shares)


def test_gated_curriculum_trains_each_stage_until_its_gate(tmp_path, monkeypatch):
    """A curriculum replaces the single-to-long stages by "reach<M>" stages trained in chunks until the gate
    accuracy on held-out haystacks of M images (here: faked) is reached, or gate_max_chunks chunks."""
    import laid.demo as demo

    recipe = recipe_from_json('{"image_size": 28, "align_steps": 1, "curriculum": [1, 40], "gate_chunk_steps": 1, '
                              '"gate_max_chunks": 3, "gate_questions": 2, "batch_size": 2, "long_grad_accum": 2, '
                              '"student_max_images": null}')
    stages = demo._family_stages(recipe)
    assert [(s.name, s.min_images, s.max_images, s.batch_size, s.grad_accum, s.gated) for s in stages] == [
        ("align", 1, 1, 2, 1, False), ("reach1", 1, 1, 2, 1, True), ("reach40", 1, 40, 1, 2, True)]
    assert (stages[1].lr, stages[2].lr) == (recipe.lr, recipe.find_lr)
    scored = []

    def entries_of(data) -> list[dict]:
        return json.loads(Path(data).read_text())

    def fake_accuracy(model, processor, data):
        entries = entries_of(data)
        scored.append((Path(model).parent.name, {len(e["pos_image"]) + len(e["neg_image"]) for e in entries}))
        passed = Path(model).parent.name == "teacher_reach40_2"
        return {"accuracy": 0.5, "yes_no": 1.0 if passed else 0.5, "what_else": 0.0 if passed else 0.5,
                "questions": 4}

    monkeypatch.setattr(demo, "answer_accuracy", fake_accuracy)
    family = build_family(tmp_path / "family", recipe=recipe, work_dir=tmp_path / "work", roles=("teacher",))
    assert scored == [("teacher_reach1_1", {1}), ("teacher_reach1_2", {1}), ("teacher_reach1_3", {1}),
                      ("teacher_reach40_1", {40}), ("teacher_reach40_2", {40})]  # stops at the gate
    log = [json.loads(line) for line in (family / "logs" / "teacher_gates.jsonl").read_text().splitlines()]
    assert [(row["stage"], row["chunk"], row["yes_no"]) for row in log] == [
        ("reach1", 1, 0.5), ("reach1", 2, 0.5), ("reach1", 3, 0.5), ("reach40", 1, 0.5), ("reach40", 2, 1.0)]
    assert len(entries_of(log[-1]["gate_set"])) == 4  # gate_questions yes/no questions, as many "what else?"
    assert (family / "teacher" / "model.safetensors").is_file()
    data = {LAidConfig.from_yaml(tmp_path / "work" / f"teacher_reach1_{k}" / "config.yaml").data for k in (1, 2, 3)}
    assert len(data) == 3  # every chunk trains on fresh haystacks
    scored.clear()
    build_family(tmp_path / "family", recipe=recipe, work_dir=tmp_path / "work", roles=("teacher",))
    assert scored == []  # a rerun reuses the chunks and their gate records
    build_family(tmp_path / "family", recipe=replace(recipe, gate_questions=3), work_dir=tmp_path / "work",
                 roles=("teacher",))
    assert scored[0] == ("teacher_reach1_1", {1})  # another gate set: the chunks are scored again, not retrained
    scored.clear()
    with pytest.raises(FileNotFoundError, match="build the teacher first"):
        build_family(tmp_path / "other", recipe=replace(recipe, student_follows_teacher=True),
                     work_dir=tmp_path / "work", roles=("student",))
    build_family(family, recipe=replace(recipe, student_follows_teacher=True), work_dir=tmp_path / "work",
                 roles=("student",))
    assert [name for name, _ in scored] == ["student_reach1_1", "student_reach1_2", "student_reach1_3",
                                            "student_reach40_1", "student_reach40_2"]  # the teacher's chunks
    scored.clear()
    build_family(family, recipe=replace(recipe, stage_chunks=(1, 2)), work_dir=tmp_path / "work",
                 roles=("student",))
    # one reach1 chunk (reused, as its gate record) and two reach40 chunks, retrained from that chunk's weights
    assert [name for name, _ in scored] == ["student_reach40_1", "student_reach40_2"]
    assert LAidConfig.from_yaml(tmp_path / "work" / "student_reach40_1" / "config.yaml").student.endswith(
        "student_reach1_1/final")
    # student_max_images: the student stops after reach1 (the teacher's 3 chunks, reused) and exports that chunk.
    scored.clear()
    build_family(family, recipe=replace(recipe, student_max_images=39), work_dir=tmp_path / "work", roles=("student",))
    log = [json.loads(line) for line in (family / "logs" / "student_gates.jsonl").read_text().splitlines()]
    assert scored == [] and [(row["stage"], row["chunk"]) for row in log] == [("reach1", k) for k in (1, 2, 3)]
    assert (family / "student" / "model.safetensors").read_bytes() == (
        tmp_path / "work" / "student_reach1_3" / "final" / "model.safetensors").read_bytes()
    assert json.loads((family / "logs" / "recipe.json").read_text())["student_max_images"] == 39
    # student_seed: another initial student, so no stage of the first is reused (each chunk retrains and is scored)
    scored.clear()
    build_family(family, recipe=replace(recipe, student_max_images=39, student_seed=7), work_dir=tmp_path / "work",
                 roles=("student",))
    assert [name for name, _ in scored] == ["student_reach1_1", "student_reach1_2", "student_reach1_3"]
    assert LAidConfig.from_yaml(tmp_path / "work" / "student_align" / "config.yaml").student.endswith(
        "student_init_seed7")
    for bad, message in (('{"curriculum": [4, 2]}', "increasing haystack sizes"), ('{"curriculum": 4}', "list of"),
                         ('{"curriculum": [4], "student_max_images": 3}', "student_max_images must be >= the"),
                         ('{"curriculum": [], "student_max_images": 30}', "student_max_images needs a curriculum"),
                         ('{"curriculum": [4], "gate_accuracy": 0}', "0 < gate_accuracy"),
                         ('{"curriculum": [1, 4], "stage_chunks": [2]}', "one count >= 1 per curriculum size")):
        with pytest.raises(ValueError, match=message):
            recipe_from_json(bad)


def test_answer_accuracy_scores_teacher_forced_answers(tmp_path):
    """The committed teacher answers one-image questions; a random model of its shape answers none."""
    from laid.data import synth_retrieval
    from laid.demo import TEACHER_SHAPE, answer_accuracy
    from laid.tiny import save_tiny_model, tiny_qwen25vl_config

    data = synth_retrieval(tmp_path / "gate", n_entries=12, min_images=1, max_images=1,
                           image_size=family_image_size(FAMILY_DIR), seed=5, retrieval_share=0.5)
    paths = family_paths(FAMILY_DIR)
    trained = answer_accuracy(paths["teacher"], paths["processor"], data)
    assert trained["questions"] == 12 and trained["yes_no"] >= 0.8 and trained["what_else"] >= 0.8
    save_tiny_model(tmp_path / "random", tiny_qwen25vl_config(**TEACHER_SHAPE), seed=0)
    assert answer_accuracy(tmp_path / "random", paths["processor"], data)["accuracy"] == 0.0
