"""Why a family model fails at long haystacks: answer and needle attention by needle position and by distractor kind.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/family_probe.py --model laid/demo_family/teacher \
        --processor laid/demo_family/processor --image-size 56 --sizes 2 20 150 --questions 30 --out runs/probe_t

For each size N, ``--questions`` fresh ``synth_haystacks`` entries (seed 4242 + N, drawn into ``OUT/data``, no file
shared with any training set) are shown as ``laid eval`` shows them (the official messages, the processor's pixel
bounds), with the needle image at a chosen place: ``first`` (farthest from the question), ``middle``, ``last``
(right before it) or ``shuffled`` (where ``laid eval`` puts it); with ``--blank`` the distractors are also shown as blank (white) images, which
separates "too many positions" (position / RoPE) from "too many look-alike images" (content interference). One
teacher-forced forward per prompt (eager attention) gives:

- accuracy: whether the model's next-token logit of the first token of "yes" beats that of "no" at the answer
  position (the answer greedy decoding would start with, restricted to the two answers);
- p_right: the softmax over those two logits, on the right answer (0.5 is chance);
- needle share per layer: at the answer position, the attention on the needle image's tokens divided by the
  attention on all image tokens, for the head of that layer with the highest mean share (chance: 1 / N).

Prints a markdown table and writes ``OUT/probe.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from laid.data import haystack_order, synth_haystacks
from laid.evaluate import prompt_inputs
from laid.models import load_model, load_processor

PLACES = ("first", "middle", "last", "shuffled")


def place_needle(entry: dict, index: int, place: str) -> list[str]:
    """The entry's images with the needle first, in the middle or last (negatives in their file order), or
    ``shuffled`` as ``laid eval`` shows question ``index`` (``haystack_order``, seed 0)."""
    if place == "shuffled":
        return haystack_order(entry, seed=0, index=index)
    needle, negatives = entry["pos_image"], list(entry["neg_image"])
    at = {"first": 0, "middle": len(negatives) // 2, "last": len(negatives)}[place]
    return negatives[:at] + needle + negatives[at:]


def image_spans(input_ids: torch.Tensor, grid_thw: torch.Tensor, image_token: int) -> list[torch.Tensor]:
    """The token positions of each image, in order: the ``<|image_pad|>`` positions split by each image's count."""
    positions = (input_ids == image_token).nonzero().flatten()
    counts = (grid_thw.prod(-1) // 4).tolist()  # merged 2 x 2 patches per image
    return list(torch.split(positions, counts))


@torch.inference_mode()
def probe(model, processor, paths: list[Path], question: str, needle: int, yes_no: tuple[int, int]) -> dict:
    """One prompt: the yes / no logits at the answer position and the per-layer, per-head needle share there."""
    inputs = prompt_inputs(processor, paths, question)
    out = model(**inputs, output_attentions=True)
    logits = out.logits[0, -1, list(yes_no)]
    spans = image_spans(inputs["input_ids"][0], inputs["image_grid_thw"], model.config.image_token_id)
    image_positions = torch.cat(spans)
    shares = []
    for attention in out.attentions:  # [1, heads, N, N] per layer
        row = attention[0, :, -1, :]  # [heads, N]: the answer position's attention
        shares.append((row[:, spans[needle]].sum(-1) / row[:, image_positions].sum(-1)).tolist())
    return {"logits": logits.tolist(), "shares": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--processor", required=True)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 20, 150])
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--places", nargs="+", default=list(PLACES), choices=PLACES)
    parser.add_argument("--blank", action="store_true", help="also show every haystack with blank distractors")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    processor = load_processor(args.processor)
    model = load_model(args.model, dtype=torch.float32, role="model", attn_implementation="eager").eval()
    tokenizer = processor.tokenizer
    yes_no = tuple(tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("yes", "no"))
    blank = args.out / "data" / "blank.png"
    blank.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (args.image_size, args.image_size), (255, 255, 255)).save(blank)
    kinds = ["normal"] + (["blank"] if args.blank else [])

    rows = []
    for size in args.sizes:
        root = args.out / "data" / f"synth_{size}"
        entries = json.loads(synth_haystacks(root, n_entries=args.questions, min_images=size, max_images=size,
                                             image_size=args.image_size, seed=4242 + size).read_text())
        for kind in kinds:
            for place in (args.places if size > 1 else ["first"]):
                right, p_right, shares = 0, 0.0, None
                for index, entry in enumerate(entries):
                    order = place_needle(entry, index, place)
                    needle = order.index(entry["pos_image"][0])
                    paths = [root / p if (p in entry["pos_image"] or kind == "normal") else blank for p in order]
                    result = probe(model, processor, paths, entry["conversations"][0]["value"], needle, yes_no)
                    truth = 0 if entry["conversations"][1]["value"] == "yes" else 1
                    right += int(result["logits"][truth] > result["logits"][1 - truth])
                    p_right += torch.softmax(torch.tensor(result["logits"]), 0)[truth].item()
                    per_head = torch.tensor(result["shares"])  # [layers, heads]
                    shares = per_head if shares is None else shares + per_head
                best = (shares / len(entries)).max(-1).values.tolist()
                rows.append({"size": size, "distractors": kind, "needle": place,
                             "accuracy": round(100 * right / len(entries), 1),
                             "p_right": round(p_right / len(entries), 3),
                             "needle_share_best_head_per_layer": [round(s, 3) for s in best]})
                print(rows[-1], flush=True)
    lines = ["| images | distractors | needle | accuracy (yes/no logit) | p(right) | best-head needle share per "
             "layer (chance 1/N) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['distractors']} | {r['needle']} | {r['accuracy']} | {r['p_right']} | "
              + " / ".join(f"{s:.3f}" for s in r["needle_share_best_head_per_layer"]) + " |" for r in rows]
    (args.out / "probe.json").write_text(json.dumps({"model": args.model, "questions": args.questions,
                                                     "rows": rows}, indent=1))
    (args.out / "probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
