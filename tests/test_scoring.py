"""Tests for laid.scoring: the Visual Haystacks scorer's word tokens, its yes/no decisions and the bootstrap."""

import random

import numpy as np
import pytest

from laid.scoring import bootstrap, score_response, vhs_metrics, word_tokens

# response -> (compliant, correct if the truth is "yes", correct if the truth is "no")
TRICKY = {
    "Yes.": (True, True, False),
    "no, there is not": (True, False, True),
    "YES!": (True, True, False),
    "Yes and no": (True, True, True),
    "": (False, False, False),
    "I cannot tell": (False, False, False),
    "yesterday": (False, False, False),
    "No. The image with the cat has no dog.": (True, False, True),
    "The answer is: yes": (True, True, False),
    "(yes)": (True, True, False),
    "'No'": (True, False, True),
    '"Yes," it said.': (True, True, False),
    "Nope.": (False, False, False),
    "yes/no": (False, False, False),
    "yes-no": (False, False, False),
    "no.yes": (False, False, False),
    "no's": (True, False, True),
    "Know": (False, False, False),
    "yes... maybe": (True, True, False),
    "Answer:\nNO": (True, False, True),
    "Not sure, maybe yes?": (True, True, False),
}


@pytest.mark.parametrize("response", list(TRICKY))
def test_tricky_responses(response):
    compliant, correct_yes, correct_no = TRICKY[response]
    assert score_response(response, "yes") == (correct_yes, compliant)
    assert score_response(response, "no") == (correct_no, compliant)


def test_word_tokens_split_punctuation_like_nltk():
    assert word_tokens("Yes.") == ["yes", "."]
    assert word_tokens("No, there is not.") == ["no", ",", "there", "is", "not", "."]
    assert word_tokens("YES! Really?") == ["yes", "!", "really", "?"]
    assert word_tokens("Costs 3,50: fine") == ["costs", "3,50", ":", "fine"]
    assert word_tokens("no. it isn't (really)") == ["no", ".", "it", "is", "n't", "(", "really", ")"]
    assert word_tokens("wait... no") == ["wait", "...", "no"]
    assert word_tokens("") == []


def test_score_response_rejects_bad_truth():
    with pytest.raises(ValueError, match="'Yes'"):
        score_response("yes", "Yes")


def _random_responses(n, seed):
    words = ["yes", "no", "Yes", "NO", "not", "yesterday", "nope", "cannot", "don't", "the", "cat", "3.5"]
    punct = [".", ",", "!", "?", ":", ";", "'", '"', "(", ")", "-", "/", "...", "--", "*", "'s", "’", "“", "\n"]
    rng = random.Random(seed)
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.5 else rng.choice(punct) for _ in range(rng.randint(1, 7))]
        yield "".join(p + (" " if rng.random() < 0.5 else "") for p in parts)


def test_yes_no_tokens_match_nltk():
    nltk_tokenize = pytest.importorskip(
        "nltk.tokenize", reason="nltk is not installed: the differential check against nltk needs its tokenizers"
    )
    # Punkt without trained parameters needs no nltk data; the benchmark's word_tokenize uses the trained English
    # model, whose abbreviation list is the one thing word_tokens does not reproduce.
    punkt, treebank = nltk_tokenize.PunktSentenceTokenizer(), nltk_tokenize.NLTKWordTokenizer()
    for response in _random_responses(4000, seed=0):
        text = response.lower()
        expected = [t for s in punkt.tokenize(text) for t in treebank.tokenize(s) if t in ("yes", "no")]
        assert [t for t in word_tokens(text) if t in ("yes", "no")] == expected, response


def test_bootstrap_matches_the_sampling_distribution():
    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.7).astype(float)
    mean, std = bootstrap(values, n_resamples=2000, seed=0)
    assert abs(mean - values.mean()) < 0.005
    assert abs(std - values.std() / np.sqrt(len(values))) < 0.003
    assert bootstrap(values, seed=3) == bootstrap(values, seed=3)
    assert bootstrap(values, seed=3) != bootstrap(values, seed=4)
    assert bootstrap(np.ones(10)) == (1.0, 0.0)
    pair_mean, pair_std = bootstrap(np.stack([values, 1 - values], axis=1), n_resamples=50)
    assert pair_mean.shape == (2,) and np.isclose(pair_mean.sum(), 1.0) and np.isclose(pair_std[0], pair_std[1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap([])
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap(values, n_resamples=0)


def test_vhs_metrics():
    responses = ["Yes.", "no", "Yes and no", "I cannot tell"]
    answers = ["yes", "yes", "no", "no"]
    metrics = vhs_metrics(responses, answers, n_resamples=1000, seed=0)
    assert metrics["n"] == 4
    # Per response: correct 1, 0, 1, 0 -> 0.5; compliant 1, 1, 1, 0 -> 0.75.
    assert abs(metrics["accuracy"][0] - 0.5) < 0.03 and abs(metrics["compliance"][0] - 0.75) < 0.03
    assert 0.2 < metrics["accuracy"][1] < 0.3  # std of a mean of 4 Bernoulli(0.5): 0.25
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        vhs_metrics(["yes", "no"], ["yes"])
