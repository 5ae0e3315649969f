"""`loss_curve.png` of a run: train loss, eval loss and the task metric against optimizer steps.

    python -m nvila_ft.train.curves runs/quickstart/output      # redraw from trainer_state.json

Drawn from the Trainer's `state.log_history` (the same numbers as TensorBoard and the log lines) during
training at every save and evaluation, and at the end; a resumed run's history starts with the
checkpoint's, so its curve covers the whole run. The plotted points are also stored in the PNG's text
chunk `nvila_ft:series` (JSON), so tools and tests read them back without parsing pixels.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CURVE = "loss_curve.png"
SERIES_KEY = "nvila_ft:series"
# Keys the Trainer logs next to the eval loss that are timings, not results.
_NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_n", "eval_loss")


def curve_series(log_history: list[dict], metric: str | None = None) -> dict[str, list[list[float]]]:
    """The points of the curve: {"train loss": [[step, loss], ...], "eval loss": [...], metric: [...]}.

    Args:
        log_history: `TrainerState.log_history` (dicts with `step` and `loss` / `eval_loss` / `eval_<name>`).
        metric: the task metric to plot (e.g. "overall_accuracy"); None = none. A step logged twice keeps
            its last value (a final evaluation at a step already evaluated).

    Returns:
        Series name -> [[step, value], ...] sorted by step; empty series are left out.
    """
    wanted = {"train loss": "loss", "eval loss": "eval_loss"}
    if metric:
        wanted[f"eval {metric}"] = f"eval_{metric}"
    series: dict[str, dict[int, float]] = {name: {} for name in wanted}
    for entry in log_history:
        for name, key in wanted.items():
            if isinstance(entry.get(key), (int, float)) and "step" in entry:
                series[name][int(entry["step"])] = float(entry[key])
    return {name: [[s, v] for s, v in sorted(points.items())] for name, points in series.items() if points}


def task_metric(log_history: list[dict], preferred: str | None = None) -> str | None:
    """The task metric to plot: `preferred` if the history has it, else the first eval number that is not a
    loss or a timing (None when the run evaluated nothing but the loss)."""
    keys = [k for entry in log_history for k in entry if k.startswith("eval_") and k not in _NOT_METRICS]
    for name in (preferred, "rewards/accuracies"):  # a DPO run (nvila_ft.train.preference): its 0-1 number
        if name and f"eval_{name}" in keys:
            return name
    return keys[0][5:] if keys else None


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike, metric: str | None = None,
                    title: str | None = None) -> dict[str, list[list[float]]]:
    """Draws the curve to `path` (PNG, written atomically) and returns the plotted series.

    Losses (nats per labelled token) on the left axis, the task metric (0-1) on a right axis.

    Args:
        log_history: `TrainerState.log_history`.
        path: the PNG to write.
        metric: task metric to plot next to the losses (see :func:`task_metric`); None = losses only.
        title: the figure title; None = the run folder's last two path parts (e.g. quickstart/output).

    Raises:
        ImportError: matplotlib is not installed (it is a dependency of nvila-ft).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, safe in a training job or a thread
    import matplotlib.pyplot as plt

    series = curve_series(log_history, metric)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        styles = {"train loss": dict(color="tab:blue", lw=1.2), "eval loss": dict(color="tab:orange", marker="o")}
        for name, style in styles.items():
            if name in series:
                steps, values = zip(*series[name])
                ax.plot(steps, values, label=name, **style)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if metric and f"eval {metric}" in series:
            right = ax.twinx()
            steps, values = zip(*series[f"eval {metric}"])
            right.plot(steps, values, color="tab:green", marker="s", ls="--", label=f"eval {metric}")
            right.set_ylabel(metric)
            if all(0 <= v <= 1 for v in values):  # accuracies, ANLS: show the whole 0-1 scale
                right.set_ylim(-0.02, 1.02)
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            ax.legend(handles, labels, loc="upper right", fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title or "/".join(path.resolve().parent.parts[-2:]), fontsize="medium")
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png", metadata={SERIES_KEY: json.dumps(series)})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return series


def read_series(path: str | os.PathLike) -> dict[str, list[list[float]]]:
    """The series stored in a curve PNG by :func:`plot_loss_curve`."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[SERIES_KEY])


def main(argv: list[str] | None = None) -> int:
    """Redraws `<run>/loss_curve.png` from the newest `trainer_state.json` in the run folder."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nvila_ft.train.curves RUN_FOLDER", file=sys.stderr)
        return 2
    run = Path(argv[0])
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    state_file = run / "trainer_state.json" if (run / "trainer_state.json").is_file() else None
    state_file = state_file or (states[-1] if states else None)
    if state_file is None:
        print(f"{run}: no trainer_state.json here or in a checkpoint-* folder", file=sys.stderr)
        return 2
    history = json.loads(state_file.read_text())["log_history"]
    preferred = None
    if (run / "recipe.yaml").is_file():  # the headline number of the run's eval.metric (e.g. overall_accuracy)
        import yaml

        from nvila_ft.metrics import PRIMARY

        preferred = PRIMARY.get((yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("eval", {}).get("metric"))
    plot_loss_curve(history, run / CURVE, task_metric(history, preferred))
    print(run / CURVE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
