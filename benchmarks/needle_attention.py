"""Where the demo's models look: the share of image attention that lands on the needle image, by haystack size.

    python benchmarks/needle_attention.py [--demo runs/demo] [--sizes 2 5 20 50 150] [--questions 20]

For each model (the family's teacher and base student, and the seed-0 SFT, LAid and LAid w/o L_qk students of a
``laid demo`` run) and each size, the test haystacks of the demo are laid out exactly as ``laid eval`` shows them
(same image order, chat template and generation prompt). At the last prompt position (the one that predicts the
answer) every head of every layer gives an attention row; its needle share is the attention on the needle image's
tokens divided by the attention on all image tokens (chance, attention spread evenly over the images: 1 / size).
The table gives, per model and size, the best head's share (the (layer, head) with the highest mean over the
questions) and the mean share over all heads of the last layer. Prints a markdown table, writes JSON and a plot
next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from qwen_vl_utils import process_vision_info
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from laid.data import build_messages, haystack_order, pixel_budget
from laid.demo import BASELINE, FAMILY_DIR, family_paths, folder_name
from laid.evaluate import haystack_entries


def needle_shares(model, processor, data: Path, size: int, questions: int) -> torch.Tensor:
    """[questions, layers, heads] needle share of each head's attention over image tokens at the answer position."""
    image_token = model.config.image_token_id
    shares = []
    for index, entry in enumerate(haystack_entries(data, size)[:questions]):
        order = haystack_order(entry, seed=0, index=index, max_images=size)
        messages = build_messages([data / p for p in order], entry["conversations"][0]["value"],
                                  **pixel_budget(processor))
        images, _ = process_vision_info(messages)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions  # layers x [1, heads, T, T]
        rows = torch.stack([a[0, :, -1] for a in attentions])  # [layers, heads, T]
        is_image = inputs["input_ids"][0] == image_token
        per_image = inputs["image_grid_thw"].prod(-1) // processor.image_processor.merge_size ** 2
        owner = torch.repeat_interleave(torch.arange(len(order)), per_image)  # image index of each image token
        needle = torch.zeros_like(is_image)
        needle[is_image.nonzero()[owner == order.index(entry["pos_image"][0])]] = True
        shares.append(rows[..., needle].sum(-1) / rows[..., is_image].sum(-1))
    return torch.stack(shares)


def models_of(demo: Path, family: Path) -> dict[str, Path]:
    paths = family_paths(family)
    models = {"Teacher": paths["teacher"], BASELINE: paths["student"]}
    for name in ("SFT", "LAid", "LAid w/o L_qk"):
        models[f"{name} (seed 0)"] = demo / "students" / folder_name(name) / "seed0" / "final"
    return models


def plot(rows: list[dict], sizes: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        axis.plot(sizes, [r["best_head"] for r in rows if r["model"] == name], marker="o", label=name)
    axis.plot(sizes, [1 / s for s in sizes], "k--", label="chance (1 / images)")
    axis.set(xscale="log", yscale="log", xlabel="number of images", ylabel="best head's needle share",
             title="Attention on the needle image at the answer position")
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished `laid demo` output folder")
    parser.add_argument("--family", default=str(FAMILY_DIR))
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 20, 50, 150])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/demo/full/needle_attention.json")
    args = parser.parse_args()
    demo, family = Path(args.demo), Path(args.family)
    processor = AutoProcessor.from_pretrained(family_paths(family)["processor"])
    rows = []
    for name, path in models_of(demo, family).items():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        for size in args.sizes:
            shares = needle_shares(model, processor, demo / "data" / "test", size, args.questions).mean(0)
            layer, head = divmod(int(shares.argmax()), shares.shape[1])
            rows.append({"model": name, "size": size, "chance": 1 / size, "best_head": float(shares.max()),
                         "best_layer_head": [layer, head], "last_layer_mean": float(shares[-1].mean())})
    print("| model | " + " | ".join(f"{s} images: best head / last layer" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    print("| chance | " + " | ".join(f"{1 / s:.3f}" for s in args.sizes) + " |")
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = [f"{r['best_head']:.3f} / {r['last_layer_mean']:.3f}" for r in rows if r["model"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"demo": str(demo), "questions": args.questions, "rows": rows}, indent=1))
    print(plot(rows, args.sizes, out.with_suffix(".png")))


if __name__ == "__main__":
    main()
