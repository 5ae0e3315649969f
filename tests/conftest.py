"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine OpenMP threads
    waiting for each other behind another busy process made steps ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ trained runs
# One tiny checkpoint, the quickstart set and short real training runs, built once per test session and
# shared by the inference / predict / merge / API tests. The runs are real `nvila_ft.train` outputs.
TINY_RUN_OVERRIDES = [
    "train.lr=1e-2",  # high on purpose: after 3 steps adapter and projector differ clearly from the base
    "train.max_steps=3",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.logging_steps=1",
    "train.save_steps=3",
    "train.seed=0",
    "train.report_to=[]",
    "data.max_train_samples=4",
    "model.image_aspect_ratio=resize",
    "eval.max_samples=4",
    "eval.max_new_tokens=4",
]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from types import SimpleNamespace

    from nvila_ft.quickstart_data import build_quickstart_dataset
    from nvila_ft.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-assets")
    return SimpleNamespace(
        root=root,
        model=build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0),
        data=build_quickstart_dataset(root / "data"),
    )


def train_tiny_run(assets, out, *overrides: str):
    """Trains the quickstart recipe on the tiny assets into `out` (3 steps); returns the TrainingRun."""
    from pathlib import Path

    from nvila_ft.recipe import load_recipe
    from nvila_ft.train import TrainingRun

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    paths = [f"model.path={assets.model}", f"data.path={assets.data}", f"train.output_dir={out}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = TrainingRun(load_recipe(recipe_path, [*paths, *TINY_RUN_OVERRIDES, *overrides]))
        run.run()
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_assets):
    """A LoRA run (LoRA LLM, LayerNorm vision tower, full projector) in `tiny_assets.root / "run"`."""
    return train_tiny_run(tiny_assets, tiny_assets.root / "run")
