"""The ``laid`` command line: ``laid train``'s options generated from LAidConfig (help, override forms, flags,
unknown options, ``--print-config``), ``laid --version`` and ``--key=value`` for the other commands. No model runs
here; tests/test_train.py trains from a ``--print-config`` output."""

import dataclasses
import json
import re
import typing

import pytest
import yaml

import laid
from laid.cli import build_parser, main
from laid.config import LAidConfig

FIELDS = dataclasses.fields(LAidConfig)


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\nstudent: s\ndata: d.json\nlr: 2.0e-5\nresume_from: latest\n")
    return path


def printed_config(capsys, *argv) -> dict:
    """The configuration ``laid train ... --print-config`` prints, read back."""
    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_field_has_a_description():
    """The convention of laid/config.py: each field's field(metadata={"help": ...}) is its --help line."""
    missing = [f.name for f in FIELDS if not f.metadata.get("help", "").strip()]
    assert not missing, f"LAidConfig fields without field(metadata={{'help': ...}}): {', '.join(missing)}"


def test_help_lists_every_field_with_its_type_default_and_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped help text
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    assert exit.value.code == 0
    # One entry per option: its line, and the help on the next line when the option is long.
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", capsys.readouterr().out)]
    defaults = LAidConfig()
    hints = typing.get_type_hints(LAidConfig)
    for f in FIELDS:
        entry = [e for e in entries if e.startswith(f"--{f.name} ")]
        assert len(entry) == 1, f"--help has no entry for LAidConfig.{f.name}"
        description = f"{f.metadata.get('help')} [default: {json.dumps(getattr(defaults, f.name))}]"
        assert entry[0].endswith(description), f"--help entry of {f.name}: {entry[0]!r}, expected {description!r}"
        if hints[f.name] is bool:
            assert f"--no-{f.name} set {f.name} to false" in entries, f.name
    for option, kind in (("lr", "float"), ("max_steps", "int|None"), ("layer_pairs", "list[list[int]]"),
                         ("trackers", "list[str]"), ("train_vision", "[bool]"), ("processor", "str|None")):
        assert any(e.startswith(f"--{option} {kind} ") for e in entries), option


def test_override_forms_and_flags_give_the_same_config(config_path, capsys):
    spaced = ["--lr", "1e-4", "--train_vision", "--no-gradient_checkpointing", "--layer_pairs", "[[0, 1], [-1, -2]]",
              "--max_steps", "3", "--trackers", "[tensorboard]", "--resume_from", "null", "--output_dir", "runs/x"]
    equals = ["--lr=1e-4", "--train_vision=true", "--gradient_checkpointing=false", "--layer_pairs=[[0, 1], [-1, -2]]",
              "--max_steps=3", "--trackers=[tensorboard]", "--resume_from=null", "--output_dir=runs/x"]
    dashes = ["--lr", "1e-4", "--train-vision", "yes", "--no-gradient-checkpointing",
              "--layer-pairs=[[0, 1], [-1, -2]]", "--max-steps", "3", "--trackers", "[tensorboard]", "--resume-from",
              "null", "--output-dir=runs/x"]
    configs = [printed_config(capsys, str(config_path), *argv) for argv in (spaced, equals, dashes)]
    python = LAidConfig.from_yaml(config_path, lr=1e-4, train_vision=True, gradient_checkpointing=False,
                                  layer_pairs=[[0, 1], [-1, -2]], max_steps=3, trackers=["tensorboard"],
                                  resume_from=None, output_dir="runs/x").to_dict()
    assert configs == [python] * 3
    assert (python["teacher"], python["lr"], python["train_vision"], python["gradient_checkpointing"]) == \
        ("t", 1e-4, True, False)
    assert (python["layer_pairs"], python["max_steps"], python["resume_from"]) == ([[0, 1], [-1, -2]], 3, None)

    # No option: the YAML file as it is; the last of repeated options wins; a flag with its default is a no-op.
    assert printed_config(capsys, str(config_path)) == LAidConfig.from_yaml(config_path).to_dict()
    assert printed_config(capsys, str(config_path), "--seed=1", "--seed", "2", "--train_language_model")["seed"] == 2
    assert printed_config(capsys, str(config_path), "--no-train_vision")["train_vision"] is False


@pytest.mark.parametrize("argv, message", [
    (["--lrr=1e-4"], "unknown option --lrr; did you mean --lr?"),
    (["--grad", "2"], "unknown option --grad; did you mean --grad_accum?"),  # no abbreviations
    (["--no-train_visoin"], "unknown option --no-train_visoin; did you mean --no-train_vision?"),
    (["--zzzzqqq", "1"], "unknown option --zzzzqqq; 'laid train --help' lists the options"),
])
def test_an_unknown_option_names_the_nearest_field(config_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        main(["train", str(config_path), *argv])
    assert exit.value.code == 2 and f"laid train: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--train_vision", "maybe"], "train_vision must be true or false, got 'maybe'"),
    (["--lr", "[1,"], "lr must be a YAML value, got '[1,'"),
    (["--epochs=0"], "epochs must be >= 1, got 0"),
    (["--layer_pairs", "[0, 1]"], "layer_pairs must be a non-empty list"),
])
def test_bad_values_name_the_field(config_path, capsys, argv, message):
    assert main(["train", str(config_path), *argv, "--print-config"]) == 2
    assert f"laid: error: {message}" in capsys.readouterr().err


def test_print_config_is_what_from_yaml_reads_back(config_path, capsys, tmp_path):
    assert main(["train", str(config_path), "--lr=3e-4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    resolved = LAidConfig.from_yaml(config_path, lr=3e-4)
    assert printed == resolved.to_yaml()
    (tmp_path / "printed.yaml").write_text(printed)
    assert LAidConfig.from_yaml(tmp_path / "printed.yaml") == resolved
    assert list(yaml.safe_load(printed)) == [f.name for f in FIELDS]  # every field, in declaration order


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"laid {laid.__version__}\n"


@pytest.mark.parametrize("spaced", [
    ["eval", "m", "--data", "d", "--output", "o", "--seed", "3", "--sizes", "10", "--max-new-tokens", "8"],
    ["demo", "--out", "runs/d", "--steps", "4", "--seeds", "1"],
    ["demo", "family", "--out", "f", "--seed", "2"],
    ["data", "synth", "--out", "s", "--n-entries", "4", "--image-size", "32"],
    ["data", "build-train", "--instances", "i.json", "--exclude-vhs", "v.json", "--out", "t.json", "--n-entries", "2"],
    ["report", "r1", "r2", "--out", "o", "--baseline", "b"],
])
def test_the_other_commands_take_key_equals_value(spaced):
    """Every option of every command reads the same as --key value and as --key=value."""
    equals, i = [], 0
    while i < len(spaced):
        if spaced[i].startswith("--") and i + 1 < len(spaced) and not spaced[i + 1].startswith("--"):
            equals.append(f"{spaced[i]}={spaced[i + 1]}")
            i += 2
        else:
            equals.append(spaced[i])
            i += 1
    assert equals != spaced
    assert vars(build_parser().parse_args(equals)) == vars(build_parser().parse_args(spaced))


def test_the_other_commands_name_the_nearest_option(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "m", "--data", "d", "--output", "o", "--seeed=3"])
    assert "laid eval: error: unknown option --seeed; did you mean --seed?" in capsys.readouterr().err
