"""Visual Haystacks (VHs) data: reading the official JSON, turning entries into Qwen2.5-VL training examples, and
building VHs-format training sets (synthetic shapes, or leak-free haystacks from COCO annotations).

The official format (see the benchmark's data note): a JSON list whose entries hold
``conversations[0]["value"]`` (the question), ``conversations[1]["value"]`` (``"yes"`` / ``"no"``), ``pos_image``
(needle paths) and ``neg_image`` (distractor paths), paths relative to an image root (the COCO root for the real
benchmark). The protocol shows all images first, then one text item ``VHS_PROMPT + question``, in a random order of
``pos_image + neg_image``; here that order is a seeded shuffle, so an example is reproducible.

Training data may also be free-form (``task="free"``): the same entries with any non-empty answer text, the question
shown as written (no yes/no instruction). The demo family learns to see and to find the needle image from such
data: ``synth_captions`` and ``synth_retrieval``.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .image_cache import ImageCache
from .prompt_inputs import encode_prompt

VHS_PROMPT = "You are given a set of images. Please answer the following question in Yes or No: "
ANSWERS = ("yes", "no")
TASKS = ("vhs", "free")  # yes/no questions after VHS_PROMPT; any answer text after the question as written
CAPTION_QUESTION = "What is in the image?"
IGNORE_INDEX = -100


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _question(anchor: str, target: str) -> str:
    """The official single-needle question, with the article the benchmark's regexes accept (a / an)."""
    return f"For the image with {_article(anchor)} {anchor}, is there {_article(target)} {target}?"


def _retrieval_question(anchor: str) -> str:
    """The free-form question whose answer is the other object of the anchor's image."""
    return f"For the image with {_article(anchor)} {anchor}, what else is there?"


def _entry(question: str, answer: str, pos_image: list[str], neg_image: list[str]) -> dict:
    return {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "pos_image": pos_image,
        "neg_image": neg_image,
    }


def load_vhs(json_path: str | Path, *, task: str = "vhs") -> list[dict]:
    """Read and validate a Visual Haystacks JSON file; return its entries unchanged (a list of dicts).

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file, the entry index and what is
    wrong when it is not the official format: a list of entries with ``conversations`` (at least two turns, each a
    dict with a string ``value``; the second ``"yes"`` or ``"no"``, or for ``task="free"`` any non-empty text), a
    non-empty list of strings ``pos_image`` and a list of strings ``neg_image``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"Visual Haystacks file {path} does not exist")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries):

        def fail(what: str):
            raise ValueError(f"{path}: entry {i}: {what}")

        if not isinstance(entry, dict):
            fail(f"expected an object, got {type(entry).__name__}")
        conversations = entry.get("conversations")
        if not isinstance(conversations, list) or len(conversations) < 2:
            fail("missing 'conversations' (a list of at least two turns: question, answer)")
        for turn, role in ((0, "question"), (1, "answer")):
            if not isinstance(conversations[turn], dict) or not isinstance(conversations[turn].get("value"), str):
                fail(f"conversations[{turn}] has no string 'value' (the {role})")
        answer = conversations[1]["value"]
        if task == "vhs" and answer not in ANSWERS:
            fail(f"conversations[1].value must be 'yes' or 'no', got {answer!r} (free-form answers: task='free')")
        if task == "free" and not answer.strip():
            fail("conversations[1].value (the answer) is empty")
        for key, may_be_empty in (("pos_image", False), ("neg_image", True)):
            images = entry.get(key)
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                fail(f"missing '{key}' (a list of image paths)")
            if not images and not may_be_empty:
                fail(f"'{key}' is empty (an entry needs at least one needle image)")
    return entries


def build_messages(
    image_paths: list[str], question: str, *, min_pixels: int | None = None, max_pixels: int | None = None,
    prompt: str = VHS_PROMPT,
) -> list[dict]:
    """The official Qwen chat messages: one user turn with every image, then ``prompt + question``.

    ``min_pixels`` / ``max_pixels`` go into each image item, where ``qwen_vl_utils`` reads them (None: its defaults).
    """
    budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    content = [{"type": "image", "image": str(p), **budget} for p in image_paths]
    content.append({"type": "text", "text": prompt + question})
    return [{"role": "user", "content": content}]


def first_missing_image(entry: dict, image_root: Path) -> Path | None:
    """The first of the entry's images (needles, then negatives) that is not a file under ``image_root``, or None."""
    return next((image_root / p for p in entry["pos_image"] + entry["neg_image"] if not (image_root / p).is_file()),
                None)


def pixel_budget(processor) -> dict[str, int]:
    """``{"min_pixels", "max_pixels"}``: the pixel bounds of ``processor``'s image processor, for ``build_messages``.

    ``qwen_vl_utils`` resizes every image into its own bounds (at least 4 merged patches, 56 x 56) before the
    processor sees it; passing the processor's bounds instead makes the loader and the processor agree. For the real
    Qwen2.5-VL processor (3136 to 12,845,056 pixels) they are the loader's defaults, so the official protocol is
    unchanged; a tiny processor whose minimum is one merged patch (28 x 28 = 784) then shows a 28 x 28 image as one
    visual token.
    """
    size = processor.image_processor.size
    return {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"])}


def haystack_order(entry: dict, *, seed: int, index: int, max_images: int | None = None) -> list[str]:
    """The entry's image paths (relative), needles plus negatives, in the seeded order ``(seed, index)`` gives.

    ``max_images`` keeps the needles and a seeded random ``max_images - len(pos_image)`` of the negatives (drawn
    without replacement by ``numpy.random.default_rng([seed, index, 1])``; how a 150-image haystack is cut from the
    500 file) before shuffling.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    negatives = entry["neg_image"]
    if max_images is not None:
        if max_images < len(entry["pos_image"]):
            n_needles = len(entry["pos_image"])
            raise ValueError(f"max_images={max_images} is smaller than the {n_needles} needle images")
        keep = max_images - len(entry["pos_image"])
        if keep < len(negatives):
            chosen = np.random.default_rng([seed, index, 1]).choice(len(negatives), size=keep, replace=False)
            negatives = [negatives[k] for k in sorted(chosen)]
    images = entry["pos_image"] + negatives
    order = np.random.default_rng([seed, index]).permutation(len(images))
    return [images[k] for k in order]


class VHsDataset(torch.utils.data.Dataset):
    """Visual Haystacks entries as Qwen2.5-VL training examples (prompt with every image, supervised answer).

    Item ``i`` is a dict (of tensors, and ``pixel_format``), N the token count and P the patch count of all its images:

    - ``input_ids`` [N], ``attention_mask`` [N] (all ones), ``mm_token_type_ids`` [N] (1 on ``<|image_pad|>``),
    - ``labels`` [N]: ``IGNORE_INDEX`` (-100) everywhere except the answer tokens and the ``<|im_end|>`` closing the
      assistant turn (aligned with ``input_ids``: the model shifts them itself),
    - ``image_grid_thw`` [n_images, 3] and the images' uint8 pixels ``image_pixels`` with their
      ``pixel_format`` (``laid.prompt_inputs.encode_prompt``): ``laid.prompt_inputs.model_inputs`` turns them into
      the processor's ``pixel_values`` [P, 3 * 2 * 14 * 14] on the device that runs the model.

    Images are ``pos_image + neg_image`` (see ``haystack_order`` for ``max_images``), shuffled by the seed and the
    index, loaded and resized by ``qwen_vl_utils`` exactly as ``process_vision_info`` does, within
    ``[min_pixels, max_pixels]`` (both the loader and the processor use that budget; None takes the processor's
    bound, ``pixel_budget``: for the real processor that is the official protocol). ``task="free"`` takes any
    answer text and shows the question without ``VHS_PROMPT`` (see ``load_vhs``). A missing image raises
    ``FileNotFoundError`` and an unreadable one ``ValueError``, both naming the file and the entry index.
    ``image_cache`` (``laid.image_cache.ImageCache``) serves the decoded, resized images from disk when it holds
    them (default: no cache).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        processor,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_images: int | None = None,
        seed: int = 0,
        task: str = "vhs",
        image_cache: ImageCache | None = None,
    ):
        self.json_path = Path(json_path)
        self.image_cache = image_cache if image_cache is not None else ImageCache(None)
        self.entries = load_vhs(self.json_path, task=task)
        self.prompt = VHS_PROMPT if task == "vhs" else ""
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root {self.image_root} is not a directory")
        self.processor = processor
        default = pixel_budget(processor)
        low = default["min_pixels"] if min_pixels is None else min_pixels
        high = default["max_pixels"] if max_pixels is None else max_pixels
        if not 0 < low <= high:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={low}, max_pixels={high}")
        self.min_pixels, self.max_pixels = low, high
        self._size_kwargs = {"size": {"shortest_edge": low, "longest_edge": high}}
        self.max_images = max_images
        self.seed = seed
        tokenizer = processor.tokenizer
        self._assistant_header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self._im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = tokenizer.pad_token_id  # for collate(batch, pad_token_id=...)

    def __len__(self) -> int:
        return len(self.entries)

    def _load_images(self, messages: list[dict], index: int) -> list[np.ndarray]:
        """The images of ``build_messages`` output, read and resized one by one as ``process_vision_info`` does."""
        images = []
        for item in messages[0]["content"]:
            if "image" not in item:
                continue
            if not Path(item["image"]).is_file():
                raise FileNotFoundError(f"{self.json_path}: entry {index}: image {item['image']} not found")
            try:
                images.append(self.image_cache.load(item))
            except (OSError, ValueError) as err:
                raise ValueError(f"{self.json_path}: entry {index}: cannot read image {item['image']} ({err})") from err
        return images

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        index %= len(self.entries)  # ds[-1] is the last entry, shuffled as that entry
        question, answer = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
        order = haystack_order(entry, seed=self.seed, index=index, max_images=self.max_images)
        paths = [self.image_root / p for p in order]
        messages = build_messages(paths, question, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                  prompt=self.prompt)
        images = self._load_images(messages, index)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = self.processor.apply_chat_template(messages, tokenize=False)
        enc = encode_prompt(self.processor, text, images, size=self._size_kwargs.get("size"))
        item = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in enc.items()}
        item["labels"] = self._answer_labels(item["input_ids"], index)
        return item

    def _answer_labels(self, input_ids: torch.Tensor, index: int) -> torch.Tensor:
        """labels [N]: input_ids on the last assistant turn's tokens up to its ``<|im_end|>``, -100 elsewhere."""
        ids, header = input_ids.tolist(), self._assistant_header
        for k in range(len(ids) - len(header), -1, -1):
            if ids[k : k + len(header)] == header:
                start = k + len(header)
                if self._im_end in ids[start:]:
                    end = start + ids[start:].index(self._im_end) + 1
                    labels = torch.full_like(input_ids, IGNORE_INDEX)
                    labels[start:end] = input_ids[start:end]
                    return labels
                break
        raise RuntimeError(f"{self.json_path}: entry {index}: no closed assistant turn in the chat template output")


def collate(batch: list[dict[str, torch.Tensor]], *, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack ``VHsDataset`` items into a batch, right-padded to the longest sequence.

    Right padding (real tokens start at index 0 of every row) is for training; ``get_rope_index`` and the losses
    exclude padding through ``attention_mask``. Padding gets ``pad_token_id`` in ``input_ids``, 0 in
    ``attention_mask`` / ``mm_token_type_ids`` and -100 in ``labels``. Returns ``input_ids``, ``attention_mask``,
    ``labels`` (and ``mm_token_type_ids`` when the items have it) [B, N_max], ``image_grid_thw`` [sum n_images, 3]
    and ``image_pixels`` (or, from the processor's path, ``pixel_values`` [sum P, C]) concatenated in batch order,
    as Qwen2.5-VL expects, and the items' ``pixel_format`` (which must agree).
    ``laid.prompt_inputs.model_inputs`` turns the batch into model inputs on a device.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    n_max = max(item["input_ids"].shape[0] for item in batch)
    out = {}
    for key, value in pad_values.items():
        if key not in batch[0]:
            continue
        rows = [item[key] for item in batch]
        out[key] = torch.stack([torch.nn.functional.pad(r, (0, n_max - r.shape[0]), value=value) for r in rows])
    keys = [set(item) for item in batch]
    if set.union(*keys) != set.intersection(*keys):
        raise ValueError(f"collate: items differ in keys {sorted(set.union(*keys) - set.intersection(*keys))} "
                         f"(uint8 image_pixels and the processor's pixel_values cannot share a batch)")
    # One item (batch 1, the long-haystack case): its pixels as they are, not a copy of up to a GB.
    for key in ("image_pixels", "pixel_values", "image_grid_thw"):
        if key in batch[0]:
            out[key] = batch[0][key] if len(batch) == 1 else torch.cat([item[key] for item in batch])
    if "pixel_format" in batch[0]:
        if any(item["pixel_format"] != batch[0]["pixel_format"] for item in batch):
            raise ValueError("collate: items normalised or patched differently (pixel_format differs)")
        out["pixel_format"] = batch[0]["pixel_format"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Synthetic haystacks: coloured shapes drawn with PIL.

SYNTH_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
# The synthetic world's objects, "colour shape", one per colour: like COCO categories, each is told apart by its look
# at a glance (here its colour), which a tiny vision tower trained from scratch learns in a few hundred steps.
SYNTH_OBJECTS = ("red circle", "green square", "blue triangle", "yellow diamond", "purple square", "orange circle")


def _draw_objects(objects: list[str], image_size: int, rng: random.Random) -> Image.Image:
    """An RGB ``image_size`` square on white with each "colour shape" object in its own horizontal slot."""
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    slot = image_size / max(len(objects), 1)
    for k, name in enumerate(objects):
        color, shape = name.split(" ")
        r = 0.4 * min(slot, image_size) * rng.uniform(0.8, 1.0)
        cx = slot * (k + 0.5)
        cy = rng.uniform(r, image_size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = SYNTH_COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


class _ImagePool:
    """Rendered images of "colour shape" contents under ``out/images``, reused across entries as COCO images are.

    Each content (an ordered tuple of objects) gets up to ``variants`` renderings (random sizes and heights); a
    request draws one of them that the current entry does not use yet, and renders a new one only when fewer than
    ``variants`` exist or all are taken. Deterministic given the rng's state.
    """

    def __init__(self, out: Path, image_size: int, variants: int, rng: random.Random):
        self.out, self.image_size, self.variants, self.rng = out, image_size, variants, rng
        self.paths: dict[tuple[str, ...], list[str]] = {}

    def get(self, content: list[str], used: set[str]) -> str:
        """A relative image path showing ``content`` that is not in ``used`` (which it is added to)."""
        paths = self.paths.setdefault(tuple(content), [])
        free = [p for p in paths if p not in used]
        if free and (len(paths) >= self.variants or self.rng.random() < len(paths) / self.variants):
            path = self.rng.choice(free)
        else:
            stem = "-".join(o.replace(" ", "_") for o in content)
            path = f"images/{stem}_{len(paths)}.png"
            _draw_objects(content, self.image_size, self.rng).save(self.out / path)
            paths.append(path)
        used.add(path)
        return path


def _synth_setup(out_dir, n_entries: int, image_size: int, seed: int, variants: int):
    """Check the shared synthetic-data arguments; ``(out folder with images/, seeded rng, its _ImagePool)``."""
    if n_entries < 1:
        raise ValueError(f"n_entries must be >= 1, got {n_entries}")
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28 (one merged Qwen2.5-VL patch), got {image_size}")
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    return out, rng, _ImagePool(out, image_size, variants, rng)


def _haystack_entries(out_dir, n_entries: int, min_images: int, max_images: int, image_size: int, seed: int,
                      variants: int, log_uniform: bool) -> tuple[Path, list[tuple[dict, str]]]:
    """``synth_haystacks``'s entries with their anchors, images written: ``(out folder, [(entry, anchor), ...])``."""
    if not 1 <= min_images <= max_images:
        raise ValueError(f"need 1 <= min_images <= max_images, got min_images={min_images}, max_images={max_images}")
    out, rng, pool = _synth_setup(out_dir, n_entries, image_size, seed, variants)
    objects = list(SYNTH_OBJECTS)
    answers = ["yes"] * (n_entries // 2) + ["no"] * (n_entries - n_entries // 2)
    rng.shuffle(answers)
    entries = []
    for answer in answers:
        anchor, target = rng.sample(objects, 2)
        others = [o for o in objects if o not in (anchor, target)]
        needle = [anchor, target if answer == "yes" else rng.choice(others)]
        rng.shuffle(needle)
        contents = [needle]
        without_anchor = [o for o in objects if o != anchor]
        n_images = (min(max_images, int(math.exp(rng.uniform(math.log(min_images), math.log(max_images + 1)))))
                    if log_uniform else rng.randint(min_images, max_images))
        for _ in range(n_images - 1):
            contents.append(rng.sample(without_anchor, rng.randint(1, 2)))
        used: set[str] = set()
        paths = [pool.get(content, used) for content in contents]
        entry = {**_entry(_question(anchor, target), answer, paths[:1], paths[1:]), "objects": contents}
        entries.append((entry, anchor))
    return out, entries


def _write_entries(json_path: Path, entries: list[dict]) -> Path:
    """Write VHs entries as the JSON files of this module are written (indent 1); returns ``json_path``."""
    json_path.write_text(json.dumps(entries, indent=1))
    return json_path


def synth_haystacks(
    out_dir: str | Path,
    *,
    n_entries: int,
    min_images: int,
    max_images: int,
    image_size: int = 56,
    seed: int = 0,
    variants: int = 4,
    log_uniform: bool = False,
    json_name: str = "visual_haystack_synth.json",
) -> Path:
    """Write a synthetic single-needle VHs set: ``out_dir/json_name`` plus PNGs under ``out_dir/images``.

    Objects are ``SYNTH_OBJECTS`` (6 "colour shape" names). Each entry picks an anchor
    and a target object, asks "For the image with a {anchor}, is there a {target}?", and has one needle image holding
    the anchor and (answer "yes") the target or (answer "no") another object, plus N - 1 distractors of one or two
    objects that never include the anchor. N is uniform in ``[min_images, max_images]`` (``log_uniform``: log N is
    uniform, so short haystacks are as common as long ones per octave, the cheap curriculum for training); exactly
    ``n_entries // 2`` entries say "yes" (the odd one out says "no"), in random order; the needle's position is
    uniform once ``VHsDataset`` shuffles. Images are shared between entries like COCO photos: each content (the
    objects of an image, left to right) has up to ``variants`` renderings, and no entry shows one file twice. Image
    paths in the JSON are relative to ``out_dir`` (the image root). Besides the official keys each entry has
    ``objects``: the objects drawn in each image of ``pos_image + neg_image``, in that order (``load_vhs`` ignores
    it). Same arguments, same files. Returns the JSON path.
    """
    out, entries = _haystack_entries(out_dir, n_entries, min_images, max_images, image_size, seed, variants,
                                     log_uniform)
    return _write_entries(out / json_name, [entry for entry, _ in entries])


def synth_retrieval(
    out_dir: str | Path,
    *,
    n_entries: int,
    min_images: int,
    max_images: int,
    image_size: int = 56,
    seed: int = 0,
    variants: int = 4,
    log_uniform: bool = False,
    retrieval_share: float = 0.5,
    json_name: str = "retrieval_synth.json",
) -> Path:
    """Write ``synth_haystacks``'s haystacks as ``task="free"`` data that teaches finding the needle image.

    A ``retrieval_share`` of the entries (spread evenly: entry k when ``floor(k * share)`` steps up, so 0.5 gives
    entries 0, 2, 4, ...) ask "For the image with a {anchor}, what else is there?", answered with the needle image's
    other object ("blue square"); the others keep their yes/no question, written after ``VHS_PROMPT`` as the
    ``vhs`` task shows it. The yes/no answer depends on the needle image only through one bit, which a model trained
    from scratch did not learn from in thousands of steps on haystacks of 2 to 4 images; naming the object gives a
    first-order signal for attending to the anchor's image, and the model then answers the yes/no questions too.
    Same arguments as ``synth_haystacks`` (same seed, same haystacks and images); returns the JSON path.
    """
    if not 0.0 <= retrieval_share <= 1.0:
        raise ValueError(f"retrieval_share must be in [0, 1] (the share of 'what else is there?' questions), got "
                         f"{retrieval_share}")
    out, entries = _haystack_entries(out_dir, n_entries, min_images, max_images, image_size, seed, variants,
                                     log_uniform)
    written = []
    for k, (entry, anchor) in enumerate(entries):
        question, answer = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
        if math.floor(k * retrieval_share) != math.floor((k - 1) * retrieval_share):
            question, answer = _retrieval_question(anchor), next(o for o in entry["objects"][0] if o != anchor)
        else:
            question = VHS_PROMPT + question
        written.append({**_entry(question, answer, entry["pos_image"], entry["neg_image"]),
                        "objects": entry["objects"]})
    return _write_entries(out / json_name, written)


def synth_captions(
    out_dir: str | Path,
    *,
    n_entries: int,
    image_size: int = 56,
    seed: int = 0,
    variants: int = 4,
    json_name: str = "captions_synth.json",
) -> Path:
    """Write single-image captions of the synthetic world (``task="free"`` data): ``out_dir/json_name`` plus PNGs.

    Each entry shows one image of one or two objects (drawn as ``synth_haystacks`` draws them, ``variants``
    renderings per content) and asks ``CAPTION_QUESTION``; the answer names the objects left to right, "red circle"
    or "red circle and blue square". This is the first-order signal a vision tower trained from scratch needs before
    the yes/no haystack questions (whose answer depends on the image only through the question) can be learned.
    Same arguments, same files; returns the JSON path.
    """
    out, rng, pool = _synth_setup(out_dir, n_entries, image_size, seed, variants)
    objects = list(SYNTH_OBJECTS)
    entries = []
    for _ in range(n_entries):
        content = rng.sample(objects, rng.randint(1, 2))
        path = pool.get(content, set())
        entries.append({**_entry(CAPTION_QUESTION, " and ".join(content), [path], []), "objects": [content]})
    return _write_entries(out / json_name, entries)


def vhs_json_name(n_images: int) -> str:
    """The official file name of the single-needle haystacks of ``n_images`` images (1: the oracle file)."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return f"visual_haystack_{'oracle' if n_images == 1 else n_images}.json"


def synth_benchmark(out_dir: str | Path, *, sizes, n_entries: int, image_size: int = 56, seed: int = 0) -> Path:
    """Write a synthetic benchmark in the official layout: ``out_dir/vhs_json_name(N)`` for every N in ``sizes``,
    each entry with exactly N images (``synth_haystacks`` with seed ``seed + N`` into ``out_dir/synth_N``; paths in
    the JSON files are relative to ``out_dir``, the image root). Returns ``out_dir``."""
    out = Path(out_dir)
    for size in sizes:
        folder = f"synth_{size}"
        path = synth_haystacks(out / folder, n_entries=n_entries, min_images=size, max_images=size,
                               image_size=image_size, seed=seed + size)
        entries = json.loads(path.read_text())
        for entry in entries:
            for key in ("pos_image", "neg_image"):
                entry[key] = [f"{folder}/{p}" for p in entry[key]]
        _write_entries(out / vhs_json_name(size), entries)
        path.unlink()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Leak-free training haystacks from COCO annotations.

_COCO_SPLIT = re.compile(r"instances_(\w+)\.json$")


def _read_coco(instances_files: list[str | Path]) -> tuple[dict[str, set[str]], list[str]]:
    """``({image path relative to the COCO root: {category names}}, category names)`` over all files.

    ``instances_<split>.json`` gives paths ``<split>/<file_name>`` (e.g. ``train2017/000000000009.jpg``).
    """
    contents: dict[str, set[str]] = {}
    names: set[str] = set()
    for file in map(Path, instances_files):
        match = _COCO_SPLIT.search(file.name)
        if match is None:
            raise ValueError(f"{file}: expected a COCO file named instances_<split>.json (e.g. instances_val2017.json)")
        if not file.is_file():
            raise FileNotFoundError(f"COCO instances file {file} does not exist")
        data = json.loads(file.read_text())
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise ValueError(f"{file}: not a COCO instances file (missing {', '.join(missing)})")
        category = {c["id"]: c["name"] for c in data["categories"]}
        names.update(category.values())
        by_id = {img["id"]: f"{match.group(1)}/{img['file_name']}" for img in data["images"]}
        for rel in by_id.values():
            contents.setdefault(rel, set())
        for k, ann in enumerate(data["annotations"]):
            if ann.get("image_id") not in by_id or ann.get("category_id") not in category:
                raise ValueError(f"{file}: annotation {k} refers to an unknown image or category")
            contents[by_id[ann["image_id"]]].add(category[ann["category_id"]])
    return contents, sorted(names)


def build_train_from_coco(
    instances_files: list[str | Path],
    out_path: str | Path,
    *,
    exclude_vhs_files: list[str | Path],
    n_entries: int,
    min_images: int = 2,
    max_images: int = 20,
    seed: int = 0,
    max_tries: int = 1000,
) -> Path:
    """Write a leak-free VHs-format training set built from COCO ``instances_*2017.json`` annotations.

    Every image referenced by ``exclude_vhs_files`` (any VHs JSON: matched by file name, which is unique in COCO) is
    left out. Entries come in pairs sharing an (anchor A, target T != A) category pair drawn uniformly among pairs
    that admit both answers: one "yes" entry whose needle holds A and T and one "no" entry whose needle holds A but
    not T, so answers are 50/50 within every (A, T). Each entry has N - 1 distractors (N uniform in
    ``[min_images, max_images]``, all distinct) that lack A, and the question "For the image with a {A}, is there a
    {T}?". Entries are shuffled; paths are relative to the COCO root. ``n_entries`` must be even. Returns
    ``out_path``.
    """
    if n_entries < 2 or n_entries % 2:
        raise ValueError(f"n_entries must be a positive even number (one yes and one no per pair), got {n_entries}")
    if not 1 <= min_images <= max_images:
        raise ValueError(f"need 1 <= min_images <= max_images, got min_images={min_images}, max_images={max_images}")
    excluded = {Path(p).name for f in exclude_vhs_files for e in load_vhs(f) for p in e["pos_image"] + e["neg_image"]}
    contents, names = _read_coco(instances_files)
    pool = sorted(rel for rel in contents if Path(rel).name not in excluded)
    if not pool:
        raise ValueError("no COCO image is left after excluding the Visual Haystacks images")
    with_category: dict[str, list[str]] = {name: [] for name in names}
    for rel in pool:
        for name in contents[rel]:
            with_category[name].append(rel)
    rng = random.Random(seed)
    co_occurring: dict[str, dict[str, list[str]]] = {}  # anchor -> target -> images holding both (built on demand)

    def needles(anchor: str, target: str) -> tuple[list[str], int]:
        """Images holding anchor and target, and how many images hold the anchor without the target."""
        if anchor not in co_occurring:
            co_occurring[anchor] = collections.defaultdict(list)
            for rel in with_category[anchor]:
                for name in contents[rel]:
                    co_occurring[anchor][name].append(rel)
        both = co_occurring[anchor].get(target, [])
        return both, len(with_category[anchor]) - len(both)

    def draw(candidates: list[str], lacking: str, count: int) -> list[str]:
        """``count`` distinct images of ``candidates`` without category ``lacking`` (rejection sampling: the
        candidate lists have a fixed order, so the result is deterministic per seed)."""
        chosen: set[str] = set()
        while len(chosen) < count:
            rel = rng.choice(candidates)
            if lacking not in contents[rel]:
                chosen.add(rel)
        return sorted(chosen)

    entries = []
    for _ in range(n_entries // 2):
        for _ in range(max_tries):
            anchor, target = rng.sample(names, 2)
            yes_needles, n_no_needles = needles(anchor, target)
            if yes_needles and n_no_needles:
                break
        else:
            raise ValueError(f"no (anchor, target) category pair with both answers found in {max_tries} tries")
        without_anchor = len(pool) - len(with_category[anchor])
        for answer in ("yes", "no"):
            needle = rng.choice(yes_needles) if answer == "yes" else draw(with_category[anchor], target, 1)[0]
            count = rng.randint(min_images, max_images) - 1
            if count > without_anchor:
                raise ValueError(f"only {without_anchor} images lack '{anchor}', cannot draw {count} distractors")
            negatives = draw(pool, anchor, count)
            rng.shuffle(negatives)
            entries.append(_entry(_question(anchor, target), answer, [needle], negatives))
    rng.shuffle(entries)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_entries(out, entries)
