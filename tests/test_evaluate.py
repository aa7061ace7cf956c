"""Tests for laid.evaluate and `laid eval`: the official data layout and the 150-image cut, the seeded haystack
order, the scorer wired to the per-question files, an end-to-end run on a tiny model with resume, clear errors.
(The scorer itself is tested in tests/test_scoring.py.)"""

import csv
import importlib
import json

import numpy as np
import pytest
import torch

from laid import evaluate
from laid.cli import main
from laid.data import haystack_order, synth_benchmark
from laid.evaluate import haystack_entries, haystack_file
from laid.scoring import vhs_metrics
from laid.tiny import TINY_STUDENT, save_tiny_model, save_tiny_processor, tiny_qwen25vl_config

evaluation = importlib.import_module("laid.evaluate")  # the module: laid.evaluate the attribute is the function


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL student with its processor in the same folder (what `laid eval MODEL` expects)."""
    path = tmp_path_factory.mktemp("model")
    save_tiny_model(path, tiny_qwen25vl_config(**TINY_STUDENT), seed=3)
    save_tiny_processor(path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Synthetic single-needle sets of 1 (oracle file) and 5 images, 4 questions each, in the official layout."""
    return synth_benchmark(tmp_path_factory.mktemp("vhs"), sizes=(1, 5), n_entries=4, image_size=56, seed=0)


def _entry(n_negatives, tag=""):
    return {"conversations": [{"from": "human", "value": "For the image with a cat, is there a dog?"},
                              {"from": "gpt", "value": "yes"}],
            "pos_image": [f"needle{tag}.jpg"], "neg_image": [f"neg{tag}_{k:03d}.jpg" for k in range(n_negatives)]}


def test_150_is_cut_from_the_500_file_needle_and_a_seeded_random_149_negatives(tmp_path):
    (tmp_path / "visual_haystack_500.json").write_text(json.dumps([_entry(499, "a"), _entry(499, "b")]))
    assert haystack_file(tmp_path, 150).name == "visual_haystack_500.json"
    assert haystack_file(tmp_path, 1).name == "visual_haystack_oracle.json"
    entry = haystack_entries(tmp_path, 150)[1]
    order = haystack_order(entry, seed=0, index=1, max_images=150)
    assert len(order) == len(set(order)) == 150 and "needleb.jpg" in order
    assert set(order) - {"needleb.jpg"} <= set(entry["neg_image"])
    assert max(order) > "negb_149.jpg"  # not the first 149 negatives of the file
    assert order == haystack_order(entry, seed=0, index=1, max_images=150)  # deterministic
    assert order != haystack_order(entry, seed=1, index=1, max_images=150)
    # The needle's position over seeds is uniform over the 150 slots: chi-square over 10 bins of 15 slots.
    positions = np.array([haystack_order(entry, seed=s, index=1, max_images=150).index("needleb.jpg")
                          for s in range(3000)])
    counts = np.bincount(positions // 15, minlength=10)
    chi2 = ((counts - 300) ** 2 / 300).sum()
    assert chi2 < 27.9, counts  # p = 0.001 for 9 degrees of freedom


def test_data_errors_name_the_size_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"size 5: .*visual_haystack_5\.json"):
        haystack_entries(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match=r"size 150: .*visual_haystack_500\.json"):
        haystack_entries(tmp_path, 150)
    (tmp_path / "visual_haystack_5.json").write_text(json.dumps([_entry(4), _entry(3)]))
    with pytest.raises(ValueError, match=r"visual_haystack_5\.json: entry 1 has 4 images, size 5"):
        haystack_entries(tmp_path, 5)
    (tmp_path / "visual_haystack_500.json").write_text(json.dumps([_entry(120)]))
    with pytest.raises(ValueError, match="entry 0 has 121 images, size 150"):
        haystack_entries(tmp_path, 150)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        haystack_file(tmp_path, 0)
    # A synthetic benchmark's own visual_haystack_150.json is used as it is, and must hold exactly 150 images.
    (tmp_path / "visual_haystack_150.json").write_text(json.dumps([_entry(150)]))
    assert haystack_file(tmp_path, 150).name == "visual_haystack_150.json"
    with pytest.raises(ValueError, match=r"visual_haystack_150\.json: entry 0 has 151 images, size 150"):
        haystack_entries(tmp_path, 150)


def test_scores_come_from_the_answer_files(bench, tmp_path, monkeypatch):
    """Answer files already present (a resumed run) are read and scored by the official scorer, never re-asked."""
    monkeypatch.setattr(evaluation, "load_for_eval", lambda model, **kwargs: model)
    monkeypatch.setattr(evaluation, "answer", lambda *a, **k: pytest.fail("an answered question was asked again"))
    entries = haystack_entries(bench, 5)
    responses = ["Yes, there is.", "no", "yes/no", "I cannot tell."]  # right?, right?, non-compliant, non-compliant
    (tmp_path / "5_images").mkdir()
    for index, (entry, response) in enumerate(zip(entries, responses)):
        record = {**entry, "result": {"image_paths": [], "response": response, "log": {}}}
        (tmp_path / "5_images" / f"{index:03d}.json").write_text(json.dumps(record))
    summary = evaluate(object(), bench, sizes=[5], output_dir=tmp_path, processor=object(), name="fake")
    expected = vhs_metrics(responses, [e["conversations"][1]["value"] for e in entries], seed=0)
    assert summary["results"]["5"] == expected
    assert expected["compliance"][0] == pytest.approx(0.5, abs=0.2)  # the fixture is not degenerate
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["size"] for r in rows] == ["5"] and float(rows[0]["accuracy_mean"]) == expected["accuracy"][0]
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["5"]["n"] == 4


def test_end_to_end_eval_with_resume(bench, model_dir, tmp_path, monkeypatch):
    args = ["eval", str(model_dir), "--data", str(bench), "--sizes", "1", "5", "--max-new-tokens", "6"]
    assert main(args + ["--output", str(tmp_path / "full")]) == 0
    full = tmp_path / "full"
    for size in (1, 5):
        entries = haystack_entries(bench, size)
        for index, entry in enumerate(entries):
            record = json.loads((full / f"{size}_images" / f"{index:03d}.json").read_text())
            assert {k: record[k] for k in entry} == entry  # the official layout: the entry + result
            paths = record["result"]["image_paths"]
            order = haystack_order(entry, seed=0, index=index, max_images=size)
            assert paths == order  # relative to the image root, in the order shown, as the official code writes
            assert isinstance(record["result"]["response"], str) and record["result"]["log"]["output_tokens"] <= 6
    summary = json.loads((full / "summary.json").read_text())
    assert summary["method"] == "baseline" and set(summary["results"]) == {"1", "5"}

    # Interrupt a second run after 5 questions, then resume it: only the 3 missing questions are asked.
    real_answer, calls = evaluation.answer, []

    def interrupted(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(evaluation, "answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed" / "summary.json").exists()
    calls.clear()
    monkeypatch.setattr(evaluation, "answer", lambda *a, **k: calls.append(1) or real_answer(*a, **k))
    assert main(args + ["--output", str(tmp_path / "resumed")]) == 0
    assert len(calls) == 3
    for size in (1, 5):
        for index in range(4):
            name = f"{size}_images/{index:03d}.json"
            resumed = json.loads((tmp_path / "resumed" / name).read_text())["result"]
            assert resumed["response"] == json.loads((full / name).read_text())["result"]["response"]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["results"] == summary["results"]

    # A resumed run with other settings is refused instead of mixing answers.
    assert main(args + ["--output", str(tmp_path / "resumed"), "--seed", "1"]) == 2


def test_eval_reads_images_within_the_processors_pixel_budget(model_dir, tmp_path):
    """28 x 28 images are one visual token each under a processor whose minimum is one merged patch (as in training,
    laid.data.pixel_budget), and four under the default one (the loader's own 56 x 56 minimum)."""
    one_patch = tmp_path / "one_patch"
    save_tiny_processor(one_patch, min_pixels=28 * 28)
    data = synth_benchmark(tmp_path / "vhs", sizes=(5,), n_entries=1, image_size=28, seed=0)
    tokens = {}
    for name, processor in (("one_patch", one_patch), ("default", model_dir)):
        evaluate(model_dir, data, sizes=(5,), output_dir=tmp_path / name, processor=processor, max_new_tokens=1,
                 device="cpu")
        tokens[name] = json.loads((tmp_path / name / "5_images" / "000.json").read_text())["result"]["log"]
    assert tokens["default"]["input_tokens"] - tokens["one_patch"]["input_tokens"] == 5 * (4 - 1)


def test_eval_cli_errors(bench, model_dir, tmp_path, capsys):
    assert main(["eval", str(model_dir), "--data", str(bench), "--sizes", "10", "--output", str(tmp_path)]) == 2
    assert "size 10" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_baseline_methods_through_evaluate(bench, model_dir, tmp_path):
    """SelfExtend with group size 1 answers exactly as the (eager) baseline; YaRN runs and records its factor."""
    common = dict(sizes=[5], limit=2, max_new_tokens=6, attn_implementation="eager")
    base = evaluate(str(model_dir), bench, output_dir=tmp_path / "base", **common)
    extended = evaluate(str(model_dir), bench, method="selfextend", selfextend_group=1, selfextend_window=4,
                        output_dir=tmp_path / "se", **common)
    names = sorted(p.name for p in (tmp_path / "base" / "5_images").glob("*.json"))
    assert len(names) == 2 and names == sorted(p.name for p in (tmp_path / "se" / "5_images").glob("*.json"))
    for name in names:
        responses = [json.loads((tmp_path / run / "5_images" / name).read_text())["result"]["response"]
                     for run in ("base", "se")]
        assert responses[0] == responses[1]
    assert extended["results"] == base["results"]
    assert extended["options"] == {"selfextend_group": 1, "selfextend_window": 4}
    yarn = evaluate(str(model_dir), bench, method="yarn", yarn_factor=2.0, output_dir=tmp_path / "yarn", **common)
    assert yarn["method"] == "yarn" and yarn["options"] == {"yarn_factor": 2.0} and yarn["results"]["5"]["n"] == 2
    with pytest.raises(ValueError, match="method must be one of"):
        evaluate(str(model_dir), bench, method="rope", output_dir=tmp_path / "bad", **common)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_lora_sft_baseline_trains_and_evaluates(bench, tmp_path):
    """SFT (LoRA): rank-8 adapters trained by laid.train with lambda_laid = lambda_kl = 0, merged at export into a
    plain Qwen2.5-VL checkpoint that laid.evaluate reads like any model."""
    from safetensors.torch import load_file

    from laid import train
    from train_helpers import build_tiny_setup, tiny_config

    paths = build_tiny_setup(tmp_path / "setup", n_entries=4)
    config = tiny_config(paths, tmp_path / "sft", lambda_laid=0.0, lambda_kl=0.0, lambda_sft=1.0, lora_rank=8,
                         lr=1e-2, max_steps=2)
    summary = train(config)
    assert summary["steps"] == 2 and summary["final_metrics"]["sft"] > 0
    final = tmp_path / "sft" / "final"
    before = load_file(f"{paths['student']}/model.safetensors")
    after = load_file(f"{final}/model.safetensors")
    assert set(after) == set(before)  # no adapter keys: the adapters are merged
    key = {suffix: next(k for k in before if k.endswith(suffix))  # checkpoint key names as saved
           for suffix in ("layers.0.mlp.up_proj.weight", "embed_tokens.weight", "lm_head.weight")}
    linear = key["layers.0.mlp.up_proj.weight"]
    assert not torch.equal(after[linear], before[linear])  # the merged adapters changed the weights
    for frozen in (key["embed_tokens.weight"], key["lm_head.weight"]):
        assert torch.equal(after[frozen], before[frozen])  # only the adapters trained
    vision = [k for k in before if "visual." in k]
    assert vision and all(torch.equal(after[k], before[k]) for k in vision)
    assert not (final / "mixer.safetensors").exists()  # a pure SFT run has no mixer and no RoPE gain
    result = evaluate(str(final), bench, sizes=[1], limit=2, max_new_tokens=4, output_dir=tmp_path / "eval",
                      name="SFT (LoRA)")
    assert result["name"] == "SFT (LoRA)" and result["results"]["1"]["n"] == 2


def test_synth_cli_writes_the_official_layout(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path), "--n-entries", "3", "--sizes", "1", "3"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["visual_haystack_3.json", "visual_haystack_oracle.json"]
    for size in (1, 3):
        entries = haystack_entries(tmp_path, size)
        assert len(entries) == 3
        assert all((tmp_path / p).is_file() for e in entries for p in e["pos_image"] + e["neg_image"])


def test_limit_asks_a_seeded_random_subset_and_is_recorded(bench, model_dir, tmp_path):
    assert evaluation.question_indices(4, None, seed=0, size=5) == [0, 1, 2, 3]
    picks = {tuple(evaluation.question_indices(100, 10, seed=s, size=5)) for s in range(5)}
    assert len(picks) == 5 and all(len(p) == 10 and list(p) == sorted(p) for p in picks)
    assert max(max(p) for p in picks) > 50  # not the first 10 questions of the file
    common = dict(sizes=[5], max_new_tokens=2, num_workers=0)
    evaluate(str(model_dir), bench, limit=2, output_dir=tmp_path / "run", **common)
    asked = sorted(int(p.stem) for p in (tmp_path / "run" / "5_images").glob("*.json"))
    assert asked == evaluation.question_indices(4, 2, seed=0, size=5)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["limit"] == 2 and run["image_root"] == str(bench) and run["processor"] == str(model_dir)
    assert run["pixel_bounds"] and set(run["pixel_bounds"]) == {"shortest_edge", "longest_edge"}
    with pytest.raises(ValueError, match=r"limit: 2 -> 3"):  # resuming with other settings is refused
        evaluate(str(model_dir), bench, limit=3, output_dir=tmp_path / "run", **common)
    with pytest.raises(ValueError, match=r"image_root"):
        evaluate(str(model_dir), bench, limit=2, image_root=bench / "..", output_dir=tmp_path / "run", **common)


def test_eval_split_across_processes_and_resumed_with_another_count(bench, model_dir, tmp_path):
    """Two processes (accelerate launch, gloo) answer disjoint halves of the questions, every answer equals the single
    process's, the summary is written once; a run cut short resumes with one process and ends the same."""
    import subprocess
    import sys

    from train_helpers import free_port, subprocess_env

    common = ["eval", str(model_dir), "--data", str(bench), "--sizes", "1", "5", "--max-new-tokens", "4",
              "--num-workers", "0"]
    assert main(common + ["--output", str(tmp_path / "one")]) == 0
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "laid.cli"]
    done = subprocess.run(launch + common + ["--output", str(tmp_path / "two")],
                          env=subprocess_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("summary.json") == 2  # each process prints the merged summary's path
    for size in (1, 5):
        for index in range(4):
            name = f"{size}_images/{index:03d}.json"
            answers = [json.loads((tmp_path / run / name).read_text())["result"] for run in ("one", "two")]
            assert answers[0]["response"] == answers[1]["response"] and answers[0]["image_paths"] == \
                answers[1]["image_paths"]
    processes = [json.loads((tmp_path / "two" / f"{size}_images/{index:03d}.json").read_text())["result"]["log"]
                 ["process"] for size in (1, 5) for index in range(4)]
    assert processes == [0, 1] * 4  # question k of the run's list went to process k mod 2
    one, two = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert one["results"] == two["results"]
    for name in ("1_images/001.json", "5_images/002.json", "summary.json"):  # as if cut short
        (tmp_path / "two" / name).unlink()
    assert main(common + ["--output", str(tmp_path / "two")]) == 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["results"] == one["results"]


def test_a_missing_image_is_named_before_the_model_loads(tmp_path, monkeypatch):
    data = synth_benchmark(tmp_path / "vhs", sizes=[3], n_entries=2)
    entry = haystack_entries(data, 3)[1]
    (data / entry["neg_image"][0]).unlink()
    monkeypatch.setattr(evaluation, "load_for_eval", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(FileNotFoundError, match=rf"size 3: entry 1: image .*{entry['neg_image'][0]}' not found"):
        evaluate(object(), data, sizes=[3], output_dir=tmp_path / "run", processor=object())
