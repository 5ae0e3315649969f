"""The scripts in examples/ run as written, in their offline `--tiny` mode, and do what they say.

    pytest tests/test_examples.py

Each runs in a subprocess from the repository root (as a user would), sharing one `--out` folder so the tiny
checkpoint, data and 3-step run are built once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


def run_example(name: str, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TENSORBOARD_LOGGING_DIR": ""}
    env.pop("TENSORBOARD_LOGGING_DIR")
    done = subprocess.run([sys.executable, f"examples/{name}.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_custom_dataset_is_under_30_lines_of_user_code():
    source = (ROOT / "examples" / "custom_dataset.py").read_text()
    user = source.split('if __name__ == "__main__":')[0].split('"""', 2)[2]  # after the docstring, before CLI
    lines = [line for line in user.splitlines() if line.strip() and not line.strip().startswith(("#", '"""'))]
    assert len(lines) < 30, "\n".join(lines)


@pytest.mark.slow
def test_custom_dataset_trains_on_a_dataset_object_with_its_own_metric(out):
    stdout = run_example("custom_dataset", out)
    metrics = json.loads((out / "custom" / "metrics.json").read_text())
    # the metric's numbers, the eval loss and the step the final model was evaluated at
    assert set(metrics["eval"]) == {"first_word_accuracy", "n", "loss", "step"} and metrics["eval"]["n"] == 4
    assert metrics["train_samples"] == 4  # data.max_train_samples of the tiny overrides, from the CSV
    assert "first_word_accuracy" in stdout
    assert "first_word_accuracy" in (out / "custom" / "README.md").read_text()  # the model card names it


@pytest.mark.slow
def test_batch_inference_writes_one_row_per_sample_and_resumes(out):
    stdout = run_example("batch_inference", out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == 8
    assert "8 written, 0 already done" in stdout
    assert "0 written, 8 already done" in run_example("batch_inference", out)


@pytest.mark.slow
def test_merge_and_reload_matches_the_adapter_model(out):
    stdout = run_example("merge_and_reload", out)
    gap = float(stdout.split("adapter model: ")[1].split()[0])
    assert gap < 1e-4
    assert (out / "merged" / "llm" / "model.safetensors").is_file()


@pytest.mark.slow
def test_evaluate_run_prints_metrics(out):
    stdout = run_example("evaluate_run", out)
    metrics = json.loads(stdout[stdout.index("{"):])
    assert metrics["n"] == 8 and metrics["n_closed"] + metrics["n_open"] == 8
