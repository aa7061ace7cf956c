"""A miniature of benchmarks/distill_study.py (2 steps, 2 questions, 3 sizes): the protocol, not the numbers.

The family is a from-scratch miniature (``build_family`` with ``MINI_RECIPE``, as in test_demo.py).
"""

import importlib.util
import json
from pathlib import Path

import pytest

from laid.demo import build_family

from test_demo import MINI_RECIPE

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("distill_study", REPO / "benchmarks" / "distill_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_screen_keeps_rows_within_four_points_of_sft_at_short_range_best_long_mean_first():
    scores = {study.SFT: {"short": 0.70, "long": 0.50}, study.KL_SFT: {"short": 0.71, "long": 0.55},
              "a": {"short": 0.69, "long": 0.60}, "b": {"short": 0.65, "long": 0.90},
              "c": {"short": 0.75, "long": 0.58}, "d": {"short": 0.67, "long": 0.62}, "e": {"short": 0.68, "long": 0.4}}
    assert study.screen_rank(scores, 3) == ["d", "a", "c"]  # "b" loses 5 points at short range; SFT / KL+SFT are not
    assert study.screen_rank(scores, 10) == ["d", "a", "c", "e"]


def test_choice_needs_the_goals_two_points_at_short_range_over_seeds():
    validation = {study.SFT: {"short": 0.70, "long": 0.50}, "a": {"short": 0.69, "long": 0.60},
                  "d": {"short": 0.67, "long": 0.62}}
    assert study.choose(validation, ["d", "a"]) == "a"  # "d" is 3 points below SFT over seeds
    assert study.choose(validation, ["d"]) == "d"  # nothing eligible: the best at long range, the verdict says so
    assert study.choose(validation, []) is None


def test_miniature_study_screens_retrains_finalists_and_reports_on_a_separate_test_split(tmp_path, capsys):
    family = build_family(tmp_path / "family", recipe=MINI_RECIPE, work_dir=tmp_path / "work")
    out = tmp_path / "study"
    rows = [study.SFT, study.KL_SFT, "LAid v2 (defaults)", "alpha 0", study.RETRIEVING]
    argv = ["--family", str(family), "--out", str(out), "--steps", "2", "--batch-size", "2", "--questions", "2",
            "--sizes", "1", "20", "50", "--seeds", "0", "1", "--finalists", "1", "--analysis-questions", "1",
            "--rows", *rows]
    study.main(argv)
    record = json.loads((out / "study.json").read_text())
    assert set(record["screen"]) == set(rows)
    layers = len(record["teacher_needle_share_by_layer"])
    assert record["overrides"][study.RETRIEVING]["layer_pairs"][0][1] in range(layers)
    finalist = study.screen_rank(record["screen"], 1)
    assert record["chosen"] == finalist[0]
    assert set(record["validation"]) == {study.SFT, study.KL_SFT, *finalist}
    assert all(record["validation"][n]["runs"] == 2 for n in record["validation"])
    assert set(record["test"]) == {"Teacher", "Base student", study.SFT, study.KL_SFT, *finalist}
    # The splits are separate folders of separate files: no image file is shared.
    referenced = {}
    for split in ("validation", "test"):
        folder = out / "data" / split
        referenced[split] = {(folder / p).resolve() for f in folder.glob("visual_haystack_*.json")
                             for e in json.loads(f.read_text()) for p in e["pos_image"] + e["neg_image"]}
        assert referenced[split] and all(folder.resolve() in p.parents and p.is_file() for p in referenced[split])
    assert not referenced["validation"] & referenced["test"]
    for split in ("validation", "test"):
        assert (out / split / "report.md").is_file() and (out / split / "accuracy.png").is_file()
    attention = record["attention_test_split"]["Teacher"]["20"]
    assert 0 <= attention["needle_best_head"] <= attention["needle_any_head"] <= 1
    assert attention["entropy_last_layer"] > 0
    assert "Chosen on validation" in capsys.readouterr().out
    # Resuming reuses every stage: same numbers.
    study.main(argv)
    again = json.loads((out / "study.json").read_text())
    assert {k: again[k] for k in ("screen", "validation", "test")} == {k: record[k] for k in ("screen", "validation",
                                                                                           "test")}
