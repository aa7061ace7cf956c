"""LAidConfig: YAML loading, command-line style overrides, validation errors that name the field."""

import pytest

from laid.config import LAidConfig


def test_defaults_are_the_paper_recipe():
    config = LAidConfig()
    assert (config.teacher, config.student) == ("Qwen/Qwen2.5-VL-32B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert (config.lr, config.mixer_lr, config.epochs, config.batch_size, config.grad_accum) == (1e-5, 1e-4, 10, 1, 8)
    assert config.layer_pairs == [[-1, -1]] and config.train_language_model and not config.train_vision
    assert (config.qk_normalize, config.mixing) == ("student", "head")  # objective version 2, the paper's mixing
    assert (config.attn_target, config.attn_divergence, config.attn_rows) == ("teacher", "forward", "text")


def test_yaml_then_string_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\nstudent: s\nlr: 2.0e-5\nlayer_pairs: [[1, 2]]\nbeta: 0\nresume_from: latest\n")
    config = LAidConfig.from_yaml(path, **{"mixer-lr": "3e-4", "epochs": "2", "train_vision": "true",
                                           "max_steps": "null", "layer_pairs": "[[0, -1], [1, -2]]",
                                           "resume_from": "null", "output_dir": "[not, a, list]"})
    assert (config.teacher, config.lr, config.beta, config.mixer_lr, config.epochs) == ("t", 2e-5, 0.0, 3e-4, 2)
    assert config.train_vision is True and config.max_steps is None and config.resume_from is None
    assert config.output_dir == "[not, a, list]"  # a str field's string is taken as it is
    assert config.layer_pairs == [[0, -1], [1, -2]]


@pytest.mark.parametrize("overrides, message", [
    ({"lrr": 1}, "unknown LAidConfig field 'lrr'; did you mean 'lr'?"),
    ({"zzzzqqq": 1}, "unknown LAidConfig field 'zzzzqqq'; valid fields: adam_betas, alpha,"),
    ({"adam_betas": "[0.9,"}, "adam_betas must be a YAML value, got '[0.9,'"),
    ({"epochs": "many"}, "epochs must be an integer"),
    ({"lr": 0}, "lr must be > 0"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"layer_pairs": [[1]]}, "layer_pairs must be a non-empty list"),
    ({"mixer_init": "random"}, "mixer_init must be one of"),
    ({"qk_normalize": "mean"}, "qk_normalize must be one of ('student', 'target', 'none')"),
    ({"mixing": "complex"}, "mixing must be one of ('head', 'frequency')"),
    ({"lambda_laid": 0, "lambda_kl": 0, "lambda_sft": 0}, "the loss is empty"),
    ({"min_pixels": 100, "max_pixels": 10}, "max_pixels (10) must be >= min_pixels (100)"),
    ({"attn_target": "student"}, "attn_target must be one of ('teacher', 'mixed')"),
    ({"attn_divergence": "js"}, "attn_divergence must be one of ('forward', 'reverse')"),
    ({"attn_rows": "all"}, "attn_rows must be one of ('text', 'after_images')"),
    ({"attn_heads": "all"}, "attn_heads must be one of ('mixture', 'best')"),
    ({"attn_heads": "best", "attn_target": "mixed"}, "attn_heads='best' needs attn_target='teacher'"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        LAidConfig().with_overrides(**overrides)
    assert message in str(error.value)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        LAidConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LAidConfig.from_yaml(tmp_path / "missing.yaml")
