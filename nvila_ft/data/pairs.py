"""Preference data for DPO (`train.objective: dpo`): rows of a prompt with its media, a chosen and a rejected
answer, normalized to one pair dict and checked like SFT rows before training.

    from nvila_ft.data.pairs import load_pairs, preflight_pairs
    pairs = load_pairs("demo:medical-pairs", "train")
    report = preflight_pairs(pairs, length_fn=..., max_length=4096)

A normalized pair is the SFT sample dict (`nvila_ft.data.rows`) with the prompt as `conversations` (human turns
only, and earlier exchanges if the row has them) plus `chosen` and `rejected` (str). :func:`answer_sample` turns
it into the SFT sample of one answer; preflight, the processor and the length count all go through that.

Accepted rows:
- LLaVA style (JSON / JSONL): `{"id", "image" | "images", "video" | "videos", "prompt": str | "conversations":
  [turns], "chosen": str, "rejected": str}`; a prompt without `<image>` gets one placeholder per image.
- Hugging Face datasets: RLAIF-V (`image, question, chosen, rejected`), VLFeedback / trl's preference layout
  (`prompt, chosen, rejected` with `image` or `images`); prompt and answers may be strings or chat messages
  (`[{"role", "content": str | [{"type": "text", "text"}, {"type": "image"}]}]`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from nvila_ft.data.checks import (
    BadRow,
    PreflightReport,
    VideoCheck,
    _row_problems,
    _video_frames,
    _videos_to_decode,
)
from nvila_ft.data.llava import read_json_rows
from nvila_ft.data.loading import detect_format
from nvila_ft.data.rows import (
    IMAGE_TOKEN,
    Broken,
    DataError,
    _media,
    conversations,
    error_sample,
    normalize_row,
)
from nvila_ft.demo import DemoError, is_demo_path
from nvila_ft.demo import resolve as resolve_demo

logger = logging.getLogger("nvila_ft.data")

ANSWERS = ("chosen", "rejected")


def answer_sample(pair: dict, which: str) -> dict:
    """The SFT sample of one answer of a pair: its prompt turns, then `pair[which]` as the gpt turn."""
    turns = [*pair["conversations"], {"from": "gpt", "value": pair.get(which) or ""}]
    return {**{k: v for k, v in pair.items() if k not in ANSWERS}, "conversations": turns}


# ---------------------------------------------------------------------------------------------- rows
def _text(value: Any, what: str) -> str:
    """A prompt / answer given as a string or as chat messages: their text, an image part as `<image>`."""
    if value is None or isinstance(value, str):
        return value or ""
    messages = [value] if isinstance(value, dict) else value
    if not isinstance(messages, list):
        raise DataError(f"{what} must be a string or a list of chat messages, got {type(value).__name__}")
    texts = []
    for message in messages:
        content = message.get("content", message.get("value")) if isinstance(message, dict) else message
        if isinstance(content, list):  # trl / OpenAI content parts: {"type": "text" | "image", ...}
            content = "".join(f"{IMAGE_TOKEN}\n" if isinstance(c, dict) and c.get("type") == "image"
                              else c.get("text") or "" if isinstance(c, dict) else str(c) for c in content)
        texts.append("" if content is None else str(content))
    return "\n".join(t for t in texts if t)


def normalize_pair(row: Any, index: int, source: str, image_folder: str | Path | None = None,
                   video_folder: str | Path | None = None, prompt_key: str = "prompt") -> dict:
    """Normalizes one preference row (see the module docstring); never raises: a broken row gets "error".

    Args:
        row: the row (dict). Images are paths (resolved against `image_folder`) or PIL images.
        index, source: where it comes from, for messages.
        prompt_key: the key holding the prompt text when the row has no `conversations` (hf: the question column).
    """
    if isinstance(row, Broken) or not isinstance(row, dict):
        return normalize_row(row, index, source)  # the SFT normaliser words these errors
    try:
        missing = [k for k in ANSWERS if k not in row]
        if missing:
            raise DataError(f"missing key(s) {missing}: a preference row needs 'chosen' and 'rejected' answers")
        images = _media(row, ("image", "images"), Path(image_folder) if image_folder is not None else None,
                        (Image.Image,), "image paths")
        if "conversations" in row:
            turns = conversations(row["conversations"])
        elif prompt_key in row or "prompt" in row:
            prompt = _text(row.get(prompt_key, row.get("prompt")), "prompt")
            if IMAGE_TOKEN not in prompt:
                prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt
            turns = [{"from": "human", "value": prompt}]
        else:
            raise DataError(f"missing key {prompt_key!r} (or 'conversations'): the prompt the answers reply to")
        if turns[-1]["from"] != "human":
            raise DataError("the prompt must end with a human turn (the answers are the next gpt turn)")
        sample = normalize_row({**{k: v for k, v in row.items() if k not in ("image", "images")}, "images": images,
                                "conversations": turns}, index, source, None, video_folder)
        if "error" not in sample:
            sample.update(chosen=_text(row["chosen"], "chosen"), rejected=_text(row["rejected"], "rejected"))
        return sample
    except DataError as e:
        return error_sample(row, index, source, str(e))


# ---------------------------------------------------------------------------------------------- loading
def load_pairs(path: str, split: str, format: str = "auto", image_folder: str | None = None,
               image_column: str | None = "image", question_column: str = "question",
               max_samples: int | None = None, subset: str | None = None) -> list[dict]:
    """Loads one split of preference data as normalized pairs (llava JSON/JSONL or a Hugging Face dataset).

    Args:
        path: a `.json` / `.jsonl` file, a folder with `<split>.json(l)`, a Hugging Face dataset (hub id,
            `save_to_disk` folder, data file) or a demo set (`demo:medical-pairs`).
        split, format, image_folder, max_samples, subset: as :func:`nvila_ft.data.load_samples`; format is
            auto | llava | hf.
        image_column: hf: the image column (`image` in RLAIF-V; `images` is read when this one is absent).
        question_column: hf: the prompt column when there is no `prompt` column (`question` in RLAIF-V).

    Raises:
        DataError: unknown format, missing file / split / columns, or no rows.
    """
    if is_demo_path(path):
        try:
            path = str(resolve_demo(path, "data"))
        except DemoError as err:
            raise DataError(str(err)) from None
    format = detect_format(path, split) if format == "auto" else format
    if format == "llava":
        file = Path(path)
        if file.is_dir():
            found = [file / f"{split}{ext}" for ext in (".json", ".jsonl") if (file / f"{split}{ext}").is_file()]
            if not found:
                raise DataError(f"{file} has no {split}.json or {split}.jsonl; add the file or fix the split.")
            file = found[0]
        folder = Path(image_folder) if image_folder is not None else file.parent
        pairs = [normalize_pair(r, i, str(file), folder, folder)
                 for i, r in enumerate(read_json_rows(file)[:max_samples])]
    elif format == "hf":
        pairs = _load_hf_pairs(path, split, image_column, question_column, max_samples, subset, image_folder)
    else:
        raise DataError(f"data.format={format} has no preference rows; use llava (prompt/chosen/rejected rows) or hf.")
    if not pairs:
        raise DataError(f"{path} has no rows for split {split!r}; point data.path at a non-empty split.")
    return pairs


def load_pair_split(data, split: str, max_samples: int | None = None) -> list[dict]:
    """One split of a recipe's `data` section as preference pairs (:func:`load_pairs`)."""
    return load_pairs(data.path, split, format=data.format, image_folder=data.image_folder,
                      image_column=data.image_column, question_column=data.question_column,
                      max_samples=max_samples, subset=data.subset)


def _load_hf_pairs(path, split, image_column, question_column, max_samples, subset, image_folder) -> list[dict]:
    from nvila_ft.data.hf import _hf_images, _open_hf, _undecoded

    dataset = _open_hf(str(path), split, subset)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    columns = dataset.column_names
    prompt = "prompt" if "prompt" in columns else question_column
    image = image_column if image_column in columns else "images" if "images" in columns else None
    needed = [*ANSWERS] + ([] if "conversations" in columns else [prompt])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"dataset {path} (split {split!r}) has no column(s) {missing}; its columns are {columns}. "
                        "Preference data needs prompt (or data.question_column), chosen and rejected.")
    if image is not None:
        dataset = dataset.cast_column(image, _undecoded(dataset.features[image]))
    folder = Path(image_folder) if image_folder is not None else None
    pairs = []
    for index, row in enumerate(dataset):
        try:
            images = _hf_images(row[image], image, folder) if image is not None and row[image] is not None else []
        except DataError as e:
            pairs.append(error_sample(row, index, str(path), str(e)))
            continue
        fields = {k: row[k] for k in (prompt, "conversations", *ANSWERS) if k in row}
        pairs.append(normalize_pair({"id": row.get("id", row.get("idx", index)), **fields, "images": images},
                                    index, str(path), None, None, prompt_key=prompt))
    return pairs


# ---------------------------------------------------------------------------------------------- preflight
def preflight_pairs(pairs: list[dict], *, on_bad_row: str = "error", length_fn=None, max_length: int | None = None,
                    check_images: bool = True, progress: bool = True,
                    video_check: VideoCheck | None = None) -> PreflightReport:
    """Checks every pair before training, as :func:`nvila_ft.data.preflight` checks SFT rows.

    Per pair: the load error if any; chosen and rejected non-empty and different; the SFT checks of the prompt
    with each answer (human turn, media placeholders, every image decodable, videos readable); and both
    lengths, `length_fn(answer_sample(pair, "chosen" | "rejected"))`, media tokens included, at most
    `max_length` (a pair is never truncated through its media). Passing pairs get `num_tokens`: the longer of
    the two (length-grouped batching), and `video_frames` as SFT samples do.

    Raises:
        DataError: `on_bad_row` is "error" and a pair is bad; the message lists every bad pair with file and index.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row is {on_bad_row!r}; choose 'error' or 'skip'.")
    report = PreflightReport(ok=[], bad=[])
    checked: dict[str, str | None] = {}
    video_check = video_check or VideoCheck()
    decode = _videos_to_decode(pairs, video_check)
    for i, pair in enumerate(tqdm(pairs, desc="preflight", unit="pair", disable=not progress)):
        problems = [pair["error"]] if pair.get("error") else []
        if not problems:
            chosen, rejected = (str(pair.get(k) or "") for k in ANSWERS)
            problems += [f"empty {k} answer" for k, v in zip(ANSWERS, (chosen, rejected)) if not v.strip()]
            if chosen.strip() and chosen.strip() == rejected.strip():
                problems.append("chosen and rejected are the same answer (nothing to prefer)")
            samples = {k: answer_sample(pair, k) for k in ANSWERS}
            problems += [p for p in _row_problems(samples["chosen"], checked if check_images else None)
                         if not p.startswith("empty answer")]
        if not problems and pair.get("videos"):
            frames, video_problems = _video_frames(pair, video_check, decode[i])
            problems += video_problems
            pair["video_frames"] = frames
        if not problems and length_fn is not None:
            lengths = {}
            for k in ANSWERS:
                try:
                    lengths[k] = length_fn({**answer_sample(pair, k), "video_frames": pair.get("video_frames", [])})
                except Exception as e:  # noqa: BLE001 - one odd row must not hide the others
                    problems.append(f"length of the {k} answer failed: {type(e).__name__}: {e}")
            problems += [f"{k}: {n} tokens > max_length {max_length}; shorten it or raise max_length"
                         for k, n in lengths.items() if n > max_length]
            if not problems:
                pair["num_tokens"] = max(lengths.values())
        if problems:
            report.bad.append(BadRow(pair.get("source", "?"), pair.get("index", -1), pair.get("id"),
                                     "; ".join(problems)))
        else:
            report.ok.append(pair)
    if report.bad:
        if on_bad_row == "error":
            raise DataError(f"{report.summary()}\nFix the rows or set data.on_bad_row=skip.")
        logger.warning("%s\nskipping %d bad pair(s) (data.on_bad_row=skip)", report.summary(), len(report.bad))
    return report
