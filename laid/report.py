"""The paper-style results of several evaluation runs: a markdown table and a plot of accuracy against haystack size.

Each run is an ``laid eval`` output folder (its ``summary.json``). Runs that share a name are seeds of one method
(for example one student distilled with 3 training seeds): the method's accuracy at a size is the mean over its runs,
and its spread (±) is the standard deviation over those runs; a method with a single run shows the bootstrap
standard deviation of ``laid eval`` instead. The table has one row per method and one column per haystack size (in
percent), then the mean accuracy over the short sizes (1-20) and over the long ones (50-150) with their spread
over runs, the short- and long-context gains (relative change of those means against the baseline method, over the
sizes both have) and the number of runs. The plot (PNG) draws accuracy against the number of images on a log x
axis, one curve with error bars per method.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

SHORT = (1, 20)  # sizes of the short-context mean and gain, inclusive
LONG = (50, 150)  # sizes of the long-context mean and gain, inclusive


def load_runs(run_dirs) -> list[dict]:
    """The ``summary.json`` of every run folder, in order; a folder may not be given twice."""
    runs, seen = [], set()
    for run_dir in map(Path, run_dirs):
        path = run_dir / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"run {str(run_dir)!r} has no summary.json (not a finished 'laid eval' run)")
        if path.resolve() in seen:
            raise ValueError(f"run {str(run_dir)!r} is given twice")
        seen.add(path.resolve())
        summary = json.loads(path.read_text())
        summary["results"] = {int(size): m for size, m in summary["results"].items()}
        runs.append(summary)
    return runs


def group_methods(runs: list[dict]) -> list[dict]:
    """One entry per run name, in first-seen order: ``{"name", "method", "runs": [summaries], "sizes": [...],
    "accuracy": {size: (mean, spread)}}`` over the sizes every run of the name has; spread is the standard deviation
    over runs (the bootstrap one for a single run)."""
    methods: dict[str, dict] = {}
    for run in runs:
        methods.setdefault(run["name"], {"name": run["name"], "method": run.get("method"), "runs": []})
        methods[run["name"]]["runs"].append(run)
    for method in methods.values():
        members = method["runs"]
        method["sizes"] = sorted(set.intersection(*(set(r["results"]) for r in members)))
        method["accuracy"] = {}
        for size in method["sizes"]:
            values = [r["results"][size]["accuracy"][0] for r in members]
            spread = statistics.stdev(values) if len(values) > 1 else members[0]["results"][size]["accuracy"][1]
            method["accuracy"][size] = (statistics.fmean(values), spread)
    return list(methods.values())


def range_mean(method: dict, low: int, high: int, sizes=None) -> tuple[float, float] | None:
    """Mean accuracy over the sizes in [low, high] (restricted to ``sizes`` when given) and its standard deviation
    over the method's runs (0 for one run); None when no size is in range."""
    chosen = [s for s in method["sizes"] if low <= s <= high and (sizes is None or s in sizes)]
    if not chosen:
        return None
    per_run = [statistics.fmean(r["results"][s]["accuracy"][0] for s in chosen) for r in method["runs"]]
    return statistics.fmean(per_run), statistics.stdev(per_run) if len(per_run) > 1 else 0.0


def gain(method: dict, baseline: dict, low: int, high: int) -> float | None:
    """Relative change (percent) of the mean accuracy over the sizes in [low, high] that both methods have; None if
    there is no such size or the baseline's mean is 0."""
    both = set(method["sizes"]) & set(baseline["sizes"])
    ours, base = range_mean(method, low, high, both), range_mean(baseline, low, high, both)
    if ours is None or base is None or base[0] == 0:
        return None
    return 100 * (ours[0] / base[0] - 1)


def markdown_table(methods: list[dict], baseline: dict) -> str:
    """One row per method: accuracy per size (percent, mean ± spread), the short / long means, gains and runs."""
    sizes = sorted({s for m in methods for s in m["sizes"]})
    header = ["Method", *map(str, sizes), f"Mean {SHORT[0]}-{SHORT[1]}", f"Mean {LONG[0]}-{LONG[1]}",
              f"Short gain ({SHORT[0]}-{SHORT[1]})", f"Long gain ({LONG[0]}-{LONG[1]})", "Runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [method["name"]]
        for size in sizes:
            acc = method["accuracy"].get(size)
            cells.append("-" if acc is None else f"{100 * acc[0]:.2f} ± {100 * acc[1]:.2f}")
        for low, high in (SHORT, LONG):
            mean = range_mean(method, low, high)
            cells.append("-" if mean is None else f"{100 * mean[0]:.2f} ± {100 * mean[1]:.2f}")
        for low, high in (SHORT, LONG):
            value = gain(method, baseline, low, high)
            cells.append("-" if value is None else f"{value:+.2f}%")
        cells.append(str(len(method["runs"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(methods: list[dict], path: Path) -> Path:
    """Accuracy (percent) against the number of images, log x axis, one curve with error bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        sizes = method["sizes"]
        means = [100 * method["accuracy"][s][0] for s in sizes]
        spreads = [100 * method["accuracy"][s][1] for s in sizes]
        axis.errorbar(sizes, means, yerr=spreads, marker="o", capsize=3, label=method["name"])
    axis.set_xscale("log")
    sizes = sorted({s for method in methods for s in method["sizes"]})
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.minorticks_off()
    axis.set_xlabel("number of images")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("Visual Haystacks (single needle)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report(run_dirs, *, baseline: str | None = None, out_dir: str | Path) -> str:
    """Write ``out_dir/report.md`` (the table) and ``out_dir/accuracy.png``; returns the markdown.

    ``baseline``: the name of the method gains are measured against (default: the one whose method is "baseline").
    """
    runs = load_runs(run_dirs)
    if not runs:
        raise ValueError("report needs at least one run folder")
    methods = group_methods(runs)
    names = [m["name"] for m in methods]
    if baseline is None:
        matches = [m for m in methods if m["method"] == "baseline"]
        if len(matches) != 1:
            raise ValueError(f"name the baseline run (--baseline NAME): {len(matches)} methods are 'baseline' "
                             f"among {names}")
    else:
        matches = [m for m in methods if m["name"] == baseline]
        if not matches:
            raise ValueError(f"baseline {baseline!r} is not one of the runs {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(methods, matches[0])
    (out / "report.md").write_text(table)
    plot(methods, out / "accuracy.png")
    return table
