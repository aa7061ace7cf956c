"""The trainer's start-up checks and precision details on CPU (issue 16): trackers and output_dir refused before
any model loads, tracker hyperparameters as flat scalars, weight decay on the student only, the lstsq init inside
accelerate's autocast, the RoPE gain folded at export exactly as training applied it, captured Q/K released."""

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import laid
from laid.checkpoint import export
from laid.losses import LAidObjective
from laid.mixer import HeadMixer
from laid.models import load_processor, load_student, load_teacher, text_config
from laid.trainer import build_optimizers, tracker_hparams
from train_helpers import build_tiny_setup, first_batch, tiny_config

CPU = torch.device("cpu")
PAIRS = [[0, 1], [-1, -1]]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"), n_entries=4)


def objective_for(paths):
    config = tiny_config(paths, "unused", layer_pairs=PAIRS)
    processor = load_processor(paths["processor"])
    teacher = load_teacher(paths["teacher"], device=CPU, attn_implementation="sdpa")
    student = load_student(paths["student"], device=CPU, attn_implementation="sdpa")
    s, t = text_config(student), text_config(teacher)
    mixer = HeadMixer(len(PAIRS), s.num_attention_heads, s.num_key_value_heads, t.num_attention_heads,
                      t.num_key_value_heads, 16)
    return LAidObjective(teacher, student, mixer, config, vocab=len(processor.tokenizer)), first_batch(paths, processor)


def test_a_missing_or_unknown_tracker_is_refused_before_any_model_loads(paths, tmp_path):
    # teacher "nowhere" would fail to load: the tracker error must come first
    with pytest.raises(ValueError, match="trackers: unknown tracker 'nonsense'"):
        laid.train(tiny_config(paths, tmp_path / "a", trackers=["nonsense"], teacher="nowhere"))
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [name for name in LoggerType.list() if name != "all" and name not in available]
    if not missing:
        pytest.skip("every tracker accelerate knows is installed here")
    with pytest.raises(ValueError, match=f"trackers: '{missing[0]}' is requested but its package is not installed"):
        laid.train(tiny_config(paths, tmp_path / "b", trackers=[missing[0]], teacher="nowhere"))


def test_tracker_hyperparameters_are_flat_scalars(paths):
    hparams = tracker_hparams(tiny_config(paths, "unused", layer_pairs=PAIRS))
    assert all(type(v) in (int, float, str, bool) for v in hparams.values()), hparams
    assert json.loads(hparams["layer_pairs"]) == PAIRS and hparams["max_steps"] == "null"
    assert hparams["lr"] == 1e-4 and hparams["grad_accum"] == 2
    summary = pytest.importorskip("torch.utils.tensorboard.summary", reason="tensorboard is not installed")
    summary.hparams(hparams, {"loss": 0.0})  # what accelerate's TensorBoard tracker passes them to


def test_an_existing_output_dir_is_refused_unless_resumed_or_overwritten(paths, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError, match="output_dir .* already exists and is not empty.*overwrite=true"):
        laid.train(tiny_config(paths, run, teacher="nowhere"))
    assert (run / "metrics.jsonl").exists()
    # overwrite: the old run is cleared first (the teacher "nowhere" then fails to load)
    with pytest.raises(ValueError, match="teacher: cannot load"):
        laid.train(tiny_config(paths, run, teacher="nowhere", overwrite=True))
    assert not (run / "metrics.jsonl").exists()


def test_weight_decay_applies_to_the_student_only(paths):
    objective, _ = objective_for(paths)
    student_opt, mixer_opt = build_optimizers(objective.student, objective.mixer,
                                              tiny_config(paths, "unused", weight_decay=0.1))
    assert [g["weight_decay"] for g in student_opt.param_groups] == [0.1]
    assert [g["weight_decay"] for g in mixer_opt.param_groups] == [0.0]
    assert {id(p) for p in mixer_opt.param_groups[0]["params"]} == {id(p) for p in objective.mixer.parameters()}


def test_the_lstsq_init_runs_inside_accelerates_autocast(paths):
    objective, batch = objective_for(paths)
    student = objective.student
    # What accelerator.prepare does under bf16 mixed precision: the prepared model's forward runs in autocast.
    student.forward = torch.autocast("cpu", dtype=torch.bfloat16)(student.forward)
    dtypes = []
    hook = student.model.language_model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype))
    objective.init_mixer(batch)
    hook.remove()
    assert dtypes == [torch.bfloat16]  # flash-attn would reject fp32 queries


def test_the_gain_is_folded_at_export_exactly_as_training_applied_it(paths, tmp_path):
    objective, batch = objective_for(paths)
    with torch.no_grad():
        objective.mixer.gain_raw.normal_(0.5, 0.3, generator=torch.Generator().manual_seed(0))
    seen = {}
    q_proj = objective.student.model.language_model.layers[1].self_attn.q_proj  # pair 1's layer (-1)
    hook = q_proj.register_forward_hook(lambda module, args, output: seen.update(x=args[0], q=output))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        objective(batch, progress=0.0)
    hook.remove()
    assert seen["q"].dtype == torch.bfloat16
    export(laid.trainer.Accelerator(cpu=True), objective.student, load_processor(paths["processor"]),
           objective.mixer, [0, 1], tmp_path / "final", {}, dtype=torch.bfloat16)
    stored = load_file(tmp_path / "final" / "model.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.bfloat16}
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "final")  # the config's dtype
    assert plain.dtype == torch.bfloat16
    folded = plain.model.language_model.layers[1].self_attn.q_proj
    exported = F.linear(seen["x"].to(torch.bfloat16), folded.weight, folded.bias)
    assert torch.equal(exported, seen["q"])  # the exported model computes the very queries training computed


def test_captured_queries_and_keys_are_released_after_the_loss(paths):
    objective, batch = objective_for(paths)
    objective.init_mixer(batch)
    captures = (objective.student_capture, objective.teacher_capture)
    assert all(t is None for c in captures for t in (*c.queries, *c.keys))
    objective(batch, progress=0.0)["loss"].backward()
    assert all(t is None for c in captures for t in (*c.queries, *c.keys))


def test_lora_with_the_laid_term_is_refused_by_the_config(paths):
    with pytest.raises(ValueError, match="lora_rank > 0 needs lambda_laid = 0"):
        tiny_config(paths, "unused", lora_rank=4)
    assert tiny_config(paths, "unused", lora_rank=4, lambda_laid=0.0).lora_rank == 4
