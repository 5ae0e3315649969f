"""A run folder's `README.md` (model card): base model, recipe summary, data, metrics, and how to use it.

    python -c "from nvila_ft.model_card import write_model_card; write_model_card('runs/medical')"

Written by `nvila_ft.train` at the end of a run from the files the run saved (`recipe.yaml`,
`run_info.json`, `metrics.json`), so it can be regenerated for an older run the same way.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from nvila_ft.train.recipe_io import load_recipe

CARD = "README.md"


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
    run = shlex.quote(str(Path(t.output_dir)))  # as the user wrote it (relative to where they train it)
    lines = [
        f"# {run_title(t.output_dir, m.path)}",
        "",
        f"NVILA fine-tuned with nvila-ft from {base}.",
        "",
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
        f"Final training loss: {_fmt(metrics.get('train', {}).get('train_loss'))}.",
        "",
        "## Data",
        "",
        f"- Source: {data_source or f'`{d.path}` (format {d.format})'}",
        f"- Splits: train `{d.train_split}`, eval `{d.eval_split}`" + (f"; samples used: {counts}" if counts else ""),
        f"- Bad rows: {d.on_bad_row}; max length {d.max_length} tokens",
        *_prune_line(d.prune, metrics.get("prune")),
        "",
        f"## Evaluation ({metric or e.metric}, greedy, max {e.max_new_tokens} new tokens)",
        "",
        *_metrics_table(eval_metrics),
        "",
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
        "`run_info.json` (package versions, git commit), `metrics.json`, `predictions_final.jsonl`.",
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
