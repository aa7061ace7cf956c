"""The trainer on tiny real Qwen2.5-VL models (saved and reloaded) and synthetic Visual Haystacks data, on CPU."""

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

import laid
import laid_kernels
from laid.capture import QKCapture, decoder_layers
from laid.checkpoint import export, latest_checkpoint
from laid.cli import main
from laid.losses import LAidObjective, answer_positions, attention_rows
from laid.mixer import HeadMixer
from laid.prompt_inputs import model_inputs
from laid.models import load_processor, load_student, load_teacher, text_config
from laid.trainer import QK_UNEXPLAINED, metrics_until
from laid.tiny import TINY_STUDENT, save_tiny_model, tiny_qwen25vl_config
from train_helpers import build_tiny_setup, first_batch, subprocess_env, tiny_config

TERMS = ("qk", "attn", "kl", "sft", "loss")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"), n_entries=8)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def objective_for(paths, **overrides):
    config = tiny_config(paths, "unused", **overrides)
    processor = load_processor(paths["processor"])
    teacher = load_teacher(paths["teacher"], device=CPU, attn_implementation="sdpa")
    student = load_student(paths["student"], device=CPU, attn_implementation="sdpa")
    s, t = text_config(student), text_config(teacher)
    mixer = HeadMixer(len(config.layer_pairs), s.num_attention_heads, s.num_key_value_heads, t.num_attention_heads,
                      t.num_key_value_heads, 16)
    objective = LAidObjective(teacher, student, mixer, config, vocab=len(processor.tokenizer))
    return objective, first_batch(paths, processor)


def test_train_runs_logs_checkpoints_and_exports_a_plain_model(paths, tmp_path):
    """A smaller student vocabulary (448 rows) than the teacher's (512) trains with the KL term on."""
    assert text_config_vocab(paths["student"]) < text_config_vocab(paths["teacher"])
    summary = laid.train(tiny_config(paths, tmp_path, kernel_backend="auto"))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and summary["steps"] == 4
    for m in metrics:
        assert all(math.isfinite(m[t]) for t in TERMS), m
        assert m["kl"] > 0 and m["tokens_per_s"] > 0 and m["peak_mem_gb"] > 0
        assert 0 <= m["data_wait_share"] < 1  # share of the step spent waiting for the loader's next batch
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]

    final = tmp_path / "final"
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(final)  # a plain Qwen2.5-VL checkpoint
    assert exported.config.text_config.vocab_size == 448
    assert json.loads((final / "summary.json").read_text())["steps"] == 4
    mixer = HeadMixer.load(final / "mixer.safetensors")
    assert not torch.allclose(mixer.gain(0), torch.ones_like(mixer.gain(0)))  # the gain trained

    # The exported (folded) model equals the trained student with the gain applied in its forward.
    student = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["student"])
    student.load_state_dict(load_file(tmp_path / "checkpoints" / "step_0000004" / "model.safetensors"))
    capture = QKCapture(student, [len(decoder_layers(student)) - 1], gain=mixer.gain_channels)
    batch = first_batch(paths, load_processor(final))
    with torch.no_grad():
        gained = logits(student.eval(), batch)
        folded = logits(exported.eval(), batch)
    capture.remove()
    assert (folded - gained).abs().max() / gained.abs().max() < 1e-5


def test_batches_from_workers_hold_small_tensors_by_value(paths, tmp_path, monkeypatch):
    """With a worker, the small tensors of the trainer's batches arrive by value (laid.loading.by_value), not each
    through a shared-memory segment of its own (which costs about a millisecond per tensor)."""
    received = []

    def recording(batch, device):
        received.append({k: v.is_shared() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return model_inputs(batch, device)

    monkeypatch.setattr(laid.trainer, "model_inputs", recording)
    laid.train(tiny_config(paths, tmp_path, lambda_laid=0.0, lambda_kl=0.0, num_workers=1, max_steps=1))
    from_loader = received[1:]  # the first: the batch the mixer would be fitted on, built in process
    assert len(from_loader) == 2 and "input_ids" in from_loader[0] and "image_pixels" in from_loader[0]
    assert not any(any(shared.values()) for shared in from_loader), from_loader


def text_config_vocab(folder):
    return json.load(open(f"{folder}/config.json"))["text_config"]["vocab_size"]


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=batch["mm_token_type_ids"]).logits


def test_export_folds_the_gain_exactly(paths, tmp_path):
    objective, batch = objective_for(paths, layer_pairs=[[0, 1], [1, -1]])
    torch.manual_seed(0)
    with torch.no_grad():
        objective.mixer.gain_raw.normal_()
    objective.student.eval()
    with torch.no_grad():
        gained = logits(objective.student, batch)
    objective.remove_hooks()
    export(Accelerator(cpu=True), objective.student, load_processor(paths["processor"]), objective.mixer, [0, 1],
           tmp_path / "final", {})
    folded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        assert (logits(folded, batch) - gained).abs().max() / gained.abs().max() < 1e-5
        unfolded = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["student"]).eval()
        assert (logits(unfolded, batch) - gained).abs().max() / gained.abs().max() > 1e-2  # the gain matters


def test_fixed_batch_loss_falls_and_mixer_gets_gradients(paths):
    objective, batch = objective_for(paths)
    objective.init_mixer(batch)
    parameters = [p for p in objective.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": parameters, "lr": 1e-3},
                                   {"params": objective.mixer.parameters(), "lr": 1e-2}])
    losses = []
    for step in range(6):
        terms = objective(batch, progress=step / 6)
        assert all(torch.isfinite(terms[t]) for t in TERMS), terms
        terms["loss"].backward()
        if step == 0:
            for name, p in objective.mixer.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("lambda_kl, expected_calls, makes_logits", [(0.0, [1, 1, 0], False), (1.0, [1, 1, 1], True)])
def test_teacher_stops_after_its_last_aligned_layer(paths, lambda_kl, expected_calls, makes_logits):
    objective, batch = objective_for(paths, lambda_kl=lambda_kl, layer_pairs=[[-1, 1]])
    teacher = objective.teacher
    calls = [0] * len(decoder_layers(teacher))
    for i, module in enumerate(decoder_layers(teacher)):
        module.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    positions = []  # the forward always goes through the model (its FSDP root); without L_KL no logits are made
    teacher.lm_head.register_forward_pre_hook(lambda m, a: positions.append(a[0].shape[1]))
    objective(batch, progress=0.0)["loss"].backward()
    answers = answer_positions(batch["labels"])[0].numel()
    assert calls == expected_calls and positions == [answers if makes_logits else 0]


def test_kill_and_resume_reproduces_the_uninterrupted_run(paths, tmp_path):
    fields = dict(epochs=2, save_every=2, beta=0.0)
    laid.train(tiny_config(paths, tmp_path / "full", **fields))

    # A real kill: `laid train` in another process, SIGKILLed as soon as it has logged step 5 of 8.
    run = tmp_path / "killed"
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(paths, run, **fields).to_dict()))
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "laid.cli", "train", str(config_path)],
                                   env=subprocess_env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        metrics = run / "metrics.jsonl"
        while (metrics.read_text().count("\n") if metrics.exists() else 0) < 5:  # 5 complete lines
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the training process did not reach step 5 in time"
            time.sleep(0.02)
        process.kill()
        process.wait()
    assert not (run / "final").exists()  # it really died before the end
    assert int(latest_checkpoint(run).name.removeprefix("step_")) >= 4  # only steps since step 4 are lost

    summary = laid.train(tiny_config(paths, run, resume_from="latest", **fields))
    assert summary["steps"] == 8
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        for term in ("qk", "kl", "sft", "loss", "grad_norm", "lr"):
            assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-9), (a["step"], term)
    weights_full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    weights_resumed = load_file(run / "final" / "model.safetensors")
    assert all(torch.allclose(weights_full[k], weights_resumed[k], rtol=1e-6, atol=1e-8) for k in weights_full)


def test_incomplete_checkpoints_and_cut_metrics_lines_are_ignored(tmp_path):
    (tmp_path / "checkpoints" / "step_0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000006.tmp").mkdir()  # a save cut by a kill
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 7)) + '{"step": 7, "lo')
    assert [json.loads(line)["step"] for line in metrics_until(metrics, 4).splitlines()] == [1, 2, 3, 4]


def test_clear_errors(paths, tmp_path):
    bad_student = tmp_path / "student_head_dim_8"
    save_tiny_model(bad_student, tiny_qwen25vl_config(**{**TINY_STUDENT, "heads": 8, "head_dim": 8},
                                                      mrope_section=(1, 2, 1)), seed=1)
    with pytest.raises(ValueError, match="head_dim mismatch: teacher has head_dim 16, student has 8"):
        laid.train(tiny_config(paths, tmp_path / "a", student=str(bad_student)))
    with pytest.raises(ValueError, match=r"layer_pairs \(teacher\): layer 3 is out of range"):
        laid.train(tiny_config(paths, tmp_path / "b", layer_pairs=[[-1, 3]]))

    not_vhs = tmp_path / "not_vhs.json"
    not_vhs.write_text(json.dumps({"question": "is there a dog?"}))
    with pytest.raises(ValueError, match="expected a JSON list of entries"):
        laid.train(tiny_config(paths, tmp_path / "c", data=str(not_vhs)))

    images = tmp_path / "images"
    shutil.copytree(paths["image_root"], images)
    entries = json.loads(open(paths["data"]).read())
    (images / entries[3]["neg_image"][0]).unlink()
    with pytest.raises(FileNotFoundError, match=f"entry 3: image .*{entries[3]['neg_image'][0]}' not found"):
        laid.train(tiny_config(paths, tmp_path / "d", image_root=str(images)))


def test_reentrant_checkpointing_is_refused(paths):
    objective, batch = objective_for(paths)
    objective.student.activation_checkpointing_disable()
    objective.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="captured student Q/K do not require grad"):
        objective(batch, progress=0.0)


def test_cli_builds_tiny_models_and_trains_with_overrides(paths, tmp_path, capsys):
    assert main(["models", "tiny", str(tmp_path / "models")]) == 0
    for name in ("teacher", "student"):
        Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "models" / name)
    capsys.readouterr()
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(paths, tmp_path / "run", beta=0.0).to_dict()))

    # --print-config round-trips: the run of the printed file saves exactly what was printed.
    overrides = ["--max_steps", "1", "--lambda-kl=0.5", "--layer_pairs", "[[0, 1]]", "--no-gradient_checkpointing"]
    assert main(["train", str(config_path), *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # nothing ran
    saved = yaml.safe_load(printed)
    assert (saved["max_steps"], saved["lambda_kl"], saved["layer_pairs"], saved["gradient_checkpointing"]) == \
        (1, 0.5, [[0, 1]], False)
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["train", str(tmp_path / "printed.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "run" / "final"))
    assert (tmp_path / "run" / "config.yaml").read_text() == printed
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]


def test_pure_sft_trains_the_student_alone(paths, tmp_path):
    """lambda_laid = lambda_kl = 0: no teacher is loaded (a missing folder is fine), no mixer, the export is the
    student as trained, and the SFT loss falls on a repeated batch."""
    config = tiny_config(paths, tmp_path, teacher=str(tmp_path / "no_teacher_here"), lambda_laid=0.0,
                         lambda_kl=0.0, epochs=6, grad_accum=2, lr=3e-3, warmup_ratio=0.0,
                         gradient_checkpointing=False)
    summary = laid.train(config)
    metrics = read_metrics(tmp_path)
    assert all(set(m) & set(TERMS) == {"sft", "loss"} for m in metrics)
    assert metrics[-1]["sft"] < metrics[0]["sft"]
    assert summary["student_layers"] == [] and metrics[0]["mixer_lr"] is None
    final = tmp_path / "final"
    assert not (final / "mixer.safetensors").exists()
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(final).state_dict()
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["student"]).state_dict()
    trained = sorted(load_file(latest_checkpoint(tmp_path) / "model.safetensors").values(), key=lambda t: t.sum())
    changed = [k for k in exported if not torch.equal(exported[k], initial[k])]
    assert changed and all(any(torch.equal(exported[k], t) for t in trained) for k in changed)  # no gain folded
    with pytest.raises(ValueError, match="teacher must be a model folder"):
        tiny_config(paths, tmp_path / "x", teacher="", lambda_laid=0.0, lambda_kl=0.5)


@pytest.mark.parametrize("overrides, terms", [
    ({}, {"qk", "attn", "kl", "sft"}),
    ({"qk_weight": 0.0}, {"attn", "kl", "sft"}),
    ({"beta": 0.0}, {"qk", "kl", "sft"}),
    ({"lambda_kl": 0.0}, {"qk", "attn", "sft"}),
])
def test_ablations_drop_exactly_their_term(paths, overrides, terms):
    """The demo's ablations: qk_weight = 0 (without L_qk), beta = 0 (without L_attn), lambda_kl = 0 (without L_KL)."""
    objective, batch = objective_for(paths, **overrides)
    out = objective(batch, progress=0.5)
    assert set(out) - {"loss"} == terms
    config = objective.config
    expected = (config.lambda_laid * (config.qk_weight * out.get("qk", 0.0) + config.beta * out.get("attn", 0.0))
                + config.lambda_kl * out.get("kl", 0.0) + config.lambda_sft * out["sft"])
    torch.testing.assert_close(out["loss"], torch.as_tensor(expected))
    with pytest.raises(ValueError, match="the LAid term is empty"):
        tiny_config(paths, "unused", qk_weight=0.0, beta=0.0)


def test_an_unexplained_student_is_reported_at_the_first_step(paths, tmp_path, capsys):
    """Unrelated random heads: their least-squares mix explains little of the student's Q/K, so L_qk (1 - R^2 under
    the default qk_normalize="student") starts near 1; the run reports it (printed, in the first metrics line and
    the summary) and warns, once. A teacher that is the student itself is explained exactly: no warning."""
    summary = laid.train(tiny_config(paths, tmp_path / "unrelated", max_steps=2, log_every=1))
    first = read_metrics(tmp_path / "unrelated")[0]
    assert QK_UNEXPLAINED["student"] < first["qk"] <= 1.05 and first["qk_initial"] == first["qk"]
    assert summary["qk_initial"] == first["qk"]
    out = capsys.readouterr().out
    assert out.count("warning: L_qk") == 1 and "L_qk at step 1" in out and "1 - R^2" in out
    laid.train(tiny_config(paths, tmp_path / "same", teacher=paths["student"], max_steps=2))
    assert read_metrics(tmp_path / "same")[0]["qk"] < 0.1
    assert "warning: L_qk" not in capsys.readouterr().out


def test_version_1_normalisation_keeps_its_warning_threshold(paths, tmp_path, capsys):
    """qk_normalize="target" (version 1) stays reachable: L_qk of the unrelated heads is then far above 1."""
    laid.train(tiny_config(paths, tmp_path / "v1", max_steps=1, qk_normalize="target"))
    assert read_metrics(tmp_path / "v1")[0]["qk"] > QK_UNEXPLAINED["target"]
    assert capsys.readouterr().out.count("warning: L_qk") == 1


def test_attention_rows_after_images_are_the_tokens_after_the_last_image(paths):
    """On a real tiny batch (two samples, padded): "after_images" selects exactly the valid tokens after each
    sample's last image pad token, "text" every valid non-image token; the trainer passes attn_rows, target and
    divergence through (a different choice changes L_attn)."""
    processor = load_processor(paths["processor"])
    batch = first_batch(paths, processor, size=2)
    image = AutoConfig.from_pretrained(paths["student"]).image_token_id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    after = attention_rows(ids, mask, image, "after_images")
    text = attention_rows(ids, mask, image, "text")
    for b in range(ids.shape[0]):
        last = (ids[b] == image).nonzero().max().item()
        expected = mask[b].bool() & (torch.arange(ids.shape[1]) > last)
        assert expected.sum() > 0 and torch.equal(after[b], expected)
        assert torch.equal(text[b], mask[b].bool() & (ids[b] != image))
        assert after[b].sum() < text[b].sum()
    losses = {}
    for overrides in ({}, {"attn_rows": "after_images"}, {"attn_target": "mixed"}, {"attn_divergence": "reverse"},
                      {"attn_heads": "best"}):
        objective, batch = objective_for(paths, qk_weight=0.0, lambda_kl=0.0, lambda_sft=0.0, **overrides)
        objective.init_mixer(batch)
        with torch.no_grad():
            losses[tuple(overrides.items())] = objective(batch, progress=0.5)["attn"].item()
        objective.remove_hooks()
    assert len(set(losses.values())) == len(losses), losses


def test_best_teacher_heads_target_one_teacher_head(paths, monkeypatch):
    """attn_heads="best" hands L_attn the one-hot mixing of ``HeadMixer.best_teacher_heads`` (the mixer's own
    weights are left alone); with a mixer that is one-hot already (init "nearest") it equals the mixture."""
    seen = []
    attn_match_loss = laid_kernels.attn_match_loss

    def spy(*args, **kwargs):
        seen.append(args[4].detach().clone())
        return attn_match_loss(*args, **kwargs)

    monkeypatch.setattr(laid_kernels, "attn_match_loss", spy)
    losses = {}
    for init in ("lstsq", "nearest"):
        for heads in ("mixture", "best"):
            objective, batch = objective_for(paths, lambda_kl=0.0, lambda_sft=0.0, mixer_init=init, attn_heads=heads)
            objective.init_mixer(batch)
            w_q = objective.mixer.w_q[0].detach().clone()
            with torch.no_grad():
                losses[init, heads] = objective(batch, progress=0.5)["attn"].item()
            expected = objective.mixer.best_teacher_heads(0) if heads == "best" else w_q
            assert torch.equal(seen[-1], expected) and torch.equal(objective.mixer.w_q[0], w_q)
            objective.remove_hooks()
    assert losses["lstsq", "best"] != losses["lstsq", "mixture"]
    assert losses["nearest", "best"] == losses["nearest", "mixture"]

