"""Evaluation by greedy generation: answers for VQA samples, scored with a metric chosen by name.

    metrics, rows = evaluate_samples(model, processor, samples, metric="anls", max_new_tokens=32)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from nvila_ft.data.rows import DataError
from nvila_ft.metrics import compute_metric

logger = logging.getLogger(__name__)


def split_prompt(sample: dict) -> tuple[list[dict], str]:
    """(turns up to the last human turn, reference answer = the last gpt turn) of a sample.

    Raises:
        ValueError: the sample does not end with a gpt turn after a human turn.
    """
    turns = sample["conversations"]
    if len(turns) < 2 or turns[-1]["from"] != "gpt" or turns[-2]["from"] != "human":
        raise ValueError(f"sample {sample.get('id')}: evaluation needs a final human -> gpt exchange")
    return list(turns[:-1]), turns[-1]["value"]


def prompt_turns(sample: dict) -> list[dict]:
    """The turns to answer: all of them when the sample ends with a human turn (unlabelled data for
    prediction), else those before the final gpt answer."""
    turns = sample["conversations"]
    return list(turns) if turns and turns[-1]["from"] == "human" else split_prompt(sample)[0]


def references_of(sample: dict) -> list[str] | None:
    """The acceptable answers of a sample: its "references" if the data lists several, else its final gpt
    turn; None for a sample without an answer."""
    if sample.get("references"):
        return list(sample["references"])
    turns = sample["conversations"]
    return [turns[-1]["value"]] if turns and turns[-1]["from"] == "gpt" else None


def prediction_row(sample: dict, prediction: str | None) -> dict:
    """One output row for a sample and its generated answer (training's `predictions_<tag>.jsonl`,
    `nvila_ft.predict` lines, `evaluate` rows).

    Returns:
        `{"id", "index", "question", "prediction"}`, plus, when the sample has an answer, `reference` (its
        first acceptable answer), `answer_type` (None when the data has none) and `references` (only when
        it lists several).
    """
    row = {"id": sample.get("id"), "index": sample.get("index"), "question": prompt_turns(sample)[-1]["value"],
           "prediction": prediction}
    references = references_of(sample)
    if references is not None:
        row["reference"] = references[0]
        row["answer_type"] = sample.get("answer_type")
        if len(references) > 1:
            row["references"] = references
    return row


@torch.no_grad()
def generate_answers(
    model,
    processor,
    samples: Sequence[dict],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    on_bad_row: str = "error",
) -> list[str | None]:
    """Greedy answers to each sample's last question (a final gpt turn, the reference, is left out).

    Args:
        model: NVILA model (or a PeftModel around one), on any device.
        processor: :class:`~nvila_ft.model.processing.NvilaProcessor`.
        samples: normalized samples (`conversations`, `images`, `videos`).
        max_new_tokens: generation budget per answer (tokens).
        batch_size: prompts per `generate` call (left-padded after splicing).
        on_bad_row: "error" raises when a sample cannot be encoded (missing image, too long); "skip" logs
            it and gives None as its answer.

    Returns:
        Decoded answers, stripped, in sample order (None for skipped samples).
    """
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    answers: list[str | None] = []
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress):
            encoded = []
            for s in samples[start : start + batch_size]:
                try:
                    encoded.append(processor(prompt_turns(s), s.get("images", []), add_generation_prompt=True,
                                             sample_id=s.get("id"), videos=s.get("videos", [])))
                except Exception as err:  # noqa: BLE001 - one bad row is reported, not fatal, under "skip"
                    if on_bad_row != "skip":
                        where, fix = f"{s.get('source')}[{s.get('index')}] id={s.get('id')}", "fix the row or skip it"
                        if isinstance(err, FileNotFoundError):  # keeps its type: callers catch missing files
                            raise FileNotFoundError(err.errno, f"{where}: {err.strerror}; {fix}", err.filename) from err
                        raise DataError(f"{where}: {err}; {fix} (on_bad_row=skip)") from err
                    logger.error("skipping %s[%s] id=%s: %s", s.get("source"), s.get("index"), s.get("id"), err)
                    encoded.append(None)
            good = [e for e in encoded if e is not None]
            decoded = []
            if good:
                batch = processor.collate(good, padding_side="left")
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
                decoded = [processor.decode(row) for row in out]
            it = iter(decoded)
            answers += [None if e is None else next(it) for e in encoded]
    finally:
        model.train(was_training)
    return answers


def evaluate_samples(
    model,
    processor,
    samples: Sequence[dict],
    metric: str | Callable = "vqa_rad",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Greedy answers to labelled samples, scored with `metric` (a name in :data:`nvila_ft.metrics.METRICS`
    or a callable `(predictions, references) -> dict | float`).

    Returns:
        (metrics, rows): `metrics` from the metric; `rows` one :func:`prediction_row` per sample (`id`,
        `index`, `question`, `prediction`, `reference`, `answer_type`, + `references` when it lists several).

    Raises:
        ValueError: a sample without a final answer to score against.
    """
    predictions = generate_answers(model, processor, samples, max_new_tokens, batch_size, progress)
    return score_answers(samples, predictions, metric)


def score_answers(samples: Sequence[dict], predictions: Sequence[str | None],
                  metric: str | Callable = "vqa_rad") -> tuple[dict, list[dict]]:
    """Scores answers given in sample order: the second half of :func:`evaluate_samples`, also used by
    :func:`nvila_ft.train.distributed.sharded_evaluate` once the ranks' answers are gathered.

    Returns:
        (metrics, rows) as :func:`evaluate_samples`.

    Raises:
        ValueError: a sample without a final answer to score against.
    """
    references = [references_of(s) for s in samples]
    if any(r is None for r in references):
        raise ValueError("evaluation needs a reference answer (final gpt turn) in every sample")
    types = [s.get("answer_type") for s in samples]
    refs = [r if len(r) > 1 else r[0] for r in references]
    metrics = compute_metric(metric, predictions, refs, types)
    return metrics, [prediction_row(s, p) for s, p in zip(samples, predictions)]
