"""The Python API: load, fine-tune, evaluate, answer, merge, each in one call.

    from nvila_ft.api import evaluate, generate, load_model, load_recipe, merge, train

    recipe = load_recipe("recipes/medical.yaml", ["train.max_steps=100"])
    run = train(recipe, train_data=my_dataset, eval_data=my_eval_set, metric=my_metric)
    model, processor = load_model(run.output_dir)
    print(generate(model, processor, "scan.png", "Is there a fracture?"))
    metrics, rows = evaluate(run.output_dir, None, my_eval_set, metric="exact_match")
    merge(run.output_dir, "runs/medical-merged", dtype="bf16")

Samples are plain dicts, as the data loaders produce them: `{"images": [path or PIL image, ...],
"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}` (optional: `id`,
`answer_type`, `references`, `videos`: [path or bytes]). `<image>` placeholders may be left out: images go before the
first question. Rows go through the same normaliser as LLaVA JSON rows (`nvila_ft.data.rows.normalize_row`).
With `train.objective: dpo`, `train` takes preference rows instead: `{"images", "prompt", "chosen", "rejected"}`
(`nvila_ft.data.pairs.normalize_pair`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nvila_ft.data.pairs import normalize_pair
from nvila_ft.data.rows import normalize_row
from nvila_ft.inference import AdapterBank, generate, load_model, stream_generate  # noqa: F401 - part of the API
from nvila_ft.merge import merge  # noqa: F401 - part of the API
from nvila_ft.train.recipe import Recipe
from nvila_ft.train.recipe_io import load_recipe

Metric = str | Callable[[list[str], list], Any]


def as_samples(data: Iterable[dict] | Any, source: str = "python", pairs: bool = False) -> list[dict]:
    """Normalizes a list of sample dicts, a `torch.utils.data.Dataset` or a Hugging Face `datasets.Dataset`
    yielding them (see the module doc) into the samples the trainer and evaluation use; with `pairs`, preference
    rows (`image`, `prompt`, `chosen`, `rejected`: `nvila_ft.data.pairs.normalize_pair`) for DPO.

    A row that is not such a dict becomes an error row (reported by preflight, dropped or fatal per
    `data.on_bad_row`), never a crash in the middle of training.
    """
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        rows = (data[i] for i in range(len(data)))  # map-style torch Dataset (HF datasets index the same way)
    else:
        rows = iter(data)
    normalize = normalize_pair if pairs else normalize_row
    return [normalize(row, index, source) for index, row in enumerate(rows)]


def train(
    recipe: Recipe | str | os.PathLike,
    train_data: Iterable[dict] | None = None,
    eval_data: Iterable[dict] | None = None,
    metric: Metric | None = None,
    overrides: list[str] = (),
):
    """Fine-tunes per a recipe, on the recipe's data or on samples given here.

    Args:
        recipe: a :class:`Recipe` or a YAML path (then `overrides`, `dotted.key=value`, apply).
        train_data, eval_data: samples (see :func:`as_samples`) instead of `data.path`; given `train_data`
            without `eval_data`, no evaluation runs.
        metric: scores eval answers instead of `eval.metric`: a name (`vqa_rad`, `anls`, `relaxed_accuracy`,
            `exact_match`) or a callable `(predictions, references) -> dict | float`.

    Returns:
        The finished :class:`~nvila_ft.train.TrainingRun`: `.metrics` (also in `metrics.json`), `.output_dir`
        (peft adapter, model card), `.model`, `.processor`. When `train.output_dir` already holds this run,
        finished, nothing is trained: `.metrics` is its `metrics.json` and `.model` is None (load it with
        :func:`load_model`).
    """
    from nvila_ft.train.trainer import TrainingRun

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    pairs = recipe.train.objective == "dpo"
    run = TrainingRun(
        recipe,
        train_samples=as_samples(train_data, "train_data", pairs) if train_data is not None else None,
        eval_samples=as_samples(eval_data, "eval_data", pairs) if eval_data is not None else None,
        metric=metric,
    )
    run.metrics = run.run()
    return run


def evaluate(
    model_or_run,
    processor=None,
    samples: Iterable[dict] = (),
    metric: Metric = "vqa_rad",
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> tuple[dict, list[dict]]:
    """Greedy answers to labelled samples, scored.

    Args:
        model_or_run: a model from :func:`load_model`, or a run folder / checkpoint path (loaded here).
        processor: the model's processor (ignored, may be None, when a path is given).
        samples: samples ending with the reference answer (see :func:`as_samples`).
        metric: a metric name or a callable `(predictions, references) -> dict | float`.

    Returns:
        (metrics, rows): rows hold `id`, `question`, `reference`, `prediction` per sample.
    """
    from nvila_ft.evaluate import evaluate_samples

    if isinstance(model_or_run, (str, Path)):
        model_or_run, processor = load_model(model_or_run)
    return evaluate_samples(model_or_run, processor, as_samples(samples), metric, max_new_tokens, batch_size)
