"""The VQA-RAD release folder (MEVF layout: `trainset.json`, `testset.json`, `images/`), as in
`../shared/data/vqa_rad`."""

from __future__ import annotations

from pathlib import Path

from nvila_ft.data.llava import read_json_rows
from nvila_ft.data.rows import DataError, answer_type, error_sample, new_sample, qa_turns

VQA_RAD_FILES = {"train": "trainset.json", "test": "testset.json"}


def load_vqa_rad(path, split, *, image_folder=None, max_samples=None, **_) -> list[dict]:
    path = Path(path)
    if split not in VQA_RAD_FILES:
        raise DataError(f"VQA-RAD has splits {sorted(VQA_RAD_FILES)}, got {split!r}; fix data.split.")
    file = path / VQA_RAD_FILES[split]
    rows = read_json_rows(file)[:max_samples]
    folder = Path(image_folder) if image_folder is not None else path / "images"
    samples = []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise DataError(f"row must be a JSON object, got {type(row).__name__}")
            missing = [k for k in ("qid", "image_name", "question", "answer", "answer_type") if k not in row]
            if missing:
                raise DataError(f"missing key(s) {missing} (VQA-RAD MEVF records need all of them)")
            sample = new_sample(row["qid"], str(file), index)
            sample["images"] = [str(folder / row["image_name"])]
            sample["conversations"] = qa_turns(row["question"], row["answer"], n_images=1)
            sample["answer_type"] = answer_type(row["answer_type"])
        except DataError as e:
            sample = error_sample(row, index, str(file), str(e))
        samples.append(sample)
    return samples
