"""Answer metrics per task type, pluggable by name (recipe `eval.metric`, `predict --metric`).

    from nvila_ft.metrics import compute_metric
    compute_metric("vqa_rad", ["Yes, there is.", "the left lung"], ["yes", "Left lung"], ["CLOSED", "OPEN"])
    compute_metric("anls", ["Acme lnc."], [["ACME Inc.", "Acme"]])

| name | task | definition |
|---|---|---|
| `vqa_rad` | medical VQA (VQA-RAD, PathVQA) | closed (yes/no) accuracy, open exact match and token recall |
| `anls` | document VQA (DocVQA, InfographicVQA) | average normalized Levenshtein similarity, threshold 0.5 |
| `relaxed_accuracy` | chart QA (ChartQA, PlotQA) | numbers within 5% of the reference, other answers exact |
| `exact_match` | classification, short answers | normalized prediction equals a reference |

Every metric takes `(predictions, references, answer_types=None)` and returns a dict of numbers with
the row count `n`; a reference may be one string or a list of acceptable answers (the best one counts).
VQA-RAD conventions follow the Med-VQA papers that report on it (MEVF split): accuracy is computed
separately on CLOSED (yes/no style) and OPEN (free text) questions, and "overall" pools both.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

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
    predictions: Sequence[str], references: Sequence[str], answer_types: Sequence[str | None] | None = None
) -> dict:
    """Scores generated answers against references, VQA-RAD style.

    Args:
        predictions: Generated answers, one per question.
        references: Ground-truth answers, same order.
        answer_types: "CLOSED", "OPEN" (case and surrounding spaces ignored: VQA-RAD has "CLOSED ")
            or None to infer from the reference (yes/no -> CLOSED); None for all rows = infer every one.
            A reference that is a list of answers counts its first one.

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
    if answer_types is None:
        answer_types = [None] * len(references)
    references = [_references(r)[0] if _references(r) else "" for r in references]
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


# ---------------------------------------------------------------------------------------------------------
# Document and chart VQA, exact match

ANLS_THRESHOLD = 0.5  # tau of Biten et al., "Scene Text Visual Question Answering", ICCV 2019 (ST-VQA), sec. 4
RELAXED_TOLERANCE = 0.05  # ChartQA (Masry et al., ACL Findings 2022, sec. 5): numbers within 5% count as correct


def _references(reference) -> list[str]:
    """A reference as a list of acceptable answers (a string is one answer)."""
    if isinstance(reference, str) or reference is None:
        return [] if reference is None else [reference]
    return [str(r) for r in reference]


def _check_lengths(name: str, predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{name} got {len(predictions)} predictions and {len(references)} references; "
                         "pass one reference (or list of references) per prediction.")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between two strings.

    Answers are short (tens of characters), so the O(len(a) * len(b)) two-row dynamic program is fast enough.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    """ANLS normalization of the official ST-VQA / DocVQA evaluation: lowercase, trim, single spaces."""
    return " ".join(str(text).lower().split())


def anls_score(prediction: str, references: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Normalized Levenshtein similarity of one answer, best over its references.

    For each reference: NL = levenshtein(p, r) / max(len(p), len(r)) after lowercasing and collapsing
    whitespace; the similarity is 1 - NL when NL < `threshold`, else 0 (Biten et al. 2019). Two empty
    strings are identical (similarity 1); an empty answer against a non-empty one scores 0.

    Raises:
        ValueError: no reference.
    """
    options = _references(references)
    if not options:
        raise ValueError("anls: a question has no reference answer")
    p = _anls_text(prediction)
    best = 0.0
    for reference in options:
        r = _anls_text(reference)
        distance = levenshtein(p, r) / max(len(p), len(r)) if (p or r) else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def anls(predictions: Sequence[str], references: Sequence, answer_types=None, threshold: float = ANLS_THRESHOLD
         ) -> dict:
    """Average normalized Levenshtein similarity (DocVQA's metric): mean of :func:`anls_score` over rows.

    Returns:
        {"anls": mean in [0, 1] or None for no rows, "n": rows}.
    """
    _check_lengths("anls", predictions, references)
    scores = [anls_score(p, r, threshold) for p, r in zip(predictions, references)]
    return {"anls": _mean(scores), "n": len(scores)}


def _to_float(text: str) -> float | None:
    """A number in an answer: "12.5" -> 12.5, "40%" -> 0.4 (as ChartQA's evaluation reads percentages)."""
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, references: str | Sequence[str], tolerance: float = RELAXED_TOLERANCE
                    ) -> bool:
    """ChartQA's relaxed correctness against any reference.

    A numeric reference (other than 0) accepts a numeric prediction within `tolerance` relative error
    (|p - r| / |r| <= 0.05); otherwise the stripped, lowercased strings must be equal.
    """
    p = str(prediction).strip()
    for reference in _references(references):
        r = str(reference).strip()
        p_num, r_num = _to_float(p), _to_float(r)
        if p_num is not None and r_num:  # r_num 0 (or None): no relative error, compare as text
            if abs(p_num - r_num) / abs(r_num) <= tolerance:
                return True
        elif p.lower() == r.lower():
            return True
    return False


def relaxed_accuracy(predictions: Sequence[str], references: Sequence, answer_types=None,
                     tolerance: float = RELAXED_TOLERANCE) -> dict:
    """Fraction of rows that are :func:`relaxed_correct` (ChartQA's metric).

    Returns:
        {"relaxed_accuracy": fraction or None for no rows, "n": rows}.
    """
    _check_lengths("relaxed_accuracy", predictions, references)
    hits = [float(relaxed_correct(p, r, tolerance)) for p, r in zip(predictions, references)]
    return {"relaxed_accuracy": _mean(hits), "n": len(hits)}


def exact_match(predictions: Sequence[str], references: Sequence, answer_types=None) -> dict:
    """Fraction of rows whose :func:`normalize_answer` prediction equals that of any reference.

    Returns:
        {"exact_match": fraction or None for no rows, "n": rows}.
    """
    _check_lengths("exact_match", predictions, references)
    hits = [
        float(normalize_answer(p) in {normalize_answer(r) for r in _references(refs)})
        for p, refs in zip(predictions, references)
    ]
    return {"exact_match": _mean(hits), "n": len(hits)}


# ---------------------------------------------------------------------------------------------------------
# By name

MetricFn = Callable[..., dict]
METRICS: dict[str, MetricFn] = {
    "vqa_rad": vqa_metrics,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
}
# The number each metric is best summarized by (model cards, progress lines).
PRIMARY = {"vqa_rad": "overall_accuracy", "anls": "anls", "relaxed_accuracy": "relaxed_accuracy",
           "exact_match": "exact_match"}


def get_metric(metric: str | Callable) -> MetricFn:
    """A metric function by name (see :data:`METRICS`), or a user callable adapted to the same interface.

    A user callable is called as `metric(predictions, references)` and may return a dict of numbers or one
    number (reported as {"score": number}); `n` is added when missing.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if callable(metric):
        def adapted(predictions, references, answer_types=None):
            result = metric(list(predictions), list(references))
            result = dict(result) if isinstance(result, dict) else {"score": float(result)}
            result.setdefault("n", len(predictions))
            return result

        adapted.__name__ = getattr(metric, "__name__", "custom")
        return adapted
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a callable")
    return METRICS[metric]


def compute_metric(metric: str | Callable, predictions: Sequence[str], references: Sequence,
                   answer_types: Sequence[str | None] | None = None) -> dict:
    """Scores predictions with a metric given by name or as a callable (see :func:`get_metric`)."""
    return get_metric(metric)(predictions, references, answer_types)
