"""Every recipe in recipes/ validates, names its dataset, checkpoint and metric, and its data columns load.

    pytest tests/test_task_recipes.py

The hub datasets cannot be downloaded here, so each task recipe's column mapping is checked on a small local
dataset with the same columns and feature types as the hub one (from the datasets' cards).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from PIL import Image

from nvila_ft.data import load_split
from nvila_ft.demo import is_demo_path
from nvila_ft.metrics import METRICS, compute_metric
from nvila_ft.train.recipe_io import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
CHECKPOINTS = {"Efficient-Large-Model/NVILA-8B", "Efficient-Large-Model/NVILA-Lite-2B",
               "Efficient-Large-Model/NVILA-Lite-8B", "Efficient-Large-Model/NVILA-15B",
               "Efficient-Large-Model/NVILA-8B-Video"}


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def test_the_task_recipes_are_there():
    assert {p.stem for p in RECIPES} >= {"medical", "pathology", "documents", "classification", "quickstart"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_its_header_says_what_it_needs(path):
    recipe = load_recipe(path)
    text = header(path)
    assert text, f"{path.name}: no header comment"
    assert f"nvila_ft.train recipes/{path.name}" in text  # the launch command
    assert recipe.eval.metric in METRICS
    if is_demo_path(recipe.model.path):  # the offline demos: demo data too, and the header says how to get it
        assert is_demo_path(recipe.data.path) and '".[demo' in text
    else:
        assert f"Metric: {recipe.eval.metric}" in text
        assert recipe.model.path in CHECKPOINTS and "24 GB" in text  # a real checkpoint that fits 24 GB
        assert recipe.data.path in text or recipe.data.path.startswith("data/")  # the dataset is named


def image_dataset(tmp_path: Path, columns: dict, n: int = 3) -> Path:
    """A save_to_disk dataset with an image column and the given columns (n rows), split train and test."""
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    rows = {"image": [image] * n, **{k: v[:n] for k, v in columns.items()}}
    split = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "ds")
    return tmp_path / "ds"


def load_like(recipe_name: str, path: Path, split: str) -> list[dict]:
    d = load_recipe(next(p for p in RECIPES if p.stem == recipe_name), [f"data.path={path}"]).data
    return load_split(d, split)


def test_pathology_columns_load_with_inferred_answer_types(tmp_path):
    path = image_dataset(tmp_path, {"question": ["is this tissue necrotic?", "what is present?", "is it x?"],
                                    "answer": ["yes", "hemorrhage", "no"]})
    samples = load_like("pathology", path, "test")
    assert [s["answer_type"] for s in samples] == ["CLOSED", "OPEN", "CLOSED"]
    assert samples[1]["conversations"][0]["value"] == "<image>\nwhat is present?"


def test_chartqa_columns_train_on_the_first_label_and_keep_all_as_references(tmp_path):
    path = image_dataset(tmp_path, {"query": ["How many bars?", "Max value?", "Which region is largest?"],
                                    "label": [["5"], ["12.5", "12.50"], ["Asia"]],
                                    "human_or_machine": [0, 1, 0]})
    samples = load_like("documents", path, "train")
    assert samples[1]["conversations"][1]["value"] == "12.5"
    assert samples[1]["references"] == ["12.5", "12.50"]
    assert samples[0]["conversations"][0]["value"] == "<image>\nHow many bars?"
    recipe = load_recipe(next(p for p in RECIPES if p.stem == "documents"))
    refs = [s.get("references") or s["conversations"][1]["value"] for s in samples]
    assert compute_metric(recipe.eval.metric, ["5.1", "12.3", "Europe"], refs)["relaxed_accuracy"] == pytest.approx(2 / 3)


def test_classification_reads_an_image_folder_with_the_question_template(tmp_path):
    for split, label in [("train", "cat"), ("train", "dog"), ("test", "dog")]:
        (tmp_path / "imgs" / split / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / split / label / "a.png")

    samples = load_like("classification", tmp_path / "imgs", "train")

    assert [s["conversations"][1]["value"] for s in samples] == ["cat", "dog"]
    assert samples[0]["conversations"][0]["value"] == (
        "<image>\nWhich class does this image show? Answer with one of: cat, dog.")
    assert load_like("classification", tmp_path / "imgs", "test")[0]["conversations"][1]["value"] == "dog"
