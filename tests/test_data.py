"""Tests for laid.data and the `laid data` CLI: VHs format checks, training examples, collation, synthetic and
COCO-derived haystacks."""

import collections
import json
import random
import re

import pytest
import torch
from qwen_vl_utils import fetch_image

from laid.cli import main
from laid.data import (
    IGNORE_INDEX,
    SYNTH_OBJECTS,
    VHS_PROMPT,
    VHsDataset,
    build_messages,
    build_train_from_coco,
    collate,
    haystack_order,
    load_vhs,
    pixel_budget,
    synth_captions,
    synth_haystacks,
    synth_retrieval,
)
from laid.prompt_inputs import PIXEL_KEYS, model_inputs
from laid.tiny import TINY_STUDENT, build_tiny_processor, save_tiny_model, tiny_qwen25vl_config

# The regexes the benchmark's OWLv2 baseline uses to read anchor and target from a single-needle question.
ANCHOR_RE = re.compile(r"for the image with (a|an) (.*?),")
TARGET_RE = re.compile(r".*is there (an? [\w\s]+)[?!.]*")


def _anchor_target(question):
    """(anchor, target) as the benchmark's regexes read them, articles dropped."""
    anchor = ANCHOR_RE.search(question.lower()).group(2)
    return anchor, TARGET_RE.search(question.lower()).group(1).split(" ", 1)[1]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return synth_haystacks(root, n_entries=6, min_images=3, max_images=6, seed=0), root


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


GOOD = {
    "conversations": [{"from": "human", "value": "For the image with a cat, is there a dog?"}, {"value": "yes"}],
    "pos_image": ["a.png"],
    "neg_image": ["b.png"],
}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({k: v for k, v in GOOD.items() if k != "conversations"}, "missing 'conversations'"),
        ({**GOOD, "conversations": GOOD["conversations"][:1]}, "missing 'conversations'"),
        ({**GOOD, "conversations": [GOOD["conversations"][0], {"value": 1}]}, r"conversations\[1\] has no string"),
        ({**GOOD, "conversations": [GOOD["conversations"][0], {"value": "maybe"}]}, "must be 'yes' or 'no'"),
        ({**GOOD, "conversations": [GOOD["conversations"][0], {"value": "Yes"}]}, "must be 'yes' or 'no'"),
        ({k: v for k, v in GOOD.items() if k != "pos_image"}, "missing 'pos_image'"),
        ({**GOOD, "pos_image": []}, "'pos_image' is empty"),
        ({**GOOD, "neg_image": ["b.png", 3]}, "missing 'neg_image'"),
        ("not an object", "expected an object"),
    ],
)
def test_load_vhs_names_file_entry_and_problem(tmp_path, entry, message):
    path = _write(tmp_path / "bad.json", [GOOD, entry])
    with pytest.raises(ValueError, match=rf"bad\.json: entry 1: .*{message}"):
        load_vhs(path)


def test_load_vhs_free_task_takes_any_answer_text(tmp_path):
    caption = {**GOOD, "conversations": [{"value": "What is in the image?"}, {"value": "a dog and a cat"}]}
    path = _write(tmp_path / "free.json", [caption])
    assert load_vhs(path, task="free") == [caption]
    with pytest.raises(ValueError, match="must be 'yes' or 'no'.*task='free'"):
        load_vhs(path)
    empty = {**caption, "conversations": [caption["conversations"][0], {"value": " "}]}
    with pytest.raises(ValueError, match=r"entry 0: conversations\[1\].value \(the answer\) is empty"):
        load_vhs(_write(tmp_path / "empty.json", [empty]), task="free")
    with pytest.raises(ValueError, match="task must be one of"):
        load_vhs(path, task="captions")


def test_load_vhs_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="notjson.json: not valid JSON"):
        load_vhs(_write(tmp_path / "notjson.json", "{oops"))
    with pytest.raises(ValueError, match="dict.json: expected a JSON list"):
        load_vhs(_write(tmp_path / "dict.json", {"a": 1}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_vhs(tmp_path / "missing.json")
    oracle_entries = [GOOD, {**GOOD, "neg_image": []}]
    assert load_vhs(_write(tmp_path / "good.json", oracle_entries)) == oracle_entries


def test_build_messages_follows_the_protocol():
    messages = build_messages(["x/1.jpg", "x/2.jpg"], "Q?", max_pixels=3136)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert content[:2] == [
        {"type": "image", "image": "x/1.jpg", "max_pixels": 3136},
        {"type": "image", "image": "x/2.jpg", "max_pixels": 3136},
    ]
    assert content[2] == {"type": "text", "text": VHS_PROMPT + "Q?"}
    assert "min_pixels" not in build_messages(["a"], "Q")[0]["content"][0]


def test_haystack_order_is_seeded_and_uniform():
    entry = {"pos_image": ["needle"], "neg_image": [f"n{k}" for k in range(9)]}
    first = haystack_order(entry, seed=3, index=7)
    assert first == haystack_order(entry, seed=3, index=7)
    assert sorted(first) == sorted(entry["pos_image"] + entry["neg_image"])
    assert len({tuple(haystack_order(entry, seed=s, index=7)) for s in range(5)}) > 1
    assert len({tuple(haystack_order(entry, seed=3, index=i)) for i in range(5)}) > 1
    positions = collections.Counter(haystack_order(entry, seed=0, index=i).index("needle") for i in range(2000))
    assert set(positions) == set(range(10)) and all(140 <= c <= 260 for c in positions.values())
    cut = haystack_order(entry, seed=0, index=0, max_images=3)
    assert len(cut) == 3 and "needle" in cut and set(cut) <= set(entry["neg_image"]) | {"needle"}
    assert cut == haystack_order(entry, seed=0, index=0, max_images=3)
    kept = collections.Counter(n for i in range(500) for n in haystack_order(entry, seed=0, index=i, max_images=3))
    assert set(kept) == set(entry["neg_image"]) | {"needle"}  # a seeded random subset, not the first negatives
    assert all(60 <= kept[n] <= 165 for n in entry["neg_image"]), kept  # each kept 2/9 of the time: about 111
    with pytest.raises(ValueError, match="max_images=0"):
        haystack_order(entry, seed=0, index=0, max_images=0)
    with pytest.raises(ValueError, match="seed=-1"):
        haystack_order(entry, seed=-1, index=0)


def test_dataset_item_supervises_only_the_answer(synth, processor):
    json_path, root = synth
    dataset = VHsDataset(json_path, root, processor, seed=5)
    entries = load_vhs(json_path)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i in range(len(dataset)):
        item = dataset[i]
        entry = entries[i]
        n_images = len(entry["pos_image"]) + len(entry["neg_image"])
        assert item["image_grid_thw"].shape == (n_images, 3)
        assert item["image_pixels"].dtype == torch.uint8 and "pixel_values" not in item  # uint8 through the loader
        assert model_inputs(item, "cpu")["pixel_values"].shape == (int(item["image_grid_thw"].prod(-1).sum()), 1176)
        assert int((item["input_ids"] == image_pad).sum()) == int(item["image_grid_thw"].prod(-1).sum()) // 4
        assert torch.equal(item["mm_token_type_ids"].bool(), item["input_ids"] == image_pad)
        assert item["attention_mask"].all()
        supervised = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
        # One contiguous span, ending on the <|im_end|> that closes the assistant turn, decoding to answer + <|im_end|>.
        assert torch.equal(supervised, torch.arange(int(supervised[0]), int(supervised[-1]) + 1))
        assert torch.equal(item["labels"][supervised], item["input_ids"][supervised])
        answer = entry["conversations"][1]["value"]
        assert processor.tokenizer.decode(item["input_ids"][supervised]) == answer + "<|im_end|>"
        prompt = processor.tokenizer.decode(item["input_ids"][: int(supervised[0])])
        assert prompt.endswith(VHS_PROMPT + entry["conversations"][0]["value"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_dataset_uses_the_seeded_image_order(synth, processor):
    json_path, root = synth
    a, b = VHsDataset(json_path, root, processor, seed=1), VHsDataset(json_path, root, processor, seed=1)
    item = a[2]
    tensors = [k for k in item if k != "pixel_format"]
    assert item["pixel_format"] == b[2]["pixel_format"] and all(torch.equal(item[k], b[2][k]) for k in tensors)
    assert all(torch.equal(a[len(a) - 1][k], a[-1][k]) for k in tensors)
    with pytest.raises(IndexError):
        a[len(a)]
    order = haystack_order(load_vhs(json_path)[2], seed=1, index=2)
    images = [fetch_image({"image": str(root / p)}) for p in order]
    expected = processor.image_processor(images=images, return_tensors="pt")
    assert torch.equal(model_inputs(item, "cpu")["pixel_values"], expected["pixel_values"])  # bitwise
    other = [haystack_order(load_vhs(json_path)[2], seed=s, index=2) for s in range(2, 8)]
    assert any(o != order for o in other)


def test_dataset_respects_pixel_budget_and_max_images(tmp_path, processor):
    json_path = synth_haystacks(tmp_path, n_entries=2, min_images=4, max_images=4, image_size=112, seed=0)
    small = VHsDataset(json_path, tmp_path, processor, max_pixels=56 * 56)[0]
    assert small["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
    large = VHsDataset(json_path, tmp_path, processor, min_pixels=168 * 168, max_pixels=168 * 168)[0]
    assert large["image_grid_thw"].tolist() == [[1, 12, 12]] * 4
    assert VHsDataset(json_path, tmp_path, processor, max_images=2)[0]["image_grid_thw"].shape == (2, 3)
    with pytest.raises(ValueError, match="min_pixels"):
        VHsDataset(json_path, tmp_path, processor, min_pixels=100, max_pixels=50)


def test_pixel_budget_is_the_processors_so_a_28_pixel_image_can_be_one_visual_token(tmp_path):
    from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM

    real = build_tiny_processor(min_pixels=3136, max_pixels=12845056)  # Qwen2.5-VL's preprocessor_config bounds
    loader = {"min_pixels": IMAGE_MIN_TOKEN_NUM * 28 ** 2, "max_pixels": IMAGE_MAX_TOKEN_NUM * 28 ** 2}
    assert pixel_budget(real) == loader  # the official protocol is unchanged
    json_path = synth_haystacks(tmp_path, n_entries=2, min_images=3, max_images=3, image_size=28, seed=0)
    one_patch = build_tiny_processor(min_pixels=28 * 28)
    assert pixel_budget(one_patch) == {"min_pixels": 784, "max_pixels": 112 * 112}
    item = VHsDataset(json_path, tmp_path, one_patch)[0]
    assert item["image_grid_thw"].tolist() == [[1, 2, 2]] * 3
    assert (item["input_ids"] == one_patch.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 3
    # a processor whose minimum is 56 x 56 (the loader's own) upsamples the same files to four tokens each
    assert VHsDataset(json_path, tmp_path, build_tiny_processor())[0]["image_grid_thw"].tolist() == [[1, 4, 4]] * 3


def test_missing_and_unreadable_images_are_named(tmp_path, processor):
    json_path = synth_haystacks(tmp_path, n_entries=2, min_images=3, max_images=3, seed=0)
    entries = load_vhs(json_path)
    (tmp_path / entries[1]["neg_image"][0]).unlink()
    (tmp_path / entries[0]["neg_image"][1]).write_bytes(b"not a png")
    dataset = VHsDataset(json_path, tmp_path, processor)
    with pytest.raises(FileNotFoundError, match=rf"entry 1: image .*{entries[1]['neg_image'][0]} not found"):
        dataset[1]
    with pytest.raises(ValueError, match=rf"entry 0: cannot read image .*{entries[0]['neg_image'][1]}"):
        dataset[0]
    with pytest.raises(FileNotFoundError, match="image_root"):
        VHsDataset(json_path, tmp_path / "nowhere", processor)


def test_collate_right_pads_and_keeps_rows_equivalent(synth, processor, tmp_path):
    json_path, root = synth
    dataset = VHsDataset(json_path, root, processor)
    items = [dataset[i] for i in range(3)]
    lengths = [it["input_ids"].shape[0] for it in items]
    assert len(set(lengths)) > 1, "synth entries should differ in length for this test"
    batch = collate(items, pad_token_id=7)
    n = max(lengths)
    for k, (it, length) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][k, :length], it["input_ids"])
        assert (batch["input_ids"][k, length:] == 7).all() and (batch["labels"][k, length:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][k].sum() == length and (batch["mm_token_type_ids"][k, length:] == 0).all()
    assert batch["input_ids"].shape == (3, n)
    assert torch.equal(batch["image_grid_thw"], torch.cat([it["image_grid_thw"] for it in items]))
    assert torch.equal(batch["image_pixels"], torch.cat([it["image_pixels"] for it in items]))
    assert torch.equal(model_inputs(batch, "cpu")["pixel_values"],
                       torch.cat([model_inputs(it, "cpu")["pixel_values"] for it in items]))
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    processed = {**{k: v for k, v in items[1].items() if k not in PIXEL_KEYS}, "pixel_values": torch.zeros(1, 1176)}
    with pytest.raises(ValueError, match=r"differ in keys \['image_pixels', 'pixel_format', 'pixel_values'\]"):
        collate([items[0], processed])
    with pytest.raises(ValueError, match="pixel_format differs"):
        collate([items[0], {**items[1], "pixel_format": {**items[1]["pixel_format"], "std": (1.0, 1.0, 1.0)}}])

    model = save_tiny_model(tmp_path / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=0)
    short = min(range(3), key=lambda k: lengths[k])
    with torch.no_grad():
        batched = model(**model_inputs(batch, "cpu")).logits[short, : lengths[short]]
        alone = model(**model_inputs(collate([items[short]]), "cpu")).logits[0]
        assert torch.isfinite(model(**model_inputs(batch, "cpu")).loss)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_synth_balance_template_and_determinism(tmp_path):
    a = synth_haystacks(tmp_path / "a", n_entries=40, min_images=2, max_images=5, seed=3)
    b = synth_haystacks(tmp_path / "b", n_entries=40, min_images=2, max_images=5, seed=3)
    c = synth_haystacks(tmp_path / "c", n_entries=40, min_images=2, max_images=5, seed=4)
    entries = load_vhs(a)
    assert entries == load_vhs(b) and entries != load_vhs(c)
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in entries[0]["pos_image"])
    assert collections.Counter(e["conversations"][1]["value"] for e in entries) == {"yes": 20, "no": 20}
    sizes = collections.Counter(len(e["pos_image"]) + len(e["neg_image"]) for e in entries)
    assert set(sizes) == {2, 3, 4, 5}
    for e in entries:
        question, answer = e["conversations"][0]["value"], e["conversations"][1]["value"]
        anchor, target = _anchor_target(question)
        a = {name: "an" if name[0] in "aeiou" else "a" for name in (anchor, target)}
        assert question == f"For the image with {a[anchor]} {anchor}, is there {a[target]} {target}?"
        needle, *distractors = e["objects"]
        assert anchor in needle and (target in needle) == (answer == "yes")
        assert all(anchor not in objs for objs in distractors)
    shown = [e["pos_image"] + e["neg_image"] for e in entries]
    assert all(len(set(paths)) == len(paths) for paths in shown)  # no entry shows one file twice
    assert len({p for paths in shown for p in paths}) < sum(map(len, shown))  # files are shared between entries
    assert len(list((tmp_path / "a" / "images").iterdir())) == len({p for paths in shown for p in paths})
    with pytest.raises(ValueError, match="min_images"):
        synth_haystacks(tmp_path / "d", n_entries=2, min_images=3, max_images=2)


def test_synth_captions_name_the_drawn_objects(tmp_path, processor):
    path = synth_captions(tmp_path, n_entries=30, seed=2)
    assert load_vhs(path, task="free") == load_vhs(synth_captions(tmp_path / "again", n_entries=30, seed=2),
                                                   task="free")
    entries = load_vhs(path, task="free")
    for e in entries:
        [objects] = e["objects"]
        assert e["conversations"][0]["value"] == "What is in the image?"
        assert e["conversations"][1]["value"] == " and ".join(objects)
        assert 1 <= len(objects) <= 2 and set(objects) <= set(SYNTH_OBJECTS)
        assert len(e["pos_image"]) == 1 and e["neg_image"] == []
    assert {len(e["objects"][0]) for e in entries} == {1, 2}
    # As training data: the question as written (no yes/no instruction), the caption supervised.
    item = VHsDataset(path, tmp_path, processor, task="free")[0]
    text = processor.tokenizer.decode(item["input_ids"])
    assert VHS_PROMPT not in text and "<|im_start|>user\n<|vision_start|>" in text
    answer = processor.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
    assert answer == entries[0]["conversations"][1]["value"] + "<|im_end|>"
    with pytest.raises(ValueError, match="must be 'yes' or 'no'"):
        VHsDataset(path, tmp_path, processor)


def test_synth_retrieval_alternates_what_else_and_yes_no_questions_over_the_same_haystacks(tmp_path, processor):
    kwargs = dict(n_entries=9, min_images=2, max_images=5, seed=4)
    haystacks = load_vhs(synth_haystacks(tmp_path / "h", **kwargs))
    path = synth_retrieval(tmp_path / "r", **kwargs)
    entries = load_vhs(path, task="free")
    assert [(e["pos_image"], e["neg_image"], e["objects"]) for e in entries] == [
        (h["pos_image"], h["neg_image"], h["objects"]) for h in haystacks]
    for k, (e, h) in enumerate(zip(entries, haystacks)):
        question, answer = (turn["value"] for turn in e["conversations"])
        official = h["conversations"][0]["value"]
        anchor = official.split(",")[0].split(" ", 5)[-1]  # "For the image with a red circle" -> "red circle"
        if k % 2:
            assert (question, answer) == (VHS_PROMPT + official, h["conversations"][1]["value"])
        else:
            needle = e["objects"][0]
            assert question == official.split(",")[0] + ", what else is there?"
            assert anchor in needle and answer in needle and answer != anchor
    # Shown as written: the yes/no entries tokenise exactly as the vhs task shows the official question.
    free = VHsDataset(path, tmp_path / "r", processor, task="free")[1]
    official = VHsDataset(tmp_path / "h" / "visual_haystack_synth.json", tmp_path / "h", processor)[1]
    assert all(torch.equal(free[key], official[key]) for key in ("input_ids", "labels", "image_pixels"))


def test_synth_log_uniform_sizes_favour_short_haystacks(tmp_path):
    entries = load_vhs(synth_haystacks(tmp_path, n_entries=400, min_images=1, max_images=150, log_uniform=True,
                                       seed=0, variants=1))
    sizes = [len(e["pos_image"]) + len(e["neg_image"]) for e in entries]
    assert min(sizes) >= 1 and max(sizes) <= 150
    # log-uniform: P(N <= 12) = log(13) / log(151) = 0.51; uniform would give 0.08
    assert 0.4 < sum(n <= 12 for n in sizes) / len(sizes) < 0.62
    assert any(n > 100 for n in sizes)


def _fake_coco(tmp_path, seed=0):
    """Two small instances files (train / val, 6 categories, random annotations) and the truth they encode:
    ``(paths, {"<split>/<file_name>": {category names}})``."""
    rng = random.Random(seed)
    categories = [{"id": 10 + k, "name": n} for k, n in enumerate(["cat", "dog", "apple", "bus", "person", "tie"])]
    paths, truth = [], {}
    for split, n_images in (("train2017", 150), ("val2017", 50)):
        images, annotations = [], []
        for i in range(n_images):
            images.append({"id": i, "file_name": f"{split}_{i:012d}.jpg"})
            present = [rng.choice(categories) for _ in range(rng.randint(0, 3))]
            for c in present:
                annotations.append({"id": len(annotations), "image_id": i, "category_id": c["id"]})
            truth[f"{split}/{images[-1]['file_name']}"] = {c["name"] for c in present}
        data = {"images": images, "annotations": annotations, "categories": categories}
        paths.append(_write(tmp_path / f"instances_{split}.json", data))
    return paths, truth


def test_build_train_from_coco_is_leak_free_and_balanced(tmp_path):
    instances, coco = _fake_coco(tmp_path)
    excluded = sorted(coco)[::4]
    vhs_entry = {**GOOD, "pos_image": [f"coco/{excluded[0]}"], "neg_image": [f"coco/{p}" for p in excluded[1:]]}
    vhs = _write(tmp_path / "vhs.json", [vhs_entry])
    options = dict(exclude_vhs_files=[vhs], n_entries=60, min_images=2, max_images=6, seed=1)

    entries = load_vhs(build_train_from_coco(instances, tmp_path / "out" / "train.json", **options))
    assert len(entries) == 60
    per_pair = collections.defaultdict(collections.Counter)
    excluded_names = {p.split("/")[-1] for p in excluded}
    for e in entries:
        anchor, target = _anchor_target(e["conversations"][0]["value"])
        answer = e["conversations"][1]["value"]
        assert anchor != target and answer in ("yes", "no")
        per_pair[anchor, target][answer] += 1
        images = e["pos_image"] + e["neg_image"]
        assert 2 <= len(images) <= 6 and len(set(images)) == len(images)
        assert not excluded_names & {p.split("/")[-1] for p in images}
        needle = coco[e["pos_image"][0]]
        assert anchor in needle and (target in needle) == (answer == "yes")
        assert all(anchor not in coco[p] for p in e["neg_image"])
    assert all(c["yes"] == c["no"] for c in per_pair.values())
    assert len({len(e["pos_image"]) + len(e["neg_image"]) for e in entries}) == 5
    assert load_vhs(build_train_from_coco(instances, tmp_path / "again.json", **options)) == entries
    with pytest.raises(ValueError, match="even"):
        build_train_from_coco(instances, tmp_path / "x.json", exclude_vhs_files=[vhs], n_entries=5)
    with pytest.raises(ValueError, match="instances_<split>.json"):
        build_train_from_coco([vhs], tmp_path / "x.json", exclude_vhs_files=[vhs], n_entries=2)


def test_cli_round_trip(tmp_path, capsys):
    synth_args = ["--n-entries", "4", "--min-images", "2", "--max-images", "3", "--seed", "2"]
    assert main(["data", "synth", "--out", str(tmp_path / "s"), *synth_args]) == 0
    printed = capsys.readouterr().out.strip()
    direct = synth_haystacks(tmp_path / "t", n_entries=4, min_images=2, max_images=3, seed=2)
    assert load_vhs(printed) == load_vhs(direct)

    instances, _ = _fake_coco(tmp_path)
    args = ["data", "build-train", "--instances", *map(str, instances), "--exclude-vhs", printed]
    assert main([*args, "--out", str(tmp_path / "train.json"), "--n-entries", "8", "--max-images", "4"]) == 0
    assert len(load_vhs(capsys.readouterr().out.strip())) == 8

    bad_range = ["--n-entries", "4", "--min-images", "5", "--max-images", "2"]
    assert main(["data", "synth", "--out", str(tmp_path / "u"), *bad_range]) == 2
    assert "laid: error: need 1 <= min_images <= max_images" in capsys.readouterr().err
