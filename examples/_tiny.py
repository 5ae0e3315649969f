"""Offline stand-ins for the examples' `--tiny` mode: a tiny random NVILA, the quickstart medical set
(real DICOM images that pydicom ships) and a 3-step fine-tuned run, built once under an output folder.
Nothing here is needed with a real checkpoint and real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
# Small and fast on a CPU: one 448 px tile per image, a few samples and steps.
OVERRIDES = ["train.max_steps=3", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
             "train.lr=1e-2", "train.logging_steps=1", "train.save_steps=3", "train.report_to=[]",
             "data.max_train_samples=4", "model.image_aspect_ratio=resize", "eval.max_samples=4",
             "eval.max_new_tokens=4"]


def checkpoint_and_data(out: str | Path) -> tuple[Path, Path]:
    """(tiny checkpoint folder, quickstart data folder with train.json / test.json), built if missing."""
    from nvila_ft.demo.medical import build_quickstart_dataset
    from nvila_ft.demo.tiny import build_tiny_checkpoint

    out = Path(out)
    model, data = out / "tiny-nvila", out / "data"
    if not model.exists():
        build_tiny_checkpoint(model, variant="nvila", seed=0)
    if not data.exists():
        build_quickstart_dataset(data)
    return model, data


def recipe_overrides(out: str | Path, name: str) -> list[str]:
    model, data = checkpoint_and_data(out)
    return [f"model.path={model}", f"data.path={data}", f"train.output_dir={Path(out) / name}", *OVERRIDES]


def run(out: str | Path) -> Path:
    """A fine-tuned tiny run folder (3 training steps of the quickstart recipe), trained if missing."""
    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

    folder = Path(out) / "run"
    if not (folder / "metrics.json").is_file():
        TrainingRun(load_recipe(RECIPE, recipe_overrides(out, "run"))).run()
    return folder


def csv_of_quickstart(out: str | Path, split: str) -> Path:
    """The quickstart split as a CSV of image,question,answer (the shape of many users' own labels)."""
    _, data = checkpoint_and_data(out)
    path = Path(out) / f"{split}.csv"
    rows = json.loads((data / f"{split}.json").read_text())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        for row in rows:
            turns = row["conversations"]
            writer.writerow([data / row["image"], turns[0]["value"].replace("<image>\n", ""), turns[1]["value"]])
    return path
