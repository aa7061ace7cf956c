"""``laid analyze``: see the attention window shrink, and see it repaired, for any Qwen2.5-VL checkpoints.

For each model (a model folder, or a ``laid train`` run folder whose ``final/`` holds the distilled student and its
``mixer.safetensors``) and each haystack size, the first ``questions`` Visual Haystacks prompts are laid out as
``laid eval`` shows them (``haystack_order`` with ``seed``, ``prompt_inputs``). One decoder forward per prompt
captures every layer's pre-RoPE Q/K (``laid.capture.QKCapture``); the attention of the question rows (every token
after the last image: the question and the answer position) is rebuilt and streamed over key blocks
(``laid.attention_stats``), so a 150-image prompt needs no [N, N] matrix. Per model, size, layer and head:

- attention by distance: the share of attention mass in log-distance bins (mean over question rows and prompts),
  and the reach, the mean log2(1 + d); the best head of a layer is the one with the longest reach, the median head
  the one with the median reach;
- needle share: at the answer position (the last row), the attention on the needle image's tokens over the
  attention on all image tokens (chance: 1 / size), per head as a mean over prompts; and per layer the mean over
  prompts of the best head's share in each prompt ("any head"), since heads specialise by content (the head that
  takes the needle in one prompt may take none in the next, so a per-head mean over few prompts is quantised);
- RoPE spectrum: the attention-weighted share of each frequency pair in the logits (``laid.rope_spectrum``);
- head flow (runs with a mixer): W_q / W_k per aligned pair and each student head's R^2 by its teacher mix
  (``laid.head_flow``) on the prompts of the smallest size, against the run's teacher (``teacher``, default the
  one its summary.json names).

``out_dir`` receives every figure as a PNG with the JSON behind it and ``analysis.md``, the page that puts the
models side by side with the numbers (``laid.analysis_figures``); ``analyze`` returns the page's numbers (also
``analysis.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .attention_stats import BLOCK, attention_row_stats, uniform_distance
from .capture import QKCapture, decoder_layers, mrope_positions, resolve_layer, stop_after, unwrap
from .data import haystack_order, load_vhs
from .evaluate import haystack_entries, load_for_eval, prompt_inputs, resolve_device
from .head_flow import MIXER_FILE, explained_share, load_mixing, pair_weights
from .prompt_inputs import model_inputs
from .rope_spectrum import low_frequency_pairs, low_frequency_share, pair_shares, wavelengths

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def resolve_model(source: str | Path) -> dict:
    """``{"name", "model", "run"}`` of a model folder (config.json) or a run folder (final/config.json); ``run`` is
    the folder whose summary.json describes the training (None for a plain model)."""
    path = Path(source)
    if (path / "final" / "config.json").is_file():
        return {"name": path.name, "model": path / "final", "run": path / "final"}
    if (path / "config.json").is_file():
        run = path if (path / "summary.json").is_file() else None
        name = path.parent.name if path.name == "final" else path.name
        return {"name": name, "model": path, "run": run}
    raise FileNotFoundError(f"models: {str(path)!r} is neither a model folder (config.json) nor a run folder "
                            f"(final/config.json)")


def check_sizes(sizes) -> list[int]:
    """The sizes as distinct ints >= 1; ValueError naming ``sizes`` otherwise."""
    sizes = [int(s) for s in sizes]
    if not sizes or len(set(sizes)) != len(sizes) or min(sizes) < 1:
        raise ValueError(f"sizes must be a non-empty list of distinct haystack sizes >= 1, got {sizes}")
    return sizes


def size_entries(data: Path, size: int) -> list[dict]:
    """The entries of ``size`` images: from a VHs folder (``haystack_entries``), or cut from one JSON file whose
    entries hold at least ``size`` images (needles + the first negatives, as ``haystack_order`` cuts)."""
    if data.is_dir():
        return haystack_entries(data, size)
    entries = load_vhs(data)
    short = [i for i, e in enumerate(entries) if len(e["pos_image"]) + len(e["neg_image"]) < size]
    if short:
        raise ValueError(f"sizes: {data} entry {short[0]} has fewer than {size} images")
    return entries


def haystack_prompt(processor, entry: dict, index: int, size: int, image_root: Path, seed: int):
    """(inputs, needle [N] bool, image [N] bool) of one haystack: the processor's inputs as ``laid eval`` builds them,
    the needle images' tokens and all image tokens."""
    order = haystack_order(entry, seed=seed, index=index, max_images=size)
    inputs = prompt_inputs(processor, [image_root / p for p in order], entry["conversations"][0]["value"])
    is_image = inputs["input_ids"][0] == processor.image_token_id
    per_image = inputs["image_grid_thw"].prod(-1) // processor.image_processor.merge_size ** 2
    owner = torch.repeat_interleave(torch.arange(len(order)), per_image)  # image index of each image token
    needle = torch.zeros_like(is_image)
    needle[is_image.nonzero()[:, 0][torch.isin(owner, torch.tensor([order.index(p) for p in entry["pos_image"]]))]] = 1
    return inputs, needle, is_image


@torch.no_grad()
def capture_qk(model, layers: list[int], inputs) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(queries [N, H, D] per layer, keys [N, H_kv, D] per layer, positions [3, N]) of one prompt (batch 1): the
    decoder runs up to the last of ``layers`` (no lm_head)."""
    inputs = model_inputs(inputs, unwrap(model).device)
    positions = mrope_positions(model, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    capture = QKCapture(model, layers)
    try:
        with stop_after(model, max(layers)), capture.record():
            unwrap(model).model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                position_ids=positions, use_cache=False)
    finally:
        capture.remove()
    return [q[0] for q in capture.queries], [k[0] for k in capture.keys], positions[:, 0]


def _rope(model) -> tuple[torch.Tensor, tuple[int, ...]]:
    rotary = unwrap(model).model.language_model.rotary_emb
    return rotary.inv_freq.float(), tuple(rotary.mrope_section)


def profile(model, prompts: dict[int, list], *, block: int = BLOCK, backend: str = "auto",
            layers_per_pass: int | None = None, progress: str | None = None) -> dict:
    """Attention by distance, needle share and RoPE spectrum of ``model`` over ``prompts`` {size: [haystack_prompt]}.

    Returns {size: {"distance" [L, H, bins], "uniform" [bins] (``uniform_distance``), "reach" [L, H],
    "entropy" [L, H] (nats, mean over the rows), "needle" [L, H] (mean over prompts), "needle_any" [L] (mean over
    prompts of each prompt's largest head share), "spectrum" [L, H, D/2] (shares),
    "tokens": mean prompt length, "span": largest position distance, "seconds"}} (tensors, fp32, CPU). The Q/K of
    ``layers_per_pass`` layers (default: all) are captured per forward, so a long prompt holds only theirs (a forward
    per group). With ``progress`` (a model name), one line per size is printed when it is done.
    """
    layers = list(range(len(decoder_layers(model))))
    per_pass = layers_per_pass or len(layers)
    if per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    passes = [layers[i:i + per_pass] for i in range(0, len(layers), per_pass)]
    inv_freq, section = _rope(model)
    result = {}
    for size, items in prompts.items():
        distance, uniform, reach, entropy, needle, needle_any, spectrum = [], [], 0, 0, 0, 0, 0
        rows_seen, tokens, span = 0, 0, 0
        start = time.perf_counter()
        for inputs, needle_mask, image_mask in items:
            rows = torch.arange(int(image_mask.nonzero().max()) + 1, len(image_mask))
            stats = []
            for group in passes:
                queries, keys, positions = capture_qk(model, group, inputs)
                stats += [attention_row_stats(q, k, positions, rows, inv_freq, section,
                                              groups=(needle_mask, image_mask), block=block, backend=backend)
                          for q, k in zip(queries, keys)]
                del queries, keys
            distance.append(torch.stack([s.distance.sum(0) for s in stats]).cpu())  # [L, H, bins]
            uniform.append(uniform_distance(rows).sum(0))  # [bins]
            reach = reach + torch.stack([s.reach.sum(0) for s in stats]).cpu()
            entropy = entropy + torch.stack([s.entropy.sum(0) for s in stats]).cpu()
            shares = torch.stack([s.groups[0, -1] / s.groups[1, -1] for s in stats]).cpu()  # [L, H]
            needle, needle_any = needle + shares, needle_any + shares.amax(-1)
            spectrum = spectrum + torch.stack([s.spectrum.sum(0) for s in stats]).cpu()
            rows_seen += len(rows)
            tokens += len(image_mask)
            span = max(span, int((positions.amax(-1) - positions.amin(-1)).max()))
        bins = max(d.shape[-1] for d in distance)
        distance, uniform = (sum(torch.nn.functional.pad(d, (0, bins - d.shape[-1])) for d in sums) / rows_seen
                             for sums in (distance, uniform))
        result[size] = {"distance": distance, "uniform": uniform, "reach": reach / rows_seen,
                        "entropy": entropy / rows_seen,
                        "needle": needle / len(items), "needle_any": needle_any / len(items),
                        "spectrum": pair_shares(spectrum), "tokens": tokens / len(items), "span": span,
                        "seconds": round(time.perf_counter() - start, 1)}
        if progress:
            print(f"{progress}: {size} images, {len(items)} prompts of {tokens / len(items):.0f} tokens: "
                  f"{result[size]['seconds']} s", flush=True)
    return result


def head_flow(student, teacher, mixer: Path, student_layers: list[int], teacher_layers: list[int],
              prompts: list) -> list[dict]:
    """Per aligned pair p: {"student_layer", "teacher_layer", "w_q" [Hs, Ht], "w_k" [Hs_kv, Ht_kv] (``pair_weights``),
    "r2_q" [Hs], "r2_k" [Hs_kv]} with R^2 over the tokens of ``prompts`` (lists)."""
    w_q, w_k = load_mixing(mixer)
    if not len(w_q) == len(student_layers) == len(teacher_layers):
        raise ValueError(f"mixer {str(mixer)!r} has {len(w_q)} layer pairs, the run aligned {len(student_layers)}")
    s_layers, t_layers = sorted(set(student_layers)), sorted(set(teacher_layers))
    captured = {"s_q": [], "s_k": [], "t_q": [], "t_k": []}
    for inputs, _, _ in prompts:
        for side, model, layers in (("s", student, s_layers), ("t", teacher, t_layers)):
            queries, keys, _ = capture_qk(model, layers, inputs)
            captured[f"{side}_q"].append(queries)
            captured[f"{side}_k"].append(keys)

    def tokens(side: str, kind: str, layer: int, layers: list[int]) -> torch.Tensor:
        return torch.cat([c[layers.index(layer)] for c in captured[f"{side}_{kind}"]]).cpu()  # [T, H, D]

    pairs = []
    for p, (s, t) in enumerate(zip(student_layers, teacher_layers)):
        pairs.append({"student_layer": s, "teacher_layer": t, "w_q": pair_weights(w_q[p]), "w_k": pair_weights(w_k[p]),
                      "frequency_mixing": w_q[p].dim() == 4,
                      "r2_q": explained_share(tokens("s", "q", s, s_layers), tokens("t", "q", t, t_layers), w_q[p]),
                      "r2_k": explained_share(tokens("s", "k", s, s_layers), tokens("t", "k", t, t_layers), w_k[p])})
    return pairs


def _run_pairs(run: Path, teacher) -> tuple[list[int], list[int]]:
    """The (student layers, teacher layers) a run aligned, from its summary.json."""
    summary = json.loads((run / "summary.json").read_text())
    pairs = summary["config"]["layer_pairs"]
    t_count = len(decoder_layers(teacher))
    return summary["student_layers"], [resolve_layer(t, t_count, "layer_pairs (teacher)") for _, t in pairs]


def _processor(model: Path, processor: str | Path | None):
    from .models import load_processor

    source = Path(processor) if processor else model
    if not processor and not any((model / f).is_file() for f in PROCESSOR_FILES):
        raise ValueError(f"processor: model {str(model)!r} holds no processor; pass --processor (processor= in "
                         f"laid.analyze) with the processor folder")
    return load_processor(str(source))


def analyze(models, data: str | Path, *, sizes, out_dir: str | Path, processor: str | Path | None = None,
            names=None, teacher: str | Path | None = None, questions: int = 8, image_root: str | Path | None = None,
            seed: int = 0, device: str | None = "auto", block: int = BLOCK, backend: str = "auto",
            layers_per_pass: int | None = None, progress: bool = False) -> dict:
    """Analyse ``models`` (model or run folders) on the VHs ``data`` (folder or JSON file) at ``sizes``; write the
    figures, their JSON and ``analysis.md`` to ``out_dir``; return the page's numbers (see the module docstring).

    ``processor``: the processor folder for model folders that hold none; ``names``: labels (default: folder
    names); ``teacher``: the teacher of the runs' head flow (default: the teacher their summary.json names);
    ``questions``: prompts per size; ``image_root``: the folder image paths are relative to (default: ``data``'s);
    ``block``: keys per block of the streamed attention; ``backend``: of ``laid_kernels.apply_mrope``;
    ``layers_per_pass``: layers whose Q/K one forward captures (default all; fewer for long prompts of large
    models); ``progress``: print a line per model and size.
    """
    from .analysis_figures import write_figures

    data, out_dir = Path(data), Path(out_dir)
    if not data.exists():
        raise FileNotFoundError(f"data {str(data)!r} is neither a folder of visual_haystack_*.json files nor a file")
    image_root = Path(image_root) if image_root else (data if data.is_dir() else data.parent)
    sizes = check_sizes(sizes)
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    entries = {size: size_entries(data, size)[:questions] for size in sizes}  # checked before any model loads
    specs = [resolve_model(m) for m in models]
    if names is not None:
        if len(names) != len(specs):
            raise ValueError(f"names: {len(names)} names for {len(specs)} models")
        for spec, name in zip(specs, names):
            spec["name"] = name
    if len({s["name"] for s in specs}) != len(specs):
        raise ValueError(f"names must be distinct, got {[s['name'] for s in specs]} (pass names / --names)")
    processors = [_processor(s["model"], processor) for s in specs]  # every processor found before any model loads
    device = resolve_device(device)
    results = []
    for spec, proc in zip(specs, processors):
        model = load_for_eval(spec["model"], method="baseline", device=device, attn_implementation="sdpa")
        prompts = {size: [haystack_prompt(proc, e, i, size, image_root, seed) for i, e in enumerate(items)]
                   for size, items in entries.items()}
        config = unwrap(model).config.text_config
        inv_freq, section = _rope(model)
        result = {"name": spec["name"], "model": str(spec["model"]), "layers": config.num_hidden_layers,
                  "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "inv_freq": inv_freq, "mrope_section": list(section),
                  "sizes": profile(model, prompts, block=block, backend=backend, layers_per_pass=layers_per_pass,
                                   progress=spec["name"] if progress else None), "flow": None}
        mixer = spec["run"] / MIXER_FILE if spec["run"] is not None else None
        if mixer is not None and mixer.is_file():
            source = teacher or json.loads((spec["run"] / "summary.json").read_text())["config"]["teacher"]
            if not Path(source).exists():
                raise FileNotFoundError(f"teacher: {spec['name']}'s teacher {str(source)!r} (from its summary.json) "
                                        f"is not a folder here; pass --teacher (teacher= in laid.analyze)")
            teacher_model = load_for_eval(source, method="baseline", device=device, attn_implementation="sdpa")
            s_layers, t_layers = _run_pairs(spec["run"], teacher_model)
            result["flow"] = {"teacher": str(source), "size": sizes[0],
                              "pairs": head_flow(model, teacher_model, mixer, s_layers, t_layers,
                                                 prompts[sizes[0]])}
            del teacher_model
        results.append(result)
        del model
    span = max(r["span"] for m in results for r in m["sizes"].values())
    for m in results:
        low = low_frequency_pairs(m["inv_freq"], span)
        m["wavelengths"], m["low_frequency_pairs"] = wavelengths(m["inv_freq"]), low
        for r in m["sizes"].values():
            r["low_frequency_share"] = low_frequency_share(r["spectrum"], low)  # [L, H]
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_figures(results, sizes, span, out_dir)
