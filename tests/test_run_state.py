"""A run folder across reruns (issue 12): a finished run is left alone, a lower target is refused, checkpoints
appear only when complete and a damaged one is skipped on resume, the loss covers the whole run, a row that
fails at train time is skipped and counted, and the model card names the run and its real epochs.

    pytest tests/test_run_state.py -q

Tiny quickstart runs (tests/conftest.py: `tiny_assets`, TINY_RUN_OVERRIDES) of 1-4 steps each.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN_OVERRIDES, InterruptAfter, Interrupted
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from nvila_ft.train.checkpoints import (
    RunStateError,
    checkpoint_problem,
    latest_checkpoint,
    plan_resume,
    read_state,
    whole_run_loss,
)
from nvila_ft.train.cli import main
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import NvilaTrainer, SupervisedDataset, TrainingRun

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
QUICK = [*TINY_RUN_OVERRIDES, "eval.enabled=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TrainerCallback):
    """The step a `train()` call starts from (after any checkpoint was loaded) and the steps it ran."""

    def __init__(self):
        self.start_step, self.steps = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class RecordingRun(TrainingRun):
    def __init__(self, recipe, callbacks):
        super().__init__(recipe)
        self.callbacks = callbacks

    def build_trainer(self):
        trainer = super().build_trainer()
        for callback in self.callbacks:
            trainer.add_callback(callback)
        return trainer


def paths(assets, out) -> list[str]:
    return [f"model.path={assets.model}", f"data.path={assets.data}", f"train.output_dir={out}"]


def train(assets, out, *overrides: str, callbacks=()) -> RecordingRun:
    run = RecordingRun(load_recipe(QUICKSTART, [*paths(assets, out), *QUICK, *overrides]), list(callbacks))
    run.run()
    return run


def cli(cwd: Path, *args: str) -> SimpleNamespace:
    """`python -m nvila_ft.train quickstart.yaml ...` run in `cwd`: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(QUICKSTART), *args])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- finished runs
@pytest.fixture(scope="module")
def finished(tiny_assets, tmp_path_factory) -> SimpleNamespace:
    """A 2-step run through the command line, in its own working folder, with `runs/demo/output` as typed."""
    root = tmp_path_factory.mktemp("finished")
    args = [f"model.path={tiny_assets.model}", f"data.path={tiny_assets.data}", "train.output_dir=runs/demo/output",
            *TINY_RUN_OVERRIDES, "train.max_steps=2", "train.save_steps=1", "data.max_train_samples=8",
            "eval.max_samples=2"]
    first = cli(root, *args)
    assert first.code == 0, first.err
    return SimpleNamespace(root=root, out=root / "runs" / "demo" / "output", args=args, first=first)


def test_rerun_of_a_finished_run_changes_nothing_and_says_where_its_results_are(finished):
    before = snapshot(finished.out)
    again = cli(finished.root, *finished.args)

    assert again.code == 0, again.err
    assert snapshot(finished.out) == before  # nothing trained, nothing rewritten
    assert "finished run (2 steps)" in again.out
    assert "runs/demo/output/metrics.json" in again.out and "runs/demo/output/adapter_model.safetensors" in again.out
    assert "train.resume_from_checkpoint=never" in again.out


def test_lower_max_steps_is_an_error_naming_both_numbers(finished):
    before = snapshot(finished.out)
    lower = cli(finished.root, *finished.args, "train.max_steps=1")

    assert lower.code == 2
    error = [line for line in lower.err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in lower.err
    assert "train.max_steps=1 is below the 2 steps already trained" in error[0] and "runs/demo/output" in error[0]
    assert snapshot(finished.out) == before


def test_training_ends_with_one_line_naming_adapter_metrics_and_card(finished):
    last = finished.first.out.strip().splitlines()[-1]
    out = "runs/demo/output"
    assert last == f"adapter {out}/adapter_model.safetensors, metrics {out}/metrics.json, model card {out}/README.md"


def test_model_card_has_a_title_relative_paths_and_the_epochs_done(finished):
    card = (finished.out / "README.md").read_text()

    assert "\n# demo: tiny-nvila fine-tuned with nvila-ft\n" in card  # the title, after the Hub metadata block
    assert 'load_model("runs/demo/output")' in card
    assert "python -m nvila_ft.merge runs/demo/output runs/demo/output-merged" in card
    use_it = card[card.index("## Use it"):card.index("## Files")]
    assert str(finished.root) not in use_it  # no absolute path of this machine
    # 2 steps x batch 2 over 8 training rows: half an epoch, where the recipe says 1 (max_steps wins)
    assert "Optimizer steps: 2 (0.5 epochs of the training split; recipe: num_train_epochs 1, max_steps 2)" in card


def test_raising_max_steps_continues_and_never_starts_over(finished, tiny_assets, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished.out, out)
    more = Recorder()
    train(tiny_assets, out, "train.max_steps=3", "train.save_steps=1", "data.max_train_samples=8", callbacks=[more])
    assert (more.start_step, more.steps) == (2, [3])
    assert json.loads((out / "metrics.json").read_text())["train"]["global_step"] == 3

    fresh = Recorder()
    train(tiny_assets, out, "train.max_steps=1", "train.resume_from_checkpoint=never", callbacks=[fresh])
    assert (fresh.start_step, fresh.steps) == (0, [1])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the earlier run's are gone
    assert json.loads((out / "metrics.json").read_text())["train"]["global_step"] == 1


def test_a_run_killed_after_its_last_step_finishes_without_training(finished, tiny_assets, tmp_path):
    # Trained to max_steps and checkpointed, killed before metrics.json: the rerun saves, evaluates and writes
    # metrics from checkpoint-2 without a step more (Trainer.train alone would run step 3).
    out = tmp_path / "copy"
    shutil.copytree(finished.out, out)
    (out / "metrics.json").unlink()
    (out / "adapter_model.safetensors").unlink()
    recorder = Recorder()
    run = train(tiny_assets, out, "train.max_steps=2", "train.save_steps=1", "data.max_train_samples=8",
                callbacks=[recorder])

    assert recorder.start_step is None and recorder.steps == []  # train() never ran
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2 and metrics["train"]["epoch"] == 0.5
    expected = json.loads((finished.out / "metrics.json").read_text())["train"]["train_loss"]
    assert metrics["train"]["train_loss"] == pytest.approx(expected)
    saved, at_2 = (load_file(f / "adapter_model.safetensors") for f in (out, out / "checkpoint-2"))
    assert set(saved) == set(at_2) and all(torch.equal(saved[k], at_2[k]) for k in saved)
    assert run.trainer.state.global_step == 2


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_folder_appears_only_when_complete(tiny_assets, tmp_path, monkeypatch):
    def killed(self, output_dir):  # the save dies after the adapter, optimizer and scheduler were written
        raise Interrupted("killed while saving")

    monkeypatch.setattr(Trainer, "_save_rng_state", killed)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny_assets, out, "train.max_steps=2", "train.save_steps=1")

    assert not list(out.glob("checkpoint-*"))  # nothing that looks like a checkpoint
    assert latest_checkpoint(out) is None
    assert (out / ".checkpoint-staging" / "checkpoint-1" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def fell_back(tiny_assets, tmp_path_factory) -> SimpleNamespace:
    """Killed after step 3 (checkpoints 1 and 2), checkpoint-2's adapter truncated, then resumed. Logging every 3
    steps: checkpoint steps 1 and 2 are logged only because they are saved."""
    out = tmp_path_factory.mktemp("fallback") / "run"
    overrides = ["train.max_steps=4", "train.save_steps=1", "train.logging_steps=3"]
    with pytest.raises(Interrupted):
        train(tiny_assets, out, *overrides, callbacks=[InterruptAfter(3)])
    after_crash = sorted(p.name for p in out.glob("checkpoint-*"))
    state_at_1 = read_state(out / "checkpoint-1")
    adapter = out / "checkpoint-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])

    recorder = Recorder()
    handler = _ListHandler()
    logging.getLogger("nvila_ft.train").addHandler(handler)
    try:
        run = train(tiny_assets, out, *overrides, callbacks=[recorder])
    finally:
        logging.getLogger("nvila_ft.train").removeHandler(handler)
    return SimpleNamespace(out=out, run=run, recorder=recorder, after_crash=after_crash, state_at_1=state_at_1,
                           warnings=[r.getMessage() for r in handler.records if r.levelno == logging.WARNING])


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_resume_skips_a_damaged_checkpoint_with_a_warning_naming_it(fell_back):
    assert fell_back.after_crash == ["checkpoint-1", "checkpoint-2"]
    assert (fell_back.recorder.start_step, fell_back.recorder.steps) == (1, [2, 3, 4])
    warning = next(w for w in fell_back.warnings if "damaged" in w)
    assert "checkpoint-2" in warning and "adapter_model.safetensors" in warning
    assert fell_back.run.trainer.state.global_step == 4
    assert sorted(p.name for p in fell_back.out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not (fell_back.out / ".checkpoint-staging").exists()


def test_checkpoint_history_covers_every_step_before_it(fell_back):
    # logging_steps 3, checkpoints every step: the loss of step 1 is in checkpoint-1's history, so a run resumed
    # from it still knows the loss of every step (Trainer alone would log step 3 only).
    assert [h["step"] for h in fell_back.state_at_1["log_history"] if "loss" in h] == [1]
    history = fell_back.run.trainer.state.log_history
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    metrics = json.loads((fell_back.out / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] == pytest.approx(sum(h["loss"] for h in history if "loss" in h) / 4)


@pytest.mark.parametrize("damage, name", [
    ("truncate", "adapter_model.safetensors"),
    ("truncate", "optimizer.pt"),
    ("truncate", "scheduler.pt"),
    ("truncate", "rng_state.pth"),
    ("garble", "trainer_state.json"),
    ("garble", "adapter_config.json"),
    ("delete", "trainer_state.json"),
])
def test_checkpoint_problem_names_the_damaged_file(fell_back, tmp_path, damage, name):
    good = fell_back.out / "checkpoint-4"
    assert checkpoint_problem(good) is None
    bad = tmp_path / "checkpoint-4"
    shutil.copytree(good, bad)
    path = bad / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    elif damage == "garble":
        path.write_text('{"global_step": ')
    else:
        path.unlink()

    assert checkpoint_problem(bad).startswith(f"{name}: ")


def test_a_damaged_checkpoint_given_by_path_or_no_usable_one_is_a_user_error(fell_back, tmp_path):
    bad = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(fell_back.out / "checkpoint-4", bad)
    (bad / "optimizer.pt").write_bytes(b"")
    recipe = load_recipe(QUICKSTART, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=8"])
    with pytest.raises(RunStateError, match="no usable checkpoint.*checkpoint-4 \\(optimizer.pt"):
        plan_resume(recipe.train)
    explicit = load_recipe(QUICKSTART, [f"train.output_dir={tmp_path / 'other'}", f"train.resume_from_checkpoint={bad}"])
    with pytest.raises(RunStateError, match="damaged: optimizer.pt"):
        plan_resume(explicit.train)


@pytest.mark.parametrize("overrides, expected", [
    (["train.max_steps=4"], "finished"),
    (["train.max_steps=6"], "resume"),
    (["train.max_steps=3"], "max_steps=3 is below the 4 steps already trained"),
    (["train.max_steps=-1", "train.num_train_epochs=2"], "finished"),  # 4 steps x batch 2 over 4 rows: 2 epochs
    (["train.max_steps=-1", "train.num_train_epochs=3"], "resume"),
    (["train.max_steps=-1", "train.num_train_epochs=1"], "num_train_epochs=1 is below the 2 epochs"),
    (["train.max_steps=4", "train.resume_from_checkpoint=never"], "start"),
])
def test_resume_plan_per_target(fell_back, tmp_path, overrides, expected):
    out = tmp_path / "run"
    shutil.copytree(fell_back.out / "checkpoint-4", out / "checkpoint-4")
    shutil.copy(fell_back.out / "adapter_model.safetensors", out)
    shutil.copy(fell_back.out / "metrics.json", out)
    train_cfg = load_recipe(QUICKSTART, [f"train.output_dir={out}", *overrides]).train
    if expected.startswith(("max_steps", "num_train")):
        with pytest.raises(RunStateError, match=expected):
            plan_resume(train_cfg)
        return
    plan = plan_resume(train_cfg)
    assert (plan.finished is not None) == (expected == "finished")
    assert plan.checkpoint == (None if expected == "start" else str(out / "checkpoint-4"))
    if expected == "start":
        assert sorted(p.name for p in plan.stale) == ["checkpoint-4", "metrics.json"]
    (out / "metrics.json").unlink()  # killed before the end of the run: trained, not finished
    if expected == "finished":
        plan = plan_resume(train_cfg)
        assert plan.finished is None and plan.trained and plan.checkpoint == str(out / "checkpoint-4")


def test_whole_run_loss_weights_each_logged_mean_by_its_steps():
    history = [{"loss": 3.0, "step": 2}, {"eval_accuracy": 0.5, "step": 2}, {"loss": 1.0, "step": 3},
               {"train_loss": 9.0, "step": 3}]
    assert whole_run_loss(history) == pytest.approx((3.0 * 2 + 1.0) / 3)
    assert whole_run_loss([]) is None


# ---------------------------------------------------------------------------------------------- bad rows
def data_with_a_missing_image(tiny_assets, folder: Path, rows: int) -> Path:
    """The first `rows` quickstart rows in `folder`, row 1's image gone: found bad only when encoded (preflight
    off)."""
    kept = json.loads((Path(tiny_assets.data) / "train.json").read_text())[:rows]
    kept[1]["image"] = "images/gone.png"
    shutil.copytree(tiny_assets.data, folder)
    (folder / "train.json").write_text(json.dumps(kept))
    return folder


def test_a_row_that_fails_at_train_time_is_skipped_named_and_counted(tiny_assets, tmp_path, monkeypatch, caplog):
    data = data_with_a_missing_image(tiny_assets, tmp_path / "data", rows=3)
    batch_sizes = []
    original = NvilaTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        batch_sizes.append(inputs["input_ids"].shape[0])
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(NvilaTrainer, "training_step", recording)
    out = tmp_path / "run"
    recipe = load_recipe(QUICKSTART, [f"model.path={tiny_assets.model}", f"data.path={data}",
                                      f"train.output_dir={out}", *QUICK, "data.preflight=false",
                                      "train.per_device_train_batch_size=1", "train.max_steps=3"])
    with caplog.at_level(logging.ERROR, logger="nvila_ft.train"):
        metrics = TrainingRun(recipe).run()

    assert sorted(batch_sizes) == [0, 1, 1]  # the bad row's batch is empty: not filled with another row
    assert metrics["bad_rows_in_training"] == 1 and metrics["train"]["global_step"] == 3
    assert json.loads((out / "metrics.json").read_text())["bad_rows_in_training"] == 1
    logged = [r.getMessage() for r in caplog.records if "skipping row" in r.getMessage()]
    assert len(logged) == 1 and "train.json[1]" in logged[0] and "gone.png" in logged[0]
    [row] = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert row["index"] == 1 and row["source"].endswith("train.json") and "gone.png" in row["error"]


def test_a_bad_row_in_a_shared_prefix_step_is_left_out_not_replaced(tiny_assets, tmp_path, monkeypatch):
    # Shared prefixes (data.share_prefix, on: the quickstart rows repeat their images) train one step per data
    # item; a row that fails there is recorded like any bad row and its step trains the other answers only.
    data = data_with_a_missing_image(tiny_assets, tmp_path / "data", rows=4)
    answers = []
    original = NvilaTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        parts = inputs["micro_batches"]  # the grouped path
        answers.append(sum(len({tuple(r) for r in b["segment_ids"][b["labels"] != -100].tolist()}) for b in parts))
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(NvilaTrainer, "training_step", recording)
    out = tmp_path / "run"
    recipe = load_recipe(QUICKSTART, [f"model.path={tiny_assets.model}", f"data.path={data}",
                                      f"train.output_dir={out}", *QUICK, "data.preflight=false",
                                      "data.share_prefix=true", "train.per_device_train_batch_size=2",
                                      "train.gradient_accumulation_steps=1", "train.max_steps=2"])
    metrics = TrainingRun(recipe).run()

    assert sorted(answers) == [1, 2]  # 4 rows, 2 answers a step; the bad row's step trains its other row only
    assert metrics["bad_rows_in_training"] == 1 and metrics["train"]["global_step"] == 2
    [row] = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert row["index"] == 1 and "gone.png" in row["error"]


def test_collate_drops_bad_rows_and_passes_their_records_on(fell_back):
    sample = fell_back.run.train_samples[0]
    dataset = SupervisedDataset([sample, {**sample, "images": ["/nope.png"], "source": "t.json", "index": 7}],
                                fell_back.run.processor)
    good, bad = dataset[0], dataset[1]
    batch = dataset.collate([good, bad])
    assert batch["input_ids"].shape[0] == 1 and [r["index"] for r in batch["bad_rows"]] == [7]
    empty = dataset.collate([bad])
    assert empty["input_ids"].shape[0] == 0 and empty["labels"].dtype == torch.long
