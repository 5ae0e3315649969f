"""LLaVA-style JSON / JSONL data: a list of `{"image" | "images", "video", "conversations", ...}` rows, image
paths relative to the file's folder (or `data.image_folder`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nvila_ft.data.rows import Broken, DataError, normalize_row


def load_llava(path, split, *, image_folder=None, max_samples=None, video_folder=None, **_) -> list[dict]:
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
    rows = read_json_rows(path)[:max_samples]
    folder = Path(image_folder) if image_folder is not None else path.parent
    videos = Path(video_folder) if video_folder is not None else folder
    return [normalize_row(row, i, str(path), folder, videos) for i, row in enumerate(rows)]


def read_json_rows(path: Path) -> list[Any]:
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
                    rows.append(Broken(f"line {line_number} is not valid JSON ({e.msg}); fix or delete it"))
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from e
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON list of samples, got a {type(rows).__name__}.")
    return rows
