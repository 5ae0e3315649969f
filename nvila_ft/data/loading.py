"""Training data: load LLaVA JSON(L), VQA-RAD (MEVF) folders or Hugging Face datasets as one list of
normalized samples, then check every row before training starts.

    from nvila_ft.data import load_samples, preflight
    samples = load_samples("../shared/data/vqa_rad", "train")
    report = preflight(samples, on_bad_row="skip")   # report.ok: rows safe to train on

A normalized sample is a plain dict:
    {"id": str, "images": [path str | PIL.Image], "videos": [path str | bytes],
     "conversations": [{"from": "human"|"gpt", "value": str}],
     "answer_type": "CLOSED" | "OPEN" | None, "source": file or dataset id, "index": row index in the source,
     "references": [str, ...] (only when the data lists several acceptable answers)}
Videos are files or folders of frame images (`nvila_ft.model.video.load_video`); preflight adds "video_frames" (frames
each video decodes to) to the samples it passes.
A row that is structurally broken is kept with an extra "error" (and its "raw" row), so that preflight
lists it with all the others instead of the loader stopping at the first one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from nvila_ft.data.hf import load_hf
from nvila_ft.data.llava import load_llava
from nvila_ft.data.rows import DataError
from nvila_ft.data.vqa_rad import load_vqa_rad
from nvila_ft.demo import DemoError, is_demo_path
from nvila_ft.demo import resolve as resolve_demo

logger = logging.getLogger(__name__)

FORMATS = ("auto", "llava", "vqa_rad", "hf")
LOADERS: dict[str, Callable[..., list[dict]]] = {"llava": load_llava, "vqa_rad": load_vqa_rad, "hf": load_hf}


def load_samples(
    path: str | os.PathLike,
    split: str,
    format: str = "auto",
    image_folder: str | os.PathLike | None = None,
    image_column: str | None = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    max_samples: int | None = None,
    video_column: str | None = None,
    video_folder: str | os.PathLike | None = None,
    subset: str | None = None,
    question_template: str | None = None,
) -> list[dict]:
    """Loads one split of a dataset as normalized samples.

    Args:
        path: A LLaVA-style `.json`/`.jsonl` file, a folder holding `<split>.json`/`<split>.jsonl`, a
            VQA-RAD MEVF folder (`trainset.json`, `testset.json`, `images/`), a folder written by
            `datasets.save_to_disk`, a local data folder or file (`.parquet`, `.csv`, `.arrow`) or a
            Hugging Face Hub dataset id, or a demo set (`demo:medical`, `demo:video`: built on first use,
            see :func:`nvila_ft.demo.resolve`).
        split: Split name, e.g. "train" or "test" (VQA-RAD: "train" -> trainset.json, "test" -> testset.json;
            ignored for a single LLaVA file).
        format: One of "auto", "llava", "vqa_rad", "hf". "auto" picks vqa_rad for a folder with
            trainset.json, llava for a .json/.jsonl file or a folder with `<split>.json(l)`, else hf.
        image_folder: Folder that relative image paths are resolved against. Default: the JSON file's folder
            (llava), `<path>/images` (vqa_rad), paths kept as stored (hf).
        image_column: hf only: column with the image (a `datasets.Image`, a path string, a
            {"bytes", "path"} dict, or a list of these); None for text-only data.
        question_column: hf only: column with the question (unused when the dataset has `conversations`).
        answer_column: hf only: column with the answer (unused when the dataset has `conversations`). A
            `ClassLabel` column gives the class name; a list of answers (DocVQA, ChartQA) trains on the
            first and keeps all of them in the sample's "references" for evaluation.
        max_samples: Keep only the first `max_samples` rows (None: all).
        video_column: hf only: column with the video (a path, the file's bytes, a {"bytes", "path"} dict, or
            a list of these); None = no videos. llava rows name theirs under "video" (a path or a list).
        video_folder: Folder that relative video paths are resolved against. Default: `image_folder`, else as
            for images.
        subset: hf only: the dataset's configuration name on the Hub (e.g. "DocVQA" for lmms-lab/DocVQA).
        question_template: hf only: the question of every row, for data without a question column
            (classification); "{choices}" in it becomes the comma-separated class names.

    Returns:
        The normalized samples in source order. Rows with a structural problem carry an "error" key that
        `preflight` reports. Images of hf sources are PIL images opened lazily (pixels are decoded on use).

    Raises:
        DataError: If the format is unknown, the file or split is missing or unreadable, a needed column
            is missing, the split has no rows, or a demo set cannot be built (unknown name, extra missing).
    """
    if format not in FORMATS:
        raise DataError(f"data format {format!r} is not supported; choose one of {FORMATS}.")
    if is_demo_path(path):
        try:
            path = resolve_demo(path, "data")
        except DemoError as err:
            raise DataError(str(err)) from None
    path = os.path.expanduser(os.fspath(path))
    if format == "auto":
        format = detect_format(path, split)
    logger.info("loading %s split %r from %s", format, split, path)
    samples = LOADERS[format](
        path,
        split,
        image_folder=image_folder,
        image_column=image_column,
        question_column=question_column,
        answer_column=answer_column,
        max_samples=max_samples,
        video_column=video_column,
        video_folder=video_folder,
        subset=subset,
        question_template=question_template,
    )
    if not samples:
        raise DataError(f"{path} has no rows for split {split!r}; point data.path at a non-empty split.")
    return samples


def load_split(data, split: str, max_samples: int | None = None) -> list[dict]:
    """One split as a recipe's `data` section (:class:`nvila_ft.train.recipe.DataConfig`) describes it:
    :func:`load_samples` with its path, format, image/video folders and column mapping.

    Raises:
        DataError: see :func:`load_samples`.
    """
    return load_samples(
        data.path, split, format=data.format, image_folder=data.image_folder, image_column=data.image_column,
        question_column=data.question_column, answer_column=data.answer_column, max_samples=max_samples,
        video_column=data.video_column, video_folder=data.video_folder, subset=data.subset,
        question_template=data.question_template,
    )


def detect_format(path: str | os.PathLike, split: str) -> str:
    """Guesses the format of `path` (see `load_samples`): "vqa_rad", "llava" or "hf"."""
    path = Path(path)
    if path.is_dir():
        if (path / "trainset.json").is_file():
            return "vqa_rad"
        if any((path / f"{split}{ext}").is_file() for ext in (".json", ".jsonl")):
            return "llava"
    elif path.suffix in (".json", ".jsonl"):
        return "llava"
    return "hf"
