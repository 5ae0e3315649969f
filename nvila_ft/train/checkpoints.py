"""A run folder's state: complete checkpoints, which one to resume from, whether the run is finished.

    python -c "from nvila_ft.train.checkpoints import checkpoint_problem as p; print(p('runs/quickstart/output/checkpoint-40'))"

`nvila_ft.train` asks :func:`plan_resume` before it loads any weight: a finished run (final adapter, `metrics.json`
and the recipe's step target reached) is reported and left as it is; a target below the steps already trained is
an error naming both numbers; otherwise the newest checkpoint that passes :func:`checkpoint_problem` is resumed,
falling back past damaged ones with a warning. Checkpoints are written into a staging folder and renamed into
place once complete (:func:`staging_dir`, :func:`publish_checkpoint`), so a `checkpoint-<step>` folder is whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("nvila_ft.train")

PREFIX = "checkpoint-"
STAGING = ".checkpoint-staging"  # inside output_dir; not matched by `checkpoint-*`
STATE = "trainer_state.json"
ADAPTER = "adapter_model.safetensors"
METRICS = "metrics.json"
BAD_ROWS = "bad_rows.jsonl"
START_OVER = "train.resume_from_checkpoint=never or a new train.output_dir"


class RunStateError(ValueError):
    """The output folder holds a run the recipe cannot continue (user error: one line, exit 2)."""


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder name, or None for any other name."""
    name = Path(path).name
    return int(name[len(PREFIX):]) if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() else None


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders holding a `trainer_state.json` (Trainer writes it last), newest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(PREFIX + "*") if checkpoint_step(p) is not None and (p / STATE).is_file()]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest `checkpoint-<step>` folder with a `trainer_state.json`, by step number; None if there is none."""
    found = checkpoints(output_dir)
    return str(found[0]) if found else None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes a checkpoint folder unusable for a resume, or None when every file reads back.

    Checks, without loading weights into a model: `trainer_state.json` and every other `*.json` parse;
    every `*.safetensors` header parses and its tensors cover the file exactly (safetensors' own check);
    `optimizer.pt`, `scheduler.pt`, `scaler.pt` load as the Trainer loads them (`torch.load(weights_only=True)`,
    memory-mapped: a truncated zip has no central directory); `rng_state*.pth` are complete zip archives.

    Returns:
        `"<file>: <what is wrong>"` for the first bad file, or None.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not (folder / STATE).is_file():
        return f"{STATE}: missing (the save did not finish)"
    if not list(folder.glob("*.safetensors")):
        return "no *.safetensors weights file"
    for path in sorted(folder.iterdir()):
        name = path.name
        try:
            if name.endswith(".json"):
                state = json.loads(path.read_text(encoding="utf-8"))
                if name == STATE and not isinstance(state.get("global_step"), int):
                    return f"{name}: no global_step"
            elif name.endswith(".safetensors"):
                with safe_open(path, "pt"):
                    pass
            elif name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            elif name.startswith("rng_state") and name.endswith(".pth"):
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
        except (OSError, ValueError, RuntimeError, SafetensorError, zipfile.BadZipFile, AttributeError) as err:
            return f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def read_state(checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's `trainer_state.json` (global_step, max_steps, epoch, num_train_epochs, log_history)."""
    return json.loads((Path(checkpoint) / STATE).read_text(encoding="utf-8"))


def usable_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest checkpoint in `output_dir` that passes :func:`checkpoint_problem`; a damaged one is skipped with a
    warning that names it and the bad file.

    Raises:
        RunStateError: checkpoints exist but none is usable.
    """
    damaged = []
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged:
                logger.warning("resuming from %s instead", folder.name)
            return str(folder)
        damaged.append(f"{folder.name} ({problem})")
        logger.warning("checkpoint %s is damaged, skipping it: %s", folder, problem)
    if damaged:
        raise RunStateError(f"{output_dir}: no usable checkpoint to resume from: {'; '.join(damaged)}. "
                            f"Start over with {START_OVER}.")
    return None


# ---------------------------------------------------------------------------------------------- atomic saves
def staging_dir(output_dir: str | os.PathLike, step: int, main_process: bool = True) -> str:
    """The folder Trainer's checkpoint save writes into (`<output_dir>/.checkpoint-staging`); a leftover
    `checkpoint-<step>` in it from a save that was killed is removed first (main process only)."""
    staging = Path(output_dir) / STAGING
    if main_process:
        shutil.rmtree(staging / f"{PREFIX}{step}", ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    return str(staging)


def publish_checkpoint(output_dir: str | os.PathLike, step: int, save_total_limit: int | None,
                       best_model_checkpoint: str | None = None) -> Path:
    """Renames a completely written `<staging>/checkpoint-<step>` to `<output_dir>/checkpoint-<step>` and keeps
    the newest `save_total_limit` checkpoints (by step number, as :func:`latest_checkpoint` orders them), never
    deleting `best_model_checkpoint` (`train.load_best_model_at_end`).

    A rename within one file system is atomic: readers see no folder or a whole one. An existing
    `checkpoint-<step>` (a damaged one being redone after a fallback) is moved aside first, then deleted.
    """
    from transformers.trainer_utils import rotate_checkpoints

    output_dir = Path(output_dir)
    staged, final = output_dir / STAGING / f"{PREFIX}{step}", output_dir / f"{PREFIX}{step}"
    if final.exists():
        old = output_dir / STAGING / f"replaced-{PREFIX}{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    try:
        (output_dir / STAGING).rmdir()
    except OSError:
        pass  # not empty: something else is staged
    rotate_checkpoints(str(output_dir), save_total_limit=save_total_limit, best_model_checkpoint=best_model_checkpoint,
                       use_mtime=False)
    return final


class LogAtSave(TrainerCallback):
    """Logs the loss at every checkpoint step too (not only every `logging_steps`), so a checkpoint's
    `log_history` covers every step before it and a resumed run's loss over the whole run can be computed
    (:func:`whole_run_loss`): Trainer drops the loss of the steps since the last log when it resumes."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control


def whole_run_loss(log_history: list[dict]) -> float | None:
    """Mean training loss per optimizer step over the whole run, from a trainer state's `log_history`.

    Each `loss` entry is the mean over the steps since the previous entry (transformers logs the summed
    loss / steps since the last log), so the entries are weighted by those step counts. With
    :class:`LogAtSave` every step up to the last one is covered, across resumes. None when nothing was logged.
    """
    total, steps, last = 0.0, 0, 0
    for entry in sorted((h for h in log_history if "loss" in h), key=lambda h: h["step"]):
        span = entry["step"] - last
        total, steps, last = total + entry["loss"] * span, steps + span, entry["step"]
    return total / steps if steps else None


# ---------------------------------------------------------------------------------------------- resume plan
@dataclass
class ResumePlan:
    """What a run does with its output folder (see :func:`plan_resume`).

    Attributes:
        checkpoint: folder to resume from, or None to train from the start.
        state: that checkpoint's trainer state, or None.
        trained: the checkpoint reached the recipe's step target; only the end of the run (final adapter,
            evaluation, metrics.json, card) is left to do, without training a step.
        finished: the run is finished; its `metrics.json`, to report instead of training.
        stale: checkpoints and records of an earlier run to remove before training (`resume_from_checkpoint:
            never` in a folder that has them).
    """

    checkpoint: str | None = None
    state: dict | None = None
    trained: bool = False
    finished: dict | None = None
    stale: list[Path] = field(default_factory=list)


def _metrics(output_dir: Path) -> dict | None:
    try:
        return json.loads((output_dir / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _readable(path: Path) -> bool:
    """A safetensors file whose header parses and whose tensors cover the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            return True
    except (OSError, SafetensorError):
        return False


def _target_reached(train, step: int, record: dict) -> bool:
    """`step` is the recipe's target: `max_steps`, or in epochs mode the record's (a trainer state's, or
    metrics.json's `train`) `max_steps` planned for `ceil(num_train_epochs)` epochs, as the Trainer plans them
    (without the data set's size, 0.5 and 0.7 epochs read alike)."""
    if train.max_steps > 0:
        return step == train.max_steps
    return step >= record.get("max_steps", step + 1) and record.get("num_train_epochs") == math.ceil(
        train.num_train_epochs)


def _check_target(train, output_dir: Path, step: int, epoch: float, where: str) -> None:
    if train.max_steps > 0 and train.max_steps < step:
        raise RunStateError(
            f"{output_dir}: train.max_steps={train.max_steps} is below the {step} steps already trained there "
            f"({where}); raise train.max_steps to {step} or more, or start over with {START_OVER}.")
    if train.max_steps <= 0 and math.ceil(train.num_train_epochs) < epoch - 1e-6:
        raise RunStateError(
            f"{output_dir}: train.num_train_epochs={train.num_train_epochs:g} is below the {epoch:.3g} epochs "
            f"already trained there ({where}); raise it, or start over with {START_OVER}.")


def plan_resume(train) -> ResumePlan:
    """Decides what a run does with `train.output_dir`, before any weight is loaded.

    Args:
        train: the recipe's `train` section (`output_dir`, `resume_from_checkpoint`, `max_steps`,
            `num_train_epochs`).

    Returns:
        A :class:`ResumePlan`. `auto`: finished when the folder has its final adapter and a `metrics.json`
        recording the recipe's target step, with no checkpoint past it; else the newest usable checkpoint.
        A checkpoint folder: that one. `never`: train from the start (the earlier run's records are stale).

    Raises:
        RunStateError: the recipe's `max_steps` (or epochs) is below what the folder already trained; the
            checkpoints are all damaged; the checkpoint folder given is damaged.
        FileNotFoundError: the checkpoint folder given does not exist.
    """
    output_dir, value = Path(train.output_dir), train.resume_from_checkpoint
    if value == "never":
        stale = [*checkpoints(output_dir)] + [output_dir / n for n in (METRICS, BAD_ROWS) if (output_dir / n).exists()]
        return ResumePlan(stale=stale)
    if value == "auto":
        checkpoint = usable_checkpoint(output_dir)
    else:
        if not Path(value).is_dir():
            raise FileNotFoundError(f"train.resume_from_checkpoint: {value} is not a checkpoint folder")
        problem = checkpoint_problem(value)
        if problem:
            raise RunStateError(f"train.resume_from_checkpoint: {value} is damaged: {problem}")
        checkpoint = value
    state = read_state(checkpoint) if checkpoint else None
    if state:
        _check_target(train, output_dir, state["global_step"], state.get("epoch", 0.0), Path(checkpoint).name)

    metrics = _metrics(output_dir) if value == "auto" else None
    done = (metrics or {}).get("train", {})
    final_step = done.get("global_step", state["global_step"] if state else None)
    if metrics is not None and final_step is not None and _readable(output_dir / ADAPTER):
        _check_target(train, output_dir, final_step, done.get("epoch", 0.0), METRICS)
        newer = state is not None and state["global_step"] > final_step
        if not newer and _target_reached(train, final_step, done if "max_steps" in done else (state or {})):
            return ResumePlan(checkpoint, state, trained=True, finished=metrics)
    trained = state is not None and _target_reached(train, state["global_step"], state)
    return ResumePlan(checkpoint, state, trained=trained)


def finished_message(output_dir: str | os.PathLike, metrics: dict) -> str:
    """What a rerun of a finished run prints: where its results are and how to go on."""
    out, steps = Path(output_dir), metrics.get("train", {}).get("global_step", "?")
    return (f"{out} is a finished run ({steps} steps), left as it is: adapter {out / ADAPTER}, metrics "
            f"{out / METRICS}, model card {out / 'README.md'}. To train on, raise train.max_steps (or "
            f"train.num_train_epochs); to start over, use {START_OVER}.")


def remove_stale(paths: list[Path]) -> None:
    """Deletes an earlier run's checkpoints and records when a run starts over in the same folder (a stale
    `checkpoint-80` would otherwise be resumed, and a stale `metrics.json` read as this run's result)."""
    if paths:
        logger.info("train.resume_from_checkpoint=never: removing the earlier run's %s",
                    ", ".join(p.name for p in paths))
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- bad rows
def append_bad_row(output_dir: str | os.PathLike, row: dict) -> None:
    """Records a row dropped at train time (`source`, `index`, `id`, `error`) in `<output_dir>/bad_rows.jsonl`.

    One short line per `write` in append mode: lines from several processes do not interleave, and the file
    outlives a crash, so a resumed run's count covers the whole run.
    """
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / BAD_ROWS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_bad_rows(output_dir: str | os.PathLike) -> list[dict]:
    """The distinct rows (by source file and row index) in `<output_dir>/bad_rows.jsonl`; [] if none."""
    path, rows = Path(output_dir) / BAD_ROWS, {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            rows.setdefault((row.get("source"), row.get("index")), row)
    return list(rows.values())
