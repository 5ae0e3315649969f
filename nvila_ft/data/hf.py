"""Hugging Face datasets: a Hub id, a `save_to_disk` folder or a local data file/folder, mapped to samples by
the recipe's column names (`data.image_column`, `question_column`, `answer_column`, `video_column`)."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from nvila_ft.data.rows import DataError, answer_type, conversations, error_sample, new_sample, qa_turns
from nvila_ft.metrics import infer_answer_type

logger = logging.getLogger("nvila_ft.data")


def load_hf(
    path,
    split,
    *,
    image_folder=None,
    image_column="image",
    question_column="question",
    answer_column="answer",
    max_samples=None,
    video_column=None,
    video_folder=None,
    subset=None,
    question_template=None,
) -> list[dict]:
    dataset = _open_hf(str(path), split, subset)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    columns = dataset.column_names
    chat = "conversations" in columns
    needed = [] if chat else [answer_column] + ([] if question_template is not None else [question_column])
    needed += [image_column] if image_column is not None else []
    needed += [video_column] if video_column is not None else []
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"dataset {path} (split {split!r}) has no column(s) {missing}; its columns are {columns}. "
            "Set data.image_column / data.video_column / data.question_column / data.answer_column "
            "(image_column: null for data without images), data.question_template for data without questions, "
            "or provide a 'conversations' column."
        )
    class_names = getattr(dataset.features.get(answer_column), "names", None)  # a ClassLabel column
    if question_template is not None and "{choices}" in question_template and not chat:
        choices = class_names or sorted({str(a) for a in dataset[answer_column] if a is not None})
        question_template = question_template.replace("{choices}", ", ".join(choices))
    if image_column is not None:  # keep encoded bytes: decoding every image up front costs GBs of memory
        dataset = dataset.cast_column(image_column, _undecoded(dataset.features[image_column]))
    if video_column is not None:  # a datasets.Video column would decode every clip: keep bytes / paths
        dataset = dataset.cast_column(video_column, _undecoded(dataset.features[video_column]))
    folder = Path(image_folder) if image_folder is not None else None
    videos = Path(video_folder) if video_folder is not None else folder
    samples = []
    for index, row in enumerate(dataset):
        sample = new_sample(row.get("id", index), str(path), index)
        try:
            if image_column is not None:
                sample["images"] = _hf_images(row[image_column], image_column, folder)
            if video_column is not None:
                sample["videos"] = _hf_videos(row[video_column], video_column, videos)
            if chat:
                sample["conversations"] = conversations(row["conversations"])
            else:
                answer = row[answer_column]
                if class_names is not None and isinstance(answer, int):
                    answer = class_names[answer]
                elif isinstance(answer, list):  # several acceptable answers: train on the first
                    references = [str(a) for a in answer if a is not None and str(a).strip()]
                    if not references:
                        raise DataError(f"column {answer_column!r} holds no answer (got {answer!r})")
                    sample["references"], answer = references, references[0]
                question = question_template if question_template is not None else row[question_column]
                sample["conversations"] = qa_turns(question, answer, n_images=len(sample["images"]))
            if row.get("answer_type") is not None:
                sample["answer_type"] = answer_type(row["answer_type"])
            elif not chat and sample["conversations"][-1]["value"]:
                sample["answer_type"] = infer_answer_type(sample["conversations"][-1]["value"])
        except DataError as e:
            sample = error_sample(row, index, str(path), str(e))
        samples.append(sample)
    return samples


def _open_hf(path: str, split: str, subset: str | None = None):
    """Opens one split from a `save_to_disk` folder, a local data file/folder (e.g. an image folder with
    one sub-folder per class) or a Hub id (`subset`: its configuration name)."""
    import datasets  # heavy import, only needed for this format

    try:
        if Path(path, "dataset_dict.json").is_file() or Path(path, "state.json").is_file():
            dataset = datasets.load_from_disk(path)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"{path} has splits {list(dataset)}, not {split!r}; fix data.split.")
                return dataset[split]
            logger.warning(
                "%s holds a single dataset without splits; using all of it as split %r", path, split
            )
            return dataset
        if path.startswith(("/", ".")) and not Path(path).exists():  # clearly local: don't ask the Hub
            raise DataError(f"{path} does not exist; check data.path.")
        builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(Path(path).suffix)
        if builder is not None and Path(path).is_file():
            return datasets.load_dataset(builder, data_files={split: path}, split=split)
        return datasets.load_dataset(path, subset, split=split)
    except DataError:
        raise
    # datasets raises many types here: FileNotFoundError, ValueError, DatasetNotFoundError, ...
    except Exception as e:
        raise DataError(
            f"cannot load split {split!r} of dataset {path!r} ({type(e).__name__}: {e}). Check data.path "
            "(a Hub id, a save_to_disk folder, a data folder or file) and data.split."
        ) from e


def _undecoded(feature):
    """The same feature with `datasets.Image` / `datasets.Video` columns (or lists of them) left undecoded:
    {"bytes", "path"} dicts."""
    import datasets

    media = tuple(t for t in (datasets.Image, getattr(datasets, "Video", None)) if t is not None)
    if isinstance(feature, media):
        return dataclasses.replace(feature, decode=False)
    if isinstance(getattr(feature, "feature", None), media):  # List / Sequence of images or videos
        feature = copy.copy(feature)
        feature.feature = dataclasses.replace(feature.feature, decode=False)
    return feature


def _hf_videos(value: Any, column: str, folder: Path | None) -> list[str | bytes]:
    """Converts a video cell (path, bytes, {"bytes", "path"} dict or a list of these) to sample videos."""
    values = value if isinstance(value, list) else [value]
    videos = []
    for item in values:
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, str) and item:
            item = str(folder / item) if folder is not None else item
        elif not isinstance(item, bytes) or not item:
            raise DataError(f"column {column!r} has no video (got {str(item)[:80]!r}); fix the row or its column")
        videos.append(item)
    return videos


def _hf_images(value: Any, column: str, folder: Path | None) -> list[str | Image.Image]:
    """Converts an image cell (path, {"bytes", "path"} dict, PIL image or a list of these) to sample images."""
    values = value if isinstance(value, list) else [value]
    images = []
    for item in values:
        if isinstance(item, dict):
            if item.get("bytes"):
                try:  # lazy: reads the header only; preflight decodes a copy
                    item = Image.open(io.BytesIO(item["bytes"]))
                except Exception as e:
                    raise DataError(
                        f"column {column!r}: unreadable image bytes ({type(e).__name__}: {e})"
                    ) from e
            else:
                item = item.get("path")
        if isinstance(item, str) and item:
            item = str(folder / item) if folder is not None else item
        elif not isinstance(item, Image.Image):
            raise DataError(f"column {column!r} has no image (got {item!r}); fix the row or its column")
        images.append(item)
    return images
