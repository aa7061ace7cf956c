"""``laid plan``: the built-in Qwen2.5-VL shapes, exact parameter / gradient / optimizer bytes against the trainer's
own objects, the whole estimate against the measured peak of a real tiny training run (benchmarks/plan_check.py),
the command line and its errors. Nothing downloads: models are the built-in hub ids or tiny folders saved here."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from laid.cli import main
from laid.plan import QWEN25_VL, Shape, layer_saved_bytes, load_config, plan
from laid.tiny import TINY_STUDENT, TINY_TEACHER, save_tiny_model, tiny_qwen25vl_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from plan_check import STUDENT, TOLERANCE, check, student_state_bytes  # noqa: E402

T32, S7, S3 = "Qwen/Qwen2.5-VL-32B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    save_tiny_model(root / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    save_tiny_model(root / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
    return {"teacher": str(root / "teacher"), "student": str(root / "student")}


@pytest.mark.parametrize("hub_id, billions", [(S3, 3.75), (S7, 8.29), ("Qwen/Qwen2.5-VL-32B-Instruct", 33.45),
                                              ("Qwen/Qwen2.5-VL-72B-Instruct", 73.41)])
def test_builtin_shapes_have_the_published_parameter_counts(hub_id, billions):
    """The published parameter counts (hub pages: 3.75B, 8.29B, 33.5B, 73.4B; here to 10M) from the built-in
    configs: a wrong width, depth, vocabulary or tying changes them by far more."""
    assert Shape.of(load_config(hub_id, "student")).params / 1e9 == pytest.approx(billions, abs=0.005)


def test_builtin_heads_are_the_real_ones():
    heads = {hub_id: (Shape.of(load_config(hub_id, "x")).heads, Shape.of(load_config(hub_id, "x")).kv_heads)
             for hub_id in QWEN25_VL}
    assert list(heads.values()) == [(16, 2), (28, 4), (40, 8), (64, 8)]


def test_weights_gradients_and_optimizer_bytes_are_exact(tiny):
    """The trainer's student (load_student) and AdamW after a step hold exactly the bytes the plan counts (CPU:
    fp32, one process, AdamW's step counters included)."""
    estimate = plan(tiny["teacher"], tiny["student"], gpus=1, gpu_memory_gb=1, images=2, strategy="ddp",
                    device="cpu")
    for name, measured in student_state_bytes(tiny).items():
        assert round(estimate["breakdown_gb"][name] * 1e9) == measured, name


def test_estimate_matches_the_measured_peak_of_a_tiny_training_run(tmp_path):
    """laid.train (two steps of two micro-batches, fp32, C++ kernels) under the profiler: the estimate for the same
    models and prompt is within TOLERANCE of the peak of live tensor bytes."""
    row = check(2, tmp_path)
    assert abs(row["ratio"] - 1) <= TOLERANCE, row


def test_one_layer_saved_tensors_match_the_formula():
    """What autograd saves for one real decoder layer run with gradients (its recomputation under checkpointing),
    counted by storage with saved-tensor hooks, against layer_saved_bytes in fp32 within 5% (the formula leaves out
    RoPE's cos / sin, shared by all layers)."""
    config = tiny_qwen25vl_config(**STUDENT)
    config.text_config._attn_implementation = "sdpa"
    language = Qwen2_5_VLForConditionalGeneration(config).model.language_model
    tokens = 600
    hidden = torch.randn(1, tokens, config.text_config.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None].expand(3, 1, tokens)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        language.layers[0](hidden, attention_mask=None, position_ids=positions,
                           position_embeddings=language.rotary_emb(hidden, positions))
    not_activations = {p.untyped_storage().data_ptr() for p in language.parameters()}
    not_activations.add(hidden.untyped_storage().data_ptr())  # the checkpoint, counted apart
    measured = sum(size for pointer, size in saved.items() if pointer not in not_activations)
    expected = layer_saved_bytes(Shape.of(config), tokens, compute=4, residual=4, autocast=False)
    assert measured == pytest.approx(expected, rel=0.05)


def test_fsdp_shards_what_ddp_replicates():
    fsdp = plan(T32, S7, gpus=8, gpu_memory_gb=80, images=20, strategy="fsdp")
    ddp = plan(T32, S7, gpus=8, gpu_memory_gb=80, images=20, strategy="ddp")
    assert fsdp["fits"] and not ddp["fits"]  # the issue: DDP of 32B -> 7B runs out of memory
    for part in ("student weights", "optimizer states", "teacher weights"):
        assert fsdp["breakdown_gb"][part] < ddp["breakdown_gb"][part] / 4, part
    # DDP: fp32 gradients plus the reducer's fp32 buckets; AdamW: two fp32 moments
    assert ddp["breakdown_gb"]["student gradients"] == pytest.approx(ddp["breakdown_gb"]["optimizer states"])
    assert ddp["student_shape"]["trainable"] * 8 == pytest.approx(ddp["breakdown_gb"]["optimizer states"] * 1e9)


def test_more_images_need_more_memory_and_change_the_peak():
    small, large = (plan(T32, S7, gpus=8, gpu_memory_gb=80, images=n, strategy="fsdp") for n in (20, 150))
    assert large["tokens"] == 150 * 360 + 64 and large["per_gpu_gb"] > small["per_gpu_gb"] + 10
    assert large["peak_moment"] == "layer backward"


def test_cli_json_prints_one_object_with_per_gpu_gb_and_fits(capsys):
    assert main(["plan", "--teacher", T32, "--student", S3, "--gpus", "8", "--gpu-memory-gb", "80", "--images",
                 "20", "--strategy", "fsdp", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["per_gpu_gb"], float) and isinstance(result["fits"], bool)
    assert result["per_gpu_gb"] == pytest.approx(sum(result["breakdown_gb"].values()), abs=1e-3)


def test_cli_table_and_local_folders(capsys, tiny):
    assert main(["plan", "--teacher", tiny["teacher"], "--student", tiny["student"], "--gpus", "2",
                 "--gpu-memory-gb", "4", "--images", "3", "--strategy", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "student weights" in out and "per GPU" in out and "fits: yes" in out


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "Qwen/Qwen2.5-VL-14B-Instruct"], "teacher: unknown model 'Qwen/Qwen2.5-VL-14B-Instruct'"),
    (["--gpus", "0"], "gpus must be an integer >= 1, got 0"),
    (["--images", "-3"], "images must be an integer >= 1, got -3"),
    (["--gpu-memory-gb", "0"], "gpu_memory_gb must be a number > 0, got 0.0"),
    (["--tokens-per-image", "2"], "tokens_per_image must be >= 3"),
])
def test_cli_errors_name_the_argument(capsys, argv, message):
    base = {"--teacher": T32, "--student": S7, "--gpus": "8", "--gpu-memory-gb": "80", "--images": "20",
            "--strategy": "fsdp"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["plan", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="student: folder .* has no config.json"):
        plan(T32, str(tmp_path), gpus=1, gpu_memory_gb=80, images=1, strategy="ddp")


def test_cpu_device_models_one_process():
    with pytest.raises(ValueError, match="device 'cpu' models one process"):
        plan(T32, S7, gpus=2, gpu_memory_gb=80, images=1, strategy="ddp", device="cpu")

