"""Tests for laid.report and `laid report`: the paper-style table and the accuracy plot of fabricated runs."""

import statistics

import pytest
from PIL import Image

from laid.cli import main
from laid.evaluate import write_summary
from laid.report import report

BASE = {1: 0.90, 5: 0.80, 20: 0.60, 50: 0.50, 150: 0.40}
LAID = {1: 0.92, 5: 0.84, 20: 0.72, 50: 0.60, 150: 0.50}


def _run(folder, name, method, accuracy, std=0.03):
    folder.mkdir()
    metrics = {s: {"accuracy": (a, std), "compliance": (1.0, 0.0), "n": 100} for s, a in accuracy.items()}
    write_summary(folder, {"name": name, "method": method, "model": "m", "sizes": list(accuracy)}, metrics)
    return folder


def _cells(row):
    return [c.strip() for c in row.strip("|").split("|")]


def test_report_table_gains_and_plot(tmp_path, capsys):
    base = _run(tmp_path / "base", "Baseline", "baseline", BASE)
    ours = _run(tmp_path / "laid", "LAid", "baseline", {s: a for s, a in LAID.items() if s != 20}, std=0.05)
    assert main(["report", str(base), str(ours), "--baseline", "Baseline", "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert table == capsys.readouterr().out.split(str(tmp_path / "out" / "accuracy.png"))[0]
    header, rule, base_row, laid_row = table.strip().split("\n")
    assert _cells(header)[1:6] == ["1", "5", "20", "50", "150"]
    cells = _cells(laid_row)
    assert cells[:6] == ["LAid", "92.00 ± 5.00", "84.00 ± 5.00", "-", "60.00 ± 5.00", "50.00 ± 5.00"]
    # Means over the sizes the method has; one run: no spread over runs.
    assert cells[6:8] == [f"{100 * (0.92 + 0.84) / 2:.2f} ± 0.00", f"{100 * (0.60 + 0.50) / 2:.2f} ± 0.00"]
    # Short gain over the sizes 1-20 both methods have (1, 5); long gain over 50-150.
    short = 100 * ((0.92 + 0.84) / (0.90 + 0.80) - 1)
    long = 100 * ((0.60 + 0.50) / (0.50 + 0.40) - 1)
    assert cells[8:] == [f"{short:+.2f}%", f"{long:+.2f}%", "1"]
    assert _cells(base_row)[8:] == ["+0.00%", "+0.00%", "1"]
    with Image.open(tmp_path / "out" / "accuracy.png") as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_runs_sharing_a_name_are_seeds_of_one_method(tmp_path):
    base = _run(tmp_path / "base", "Base", "baseline", BASE)
    seeds = [_run(tmp_path / f"s{k}", "LAid", "baseline", {s: a + d for s, a in LAID.items()})
             for k, d in enumerate((-0.02, 0.0, 0.05))]
    table = report([base, *seeds], baseline="Base", out_dir=tmp_path / "out")
    rows = table.strip().split("\n")
    assert len(rows) == 4  # header, rule, Base, LAid
    cells = _cells(rows[3])
    values = [0.92 - 0.02, 0.92, 0.92 + 0.05]
    mean, spread = statistics.fmean(values), statistics.stdev(values)  # over the three runs, not the bootstrap
    assert cells[1] == f"{100 * mean:.2f} ± {100 * spread:.2f}" and cells[-1] == "3"
    long_per_run = [statistics.fmean([LAID[50] + d, LAID[150] + d]) for d in (-0.02, 0.0, 0.05)]
    assert cells[7] == f"{100 * statistics.fmean(long_per_run):.2f} ± {100 * statistics.stdev(long_per_run):.2f}"


def test_report_errors_name_the_problem(tmp_path):
    base = _run(tmp_path / "base", "Baseline", "baseline", BASE)
    other = _run(tmp_path / "other", "Other", "baseline", LAID)
    with pytest.raises(ValueError, match="name the baseline run"):
        report([base, other], out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="baseline 'YaRN' is not one of the runs"):
        report([base, other], baseline="YaRN", out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="is given twice"):
        report([base, base], out_dir=tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="has no summary.json"):
        report([tmp_path], out_dir=tmp_path / "out")
    # One baseline-method run among several is found without --baseline.
    yarn = _run(tmp_path / "yarn", "YaRN", "yarn", LAID)
    assert "| YaRN |" in report([base, yarn], out_dir=tmp_path / "out")
