"""Shared test fixtures."""

from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine OpenMP threads
    waiting for each other behind another busy process made steps ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two real fine-tuned runs of a tiny NVILA (a few quickstart steps each), for the preview app's tests.

    `root/runs/medical`: LoRA r 8 LLM + LayerNorm vision tower + projector, 2 steps, eval on 2 rows;
    `root/runs/medical-r4`: LoRA r 4, frozen vision tower, lr 1e-2, another seed. Both train on the quickstart set
    (pydicom's DICOM files) with `dynamic` tiling of at most 4 tiles (5 tiles per image with the thumbnail).
    """
    from types import SimpleNamespace

    from nvila_ft.quickstart_data import build_quickstart_dataset
    from nvila_ft.recipe import load_recipe
    from nvila_ft.tiny import build_tiny_checkpoint
    from nvila_ft.train import TrainingRun

    root = tmp_path_factory.mktemp("app")
    model = build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0)
    data = build_quickstart_dataset(root / "data")
    common = [f"model.path={model}", f"data.path={data}", "model.image_aspect_ratio=dynamic", "model.max_tiles=4",
              "train.max_steps=2", "train.save_steps=100", "train.report_to=[]", "train.logging_steps=1",
              "data.max_train_samples=4", "eval.max_samples=2", "eval.max_new_tokens=4"]
    variants = {"medical": ["train.seed=0"],
                "medical-r4": ["train.seed=1", "train.lr=1e-2", "lora.r=4", "lora.alpha=8", "tune.vision_tower=frozen"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in variants.items():
            recipe = load_recipe(RECIPES / "quickstart.yaml", [*common, f"train.output_dir={root / 'runs' / name}", *extra])
            TrainingRun(recipe).run()
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, model=model, data=data, runs=root / "runs")
