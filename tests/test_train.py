"""End-to-end tests of nvila_ft.train: a few real training steps of the quickstart recipe on CPU.

    /work/venv/bin/pytest tests/test_train.py -q          # -m "not slow" for the quick checks only

One tiny seeded NVILA checkpoint and the quickstart medical set (pydicom's DICOM files) are built once for
the module. Runs use `recipes/quickstart.yaml` with small overrides (SMALL): 4 training samples at batch 2,
so every 2 steps are one pass over the same samples; one 448 px tile per image; 8 steps, checkpoints at 4
and 8. Each run takes about a second or two on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import InterruptAfter, Interrupted
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from nvila_ft.demo.medical import build_quickstart_dataset
from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.train.cli import main
from nvila_ft.train.recipe import Recipe
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun, latest_checkpoint
from nvila_ft.train.tuning import base_model, non_lora_state_dict

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SMALL = [  # pinned here, not taken from quickstart.yaml, because the tests below rely on them
    "train.lr=1e-3",
    "train.vision_lr_ratio=10",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.max_steps=8",
    "train.logging_steps=1",
    "train.save_steps=4",
    "train.seed=0",
    "data.max_train_samples=4",
    "model.image_aspect_ratio=resize",
    "eval.max_samples=4",
    "eval.max_new_tokens=4",
]
LR, VISION_LR_RATIO = 1e-3, 10.0  # as in SMALL
N_VISION_LAYERS = 3  # tiny SigLIP (nvila_ft.tiny.TinySpec); features come from layer 2 of 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _tensorboard_env():
    """Runs must log to <output_dir>/logs: hide a TENSORBOARD_LOGGING_DIR from the caller, restore it after."""
    saved = os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    yield
    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    if saved is not None:
        os.environ["TENSORBOARD_LOGGING_DIR"] = saved


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train")
    return SimpleNamespace(
        root=root,
        model=build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0),
        data=build_quickstart_dataset(root / "data"),
    )


def recipe(assets, output_dir: Path, *overrides: str) -> Recipe:
    paths = [f"model.path={assets.model}", f"data.path={assets.data}", f"train.output_dir={output_dir}"]
    return load_recipe(QUICKSTART, [*paths, *SMALL, *overrides])


class Recorder(TrainerCallback):
    """What the trainer did in this `train()` call: state at start, steps run, lines logged."""

    def __init__(self):
        self.steps, self.logged = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Called after any checkpoint was loaded: this is what training continues from.
        self.start_step = state.global_step
        self.non_lora = {k: v.clone() for k, v in non_lora_state_dict(model).items()}
        self.lora = {n: p.detach().clone() for n, p in base_model(model).named_parameters() if "lora_" in n}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append((state.global_step, dict(logs or {})))


class RecordingRun(TrainingRun):
    """`TrainingRun` with extra trainer callbacks (run() builds the trainer itself)."""

    def __init__(self, recipe: Recipe, callbacks: list[TrainerCallback]):
        super().__init__(recipe)
        self.callbacks = callbacks

    def build_trainer(self):
        trainer = super().build_trainer()
        for callback in self.callbacks:
            trainer.add_callback(callback)
        return trainer


@pytest.fixture(scope="module")
def trained(assets) -> SimpleNamespace:
    """One uninterrupted 8-step run (checkpoints 4 and 8, final eval)."""
    out = assets.root / "run"
    run = TrainingRun(recipe(assets, out))
    metrics = run.run()
    return SimpleNamespace(run=run, metrics=metrics, out=out)


@pytest.fixture(scope="module")
def resumed(assets) -> SimpleNamespace:
    """The same run killed after step 5, then started again on the same output_dir."""
    out = assets.root / "resumed"
    with pytest.raises(Interrupted):
        RecordingRun(recipe(assets, out), [InterruptAfter(5)]).run()
    after_crash = sorted(p.name for p in out.glob("checkpoint-*"))
    saved = trained_copies(out / "checkpoint-4")
    # A save killed half-way: weights written, trainer_state.json (written last) missing.
    half = out / "checkpoint-6"
    half.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / "checkpoint-4" / name, half / name)
    state_at_4 = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())

    recorder = Recorder()
    run = RecordingRun(recipe(assets, out), [recorder])
    metrics = run.run()
    return SimpleNamespace(
        run=run,
        metrics=metrics,
        out=out,
        recorder=recorder,
        after_crash=after_crash,
        saved_at_4=saved,
        state_at_4=state_at_4,
    )


def trained_copies(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors trained in full (peft modules_to_save copies) in a run's adapter file, by official name."""
    tensors = load_file(folder / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model."): v for k, v in tensors.items() if "lora_" not in k}


def losses(log_history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in log_history if "loss" in h}


def sample_batch(run: TrainingRun) -> dict:
    sample = run.eval_samples[0]
    return run.processor.collate([run.processor(sample["conversations"], sample["images"])])


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_loss_falls_over_a_short_run(trained):
    loss = losses(trained.run.trainer.state.log_history)
    assert sorted(loss) == list(range(1, 9))
    # Steps 1-2 and 7-8 each see the same 4 samples once; 8 steps at lr 1e-3 drop the mean by ~2 nats
    # across seeds, so a 1-nat margin is robust.
    first, last = (loss[1] + loss[2]) / 2, (loss[7] + loss[8]) / 2
    assert last < first - 1.0, loss


@pytest.mark.slow
def test_optimizer_uses_the_per_part_learning_rates(trained):
    model = base_model(trained.run.model)
    part_of = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
    expected = {"llm": LR, "vision_tower": LR / VISION_LR_RATIO, "mm_projector": LR}
    seen = set()
    for group in trained.run.trainer.optimizer.param_groups:
        for p in group["params"]:
            part = part_of[id(p)]
            seen.add(part)
            assert group["initial_lr"] == pytest.approx(expected[part]), part  # lr before the schedule
    assert seen == set(expected)


def test_train_seed_fixes_the_adapter_init(assets, tmp_path):
    # train.seed is documented as the "seed of data order, dropout and adapter init": two runs of one recipe
    # in one process (a sweep, a notebook, these tests) must start from the same LoRA weights.
    def lora_a(seed: int) -> dict[str, torch.Tensor]:
        run = TrainingRun(recipe(assets, tmp_path / "out", f"train.seed={seed}"))
        run.load_model()
        return {n: p.detach().clone() for n, p in base_model(run.model).named_parameters() if "lora_A" in n}

    first = lora_a(0)
    torch.rand(100)  # anything else drawing from the global RNG in between
    again, other = lora_a(0), lora_a(1)

    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_output_folder_has_adapter_tokenizer_and_run_records(trained):
    out = trained.out
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "run_info.json",
        "metrics.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    adapter = json.loads((out / "adapter_config.json").read_text())
    lora = trained.run.recipe.lora
    assert (adapter["r"], adapter["lora_alpha"]) == (lora.r, lora.alpha)
    assert adapter["target_modules"] and all(t.startswith("llm.") for t in adapter["target_modules"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<image>") == trained.run.processor.image_token_id
    info = json.loads((out / "run_info.json").read_text())
    assert info["base_model"] == str(trained.run.recipe.model.path)
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["peft"]


@pytest.mark.slow
def test_adapter_file_holds_the_projector_and_used_vision_layernorms_only(trained):
    tensors = trained_copies(trained.out)
    model = base_model(trained.run.model)
    params = {n.replace(".modules_to_save.default.", "."): p for n, p in model.named_parameters()
              if ".original_module." not in n}  # the trained copies under their official names
    projector = {n for n in params if n.startswith("mm_projector.")}
    layernorms = {
        f"vision_tower.encoder.layers.{i}.layer_norm{k}.{w}"
        for i in range(N_VISION_LAYERS - 1)
        for k in (1, 2)
        for w in ("weight", "bias")
    }
    assert set(tensors) == projector | layernorms
    modules = json.loads((trained.out / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(modules) == sorted({"mm_projector"} | {n.rsplit(".", 1)[0] for n in layernorms})
    assert all(torch.equal(v, params[k].detach()) for k, v in tensors.items())  # the final weights


@pytest.mark.slow
def test_saved_recipe_loads_back_to_the_same_recipe(trained):
    assert load_recipe(trained.out / "recipe.yaml") == trained.run.recipe


@pytest.mark.slow
def test_metrics_json_has_train_and_eval_results(trained):
    metrics = json.loads((trained.out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(trained.metrics))
    assert metrics["train_samples"] == 4
    assert metrics["eval"]["n"] == 4  # eval.max_samples
    assert 0.0 <= metrics["eval"]["overall_accuracy"] <= 1.0
    assert metrics["train"]["train_loss"] > 0


@pytest.mark.slow
def test_checkpoints_are_complete_at_each_save_step(trained):
    assert sorted(p.name for p in trained.out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    for step in (4, 8):
        folder = trained.out / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            assert (folder / name).is_file(), f"checkpoint-{step}/{name}"
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    final = trained_copies(trained.out)
    at_4 = trained_copies(trained.out / "checkpoint-4")
    at_8 = trained_copies(trained.out / "checkpoint-8")
    assert all(torch.equal(final[k], at_8[k]) for k in final)
    assert not all(torch.equal(at_4[k], at_8[k]) for k in at_4)  # trained between the two saves


@pytest.mark.slow
def test_each_run_writes_tensorboard_events_to_its_own_logs_folder(trained, resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for done in (trained, resumed):
        logs = done.out / "logs"
        assert list(logs.glob("events.out.tfevents.*")), f"no TensorBoard events in {logs}"
    events = EventAccumulator(str(trained.out / "logs")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_continues_from_the_last_complete_checkpoint(resumed):
    assert resumed.after_crash == ["checkpoint-4"]  # killed after step 5: step 4 was the last save
    rec = resumed.recorder
    assert rec.start_step == 4
    assert rec.steps == [5, 6, 7, 8]
    assert [step for step, logs in rec.logged if "loss" in logs] == [5, 6, 7, 8]
    history = resumed.run.trainer.state.log_history
    assert sorted(losses(history)) == list(range(1, 9))  # steps 1-4 from checkpoint-4, then 5-8, no repeats
    assert history[:4] == resumed.state_at_4["log_history"]
    assert resumed.run.trainer.state.global_step == 8


@pytest.mark.slow
def test_resume_restores_the_checkpoint_weights(resumed, assets):
    rec = resumed.recorder
    assert set(rec.non_lora) == set(resumed.saved_at_4)
    for name, value in resumed.saved_at_4.items():
        assert torch.equal(rec.non_lora[name], value), name
    # ...and they are trained values, not the base checkpoint's.
    base = dict(
        NvilaForConditionalGeneration.from_pretrained(assets.model, dtype=torch.float32).named_parameters()
    )
    assert not all(torch.equal(value, base[name]) for name, value in resumed.saved_at_4.items())
    assert rec.lora and any(p.abs().sum() > 0 for n, p in rec.lora.items() if "lora_B" in n)  # adapter too


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(trained, resumed):
    # Same recipe and seed: a resume that restores weights, optimizer, schedule and data order exactly
    # reproduces the last steps' losses and the final weights.
    assert losses(resumed.run.trainer.state.log_history) == pytest.approx(
        losses(trained.run.trainer.state.log_history), rel=1e-4
    )
    a, b = trained_copies(trained.out), trained_copies(resumed.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # In fact bit-identical: peft's load_adapter copies the saved fp32 copies into the trained parameters.
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(resumed.run.trainer.state.log_history) == losses(trained.run.trainer.state.log_history)


@pytest.mark.slow
def test_resumed_run_reports_the_whole_runs_figures(trained, resumed):
    # metrics.json and the card of the resumed run give the loss of all 8 steps (from the trainer state's
    # history), not of the 4 steps after the resume: the same figures as the uninterrupted run.
    whole = sum(losses(trained.run.trainer.state.log_history).values()) / 8
    for done in (resumed, trained):
        train = json.loads((done.out / "metrics.json").read_text())["train"]
        assert train["train_loss"] == pytest.approx(whole, rel=1e-9)
        assert (train["global_step"], train["epoch"]) == (8, 4.0)  # 8 steps x batch 2 over 4 rows
        card = (done.out / "README.md").read_text()
        assert f"Final training loss: {whole:.4f}." in card and "Optimizer steps: 8 (4 epochs" in card


def test_latest_checkpoint_skips_half_written_folders(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step, complete in [(4, True), (9, True), (10, True), (12, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-final" / "trainer_state.json").write_text("{}")

    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # by step number, not by name


# ---------------------------------------------------------------------------------------------- loading back
@pytest.mark.slow
def test_saved_run_loads_back_to_the_trained_model(trained, assets):
    batch = sample_batch(trained.run)
    with torch.no_grad():
        expected = trained.run.model.eval()(**batch).logits
        base = NvilaForConditionalGeneration.from_pretrained(assets.model, dtype=torch.float32)
        untrained = base(**batch).logits
        model = PeftModel.from_pretrained(base, trained.out).eval()
        logits = model(**batch).logits
        copies = [m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper"]
        for m in copies:  # LoRA alone: the trained projector / LayerNorm copies bypassed
            m.enable_adapters(False)
        lora_only = model(**batch).logits

    saved = trained_copies(trained.out)
    assert set(non_lora_state_dict(model)) == set(saved) and len(copies) == 1 + 2 * (N_VISION_LAYERS - 1)
    assert all(torch.equal(v, saved[k]) for k, v in non_lora_state_dict(model).items())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # Both kinds of tensor matter: training moved the logits, and the LoRA weights alone do not reproduce them.
    assert (untrained - expected).abs().max() > 1e-2
    assert (lora_only - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- CLI / recipe
def test_cli_rejects_an_unknown_key_before_building_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the quickstart recipe would bootstrap runs/quickstart here

    assert main([str(QUICKSTART), "train.lrr=1"]) == 2

    err = capsys.readouterr().err
    assert "train.lrr" in err and "did you mean 'lr'" in err
    assert list(tmp_path.iterdir()) == []


def test_empty_report_to_override_disables_trackers(assets, tmp_path):
    # The schema documents `report_to: [] = none`; from the command line that is `train.report_to=[]`.
    r = recipe(assets, tmp_path / "out", "train.report_to=[]")
    assert r.train.report_to == []
    run = TrainingRun(r)
    run.load_model()
    run.load_data()
    trainer = run.build_trainer()
    assert not any(isinstance(cb, TensorBoardCallback) for cb in trainer.callback_handler.callbacks)
