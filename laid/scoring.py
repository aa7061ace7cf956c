"""The official Visual Haystacks scorer and its bootstrap, without nltk.

The benchmark (utils.py of visual-haystacks/vhs_benchmark) lower-cases a response, splits it with
``nltk.word_tokenize`` and calls it compliant if ``"yes"`` or ``"no"`` is one of the tokens and correct if the ground
truth is (so a response holding both words counts as correct whatever the truth: kept for faithful numbers). It then
reports mean and standard deviation over 100 bootstrap resamples. ``word_tokens`` reproduces the word boundaries of
``nltk.word_tokenize`` (Punkt sentence splitting, then the NLTK Treebank rules) that decide whether a token is a bare
"yes" / "no", without nltk or its data: sentences end at ``.``, ``!`` or ``?`` followed by white space (Punkt's
learned abbreviation list is not reproduced), and the quote symbols it emits may differ from nltk's.
"""

from __future__ import annotations

import re

import numpy as np

from .data import ANSWERS

# Punkt without trained parameters: a sentence may end at ".", "!" or "?" followed by white space and a token, or
# directly by punctuation that cannot be inside a word; of several such marks in one white-space-free stretch only
# the last counts, an ellipsis ends nothing, and closing quotes or brackets that open the next sentence are moved
# back to the one they close.
_SENTENCE_END = re.compile(r"[.!?](?=[)\";}\]*:@'({\[‘’“”«»!?]|\s+(?P<next>\S))")
_REALIGN = re.compile(r"[\"')\]}‘’“”«»]+?(?:\s+|(?=--)|$)")
_SPACE = re.compile(r"\s")
# (pattern, replacement) pairs applied in order to one sentence, after which the text is split on white space.
_TREEBANK_RULES = [
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),  # opening quotes
    (re.compile(r"^\""), r" `` "),
    (re.compile(r"([ \(\[{<])(\"|'')"), r"\1 `` "),
    (re.compile(r"(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),  # an opening single quote
    (re.compile(r"([^.])(\.)([\]\)}>\"'»”’ ]*)\s*$"), r"\1 \2 \3 "),  # the sentence's final period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # comma / colon unless a digit follows
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&?!*\u2012-\u2015\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"--"), r" -- "),
    (re.compile(r"([»”’]|''|\")"), r" \1 "),  # closing quotes
]
_CLITICS = [
    re.compile(r"([^' ])('[smd]|') "),
    re.compile(r"([^' ])('ll|'re|'ve|n't) "),
]


def _sentences(text: str) -> list[str]:
    """Split ``text`` into sentences as an untrained Punkt tokenizer does (slices of ``text``, right-stripped)."""
    bounds, start = [], 0
    ends = list(_SENTENCE_END.finditer(text))
    for match, following in zip(ends, ends[1:] + [None]):
        if following is not None and not _SPACE.search(text, match.start(), following.start()):
            continue
        if match.group() == "." and match.start() > 0 and text[match.start() - 1] == ".":
            continue
        bounds.append([start, match.end()])
        start = match.start("next") if match.group("next") else match.end()
    bounds.append([start, len(text.rstrip())])
    for first, second in zip(bounds, bounds[1:]):
        closers = _REALIGN.match(text, second[0], second[1])
        if closers:
            first[1] = closers.start() + len(closers.group().rstrip())
            second[0] = closers.end()
    return [text[a:b] for a, b in bounds]


def word_tokens(text: str) -> list[str]:
    """Split lower-cased ``text`` into word and punctuation tokens the way ``nltk.word_tokenize`` does.

    ``word_tokens("yes.") == ["yes", "."]``, ``word_tokens("no, there is not")[0] == "no"``,
    ``word_tokens("yes/no") == ["yes/no"]`` (nltk keeps slashes and hyphens inside a word).
    """
    tokens = []
    for sentence in _sentences(text.lower()):
        for pattern, replacement in _TREEBANK_RULES:
            sentence = pattern.sub(replacement, sentence)
        sentence = " " + " ".join(sentence.split()) + " "
        for pattern in _CLITICS:
            sentence = pattern.sub(r"\1 \2 ", sentence)
        tokens.extend(sentence.split())
    return tokens


def score_response(response: str, answer: str) -> tuple[bool, bool]:
    """``(correct, compliant)`` of one response against the ground truth ``answer`` ("yes" or "no")."""
    if answer not in ANSWERS:
        raise ValueError(f"answer must be 'yes' or 'no', got {answer!r}")
    tokens = word_tokens(response)
    return answer in tokens, any(a in tokens for a in ANSWERS)


def bootstrap(values, *, n_resamples: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of the column means over ``n_resamples`` resamples with replacement.

    ``values`` [N] or [N, K] (e.g. K = 2: correct, compliant as 0/1); rows are resampled together, as the benchmark
    does for accuracy and compliance. Returns two arrays of shape [] or [K].
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[0] == 0:
        raise ValueError(f"values must be a non-empty [N] or [N, K] array, got shape {values.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rows = np.random.default_rng(seed).integers(0, values.shape[0], size=(n_resamples, values.shape[0]))
    means = values[rows].mean(axis=1)
    return means.mean(axis=0), means.std(axis=0)


def vhs_metrics(responses: list[str], answers: list[str], *, n_resamples: int = 100, seed: int = 0) -> dict:
    """Bootstrapped accuracy and compliance of ``responses`` against ``answers`` (same length N).

    Returns ``{"accuracy": (mean, std), "compliance": (mean, std), "n": N}`` with fractions in [0, 1].
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    scores = [score_response(r, a) for r, a in zip(responses, answers)]
    mean, std = bootstrap(scores, n_resamples=n_resamples, seed=seed)
    return {
        "accuracy": (float(mean[0]), float(std[0])),
        "compliance": (float(mean[1]), float(std[1])),
        "n": len(scores),
    }
