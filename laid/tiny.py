"""Tiny but real Qwen2.5-VL checkpoints, built offline for tests, the trainer and the CPU demo.

Everything here is a genuine transformers object saved with ``save_pretrained`` and meant to be loaded back with
``from_pretrained``: a ``Qwen2_5_VLProcessor`` (a byte-level BPE ``Qwen2Tokenizer`` trained on a small built-in ASCII
corpus, Qwen's special tokens, a Qwen2.5-VL style chat template, ``Qwen2VLImageProcessor`` and
``Qwen2VLVideoProcessor`` with small pixel budgets) and ``Qwen2_5_VLForConditionalGeneration`` models with random
weights stored as safetensors. Nothing is downloaded.

The shapes mimic the real family at toy scale: a teacher and a student share ``head_dim``, the tokenizer and the
image processor, differ in layers / heads / kv heads / hidden size, and may have different (padded) vocabularies,
like Qwen2.5-VL-3B (151,936 rows) against 32B (152,064 rows) over the same 151,665 real tokens.

Example::

    save_tiny_processor("tiny/processor")
    save_tiny_model("tiny/teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    save_tiny_model("tiny/student", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen's special tokens that a multi-image chat needs, in the relative order of the real vocabulary
# (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <|vision_start|> 151652, ...).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Same structure as Qwen2.5-VL's template: a default system turn, one <|im_start|>role ... <|im_end|> block per
# message, each image as <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to the image's
# token count), optional "Picture k: " prefixes, and an open assistant turn for generation.
CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Text the BPE merges are learned from: the chat scaffolding, the Visual Haystacks prompt and question templates,
# colours, shapes and the COCO categories, so that the words the tests and the demo use become few tokens.
_CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    "system user assistant",
    "You are given a set of images. Please answer the following question in Yes or No: ",
    "For the image with a cat, is there a dog? For all images with a cat, do all of them contain a dog?",
    "For the image with an apple, is there an orange? do any of them contain a bus? yes no Yes No",
    "red green blue yellow purple orange white black circle square triangle diamond cross star",
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports ball kite baseball bat baseball glove skateboard surfboard tennis racket bottle wine glass "
    "cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut cake chair couch "
    "potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy bear hair drier toothbrush",
    "The answer is yes. The answer is no. There is not. I cannot tell. Picture 1: Video 1:",
    string.printable,
]


def build_tiny_tokenizer(bpe_vocab_size: int = 400) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer with ``bpe_vocab_size`` ordinary tokens, then Qwen's special tokens.

    Ordinary ids are ``0 .. bpe_vocab_size - 1`` (the 256 byte symbols, then merges learned on a fixed corpus with
    Qwen's pre-tokenizer regex, so the result is deterministic); the special tokens follow in the order of
    ``SPECIAL_TOKENS``. ``len(tokenizer) == bpe_vocab_size + len(SPECIAL_TOKENS)``.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_vocab_size < len(alphabet) + 1:
        raise ValueError(f"bpe_vocab_size must be at least {len(alphabet) + 1} (bytes + 1 merge), got {bpe_vocab_size}")
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=alphabet, min_frequency=1, show_progress=False
    )
    trainer_tok.train_from_iterator(_CORPUS, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab, merges = learned["vocab"], [tuple(pair) for pair in learned["merges"]]
    if len(vocab) != bpe_vocab_size:
        raise ValueError(
            f"the built-in corpus supports at most {len(vocab)} BPE tokens, bpe_vocab_size={bpe_vocab_size} is too many"
        )
    # The special tokens get the ids right after the ordinary ones, whatever order transformers registers them in.
    vocab.update({token: bpe_vocab_size + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(bpe_vocab_size, bpe_vocab_size + len(SPECIAL_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"special token ids {ids} are not the expected {expected}")
    return tokenizer


def build_tiny_processor(
    *, bpe_vocab_size: int = 400, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112
) -> Qwen2_5_VLProcessor:
    """A ``Qwen2_5_VLProcessor`` over the tiny tokenizer, with image pixel budgets ``[min_pixels, max_pixels]``.

    Patch size 14, merge size 2 and temporal patch 2 as in the real model: a 56x56 image is a 4x4 patch grid,
    ``image_grid_thw`` row ``[1, 4, 4]``, and 4 ``<|image_pad|>`` tokens; ``pixel_values`` rows have 3*2*14*14 = 1176
    values.
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
    tokenizer = build_tiny_tokenizer(bpe_vocab_size)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_processor(path: str | Path, **kwargs) -> Qwen2_5_VLProcessor:
    """Build the tiny processor (``build_tiny_processor(**kwargs)``), save it to ``path`` and return it."""
    processor = build_tiny_processor(**kwargs)
    processor.save_pretrained(str(path))
    return processor


def tiny_qwen25vl_config(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int | None = None,
    vocab_size: int = 512,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    rope_theta: float = 1e6,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    tokenizer: Qwen2Tokenizer | None = None,
) -> Qwen2_5_VLConfig:
    """A ``Qwen2_5_VLConfig`` of the given toy shape whose special token ids match the tiny tokenizer.

    ``tokenizer`` defaults to ``build_tiny_tokenizer()``; ``vocab_size`` (embedding rows) must be at least
    ``len(tokenizer)``, rows beyond it are padding as in the real checkpoints. ``sum(mrope_section)`` must equal
    ``head_dim // 2``. The vision tower (patch 14, merge 2, last block full attention, the others windowed) projects to
    ``hidden``.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    if len(mrope_section) != 3 or 2 * sum(mrope_section) != head_dim:
        raise ValueError(
            f"mrope_section {tuple(mrope_section)} must be 3 ints adding up to head_dim / 2 = {head_dim // 2}"
        )
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise ValueError(
            f"vision_hidden / vision_heads must be a multiple of 4, got {vision_hidden} / {vision_heads}"
        )
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=32768,
        max_window_layers=layers,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=hidden,
        fullatt_block_indexes=[vision_depth - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


# Toy teacher / student shapes: same head_dim (16) and tokenizer, different depth, width, heads, kv heads and
# padded vocabulary (the student's is smaller, like 3B's against 32B's).
TINY_TEACHER = dict(layers=3, hidden=128, heads=8, kv_heads=4, head_dim=16, vocab_size=512)
TINY_STUDENT = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab_size=448)


def save_tiny_model(path: str | Path, config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Initialise ``Qwen2_5_VLForConditionalGeneration(config)`` from ``seed``, save it (safetensors) and return it.

    The same ``(config, seed)`` always gives the same weights; the model is returned in eval mode, fp32.
    """
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(rng_state)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    return model.eval()
