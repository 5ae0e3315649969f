"""Tests for nvila_ft.metrics against hand-computed VQA-RAD style scores.

Run: pytest tests/test_metrics.py
"""

import pytest

from nvila_ft.metrics import infer_answer_type, normalize_answer, vqa_metrics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Left-Lung. ", "left lung"),
        ("An MRI, T2!", "mri t2"),
        ("a  nodule\tin   the apex", "nodule in apex"),
        ("Thethe anatomy", "thethe anatomy"),  # articles only as whole words
        (7, "7"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_infer_answer_type():
    assert [infer_answer_type(a) for a in ["Yes", "no.", " NO ", "Nothing", "yes, left"]] == [
        "CLOSED", "CLOSED", "CLOSED", "OPEN", "OPEN",
    ]  # fmt: skip


def test_closed_reads_yes_no_from_the_start():
    predictions = ["Yes, there is a mass.", "No.", "yes", "Nothing abnormal", "The left side", "no, yes"]
    references = ["yes", "no", "no", "no", "Left side", "yes"]
    result = vqa_metrics(predictions, references, ["CLOSED"] * 6)
    # Correct: rows 0, 1, 4 ("Nothing" is not "no"; "no, yes" reads as "no").
    assert result["closed_accuracy"] == pytest.approx(3 / 6)
    assert (result["n"], result["n_closed"], result["n_open"]) == (6, 6, 0)
    assert result["open_exact_match"] is None and result["open_token_recall"] is None
    assert result["overall_accuracy"] == pytest.approx(3 / 6)


def test_open_exact_match_and_token_recall():
    predictions = ["The Left Lung.", "right lung", "Yes, there is", "an mri of brain"]
    references = ["left lung", "left lung", "yes", "brain MRI"]
    result = vqa_metrics(predictions, references, ["OPEN"] * 4)
    assert result["open_exact_match"] == pytest.approx(1 / 4)  # only row 0; no yes/no prefix reading for OPEN
    # Recall per row: 2/2, 1/2 ("lung"), 1/1 ("yes"), 2/2 (order ignored).
    assert result["open_token_recall"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert result["closed_accuracy"] is None and result["n_open"] == 4


def test_open_reference_of_only_articles_needs_an_empty_prediction():
    result = vqa_metrics(["", "a lung"], ["The", "the"], ["OPEN", "OPEN"])
    assert result["open_exact_match"] == result["open_token_recall"] == pytest.approx(1 / 2)


def test_mixed_pooled_overall_and_inferred_types():
    predictions = ["Yes it is", "no", "liver", "kidney", "axial"]
    references = ["Yes", "yes", "Liver", "left kidney", "axial plane"]
    answer_types = [None, "CLOSED ", None, "open", "OPEN"]  # None inferred; case and spaces ignored
    result = vqa_metrics(predictions, references, answer_types)
    assert (result["n"], result["n_closed"], result["n_open"]) == (5, 2, 3)
    assert result["closed_accuracy"] == pytest.approx(1 / 2)
    assert result["open_exact_match"] == pytest.approx(1 / 3)
    assert result["open_token_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert result["overall_accuracy"] == pytest.approx(2 / 5)


def test_empty_input_has_no_division_by_zero():
    assert vqa_metrics([], [], []) == {
        "closed_accuracy": None,
        "open_exact_match": None,
        "open_token_recall": None,
        "overall_accuracy": None,
        "n": 0,
        "n_closed": 0,
        "n_open": 0,
    }


def test_invalid_input_raises():
    with pytest.raises(ValueError, match="2 predictions, 1 references"):
        vqa_metrics(["a", "b"], ["a"], ["OPEN"])
    with pytest.raises(ValueError, match=r"answer_types\[1\] is 'YESNO'"):
        vqa_metrics(["a", "b"], ["a", "b"], ["OPEN", "yesno"])


# ---------------------------------------------------------------------------------------------------------
# ANLS, relaxed accuracy, exact match, the registry (hand-computed)
from nvila_ft.metrics import (  # noqa: E402
    METRICS,
    anls,
    anls_score,
    compute_metric,
    exact_match,
    get_metric,
    levenshtein,
    relaxed_accuracy,
    relaxed_correct,
)


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0),
])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == levenshtein(b, a) == distance


@pytest.mark.parametrize(("prediction", "references", "score"), [
    ("Acme Inc.", "acme inc.", 1.0),                 # case is ignored
    ("  acme   inc. ", "Acme Inc.", 1.0),            # surrounding and repeated whitespace too
    ("acme lnc.", "acme inc.", 1 - 1 / 9),           # one substitution in 9 characters
    ("1990", "1996", 0.75),                          # NL 0.25 < 0.5: partial credit
    ("ab", "abcd", 0.0),                             # NL = 0.5 is not < tau: 1 - NL only if NL < tau
    ("abc", "abcdefgh", 0.0),                        # NL 5/8 >= 0.5: no credit
    ("", "", 1.0),                                   # empty against empty: identical
    ("", "answer", 0.0),                             # an empty answer scores 0
    ("answer", "", 0.0),                             # against an empty reference too
    ("acme", ["Acme Corp", "ACME"], 1.0),            # best over several references
    ("acme corp", ["acme", "Acme Corp."], 1 - 1 / 10),
])
def test_anls_score(prediction, references, score):
    assert anls_score(prediction, references) == pytest.approx(score)


def test_anls_averages_and_rejects_a_question_without_reference():
    result = anls(["1990", "acme", "x"], ["1996", ["ACME", "acme inc"], "yyyy"])
    assert result == {"anls": pytest.approx((0.75 + 1.0 + 0.0) / 3), "n": 3}
    assert anls([], []) == {"anls": None, "n": 0}
    with pytest.raises(ValueError, match="no reference"):
        anls(["x"], [[]])
    with pytest.raises(ValueError, match="1 predictions and 2 references"):
        anls(["x"], ["a", "b"])


@pytest.mark.parametrize(("prediction", "references", "correct"), [
    ("105", "100", True),              # 5% off: the edge is included
    ("105.1", "100", False),
    ("94.9", "100", False),
    ("0.41", "40%", True),             # "40%" reads as 0.40; 0.41 is 2.5% off
    ("40%", "0.4", True),
    (" 12 ", "12.0", True),
    ("0", "0", True),                  # a zero reference has no relative error: string match
    ("0.0", "0", False),
    ("Yes", "yes", True),              # text: case-insensitive exact match
    ("Asia ", "Asia", True),
    ("Europe", "Asia", False),
    ("twelve", "12", False),
    ("12", ["eleven", "12.3"], True),  # any reference
])
def test_relaxed_correct(prediction, references, correct):
    assert relaxed_correct(prediction, references) is correct


def test_relaxed_accuracy_and_exact_match_averages():
    assert relaxed_accuracy(["105", "Asia", "3"], ["100", "asia", "4"]) == {
        "relaxed_accuracy": pytest.approx(2 / 3), "n": 3}
    assert exact_match(["The Cat.", "dog", "a bird"], ["cat", ["puppy", "Dog"], "birds"]) == {
        "exact_match": pytest.approx(2 / 3), "n": 3}


def test_registry_by_name_and_callables():
    assert set(METRICS) == {"vqa_rad", "anls", "relaxed_accuracy", "exact_match"}
    assert compute_metric("vqa_rad", ["yes", "left lung"], ["Yes", "the left lung"])["overall_accuracy"] == 1.0
    assert compute_metric(lambda p, r: 0.25, ["a"], ["b"]) == {"score": 0.25, "n": 1}
    custom = get_metric(lambda p, r: {"hits": sum(x == y for x, y in zip(p, r))})
    assert custom(["a", "b"], ["a", "c"]) == {"hits": 1, "n": 2}
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*anls"):
        get_metric("bleu")


def test_recipe_rejects_an_unknown_metric():
    from nvila_ft.train.recipe import RecipeError
    from nvila_ft.train.recipe_io import parse_recipe

    with pytest.raises(RecipeError, match="eval.metric must be one of"):
        parse_recipe({"model": {"path": "m"}, "data": {"path": "d"}, "eval": {"metric": "bleu"}})
