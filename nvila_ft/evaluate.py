"""Evaluation by greedy generation: answers for VQA samples and their VQA-RAD style metrics.

    metrics, rows = evaluate_vqa(model, processor, samples, max_new_tokens=32)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .metrics import vqa_metrics

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


@torch.no_grad()
def generate_answers(
    model, processor, samples: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 8, progress: bool = True
) -> list[str]:
    """Greedy answers to each sample's last question (its last gpt turn is left out).

    Args:
        model: NVILA model (or a PeftModel around one), on any device.
        processor: :class:`~nvila_ft.processing.NvilaProcessor`.
        samples: normalized samples (`conversations`, `images`, `videos`).
        max_new_tokens: generation budget per answer (tokens).
        batch_size: prompts per `generate` call (left-padded after splicing).

    Returns:
        Decoded answers, stripped, in sample order.
    """
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress):
            chunk = samples[start : start + batch_size]
            encoded = [
                processor(split_prompt(s)[0], s.get("images", []), add_generation_prompt=True, sample_id=s.get("id"),
                          videos=s.get("videos", []))
                for s in chunk
            ]
            batch = processor.collate(encoded)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            answers += [processor.decode(row) for row in out]
    finally:
        model.train(was_training)
    return answers


def evaluate_vqa(
    model, processor, samples: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 8, progress: bool = True
) -> tuple[dict, list[dict]]:
    """VQA-RAD metrics (closed accuracy, open exact match and token recall) of greedy answers.

    Returns:
        (metrics, rows): `metrics` from :func:`nvila_ft.metrics.vqa_metrics`; `rows` one dict per sample
        with `id`, `question`, `reference`, `prediction`, `answer_type`.
    """
    predictions = generate_answers(model, processor, samples, max_new_tokens, batch_size, progress)
    prompts = [split_prompt(s) for s in samples]
    references = [reference for _, reference in prompts]
    types = [s.get("answer_type") for s in samples]
    metrics = vqa_metrics(predictions, references, types)
    rows = [
        {"id": s.get("id"), "question": turns[-1]["value"], "reference": r, "prediction": p, "answer_type": t}
        for s, (turns, r), p, t in zip(samples, prompts, predictions, types)
    ]
    return metrics, rows
