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
Videos are files or folders of frame images (`nvila_ft.video.load_video`); preflight adds "video_frames" (frames
each video decodes to) to the samples it passes.
A row that is structurally broken is kept with an extra "error" (and its "raw" row), so that preflight
lists it with all the others instead of the loader stopping at the first one.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from nvila_ft.metrics import ANSWER_TYPES, infer_answer_type
from nvila_ft.processing import placeholder_problem
from nvila_ft.video import VideoError, frame_indices, load_video, probe_video

logger = logging.getLogger(__name__)

FORMATS = ("auto", "llava", "vqa_rad", "hf")
IMAGE_TOKEN = "<image>"
VQA_RAD_FILES = {"train": "trainset.json", "test": "testset.json"}
# Role aliases seen in LLaVA-style data; normalized samples use the LLaVA names.
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
MAX_LISTED_BAD_ROWS = 50


class DataError(ValueError):
    """A data file, split or row that cannot be used; the message names it and says how to fix it."""


# ---------------------------------------------------------------------------------------------------------
# Loading


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
            Hugging Face Hub dataset id.
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
            is missing, or the split has no rows.
    """
    if format not in FORMATS:
        raise DataError(f"data format {format!r} is not supported; choose one of {FORMATS}.")
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
    """One split as a recipe's `data` section (:class:`nvila_ft.recipe.DataConfig`) describes it:
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


def _load_llava(path, split, *, image_folder=None, max_samples=None, video_folder=None, **_) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        candidates = [path / f"{split}{ext}" for ext in (".json", ".jsonl")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(
                f"{path} has no {candidates[0].name} or {candidates[1].name} for split {split!r} "
                f"(files there: {sorted(p.name for p in path.iterdir())[:20]}); add the file or fix data.split."
            )
        path = found[0]
    rows = _read_json_rows(path)[:max_samples]
    folder = Path(image_folder) if image_folder is not None else path.parent
    videos = Path(video_folder) if video_folder is not None else folder
    return [_llava_sample(row, i, str(path), folder, videos) for i, row in enumerate(rows)]


def _read_json_rows(path: Path) -> list[Any]:
    """Reads a JSON list or a JSONL file; a JSONL line that does not parse becomes an error row."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.path.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(_Broken(f"line {line_number} is not valid JSON ({e.msg}); fix or delete it"))
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from e
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON list of samples, got a {type(rows).__name__}.")
    return rows


@dataclasses.dataclass
class _Broken:
    """Stands in for a JSONL line that did not parse."""

    error: str


def _llava_sample(row: Any, index: int, source: str, image_folder: Path, video_folder: Path) -> dict:
    if isinstance(row, _Broken):
        return _error_sample(None, index, source, row.error)
    if not isinstance(row, dict):
        return _error_sample(row, index, source, f"row must be a JSON object, got {type(row).__name__}")
    sample = _new_sample(row.get("id", index), source, index)
    try:
        if row.get("image") is not None and row.get("images") is not None:
            raise DataError("has both 'image' and 'images'; keep one")
        images = row.get("images", row.get("image"))
        images = [] if images is None else [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise DataError(f"image paths must be a non-empty string or a list of them, got {images!r}")
        sample["images"] = [str(image_folder / p) for p in images]
        videos = row.get("video")
        videos = [] if videos is None else [videos] if isinstance(videos, str) else videos
        if not isinstance(videos, list) or not all(isinstance(p, str) and p for p in videos):
            raise DataError(f"'video' must be a non-empty path string or a list of them, got {videos!r}")
        sample["videos"] = [str(video_folder / p) for p in videos]
        if "conversations" not in row:
            raise DataError("missing key 'conversations' (a list of {'from', 'value'} turns)")
        sample["conversations"] = _conversations(row["conversations"])
        if row.get("answer_type") is not None:
            sample["answer_type"] = _answer_type(row["answer_type"])
    except DataError as e:
        return _error_sample(row, index, source, str(e))
    return sample


def _load_vqa_rad(path, split, *, image_folder=None, max_samples=None, **_) -> list[dict]:
    path = Path(path)
    if split not in VQA_RAD_FILES:
        raise DataError(f"VQA-RAD has splits {sorted(VQA_RAD_FILES)}, got {split!r}; fix data.split.")
    file = path / VQA_RAD_FILES[split]
    rows = _read_json_rows(file)[:max_samples]
    folder = Path(image_folder) if image_folder is not None else path / "images"
    samples = []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise DataError(f"row must be a JSON object, got {type(row).__name__}")
            missing = [k for k in ("qid", "image_name", "question", "answer", "answer_type") if k not in row]
            if missing:
                raise DataError(f"missing key(s) {missing} (VQA-RAD MEVF records need all of them)")
            sample = _new_sample(row["qid"], str(file), index)
            sample["images"] = [str(folder / row["image_name"])]
            sample["conversations"] = _qa_turns(row["question"], row["answer"], n_images=1)
            sample["answer_type"] = _answer_type(row["answer_type"])
        except DataError as e:
            sample = _error_sample(row, index, str(file), str(e))
        samples.append(sample)
    return samples


def _load_hf(
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
        sample = _new_sample(row.get("id", index), str(path), index)
        try:
            if image_column is not None:
                sample["images"] = _hf_images(row[image_column], image_column, folder)
            if video_column is not None:
                sample["videos"] = _hf_videos(row[video_column], video_column, videos)
            if chat:
                sample["conversations"] = _conversations(row["conversations"])
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
                sample["conversations"] = _qa_turns(question, answer, n_images=len(sample["images"]))
            if row.get("answer_type") is not None:
                sample["answer_type"] = _answer_type(row["answer_type"])
            elif not chat and sample["conversations"][-1]["value"]:
                sample["answer_type"] = infer_answer_type(sample["conversations"][-1]["value"])
        except DataError as e:
            sample = _error_sample(row, index, str(path), str(e))
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


LOADERS: dict[str, Callable[..., list[dict]]] = {
    "llava": _load_llava,
    "vqa_rad": _load_vqa_rad,
    "hf": _load_hf,
}


def _new_sample(id_: Any, source: str, index: int) -> dict:
    return {
        "id": str(id_),
        "images": [],
        "videos": [],
        "conversations": [],
        "answer_type": None,
        "source": source,
        "index": index,
    }


def _error_sample(row: Any, index: int, source: str, error: str) -> dict:
    id_ = row.get("id", row.get("qid", index)) if isinstance(row, dict) else index
    return {**_new_sample(id_, source, index), "error": error, "raw": row}


def _conversations(turns: Any) -> list[dict]:
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


def _qa_turns(question: Any, answer: Any, n_images: int) -> list[dict]:
    """One question-answer exchange; `<image>` placeholders are prepended unless the question has them."""
    question = "" if question is None else str(question)
    if IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n" * n_images + question
    return [
        {"from": "human", "value": question},
        {"from": "gpt", "value": "" if answer is None else str(answer)},
    ]


def _answer_type(value: Any) -> str:
    answer_type = str(value).strip().upper()  # VQA-RAD has "CLOSED " with a trailing space
    if answer_type not in ANSWER_TYPES:
        raise DataError(f"answer_type is {value!r}; use one of {ANSWER_TYPES}")
    return answer_type


# ---------------------------------------------------------------------------------------------------------
# Preflight


@dataclasses.dataclass
class BadRow:
    """A row that preflight refused: where it is and why."""

    source: str
    index: int
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}[{self.index}] id={self.id}: {self.reason}"


@dataclasses.dataclass
class VideoCheck:
    """How preflight samples and checks videos (the processor's settings, so that counts agree).

    Attributes:
        num_frames: frames sampled per video (model.num_video_frames).
        fps: 0 = uniform, > 0 = at most this many frames per second (model.video_fps).
        short_videos: "bad_row" reports videos with fewer frames than sampled; "repeat" accepts them.
        sample: decode only this many videos, drawn at random with `seed` (others: header only); None = all.
        seed: seed of that draw.
        cache_dir: frame cache shared with training (data.video_cache_dir): decoded frames land there.
        tokens_fn: frames -> embedding rows of a video (`NvilaProcessor.count_video_tokens`), for the report.
    """

    num_frames: int = 8
    fps: float = 0.0
    short_videos: str = "bad_row"
    sample: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    tokens_fn: Callable[[int], int] | None = None


@dataclasses.dataclass
class PreflightReport:
    """Outcome of `preflight`: the rows safe to train on, the refused ones, and per video row its token cost."""

    ok: list[dict]
    bad: list[BadRow]
    videos: list[tuple[str, list[int], list[int]]] = dataclasses.field(default_factory=list)
    """(`<source>[<index>] id=<id>`, frames per video, visual tokens per video) of every ok row with videos."""

    def summary(self) -> str:
        """Counts, one line per bad row (`<source>[<index>] id=<id>: <reason>`), then per video row its frames
        and visual tokens (pooling applied); at most 50 lines of each."""
        lines = [
            f"preflight: {len(self.ok) + len(self.bad)} rows checked, {len(self.ok)} ok, {len(self.bad)} bad"
        ]
        lines += [f"  {row}" for row in self.bad[:MAX_LISTED_BAD_ROWS]]
        if len(self.bad) > MAX_LISTED_BAD_ROWS:
            lines.append(f"  ... and {len(self.bad) - MAX_LISTED_BAD_ROWS} more bad rows")
        if self.videos:
            tokens = [sum(t) for _, _, t in self.videos]
            lines.append(f"video rows: {len(self.videos)}, visual tokens per row (frames x tokens per frame / t, "
                         f"+ end tokens) min {min(tokens)} max {max(tokens)}")
            lines += [f"  {where}: frames {frames} -> {tokens} visual tokens"
                      for where, frames, tokens in self.videos[:MAX_LISTED_BAD_ROWS]]
            if len(self.videos) > MAX_LISTED_BAD_ROWS:
                lines.append(f"  ... and {len(self.videos) - MAX_LISTED_BAD_ROWS} more video rows")
        return "\n".join(lines)


def preflight(
    samples: list[dict],
    *,
    on_bad_row: str = "error",
    length_fn: Callable[[dict], int] | None = None,
    max_length: int | None = None,
    check_images: bool = True,
    progress: bool = True,
    video_check: VideoCheck | None = None,
) -> PreflightReport:
    """Checks every sample before training, so that a bad row fails now rather than hours in.

    Per row: the load error if any, a human turn present, every gpt turn non-empty, media placeholders
    matching the media (none, or one per image / video), each image file present and fully decodable (PIL
    open + load; files are closed again), each video present, readable, not truncated (its sampled frames
    decode) and not shorter than the frames requested (unless `video_check.short_videos` is "repeat"), and
    `length_fn(sample) <= max_length` when both are given (checked only on rows that passed the rest).
    Rows that pass get `sample["video_frames"]`: the frames each video decodes to.

    Args:
        samples: Normalized samples from `load_samples`.
        on_bad_row: "error" to raise on any bad row, "skip" to drop bad rows with a warning.
        length_fn: Returns a sample's token count after media expansion (visual tokens included).
        max_length: Longest allowed sample in tokens (e.g. the recipe's `max_length`).
        check_images: Open and decode every image (the slow part: a few ms per image).
        progress: Show a tqdm progress bar.
        video_check: Video sampling settings and how many videos to decode; None = `VideoCheck()` defaults.

    Returns:
        The report; `ok` holds the good samples in order.

    Raises:
        ValueError: If `on_bad_row` is not "error"/"skip", or `length_fn` is given without `max_length`.
        DataError: If `on_bad_row` is "error" and any row is bad; the message lists them (`summary()`).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row is {on_bad_row!r}; choose 'error' or 'skip'.")
    if length_fn is not None and max_length is None:
        raise ValueError("preflight got length_fn but no max_length; pass max_length (tokens).")
    report = PreflightReport(ok=[], bad=[])
    checked: dict[str, str | None] = {}  # image path -> problem; VQA-RAD has ~10 questions per image
    video_check = video_check or VideoCheck()
    decode = _videos_to_decode(samples, video_check)
    for i, sample in enumerate(tqdm(samples, desc="preflight", unit="row", disable=not progress)):
        problems = _row_problems(sample, checked if check_images else None)
        if not problems and sample.get("videos"):
            frames, video_problems = _video_frames(sample, video_check, decode[i])
            problems += video_problems
            if not video_problems:
                sample["video_frames"] = frames
        if not problems and length_fn is not None:
            try:
                length = length_fn(sample)
                if length > max_length:
                    problems.append(
                        f"{length} tokens > max_length {max_length}; shorten it or raise max_length"
                    )
            except Exception as e:  # one odd row must not hide the others
                problems.append(f"length_fn failed: {type(e).__name__}: {e}")
        if problems:
            report.bad.append(
                BadRow(
                    sample.get("source", "?"), sample.get("index", -1), sample.get("id"), "; ".join(problems)
                )
            )
        else:
            report.ok.append(sample)
            if sample.get("videos") and video_check.tokens_fn is not None:
                where = f"{sample.get('source', '?')}[{sample.get('index', -1)}] id={sample.get('id')}"
                frames = sample["video_frames"]
                report.videos.append((where, frames, [video_check.tokens_fn(f) for f in frames]))
    if report.bad:
        if on_bad_row == "error":
            raise DataError(f"{report.summary()}\nFix the rows or set data.on_bad_row=skip.")
        logger.warning("%s\nskipping %d bad row(s) (data.on_bad_row=skip)", report.summary(), len(report.bad))
    return report


def _row_problems(sample: dict, checked: dict[str, str | None] | None) -> list[str]:
    """Everything wrong with one sample; images are checked unless `checked` (a path -> problem cache) is None."""
    if sample.get("error"):
        return [sample["error"]]
    problems = []
    turns = sample.get("conversations") or []
    if not any(turn["from"] == "human" for turn in turns):
        problems.append("no human turn")
    answers = [turn["value"] for turn in turns if turn["from"] == "gpt"]
    if not answers:
        problems.append("no gpt turn (nothing to learn)")
    elif not all(answer.strip() for answer in answers):
        problems.append("empty answer (a gpt turn is empty or whitespace)")
    images = sample.get("images") or []
    problem = placeholder_problem(turns, len(images), len(sample.get("videos") or []))
    if problem:
        problems.append(problem)
    if checked is not None:
        for image in images:
            if not isinstance(image, str):
                problem = _image_problem(image)
            elif image in checked:
                problem = checked[image]
            else:
                problem = checked[image] = _image_problem(image)
            problems += [problem] if problem else []
    return problems


def _videos_to_decode(samples: list[dict], check: VideoCheck) -> list[list[bool]]:
    """Per sample, per video: decode it in preflight (True) or only read its header (False)."""
    flags = [[True] * len(s.get("videos") or []) for s in samples]
    slots = [(i, j) for i, row in enumerate(flags) for j in range(len(row))]
    if check.sample is not None and check.sample < len(slots):
        import random

        chosen = set(random.Random(check.seed).sample(slots, check.sample))
        flags = [[(i, j) in chosen for j in range(len(row))] for i, row in enumerate(flags)]
    return flags


def _video_frames(sample: dict, check: VideoCheck, decode: list[bool]) -> tuple[list[int], list[str]]:
    """(frames each video decodes to, problems) of a sample's videos."""
    frames, problems = [], []
    for video, full in zip(sample["videos"], decode):
        name = f"{len(video)} bytes of video" if isinstance(video, bytes | bytearray) else video
        try:
            n_frames, video_fps = probe_video(video)
            if check.fps > 0 and video_fps is None:
                raise VideoError(f"{name}: a frames folder has no frame rate; set model.video_fps=0")
            wanted = len(frame_indices(n_frames, check.num_frames, check.fps, video_fps))
            if n_frames < wanted and check.short_videos != "repeat":
                problems.append(f"video {name} has {n_frames} frames, fewer than the {wanted} sampled "
                                "(data.short_videos=repeat keeps such videos)")
                continue
            if full:
                wanted = len(load_video(video, check.num_frames, check.fps, check.cache_dir))
            frames.append(wanted)
        except VideoError as e:
            problems.append(str(e))
        except Exception as e:  # one odd file must not hide the others
            problems.append(f"unreadable video {name} ({type(e).__name__}: {e})")
    return frames, problems


def _image_problem(image: str | Image.Image) -> str | None:
    """Why an image cannot be used, or None. Decodes it fully and closes what it opened."""
    try:
        if isinstance(image, Image.Image):
            if isinstance(
                getattr(image, "fp", None), io.BytesIO
            ):  # lazily opened: decode a copy, keep it lazy
                with Image.open(io.BytesIO(image.fp.getvalue())) as copy_:
                    copy_.load()
            else:
                image.load()
            return None
        if not os.path.isfile(image):
            return f"image file not found: {image}"
        with Image.open(image) as opened:
            opened.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        name = image if isinstance(image, str) else "in-memory image"
        return f"unreadable image {name} ({type(e).__name__}: {e})"
    return None
