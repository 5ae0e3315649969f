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
