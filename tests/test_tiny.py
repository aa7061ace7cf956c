"""Tests for laid.tiny: the offline tiny Qwen2.5-VL processor and models round-trip and run like the real ones."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from laid.tiny import (
    SPECIAL_TOKENS,
    TINY_STUDENT,
    TINY_TEACHER,
    build_tiny_tokenizer,
    save_tiny_model,
    save_tiny_processor,
    tiny_qwen25vl_config,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_processor(root / "processor")
    save_tiny_model(root / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    save_tiny_model(root / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
    return root


def _images(n, size=56):
    return [Image.new("RGB", (size, size), (40 * i % 256, 255 - 30 * i % 256, 90)) for i in range(n)]


def _messages(images, question="Is there a cat?", answer=None):
    messages = [{"role": "user", "content": [{"type": "image", "image": im} for im in images]}]
    messages[0]["content"].append({"type": "text", "text": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def test_tokenizer_is_deterministic_and_places_special_tokens_after_bpe():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(400, 400 + len(SPECIAL_TOKENS)))
    assert len(a) == 400 + len(SPECIAL_TOKENS)
    text = "For the image with a red circle, is there a blue square? yes"
    assert a.decode(a(text)["input_ids"]) == text
    assert a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        build_tiny_tokenizer(100_000)


def test_processor_round_trip_and_chat_template(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir / "processor")
    assert isinstance(processor, Qwen2_5_VLProcessor)
    images = _images(3)
    text = processor.apply_chat_template(_messages(images, answer="yes"), tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<|vision_start|><|image_pad|><|vision_end|>" * 3
        + "Is there a cat?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    )
    prompt = processor.apply_chat_template(_messages(images), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Is there a cat?<|im_end|>\n<|im_start|>assistant\n")

    enc = processor(text=[text], images=images, return_tensors="pt")
    fresh = save_tiny_processor(tiny_dir / "processor_again")
    assert torch.equal(enc["input_ids"], fresh(text=[text], images=images, return_tensors="pt")["input_ids"])
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    assert enc["pixel_values"].shape == (3 * 16, 3 * 2 * 14 * 14)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_pad).sum()) == 3 * 16 // 4
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == image_pad)


def test_processor_respects_pixel_budget(tmp_path):
    processor = save_tiny_processor(tmp_path, min_pixels=56 * 56, max_pixels=112 * 112)
    big, small = Image.new("RGB", (640, 480)), Image.new("RGB", (20, 20))
    grid = processor.image_processor(images=[big, small], return_tensors="pt")["image_grid_thw"]
    big_hw, small_hw = (grid[:, 1] * grid[:, 2] * 14 * 14).tolist()
    assert 56 * 56 <= big_hw <= 112 * 112 and 56 * 56 <= small_hw <= 112 * 112
    with pytest.raises(ValueError, match="min_pixels"):
        save_tiny_processor(tmp_path / "bad", min_pixels=200, max_pixels=100)


def test_config_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen25vl_config(vocab_size=300)
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen25vl_config(head_dim=16, mrope_section=(4, 4, 4))
    with pytest.raises(ValueError, match="kv_heads"):
        tiny_qwen25vl_config(heads=4, kv_heads=3)


def test_teacher_student_shapes_and_saved_weights(tiny_dir):
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "teacher")
    student = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "student")
    assert (tiny_dir / "student" / "model.safetensors").is_file()
    tok = build_tiny_tokenizer()
    for model, shape in ((teacher, TINY_TEACHER), (student, TINY_STUDENT)):
        text = model.config.text_config
        assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (
            shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"]
        )
        assert model.get_output_embeddings().weight.shape[0] == shape["vocab_size"] >= len(tok)
        assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
        assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert text.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    q = student.model.language_model.layers[0].self_attn.q_proj.weight
    assert q.shape == (TINY_STUDENT["heads"] * 16, TINY_STUDENT["hidden"])
    # Same (config, seed) gives the same weights; another seed does not.
    again = save_tiny_model(tiny_dir / "student_again", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
    other = save_tiny_model(tiny_dir / "student_other", tiny_qwen25vl_config(**TINY_STUDENT), seed=2)
    assert torch.equal(again.model.language_model.layers[0].self_attn.q_proj.weight, q)
    assert not torch.equal(other.model.language_model.layers[0].self_attn.q_proj.weight, q)


def test_multi_image_forward_rope_index_and_generate(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir / "processor")
    images = _images(5)
    text = processor.apply_chat_template(_messages(images), tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=images, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    for name, vocab in (("teacher", TINY_TEACHER["vocab_size"]), ("student", TINY_STUDENT["vocab_size"])):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / name).eval()
        with torch.no_grad():
            logits = model(**enc).logits
        assert logits.shape == (1, n, vocab) and torch.isfinite(logits).all()

    positions, deltas = model.model.get_rope_index(
        enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"], attention_mask=enc["attention_mask"]
    )
    assert positions.shape == (3, 1, n)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    is_image = enc["input_ids"][0] == image_pad
    first = int(is_image.nonzero()[0])
    # First image: 4x4 patches merged 2x2 -> a 2x2 grid of tokens, temporal row constant, h/w rows the grid.
    block = positions[:, 0, first : first + 4] - first
    assert block.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]]
    # The <|vision_end|> after it continues from the image's start + max(grid) // merge.
    assert positions[:, 0, first + 4].tolist() == [first + 2] * 3
    text_rows = positions[:, 0, ~is_image]
    assert torch.equal(text_rows[0], text_rows[1]) and torch.equal(text_rows[1], text_rows[2])
    assert int(deltas) == int(positions.max()) + 1 - n

    generated = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= n + 3 and torch.equal(generated[:, :n], enc["input_ids"])
