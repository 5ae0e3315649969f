"""Watching a run: generated-answer metrics inside the Trainer's evaluation, the live loss curve, the best
checkpoint loaded back whole, our model card in what `push_to_hub` uploads.

Used by :mod:`nvila_ft.train.trainer`; all through transformers' own mechanisms (eval_strategy,
load_best_model_at_end, metric_for_best_model, EarlyStoppingCallback, push_to_hub).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from nvila_ft.train.curves import CURVE, plot_loss_curve, task_metric

logger = logging.getLogger("nvila_ft.train")


class WatchedTrainer(Trainer):
    """`Trainer` whose evaluation also scores generated answers, and whose model card is nvila-ft's.

    Attributes:
        answer_metrics: called with no argument at each evaluation (model in eval mode); returns the
            generated-answer metrics (e.g. {"overall_accuracy": 0.5, "n": 4}). None = eval loss only.
        write_card: writes the run folder's model card; None = the Trainer's generic card.
    """

    answer_metrics: Callable[[], dict] | None = None
    write_card: Callable[[], object] | None = None

    def evaluation_loop(self, *args, **kwargs):
        # Why here: the answer metrics must join the eval loss before the Trainer logs them (one log line,
        # TensorBoard, log_history) and before it picks the best checkpoint with metric_for_best_model.
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.answer_metrics is not None and prefix == "eval":
            for key, value in self.answer_metrics().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    output.metrics[f"{prefix}_{key}"] = value
        return output

    def create_model_card(self, *args, **kwargs) -> None:
        # push_to_hub writes a card just before uploading; ours (base_model metadata, recipe, metrics), not
        # the Trainer's generic one.
        if self.write_card is not None:
            self.write_card()
        else:
            super().create_model_card(*args, **kwargs)


class LossCurve(TrainerCallback):
    """Redraws `<output_dir>/loss_curve.png` at every save, evaluation and at the end of training, so a running
    job can be watched (open the file, or the preview app)."""

    def __init__(self, output_dir: str | Path, metric: str | None = None):
        self.path, self.metric = Path(output_dir) / CURVE, metric

    def draw(self, state) -> None:
        """Draws the curve of `state.log_history` (process zero only); a failure is logged, never raised: a
        plot must not stop training or lose a finished run's results."""
        if not state.is_world_process_zero:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            plot_loss_curve(state.log_history, self.path, task_metric(state.log_history, self.metric))
        except ImportError as err:
            logger.warning("no %s: %s (pip install matplotlib)", self.path.name, err)
        except Exception as err:  # noqa: BLE001 - see the docstring
            logger.warning("could not draw %s: %s", self.path, err)

    def on_save(self, args, state, control, **kwargs):
        self.draw(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self.draw(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.draw(state)


def summary_line(state, metrics: dict, seconds: float, output_dir: str | Path, metric: str | None) -> str:
    """The last line a run prints: steps, time, train and eval loss, the task metric, the best checkpoint and
    where the results are.

    Args:
        state: the Trainer's `TrainerState` at the end; metrics: what `metrics.json` holds; seconds: wall time
        of training + final evaluation; output_dir: the run folder; metric: the task metric to show.
    """
    parts = [f"done: {state.global_step} steps in {seconds:.0f} s"]
    if isinstance(metrics.get("train", {}).get("train_loss"), float):
        parts.append(f"train loss {metrics['train']['train_loss']:.4f}")
    ev = metrics.get("eval", {})
    if isinstance(ev.get("loss"), float):
        parts.append(f"eval loss {ev['loss']:.4f}")
    if metric and isinstance(ev.get(metric), float):
        parts.append(f"{metric} {ev[metric]:.4f}")
    best = metrics.get("best")
    if best:
        parts.append(f"best {best['checkpoint']} ({best['metric']} {best['value']:.4f})")
    out = Path(output_dir)
    answers = ", predictions_final.jsonl" if (out / "predictions_final.jsonl").is_file() else ""  # none for DPO
    parts.append(f"results in {out}/: README.md, metrics.json, {CURVE}{answers} "
                 f"(tensorboard --logdir {out / 'logs'})")
    return " | ".join(parts)


class DenseLog(ProgressCallback):
    """Progress bar plus one dense line per logging step: `step | loss | lr | samples/s | mem`.

    `rows_per_item`: training rows per data-loader item (a shared-prefix / packed step holds several).
    """

    def __init__(self, rows_per_item: int = 1):
        super().__init__()
        self.rows_per_item = rows_per_item

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            numbers = [f"{k[5:]} {v:.4f}" for k, v in logs.items() if k.startswith("eval_") and isinstance(v, float)
                       and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")]
            self._write(f"eval step {state.global_step} | " + " | ".join(numbers))
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if torch.cuda.is_available():
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GB cuda"
        else:
            mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB rss"
        elapsed = time.time() - getattr(self, "_t0", time.time())
        self._t0 = time.time()
        done = state.global_step - getattr(self, "_last_step", 0)
        self._last_step = state.global_step
        rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.rows_per_item
        rate = done * rows * args.world_size / max(elapsed, 1e-9)  # all ranks
        dpo = "".join(f" | {k.split('/')[1]} {logs[k]:.3f}" for k in ("rewards/margins", "rewards/accuracies")
                      if k in logs)  # preference runs (nvila_ft.train.preference)
        self._write(f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f}{dpo} | "
                    f"lr {logs.get('learning_rate', 0):.2e} | {rate:.2f} samples/s | mem {mem}")

    def _write(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._t0, self._last_step = time.time(), state.global_step
