"""Shared test fixtures."""

import os
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="session", autouse=True)
def demo_dir(tmp_path_factory):
    """`demo:` resources (nvila_ft.demo) are built once per session in a temporary folder, never in the home
    cache; subprocesses (tests/test_examples.py) inherit it."""
    folder = tmp_path_factory.mktemp("demo")
    before = os.environ.get("NVILA_FT_DEMO_DIR")
    os.environ["NVILA_FT_DEMO_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("NVILA_FT_DEMO_DIR", None)
    else:
        os.environ["NVILA_FT_DEMO_DIR"] = before


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

    from nvila_ft.demo.medical import build_quickstart_dataset
    from nvila_ft.demo.tiny import build_tiny_checkpoint
    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

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

    from nvila_ft.demo.medical import build_quickstart_dataset
    from nvila_ft.demo.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-assets")
    return SimpleNamespace(
        root=root,
        model=build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0),
        data=build_quickstart_dataset(root / "data"),
    )


def load_tuned(assets, *overrides: str):
    """A model as training loads it (`TrainingRun.load_model`: tuning applied, trainables fp32 under mixed
    precision) in train mode, dropout off so two forwards compute the same, and its processor.

    assets: (folder, tiny checkpoint); the quickstart recipe with `model.image_aspect_ratio=resize` + `overrides`.
    """
    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

    root, ckpt = assets
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
                         [f"model.path={ckpt}", f"data.path={root / 'data'}", f"train.output_dir={root / 'out'}",
                          "lora.dropout=0", "model.image_aspect_ratio=resize", *overrides])
    model, processor = TrainingRun(recipe).load_model()
    return model.train(), processor


def noise_image(seed: int, size: tuple[int, int] = (56, 40)):
    """A seeded random RGB PIL image, (width, height) = `size`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def train_tiny_run(assets, out, *overrides: str):
    """Trains the quickstart recipe on the tiny assets into `out` (3 steps); returns the TrainingRun."""
    from pathlib import Path

    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

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


# Killed-job stand-ins for the resume tests (test_train, test_run_state).
class Interrupted(Exception):
    """Stands in for a killed job."""


class InterruptAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"interrupted after step {self.step}")
