"""One row normaliser: a data row (LLaVA JSON, the Python API, a Hugging Face row turned into turns) -> the
sample dict every other part of the kit reads.

A normalized sample is a plain dict:
    {"id": str, "images": [path str | PIL.Image], "videos": [path str | bytes],
     "conversations": [{"from": "human"|"gpt", "value": str}],
     "answer_type": "CLOSED" | "OPEN" | None, "source": file or dataset id, "index": row index in the source,
     "references": [str, ...] (only when the data lists several acceptable answers)}
A row that is structurally broken is kept with an extra "error" (and its "raw" row), so that preflight
lists it with all the others instead of the loader stopping at the first one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from PIL import Image

from nvila_ft.metrics import ANSWER_TYPES

IMAGE_TOKEN = "<image>"
# Role aliases seen in LLaVA-style data; normalized samples use the LLaVA names.
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class DataError(ValueError):
    """A data file, split or row that cannot be used; the message names it and says how to fix it."""


@dataclasses.dataclass
class Broken:
    """Stands in for a row that could not even be read (a JSONL line that did not parse)."""

    error: str


def new_sample(id_: Any, source: str, index: int) -> dict:
    """An empty normalized sample (no media, no turns) with its id and where it comes from."""
    return {
        "id": str(id_),
        "images": [],
        "videos": [],
        "conversations": [],
        "answer_type": None,
        "source": source,
        "index": index,
    }


def error_sample(row: Any, index: int, source: str, error: str) -> dict:
    """A sample standing for a broken row: preflight reports `error` with the row's source and index."""
    id_ = row.get("id", row.get("qid", index)) if isinstance(row, dict) else index
    return {**new_sample(id_, source, index), "error": error, "raw": row}


def _media(row: dict, keys: tuple[str, str], folder: Path | None, kinds: tuple[type, ...], what: str) -> list:
    """The media a row lists under either key (one item or a list): strings are paths, resolved against
    `folder` (absolute paths stay as they are); other items must be of `kinds` (PIL images, bytes)."""
    one, many = keys
    if row.get(one) is not None and row.get(many) is not None:
        raise DataError(f"has both {one!r} and {many!r}; keep one")
    items = row.get(many, row.get(one))
    items = [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items]
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append(str(folder / item) if folder is not None else item)
        elif isinstance(item, kinds) and not isinstance(item, str) and (not isinstance(item, bytes) or item):
            out.append(item)
        else:
            raise DataError(f"{what} must be a non-empty path string or a list of them, got {row.get(many, row.get(one))!r}")
    return out


def normalize_row(row: Any, index: int, source: str, image_folder: str | Path | None = None,
                  video_folder: str | Path | None = None) -> dict:
    """Normalizes one LLaVA-style row (`{"image" | "images", "video" | "videos", "conversations", "id",
    "answer_type", "references"}`): LLaVA JSON(L) files and the Python API both go through here.

    Args:
        row: the row; images are paths or PIL images, videos paths or bytes.
        index: its position in `source`.
        source: where it comes from (a file path, "train_data", ...), for messages.
        image_folder, video_folder: relative paths are resolved against these (None: kept as given).

    Returns:
        The normalized sample, or an error sample (with "error") naming what is wrong; never raises.
    """
    if isinstance(row, Broken):
        return error_sample(None, index, source, row.error)
    if not isinstance(row, dict):
        return error_sample(row, index, source, f"row must be a JSON object, got {type(row).__name__}")
    sample = new_sample(row.get("id", index), source, index)
    image_folder = Path(image_folder) if image_folder is not None else None
    video_folder = Path(video_folder) if video_folder is not None else image_folder
    try:
        sample["images"] = _media(row, ("image", "images"), image_folder, (Image.Image,), "image paths")
        sample["videos"] = _media(row, ("video", "videos"), video_folder, (bytes,), "'video'")
        if "conversations" not in row:
            raise DataError("missing key 'conversations' (a list of {'from', 'value'} turns)")
        sample["conversations"] = conversations(row["conversations"])
        if row.get("answer_type") is not None:
            sample["answer_type"] = answer_type(row["answer_type"])
        if row.get("references"):
            sample["references"] = [str(r) for r in row["references"]]
    except DataError as e:
        return error_sample(row, index, source, str(e))
    return sample


def conversations(turns: Any) -> list[dict]:
    """Validates LLaVA turns and normalizes roles to human/gpt."""
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"'conversations' must be a non-empty list of {{'from', 'value'}} turns, got {turns!r}"
        )
    normalized = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"conversations[{i}] must be a dict with 'from' and 'value', got {turn!r}")
        if turn["from"] not in ROLES:
            raise DataError(f"conversations[{i}]['from'] is {turn['from']!r}; use one of {sorted(ROLES)}")
        value = turn["value"]
        normalized.append({"from": ROLES[turn["from"]], "value": "" if value is None else str(value)})
    return normalized


def qa_turns(question: Any, answer: Any, n_images: int) -> list[dict]:
    """One question-answer exchange; `<image>` placeholders are prepended unless the question has them."""
    question = "" if question is None else str(question)
    if IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n" * n_images + question
    return [
        {"from": "human", "value": question},
        {"from": "gpt", "value": "" if answer is None else str(answer)},
    ]


def answer_type(value: Any) -> str:
    """`value` as one of ANSWER_TYPES (case and spaces ignored).

    Raises:
        DataError: any other value.
    """
    answer_type = str(value).strip().upper()  # VQA-RAD has "CLOSED " with a trailing space
    if answer_type not in ANSWER_TYPES:
        raise DataError(f"answer_type is {value!r}; use one of {ANSWER_TYPES}")
    return answer_type
