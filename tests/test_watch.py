"""Watching a run: eval loss, periodic evaluation, best checkpoint, early stopping, loss curve, model card, Hub.

    pytest tests/test_watch.py -q

Short real runs of the quickstart recipe on a tiny seeded NVILA (as tests/test_train.py): 4 training rows at
batch 2, one 448 px tile per image, 2 eval rows answered in at most 4 tokens. Where a test needs the task
metric to go up and down on cue, `exact_match` is replaced by a scripted scorer (the Trainer's mechanisms are
under test, not the tiny model's answers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from nvila_ft import metrics as metrics_module
from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.model_card import hub_base_model, write_model_card
from nvila_ft.train.cli import main
from nvila_ft.train.curves import CURVE, curve_series, plot_loss_curve, read_series, task_metric
from nvila_ft.train.curves import main as curves_main
from nvila_ft.train.recipe import RecipeError
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun
from nvila_ft.train.tuning import base_model

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SMALL = [
    "train.lr=1e-3",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.logging_steps=1",
    "train.seed=0",
    "train.report_to=[]",
    "data.max_train_samples=4",
    "data.max_eval_samples=3",
    "model.image_aspect_ratio=resize",
    "eval.max_samples=2",
    "eval.max_new_tokens=4",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    from nvila_ft.demo.medical import build_quickstart_dataset
    from nvila_ft.demo.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("watch")
    return SimpleNamespace(root=root, model=build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0),
                           data=build_quickstart_dataset(root / "data"))


def recipe(assets, out: Path, *overrides: str):
    paths = [f"model.path={assets.model}", f"data.path={assets.data}", f"train.output_dir={out}"]
    return load_recipe(QUICKSTART, [*paths, *SMALL, *overrides])


def scripted_exact_match(monkeypatch, scores: list[float]) -> list[float]:
    """`exact_match` returns these scores in turn, one per evaluation of the 2 eval rows."""
    left = list(scores)

    def scorer(predictions, references, answer_types=None):
        if len(predictions) == 1:  # recipe validation probes the metric's keys with one row
            return {"exact_match": 0.0, "n": 1}
        return {"exact_match": left.pop(0), "n": len(predictions)}

    monkeypatch.setitem(metrics_module.METRICS, "exact_match", scorer)
    return left


def eval_entries(history: list[dict]) -> list[dict]:
    return [h for h in history if "eval_loss" in h]


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------- eval loss
def test_eval_loss_equals_a_hand_computation(assets, tmp_path):
    # The Trainer's eval loss runs the eval-mode forward (full LLM head + transformers' ForCausalLMLoss), the
    # training loss the label-only head (modeling._label_only_loss): both must be the mean cross-entropy
    # over the labelled (answer) tokens of the batch, computed here by hand from the logits.
    run = TrainingRun(recipe(assets, tmp_path / "out", "lora.dropout=0", "train.per_device_eval_batch_size=2",
                             "data.max_eval_samples=2"))
    run.load_model()
    run.load_data()
    trainer = run.build_trainer()
    trainer.answer_metrics = None  # the loss only
    eval_loss = trainer.evaluate()["eval_loss"]

    batch = run.processor.collate([trainer.eval_dataset[i] for i in range(2)])  # one eval batch of 2 rows
    model = base_model(run.model)
    with torch.no_grad():
        embeds, mask, labels = model.embed(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                           batch.get("block_sizes"), batch["labels"])
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits  # (2, L', vocab), every position
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        by_hand = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])  # mean over labelled tokens
        run.model.train()
        training_loss = run.model(**batch).loss  # what the optimizer minimises on the same rows
    assert 0 < keep.sum() < keep.numel()  # prompt and media positions carry no loss
    assert eval_loss == pytest.approx(by_hand.item(), rel=1e-5)
    assert training_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- periodic eval
@pytest.fixture(scope="module")
def periodic(assets) -> SimpleNamespace:
    """8 steps, evaluation every 3: at 3, 6 and (the last step) 8."""
    out = assets.root / "periodic"
    run = TrainingRun(recipe(assets, out, "train.max_steps=8", "eval.eval_steps=3", "train.save_steps=4"))
    metrics = run.run()
    return SimpleNamespace(run=run, metrics=metrics, out=out, history=run.trainer.state.log_history)


def test_periodic_eval_runs_at_the_right_steps(periodic):
    evals = eval_entries(periodic.history)
    assert [e["step"] for e in evals] == [3, 6, 8]  # every eval.eval_steps, and the last step once
    for e in evals:
        assert e["eval_loss"] > 0 and 0 <= e["eval_overall_accuracy"] <= 1 and e["eval_n"] == 2
    for step in (3, 6, 8):
        rows = (periodic.out / f"predictions_step{step}.jsonl").read_text().splitlines()
        assert len(rows) == 2  # eval.max_samples answered by generation
    # The last step's evaluation is the final one: reused, not run again.
    assert (periodic.out / "predictions_final.jsonl").read_bytes() == (
        periodic.out / "predictions_step8.jsonl").read_bytes()
    saved = json.loads((periodic.out / "metrics.json").read_text())["eval"]
    assert saved["step"] == 8 and saved["loss"] == evals[-1]["eval_loss"]
    assert saved["overall_accuracy"] == evals[-1]["eval_overall_accuracy"]
    # The eval loss covers all data.max_eval_samples rows (3), generation the first eval.max_samples (2).
    assert len(periodic.run.trainer.eval_dataset) == 3 and len(periodic.run.eval_samples) == 2


def test_eval_loss_reaches_trainer_state_and_the_run_folder(periodic):
    state = json.loads((periodic.out / "trainer_state.json").read_text())
    assert eval_entries(state["log_history"]) == eval_entries(periodic.history)


def test_loss_curve_has_every_logged_point(periodic):
    series = read_series(periodic.out / CURVE)
    history = json.loads((periodic.out / "trainer_state.json").read_text())["log_history"]
    assert [s for s, _ in series["train loss"]] == [h["step"] for h in history if "loss" in h] == list(range(1, 9))
    assert series["eval loss"] == [[e["step"], e["eval_loss"]] for e in eval_entries(history)]
    assert [s for s, _ in series["eval overall_accuracy"]] == [3, 6, 8]


def test_model_card_has_hub_metadata(periodic, tmp_path):
    card = ModelCard.load(periodic.out / "README.md")
    saved = json.loads((periodic.out / "metrics.json").read_text())["eval"]
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert {"nvila", "lora"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["overall_accuracy"] == saved["overall_accuracy"] and results["loss"] == saved["loss"]
    # A local base folder is not a Hub id: the card names it in the text, not as base_model.
    assert card.data.base_model is None and str(periodic.run.recipe.model.path) in card.text
    assert f"![loss curve]({CURVE})" in card.text

    # The same run trained from a Hub checkpoint names it as base_model, an adapter of it.
    moved = tmp_path / "from-hub"
    shutil.copytree(periodic.out, moved, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    text = (moved / "recipe.yaml").read_text().replace(str(periodic.run.recipe.model.path),
                                                         "Efficient-Large-Model/NVILA-Lite-2B")
    (moved / "recipe.yaml").write_text(text)
    write_model_card(moved)
    card = ModelCard.load(moved / "README.md")
    assert card.data.base_model == "Efficient-Large-Model/NVILA-Lite-2B"
    assert card.data.to_dict()["base_model_relation"] == "adapter"


def test_hub_base_model_from_an_id_or_a_cache_snapshot(tmp_path):
    assert hub_base_model("Efficient-Large-Model/NVILA-8B") == "Efficient-Large-Model/NVILA-8B"
    snapshot = "/cache/hub/models--Efficient-Large-Model--NVILA-Lite-2B/snapshots/0123abc"
    assert hub_base_model(snapshot) == "Efficient-Large-Model/NVILA-Lite-2B"
    assert hub_base_model(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------- best / early stop
def test_best_checkpoint_is_kept_and_loaded(assets, tmp_path, monkeypatch):
    out = tmp_path / "best"
    r = recipe(assets, out, "train.max_steps=6", "eval.eval_steps=2", "train.save_steps=2", "eval.metric=exact_match",
               "train.load_best_model_at_end=true", "train.metric_for_best_model=exact_match",
               "train.save_total_limit=1")
    scripted_exact_match(monkeypatch, [0.2, 0.9, 0.1])  # evaluations at steps 2, 4, 6: the best is step 4
    run = TrainingRun(r)
    metrics = run.run()

    assert run.trainer.state.global_step == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # the limit kept the best
    best = out / "checkpoint-4"
    # The run folder holds the best checkpoint's weights, every file of them (adapter and the rest).
    weights = sorted(p.name for p in best.glob("*.safetensors"))
    assert "adapter_model.safetensors" in weights
    for name in weights:
        assert tensors_equal(out / name, best / name), name
    # ...and so does the model in memory (its final evaluation is the best one's).
    assert metrics["best"] == {"checkpoint": "checkpoint-4", "metric": "eval_exact_match", "value": 0.9}
    assert metrics["eval"]["step"] == 4 and metrics["eval"]["exact_match"] == 0.9
    assert (out / "predictions_final.jsonl").read_bytes() == (out / "predictions_step4.jsonl").read_bytes()
    in_memory = get_peft_model_state_dict(run.model)
    saved = load_file(best / "adapter_model.safetensors")
    assert in_memory.keys() == saved.keys() and all(torch.equal(in_memory[k], saved[k]) for k in saved)


def test_early_stopping_stops(assets, tmp_path, monkeypatch):
    out = tmp_path / "early"
    r = recipe(assets, out, "train.max_steps=12", "eval.eval_steps=2", "train.save_steps=2", "eval.metric=exact_match",
               "train.load_best_model_at_end=true", "train.metric_for_best_model=exact_match",
               "train.early_stopping_patience=2")
    left = scripted_exact_match(monkeypatch, [0.5, 0.4, 0.5, 0.9, 0.9, 0.9])
    run = TrainingRun(r)
    metrics = run.run()

    # Step 2 is best; 4 and 6 do not beat it (equal is no improvement): two in a row, stop after step 6.
    assert run.trainer.state.global_step == 6
    assert [e["step"] for e in eval_entries(run.trainer.state.log_history)] == [2, 4, 6]
    assert len(left) == 3  # no evaluation after stopping
    assert metrics["best"]["checkpoint"] == "checkpoint-2" and metrics["eval"]["step"] == 2


# ---------------------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.load_best_model_at_end=true", "eval.eval_steps=null"], "eval.eval_steps"),
        (["train.load_best_model_at_end=true", "eval.eval_steps=3", "train.save_steps=4"], "multiple of eval.eval_steps"),
        (["train.load_best_model_at_end=true", "eval.eval_steps=2", "train.metric_for_best_model=acc"],
         "overall_accuracy"),
        (["train.early_stopping_patience=2"], "load_best_model_at_end"),
        (["train.report_to=[wandbb]"], "unknown tracker 'wandbb'"),
    ],
)
def test_recipe_refuses_inconsistent_watch_settings(assets, tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe(assets, tmp_path, *overrides)


def test_report_to_names_a_missing_package_at_load_time(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.chdir(tmp_path)  # the quickstart recipe would bootstrap runs/quickstart here
    assert main([str(QUICKSTART), "train.report_to=[tensorboard,wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wandb" in err and "pip install wandb" in err
    assert list(tmp_path.iterdir()) == []  # nothing built, no weights loaded

    # Installed (here: found), it is accepted and reaches the Trainer's report_to.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    r = load_recipe(QUICKSTART, ["train.report_to=[wandb]"])
    assert r.train.report_to == ["wandb"]


def test_push_to_hub_uploads_the_run_folder_with_our_card(assets, tmp_path, monkeypatch):
    import transformers.trainer

    calls = []

    class FakeHub:  # stands in for the Hub: no network in tests
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            card = ModelCard.load(Path(folder_path) / "README.md")
            calls.append(("upload_folder", repo_id, folder_path, card.data.library_name, kwargs["ignore_patterns"],
                          sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHub())
    out = tmp_path / "pushed"
    run = TrainingRun(recipe(assets, out, "train.max_steps=1", "eval.enabled=false", "train.push_to_hub=true",
                             "train.hub_model_id=me/nvila-medical"))
    run.run()

    assert calls[0] == ("create_repo", "me/nvila-medical")
    _, repo, folder, library, ignore, files = calls[-1]
    assert (repo, folder, library) == ("me/nvila-medical", str(out), "peft")  # our card, not the Trainer's
    assert "checkpoint-*" in ignore
    assert {"adapter_model.safetensors", "README.md", CURVE, "metrics.json", "recipe.yaml"} <= set(files)


def test_resumed_run_curve_covers_the_whole_run(assets, tmp_path):
    out = tmp_path / "resumed"
    TrainingRun(recipe(assets, out, "train.max_steps=4", "train.save_steps=2", "eval.enabled=false")).run()
    assert [s for s, _ in read_series(out / CURVE)["train loss"]] == [1, 2, 3, 4]
    run = TrainingRun(recipe(assets, out, "train.max_steps=6", "train.save_steps=2", "eval.enabled=false"))
    run.run()  # resumes from checkpoint-4 (train.resume_from_checkpoint=auto)
    assert run.trainer.state.global_step == 6
    assert [s for s, _ in read_series(out / CURVE)["train loss"]] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- curve
HISTORY = [
    {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.8, "eval_anls": 0.1,
                                                          "eval_runtime": 1.0, "eval_n": 4},
    {"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.5}, {"step": 4, "eval_loss": 2.2, "eval_anls": 0.3},
    {"step": 4, "eval_loss": 2.1, "eval_anls": 0.4},  # a later evaluation at the same step wins
    {"step": 4, "train_loss": 2.25, "train_runtime": 9.0},
]


def test_curve_series_from_history():
    assert task_metric(HISTORY) == "anls" and task_metric(HISTORY, "anls") == "anls"
    assert task_metric([{"step": 1, "eval_loss": 1.0, "eval_runtime": 2.0}]) is None
    series = curve_series(HISTORY, "anls")
    assert series == {"train loss": [[1, 3.0], [2, 2.5], [3, 2.0], [4, 1.5]], "eval loss": [[2, 2.8], [4, 2.1]],
                      "eval anls": [[2, 0.1], [4, 0.4]]}


def test_curve_png_and_its_cli(tmp_path):
    series = plot_loss_curve(HISTORY, tmp_path / CURVE, "anls")
    assert read_series(tmp_path / CURVE) == series
    from PIL import Image

    with Image.open(tmp_path / CURVE) as image:
        assert image.format == "PNG" and image.size == (640, 360)
    # Redrawn from a (resumed or finished) run's trainer_state.json.
    (tmp_path / CURVE).unlink()
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"log_history": HISTORY[:4]}))
    assert curves_main([str(tmp_path)]) == 0
    assert read_series(tmp_path / CURVE)["train loss"] == [[1, 3.0], [2, 2.5], [3, 2.0]]
    assert curves_main([str(tmp_path / "missing")]) == 2
