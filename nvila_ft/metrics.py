"""VQA-RAD style answer metrics: closed (yes/no) accuracy, open exact match and open token recall.

    from nvila_ft.metrics import vqa_metrics
    vqa_metrics(["Yes, there is.", "the left lung"], ["yes", "Left lung"], ["CLOSED", "OPEN"])

Conventions follow the Med-VQA papers that report on VQA-RAD (MEVF split): accuracy is computed
separately on CLOSED (yes/no style) and OPEN (free text) questions, and "overall" pools both.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

ANSWER_TYPES = ("CLOSED", "OPEN")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Normalizes an answer for comparison.

    Lowercases, replaces punctuation with spaces (so "left-sided" and "left sided" agree), drops the
    articles a/an/the and collapses whitespace.

    Args:
        text: A prediction or reference answer (non-strings are converted with `str`).

    Returns:
        The normalized answer, e.g. "The Left-Lung." -> "left lung".
    """
    text = _PUNCTUATION.sub(" ", str(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def infer_answer_type(answer: str) -> str:
    """Returns "CLOSED" for a yes/no answer (any case or punctuation) and "OPEN" otherwise (VQA-RAD convention)."""
    return "CLOSED" if normalize_answer(answer) in ("yes", "no") else "OPEN"


def _closed_answer(prediction: str) -> str:
    """Reads yes/no from the start of a prediction ("Yes, there is ..." -> "yes"); else the whole normalized text."""
    normalized = normalize_answer(prediction)
    first = normalized.split(" ", 1)[0]
    return first if first in ("yes", "no") else normalized


def _token_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference's normalized tokens found among the prediction's tokens."""
    reference_tokens = normalize_answer(reference).split()
    prediction_tokens = set(normalize_answer(prediction).split())
    if not reference_tokens:  # reference was only articles/punctuation: fall back to exact match
        return float(not prediction_tokens)
    return sum(token in prediction_tokens for token in reference_tokens) / len(reference_tokens)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def vqa_metrics(
    predictions: Sequence[str], references: Sequence[str], answer_types: Sequence[str | None]
) -> dict:
    """Scores generated answers against references, VQA-RAD style.

    Args:
        predictions: Generated answers, one per question.
        references: Ground-truth answers, same order.
        answer_types: "CLOSED", "OPEN" (case and surrounding spaces ignored: VQA-RAD has "CLOSED ")
            or None to infer from the reference (yes/no -> CLOSED).

    Returns:
        A dict with
        `closed_accuracy`: fraction of CLOSED rows whose prediction matches after normalization, with
        yes/no read from the start of the prediction ("Yes, there is a mass." counts as "yes");
        `open_exact_match`: fraction of OPEN rows whose normalized prediction equals the reference;
        `open_token_recall`: mean over OPEN rows of the fraction of reference tokens present in the
        prediction;
        `overall_accuracy`: closed matches plus open exact matches over all rows;
        `n`, `n_closed`, `n_open`: row counts. A metric over an empty group is None (so empty input
        gives counts of 0 and all metrics None).

    Raises:
        ValueError: If the three sequences differ in length or an answer type is not CLOSED/OPEN/None.
    """
    if not len(predictions) == len(references) == len(answer_types):
        raise ValueError(
            f"vqa_metrics got {len(predictions)} predictions, {len(references)} references and "
            f"{len(answer_types)} answer types; pass one of each per question."
        )
    closed, exact, recall = [], [], []
    for i, (prediction, reference, answer_type) in enumerate(
        zip(predictions, references, answer_types, strict=True)
    ):
        answer_type = infer_answer_type(reference) if answer_type is None else answer_type.strip().upper()
        if answer_type == "CLOSED":
            closed.append(float(_closed_answer(prediction) == normalize_answer(reference)))
        elif answer_type == "OPEN":
            exact.append(float(normalize_answer(prediction) == normalize_answer(reference)))
            recall.append(_token_recall(prediction, reference))
        else:
            raise ValueError(
                f"answer_types[{i}] is {answer_type!r}; use one of {ANSWER_TYPES} or None to infer it."
            )
    return {
        "closed_accuracy": _mean(closed),
        "open_exact_match": _mean(exact),
        "open_token_recall": _mean(recall),
        "overall_accuracy": _mean(closed + exact),
        "n": len(closed) + len(exact),
        "n_closed": len(closed),
        "n_open": len(exact),
    }
