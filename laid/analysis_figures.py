"""The figures and the page of ``laid analyze``: each figure a PNG with the JSON behind it, and ``analysis.md``.

Input: the per-model results of ``laid.analyze.analyze`` (tensors). Written to ``out_dir``:

- ``distance_<model>.png`` / ``.json``: attention mass by log-distance bin, one panel column per size, rows the mean
  over heads, the best (longest-reach) head and the median head of every layer (one line per layer), with the
  histogram of attention spread evenly over the causal keys (dashed) for reference;
- ``needle.png`` / ``.json``: the best head's and the last layer's mean needle share by size, every model;
- ``spectrum.png`` / ``.json``: per model the head x frequency-pair heat map at the largest size (rows: layer-major
  heads), and the low-frequency share of each layer for every model;
- ``flow_<model>.png`` / ``.json`` (runs with a mixer): W_q and W_k (student heads x teacher heads) with each
  student head's R^2 beside them;
- ``analysis.md`` (the figures side by side, the numbers) and ``analysis.json`` (the numbers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .attention_stats import distance_bin_edges


def to_json(value):
    """Tensors as nested lists (4 decimals; bool tensors as bools), recursively through dicts and lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dtype == torch.bool else value.double().round(decimals=4).tolist()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def slug(name: str) -> str:
    """A file-name part for a model name: "LAid (40 steps)" -> "laid_40_steps"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "model"


def _write(path: Path, value) -> None:
    path.write_text(json.dumps(to_json(value), indent=1))


def _save(figure, path: Path, table) -> Path:
    """Write ``figure`` as path.png (and close it) and ``table`` as path.json; returns the PNG's path."""
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=100)
    _pyplot().close(figure)
    _write(path.with_suffix(".json"), table)
    return path.with_suffix(".png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def geometric_distance(reach: torch.Tensor) -> torch.Tensor:
    """The distance in tokens a reach (mean log2(1 + d)) stands for: 2^reach - 1."""
    return 2.0 ** reach - 1


def ranked_heads(reach: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best [L], median [L]) head of each layer by reach [L, H]: the longest reach, and the median one."""
    order = reach.argsort(-1)
    return order[:, -1], order[:, (reach.shape[-1] - 1) // 2]


def bin_labels(bins: int) -> list[str]:
    """Tick labels of the distance bins: "0", "1", "2-3", "4-7", ..."""
    edges = distance_bin_edges(2 ** (bins - 1) - 1).tolist() if bins > 1 else []
    return ["0"] + [str(e) if e == 1 else f"{e}-{2 * e - 1}" for e in edges]


def distance_figure(model: dict, sizes: list[int], path: Path) -> Path:
    """``distance_<model>`` .png and .json (see the module docstring)."""
    plt = _pyplot()
    table = {"model": model["name"], "sizes": {}}
    figure, axes = plt.subplots(3, len(sizes), figsize=(3.2 * len(sizes), 7.5), squeeze=False, sharey="row")
    colours = plt.cm.viridis(torch.linspace(0, 0.9, model["layers"]).numpy())
    for column, size in enumerate(sizes):
        r = model["sizes"][size]
        best, median = ranked_heads(r["reach"])
        layer = torch.arange(model["layers"])
        views = {"mean over heads": r["distance"].mean(1), "best head": r["distance"][layer, best],
                 "median head": r["distance"][layer, median]}
        table["sizes"][size] = {"bins": bin_labels(r["distance"].shape[-1]), "tokens": r["tokens"],
                                "uniform": r["uniform"],
                                "distance": r["distance"], "reach": r["reach"], "best_head": best,
                                "median_head": median, **{k.replace(" ", "_"): v for k, v in views.items()}}
        for row, (label, shares) in enumerate(views.items()):
            axis = axes[row, column]
            for index, line in enumerate(shares):
                axis.plot(line.numpy(), color=colours[index], label=f"layer {index}")
            axis.plot(r["uniform"].numpy(), "k--", linewidth=1, label="uniform over keys")
            ticks = range(0, shares.shape[-1], max(1, shares.shape[-1] // 8))
            axis.set_xticks(list(ticks), [table["sizes"][size]["bins"][t] for t in ticks], fontsize=7, rotation=45)
            axis.set(title=f"{size} images: {label}" if row == 0 else label, xlabel="token distance",
                     ylabel="share of attention" if column == 0 else None)
    axes[0, 0].legend(fontsize=6)
    figure.suptitle(f"{model['name']}: attention of the question rows by distance")
    return _save(figure, path, table)


def needle_figure(models: list[dict], sizes: list[int], path: Path) -> Path:
    """``needle`` .png and .json: the best head's needle share at the answer position by size, every model."""
    plt = _pyplot()
    rows = []
    for model in models:
        for size in sizes:
            shares = model["sizes"][size]["needle"]
            layer, head = divmod(int(shares.argmax()), shares.shape[1])
            rows.append({"model": model["name"], "size": size, "chance": 1 / size, "best_head": float(shares.max()),
                         "best_layer_head": [layer, head], "last_layer_mean": float(shares[-1].mean()),
                         "needle": shares})
    figure, axis = plt.subplots(figsize=(7, 4))
    for model in models:
        axis.plot(sizes, [r["best_head"] for r in rows if r["model"] == model["name"]], marker="o",
                  label=model["name"])
    axis.plot(sizes, [1 / s for s in sizes], "k--", label="chance (1 / images)")
    axis.set(xscale="log", yscale="log", xlabel="number of images", ylabel="best head's needle share",
             title="Attention on the needle image at the answer position")
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.legend(fontsize=8)
    return _save(figure, path, rows)


def spectrum_figure(models: list[dict], sizes: list[int], span: int, path: Path) -> Path:
    """``spectrum`` .png and .json: head x frequency heat maps at the largest size and the low-frequency share of
    each layer, every model side by side."""
    plt = _pyplot()
    size = sizes[-1]
    figure = plt.figure(figsize=(3.4 * len(models) + 2, 8))
    grid = figure.add_gridspec(2, len(models), height_ratios=[3, 1])
    table = {"span": span, "heat_map_size": size, "models": []}
    for column, model in enumerate(models):
        shares = model["sizes"][size]["spectrum"]  # [L, H, D/2]
        axis = figure.add_subplot(grid[0, column])
        image = axis.imshow(shares.flatten(0, 1).numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        for layer in range(1, model["layers"]):
            axis.axhline(layer * model["heads"] - 0.5, color="white", linewidth=0.5)
        low = model["low_frequency_pairs"]
        if low.any():
            axis.axvline(int(low.nonzero()[0]) - 0.5, color="cyan", linewidth=1)
        axis.set(title=f"{model['name']}\n({size} images)", xlabel="frequency pair f (high -> low frequency)",
                 ylabel="layer x head" if column == 0 else None)
        figure.colorbar(image, ax=axis, fraction=0.05)
        table["models"].append({"model": model["name"], "wavelengths": model["wavelengths"], "low_frequency_pairs": low,
                                "mrope_section": model["mrope_section"],
                                "sizes": {s: {"spectrum": model["sizes"][s]["spectrum"],
                                              "low_frequency_share": model["sizes"][s]["low_frequency_share"]}
                                          for s in sizes}})
    bottom = figure.add_subplot(grid[1, :])
    for model in models:
        per_layer = model["sizes"][size]["low_frequency_share"].mean(-1)
        bottom.plot(torch.linspace(0, 1, model["layers"]).numpy(), per_layer.numpy(), marker="o", label=model["name"])
    bottom.set(xlabel="relative depth (layer / last layer)", ylabel="low-frequency share",
               title=f"low-frequency share per layer (wavelength > {span} positions, {size} images)")
    bottom.legend(fontsize=7)
    return _save(figure, path, table)


def flow_figure(model: dict, path: Path) -> Path:
    """``flow_<model>`` .png and .json: per aligned pair, W_q and W_k heat maps with each student head's R^2."""
    plt = _pyplot()
    pairs = model["flow"]["pairs"]
    figure, axes = plt.subplots(len(pairs), 4, figsize=(13, 3.2 * len(pairs)), squeeze=False,
                                gridspec_kw={"width_ratios": [4, 1, 4, 1]})
    for row, pair in enumerate(pairs):
        weight = "sum_f |C|^2" if pair["frequency_mixing"] else "W"
        for column, kind in ((0, "q"), (2, "k")):
            w = pair[f"w_{kind}"]
            limit = float(w.abs().max()) or 1.0
            axis = axes[row, column]
            image = axis.imshow(w.numpy(), aspect="auto", interpolation="nearest",
                                cmap="viridis" if pair["frequency_mixing"] else "RdBu_r",
                                vmin=0 if pair["frequency_mixing"] else -limit, vmax=limit)
            figure.colorbar(image, ax=axis, fraction=0.05)
            axis.set(title=f"{weight}_{kind}: student layer {pair['student_layer']} <- teacher layer "
                           f"{pair['teacher_layer']}", xlabel="teacher head", ylabel="student head",
                     xticks=range(w.shape[1]), yticks=range(w.shape[0]))
            r2 = pair[f"r2_{kind}"]
            bars = axes[row, column + 1]
            bars.barh(range(len(r2)), r2.numpy(), color="tab:green")
            for head, value in enumerate(r2.tolist()):
                bars.text(0.02, head, f"{value:.3f}", va="center", fontsize=7)
            bars.set(xlim=(min(0.0, float(r2.min())), 1), ylim=(len(r2) - 0.5, -0.5), title=f"R^2 ({kind})",
                     yticks=range(len(r2)))
    figure.suptitle(f"{model['name']}: head flow from the teacher ({model['flow']['size']}-image prompts)")
    return _save(figure, path, {"model": model["name"], **model["flow"]})


def numbers(models: list[dict], sizes: list[int]) -> dict:
    """The page's numbers per model: per size the last layer's geometric-mean distance (mean reach over heads), the
    longest-reach head's, the best needle share and the mean low-frequency share; per aligned pair the mean R^2."""
    out = {}
    for model in models:
        per_size = {}
        for size in sizes:
            r = model["sizes"][size]
            per_size[size] = {"tokens": r["tokens"],
                              "distance_last_layer": float(geometric_distance(r["reach"][-1].mean())),
                              "distance_best_head": float(geometric_distance(r["reach"].max())),
                              "needle_best_head": float(r["needle"].max()),
                              "needle_any_head": float(r["needle_any"].max()),
                              "needle_last_layer": float(r["needle"][-1].mean()),
                              "low_frequency_share": float(r["low_frequency_share"].mean())}
        flow = None if model["flow"] is None else [
            {"student_layer": p["student_layer"], "teacher_layer": p["teacher_layer"],
             "r2_q": float(p["r2_q"].mean()), "r2_k": float(p["r2_k"].mean())} for p in model["flow"]["pairs"]]
        out[model["name"]] = {"model": model["model"], "layers": model["layers"], "heads": model["heads"],
                              "sizes": per_size, "flow": flow}
    return out


def _images_row(files: list[tuple[str, str]]) -> str:
    header = "| " + " | ".join(name for name, _ in files) + " |"
    return "\n".join([header, "|" + "---|" * len(files), "| " + " | ".join(f"![{n}]({f})" for n, f in files) + " |"])


def page(summary: dict, sizes: list[int], span: int, figures: dict) -> str:
    """analysis.md: the figures side by side and the numbers of ``summary`` (``numbers``)."""
    names = list(summary)

    def cells(cell) -> str:
        """One table row per model: ``cell(numbers of a size)`` for each size."""
        return "\n".join(f"| {n} | " + " | ".join(cell(summary[n]["sizes"][s]) for s in sizes) + " |" for n in names)

    head = "| model | " + " | ".join(f"{s} images" for s in sizes) + " |\n|---|" + "---|" * len(sizes)
    lines = ["# laid analyze", "",
             "| model | folder | layers | heads | prompt tokens (" + ", ".join(map(str, sizes)) + " images) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | `{v['model']}` | {v['layers']} | {v['heads']} | "
              + ", ".join(f"{v['sizes'][s]['tokens']:.0f}" for s in sizes) + " |" for n, v in summary.items()]
    lines += ["", "## Attention by distance", "",
              "Share of the question rows' attention at each token distance (log bins), per layer. Geometric-mean "
              "distance attended, 2^E[log2(1 + d)] - 1 tokens: the last layer's (mean over heads) / the "
              "longest-reach head's.", "", head,
              cells(lambda v: f"{v['distance_last_layer']:.1f} / {v['distance_best_head']:.1f}"),
              "", _images_row([(n, figures["distance"][n]) for n in names]), "",
              "## Needle share", "",
              "Attention on the needle image over attention on all images at the answer position: the best "
              "(layer, head) by its mean over prompts / the last layer's mean / any head (the mean over prompts of "
              "each prompt's best head, best layer: heads specialise by content, so the head that takes the needle "
              "changes between prompts).", "", head,
              "| chance | " + " | ".join(f"{1 / s:.3f}" for s in sizes) + " |",
              cells(lambda v: f"{v['needle_best_head']:.3f} / {v['needle_last_layer']:.3f} / "
                              f"{v['needle_any_head']:.3f}"),
              "", f"![needle]({figures['needle']})", "",
              "## RoPE spectrum", "",
              f"Attention-weighted share of each frequency pair in the q . k logits; low-frequency pairs have a "
              f"wavelength longer than {span} positions (the longest prompt's span). Mean low-frequency share over "
              f"layers and heads:", "", head, cells(lambda v: f"{v['low_frequency_share']:.3f}"), "",
              f"![spectrum]({figures['spectrum']})", ""]
    flows = [n for n in names if summary[n]["flow"] is not None]
    if flows:
        lines += ["## Head flow", "", "Mean R^2 of the student heads by their teacher mix (queries / keys):", "",
                  "| model | student layer <- teacher layer | R^2 q | R^2 k |", "|---|---|---|---|"]
        lines += [f"| {n} | {p['student_layer']} <- {p['teacher_layer']} | {p['r2_q']:.3f} | {p['r2_k']:.3f} |"
                  for n in flows for p in summary[n]["flow"]]
        lines += ["", _images_row([(n, figures["flow"][n]) for n in flows]), ""]
    return "\n".join(lines)


def write_figures(models: list[dict], sizes: list[int], span: int, out_dir: Path) -> dict:
    """Every figure (PNG + JSON) and analysis.md / analysis.json in ``out_dir``; returns the numbers."""
    figures = {"distance": {}, "flow": {}}
    stems = [slug(m["name"]) for m in models]
    if len(set(stems)) != len(stems):
        raise ValueError(f"names {[m['name'] for m in models]} give the same file names {stems}: pass other names")
    for model in models:
        stem = slug(model["name"])
        figures["distance"][model["name"]] = distance_figure(model, sizes, out_dir / f"distance_{stem}").name
        if model["flow"] is not None:
            figures["flow"][model["name"]] = flow_figure(model, out_dir / f"flow_{stem}").name
    figures["needle"] = needle_figure(models, sizes, out_dir / "needle").name
    figures["spectrum"] = spectrum_figure(models, sizes, span, out_dir / "spectrum").name
    summary = numbers(models, sizes)
    _write(out_dir / "analysis.json", {"sizes": sizes, "span": span, "figures": figures, "models": summary})
    (out_dir / "analysis.md").write_text(page(summary, sizes, span, figures))
    return summary
