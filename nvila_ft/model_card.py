"""A run folder's `README.md` (model card): base model, recipe summary, data, metrics, and how to use it.

It opens with a Hugging Face metadata block (base_model, library_name peft, pipeline_tag, tags, datasets,
metrics with their values as model-index), so a pushed run folder (`train.push_to_hub`) is shown on the
Hub as an adapter of its base model.

    python -c "from nvila_ft.model_card import write_model_card; write_model_card('runs/medical')"

Written by `nvila_ft.train` at the end of a run from the files the run saved (`recipe.yaml`,
`run_info.json`, `metrics.json`), so it can be regenerated for an older run the same way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from nvila_ft.train.recipe_io import load_recipe

CARD = "README.md"
CURVE_FILE = "loss_curve.png"  # nvila_ft.train.curves.CURVE (not imported: the card needs no matplotlib)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _metrics_table(metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) or v is None]
    if not rows:
        return ["(no evaluation)"]
    return ["| metric | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows]]


def _prune_line(prune, stats: dict | None) -> list[str]:
    """The card's pruning line (`data.prune`, rows before and after from metrics.json), or none."""
    if not prune.enabled:
        return []
    how = "DeltaLoss (NVILA paper), top" if prune.method == "deltaloss" else "random baseline,"
    line = (f"- Pruning: {how} {prune.keep:g} of each subset" + (f" by `{prune.by}`" if prune.by else "")
            + (f", scores `{prune.scores}`" if prune.scores else ""))
    if stats:
        line += f"; {stats['rows_before']} -> {stats['rows_after']} train rows"
    return [line]


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_NOT_SCORES = ("n", "step", "runtime", "samples_per_second", "steps_per_second")


def hub_base_model(model_path: str, local_path: str | None = None) -> str | None:
    """The Hub id of the base model: `model.path` when it is one (owner/name, not a local folder), or the id
    of a Hub cache snapshot folder (`.../models--owner--name/snapshots/<sha>`); None for another local folder
    (the Hub refuses a base_model that is not a model id)."""
    if _HUB_ID.match(model_path) and not Path(model_path).exists():
        return model_path
    for part in Path(local_path or model_path).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    return None


def card_metadata(recipe, eval_metrics: dict, run_name: str, info: dict | None = None):
    """The metadata block of a run's card as `huggingface_hub.ModelCardData`.

    Args:
        recipe: the run's `Recipe`; eval_metrics: `metrics.json`'s "eval" (numbers become model-index
        results); run_name: the model's name in model-index; info: `run_info.json` (local base path).
    """
    from huggingface_hub import EvalResult, ModelCardData

    d = recipe.data
    base = hub_base_model(recipe.model.path, (info or {}).get("base_model_path"))
    dataset = d.path if d.format == "hf" or (_HUB_ID.match(d.path) and not Path(d.path).exists()) else None
    scores = {k: v for k, v in eval_metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_SCORES}
    modes = {recipe.tune.llm, recipe.tune.vision_tower}
    tags = ["nvila", "nvila-ft", "vision-language", *sorted(m for m in modes if m in ("lora", "qlora"))]
    if recipe.lora.use_dora and modes & {"lora", "qlora"}:
        tags.append("dora")
    results = [
        EvalResult(task_type="visual-question-answering", dataset_type=dataset or Path(d.path).name or "local",
                   dataset_name=f"{Path(d.path).name} ({d.eval_split})", dataset_split=d.eval_split,
                   metric_type=name, metric_name=name, metric_value=value)
        for name, value in scores.items()
    ]
    extra = {"base_model_relation": "adapter"} if base else {}
    return ModelCardData(
        base_model=base, library_name="peft", pipeline_tag="image-text-to-text", tags=tags,
        datasets=[dataset] if dataset else None, metrics=list(scores) or None, model_name=run_name,
        eval_results=results or None, **extra,
    )


GENERIC_NAMES = {"output", "outputs", "out", "final"}  # run folder names that say nothing: the parent's is used


def run_title(output_dir: str, base_model: str) -> str:
    """The card's title: the run's name and its base model, e.g. `quickstart: tiny-nvila fine-tuned with
    nvila-ft` for `runs/quickstart/output` from `demo:tiny-nvila`."""
    parts = [p for p in Path(output_dir).parts if p not in ("/", ".", "..")]
    name = parts[-1] if parts else "run"
    if name in GENERIC_NAMES and len(parts) > 1:
        name = parts[-2]
    base = base_model.removeprefix("demo:").rstrip("/").rsplit("/", 1)[-1]
    return f"{name}: {base} fine-tuned with nvila-ft"


def render_model_card(run_dir: str | os.PathLike, *, train_samples: int | None = None,
                      eval_samples: int | None = None, data_source: str | None = None,
                      metric: str | None = None, steps: int | None = None, epochs: float | None = None) -> str:
    """The model card text of a run folder (see :func:`write_model_card`).

    Args:
        run_dir: the run folder (reads `recipe.yaml`, `run_info.json`, `metrics.json` there).
        train_samples, eval_samples: sample counts used (after preflight).
        data_source: describes data that did not come from `data.path` (Python API samples).
        metric: the eval metric's name when it is not the recipe's `eval.metric`.
        steps: optimizer steps run; default metrics.json's `train.global_step`, else the recipe's `max_steps`.
        epochs: passes over the training split done (trainer state `epoch`); default metrics.json's
            `train.epoch`.

    Raises:
        RecipeError: the run has no readable `recipe.yaml`.
    """
    folder = Path(run_dir)
    recipe = load_recipe(folder / "recipe.yaml")
    info = json.loads((folder / "run_info.json").read_text()) if (folder / "run_info.json").is_file() else {}
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    m, tune, lora, d, t, e = recipe.model, recipe.tune, recipe.lora, recipe.data, recipe.train, recipe.eval
    lrs = t.lr_per_part
    local = info.get("base_model_path")
    base = f"`{m.path}`" + (f" (local folder `{local}`)" if local and Path(local) != Path(m.path) else "")

    def part(name: str, mode: str) -> str:
        detail = ""
        if mode in ("lora", "qlora"):
            target = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
            detail = (f"LoRA r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, {target}"
                      + (", DoRA" if lora.use_dora else "") + ("; 4-bit nf4 base" if mode == "qlora" else ""))
        return f"| `{name}` | {mode} | {detail} | {'-' if mode == 'frozen' else f'{lrs[name]:.2e}'} |"

    done = metrics.get("train", {})
    steps = steps if steps is not None else done.get("global_step", t.max_steps if t.max_steps > 0 else None)
    epochs = epochs if epochs is not None else done.get("epoch")
    counts = f"{train_samples} train" if train_samples is not None else ""
    if eval_samples:
        counts += f", {eval_samples} eval"
    eval_metrics = metrics.get("eval", {})
    meta = card_metadata(recipe, eval_metrics, folder.resolve().name, info).to_yaml()
    run = shlex.quote(str(Path(t.output_dir)))  # as the user wrote it (relative to where they train it)
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# {run_title(t.output_dir, m.path)}",
        "",
        f"NVILA fine-tuned with nvila-ft from {base}.",
        "",
        *([f"**RANDOM WEIGHTS**: trained with `model.init: random` (seeded random weights at the shapes of "
           f"`{m.path}`, no checkpoint downloaded): a memory, speed and code-path check, not a usable model.",
           ""] if m.init == "random" else []),
        "## Training",
        "",
        "| part | tuning | adapter | learning rate |",
        "|---|---|---|---|",
        part("llm", tune.llm),
        part("vision_tower", tune.vision_tower),
        part("mm_projector", tune.mm_projector),
        "",
        f"Optimizer steps: {_fmt(steps)} ({'?' if epochs is None else f'{epochs:.3g}'} epochs of the training "
        f"split; recipe: num_train_epochs {t.num_train_epochs:g}, max_steps {t.max_steps}); batch "
        f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation per device; "
        f"{t.lr_scheduler_type} schedule, warmup {t.warmup_ratio}; seed {t.seed}; weights {m.dtype}; image "
        f"tiling {m.image_aspect_ratio or 'from the checkpoint'}"
        + (f", max {m.max_tiles} tiles" if m.max_tiles else "") + ".",
        *([f"Objective: DPO preference tuning (loss {recipe.dpo.loss_type}, beta {recipe.dpo.beta:g}; reference: the "
           "base model, the adapter disabled)."] if t.objective == "dpo" else []),
        f"Final training loss: {_fmt(metrics.get('train', {}).get('train_loss'))}.",
        "",
        "## Data",
        "",
        f"- Source: {data_source or f'`{d.path}` (format {d.format})'}",
        f"- Splits: train `{d.train_split}`, eval `{d.eval_split}`" + (f"; samples used: {counts}" if counts else ""),
        f"- Bad rows: {d.on_bad_row}; max length {d.max_length} tokens",
        *_prune_line(d.prune, metrics.get("prune")),
        "",
        f"## Evaluation ({metric or e.metric}, greedy, max {e.max_new_tokens} new tokens)" if t.objective != "dpo"
        else "## Evaluation (DPO loss and rewards on the eval pairs)",
        "",
        *_metrics_table(eval_metrics),
        "",
        *([f"![loss curve]({CURVE_FILE})", ""] if (folder / CURVE_FILE).is_file() else []),
        "## Use it",
        "",
        "```python",
        "from nvila_ft import generate, load_model",
        "",
        f"model, processor = load_model({json.dumps(str(Path(t.output_dir)))})",
        'print(generate(model, processor, "image.png", "What is shown?"))',
        "```",
        "",
        "```bash",
        "# batch inference (DATA: a llava json/jsonl, a VQA-RAD folder or a Hugging Face dataset)",
        f"python -m nvila_ft.predict {run} --data DATA --out predictions.jsonl",
        "# a full checkpoint in the official NVILA layout, LoRA folded into the LLM",
        f"python -m nvila_ft.merge {run} {run}-merged",
        "```",
        "",
        "## Files",
        "",
        "`adapter_config.json` + `adapter_model.safetensors` (the peft adapter: LoRA weights and, as "
        "`modules_to_save`, the projector, vision LayerNorms and parts trained in full), `processor_config.json` "
        "and tokenizer files, "
        "`recipe.yaml` (the full resolved recipe: `python -m nvila_ft.train recipe.yaml` reruns it), "
        "`run_info.json` (package versions, git commit), `metrics.json`, `predictions_final.jsonl`, "
        "`trainer_state.json` (the logged history), `loss_curve.png`, `logs/` (TensorBoard).",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in info.get('versions', {}).items() if v)}; "
        f"git commit {info.get('git_commit') or 'unknown'}.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | os.PathLike, **kwargs) -> Path:
    """Writes `README.md` into a run folder atomically (temp file, then rename); keyword arguments as for
    :func:`render_model_card`. Returns its path."""
    path = Path(run_dir) / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(render_model_card(run_dir, **kwargs), encoding="utf-8")
    os.replace(tmp, path)
    return path
