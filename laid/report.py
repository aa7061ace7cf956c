"""The paper-style results of several evaluation runs: a markdown table and a plot of accuracy against haystack size.

Each run is an ``laid eval`` output folder (its ``summary.json``). The table has one row per run and one column per
haystack size (accuracy mean +- std over the bootstrap resamples, in percent), then the short-context gain (relative
change of the mean accuracy over the sizes 1-20 against the baseline run) and the long-context gain (over 50-150),
each over the sizes both runs have. The plot (PNG) draws accuracy against the number of images on a log x axis, one
curve with error bars per run.
"""

from __future__ import annotations

import json
from pathlib import Path

SHORT = (1, 20)  # sizes of the short-context gain, inclusive
LONG = (50, 150)  # sizes of the long-context gain, inclusive


def load_runs(run_dirs) -> list[dict]:
    """The ``summary.json`` of every run folder, in order; names must be distinct."""
    runs = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"run {str(run_dir)!r} has no summary.json (not a finished 'laid eval' run)")
        summary = json.loads(path.read_text())
        summary["results"] = {int(size): m for size, m in summary["results"].items()}
        runs.append(summary)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs need distinct names (laid eval --name), got {names}")
    return runs


def gain(run: dict, baseline: dict, low: int, high: int) -> float | None:
    """Relative change (percent) of the mean accuracy over the sizes in [low, high] that both runs have; None if
    there is no such size or the baseline's mean is 0."""
    sizes = [s for s in run["results"] if low <= s <= high and s in baseline["results"]]
    if not sizes:
        return None
    ours = sum(run["results"][s]["accuracy"][0] for s in sizes) / len(sizes)
    base = sum(baseline["results"][s]["accuracy"][0] for s in sizes) / len(sizes)
    return None if base == 0 else 100 * (ours / base - 1)


def markdown_table(runs: list[dict], baseline: dict) -> str:
    """One row per run, one column per size (percent, mean +- std), then the short and long gains."""
    sizes = sorted({s for r in runs for s in r["results"]})
    header = ["Method", *map(str, sizes), f"Short gain ({SHORT[0]}-{SHORT[1]})", f"Long gain ({LONG[0]}-{LONG[1]})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run["name"]]
        for size in sizes:
            m = run["results"].get(size)
            cells.append("-" if m is None else f"{100 * m['accuracy'][0]:.2f} ± {100 * m['accuracy'][1]:.2f}")
        for low, high in (SHORT, LONG):
            value = gain(run, baseline, low, high)
            cells.append("-" if value is None else f"{value:+.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> Path:
    """Accuracy (percent) against the number of images, log x axis, one curve with error bars per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for run in runs:
        sizes = sorted(run["results"])
        means = [100 * run["results"][s]["accuracy"][0] for s in sizes]
        stds = [100 * run["results"][s]["accuracy"][1] for s in sizes]
        axis.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=run["name"])
    axis.set_xscale("log")
    sizes = sorted({s for run in runs for s in run["results"]})
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.minorticks_off()
    axis.set_xlabel("number of images")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("Visual Haystacks (single needle)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report(run_dirs, *, baseline: str | None = None, out_dir: str | Path) -> str:
    """Write ``out_dir/report.md`` (the table) and ``out_dir/accuracy.png``; returns the markdown.

    ``baseline``: the name of the run gains are measured against (default: the run whose method is "baseline").
    """
    runs = load_runs(run_dirs)
    if not runs:
        raise ValueError("report needs at least one run folder")
    names = [r["name"] for r in runs]
    if baseline is None:
        matches = [r for r in runs if r.get("method") == "baseline"]
        if len(matches) != 1:
            raise ValueError(f"name the baseline run (--baseline NAME): {len(matches)} runs have method 'baseline' "
                             f"among {names}")
    else:
        matches = [r for r in runs if r["name"] == baseline]
        if not matches:
            raise ValueError(f"baseline {baseline!r} is not one of the runs {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs, matches[0])
    (out / "report.md").write_text(table)
    plot(runs, out / "accuracy.png")
    return table
