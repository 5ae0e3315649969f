"""Offline stand-ins for the examples' `--tiny` mode: a tiny random NVILA (`demo:tiny-nvila`), the quickstart
medical set (`demo:medical`, real DICOM images that pydicom ships; both built once in the demo cache, see
`nvila_ft.demo`) and a 3-step fine-tuned run, built once under an output folder. Nothing here is needed with a
real checkpoint and real data."""

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


def checkpoint_and_data() -> tuple[Path, Path]:
    """(tiny checkpoint folder, quickstart data folder with train.json / test.json), built if missing."""
    from nvila_ft.demo import resolve

    return resolve("demo:tiny-nvila"), resolve("demo:medical")


def recipe_overrides(out: str | Path, name: str) -> list[str]:
    return ["model.path=demo:tiny-nvila", "data.path=demo:medical", f"train.output_dir={Path(out) / name}",
            *OVERRIDES]


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
    _, data = checkpoint_and_data()
    path = Path(out) / f"{split}.csv"
    rows = json.loads((data / f"{split}.json").read_text())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        for row in rows:
            turns = row["conversations"]
            writer.writerow([data / row["image"], turns[0]["value"].replace("<image>\n", ""), turns[1]["value"]])
    return path
