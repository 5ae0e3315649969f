"""The offline preference set `demo:medical-pairs`: the quickstart's questions (`demo:medical`, real DICOM images
pydicom ships) as DPO pairs, the metadata-derived answer chosen and a wrong one rejected.

    python -c "from nvila_ft.demo import resolve; print(resolve('demo:medical-pairs'))"

Rejected answers: the other of yes / no for closed questions; for open ones, another answer the set gives to the
same question (another modality, another body part), else the first other answer of the set. Rows are LLaVA-style
preference rows (`id, image, prompt, chosen, rejected`, see `nvila_ft.data.pairs`); images are copied next to them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from nvila_ft.demo import demo_dir
from nvila_ft.demo.medical import build_quickstart_dataset

MARKER = ".pairs_complete.json"
VERSION = 1


def rejected_answer(question: str, answer: str, answers_by_question: dict[str, list[str]]) -> str:
    """A wrong answer to `question`: yes <-> no, else another answer given to the same question, else any other."""
    if answer.lower() in ("yes", "no"):
        return "no" if answer.lower() == "yes" else "yes"
    others = sorted({a for a in answers_by_question.get(question, []) if a != answer})
    if others:
        return others[0]
    every = sorted({a for values in answers_by_question.values() for a in values if a.lower() not in ("yes", "no")})
    return next(a for a in every if a != answer)


def to_pairs(rows: list[dict]) -> list[dict]:
    """Quickstart LLaVA rows (one question, one answer) -> preference rows."""
    by_question: dict[str, list[str]] = {}
    for row in rows:
        by_question.setdefault(row["conversations"][0]["value"], []).append(row["conversations"][1]["value"])
    return [{"id": row["id"], "image": row["image"], "prompt": row["conversations"][0]["value"],
             "chosen": row["conversations"][1]["value"],
             "rejected": rejected_answer(row["conversations"][0]["value"], row["conversations"][1]["value"], by_question),
             "answer_type": row.get("answer_type")} for row in rows]


def build_preference_dataset(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """Writes `train.json`, `test.json` (preference rows) and `images/` into `out_dir` (atomically: a temporary
    sibling renamed into place); returns it at once when already built.

    Args:
        out_dir: the folder to write.
        source: a built quickstart set (`build_quickstart_dataset`); None = `demo:medical`, built if needed.
    """
    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file():
        return out_dir
    source = Path(source) if source is not None else build_quickstart_dataset(demo_dir() / "medical")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        shutil.copytree(source / "images", tmp / "images")
        counts = {}
        for split in ("train", "test"):
            pairs = to_pairs(json.loads((source / f"{split}.json").read_text()))
            (tmp / f"{split}.json").write_text(json.dumps(pairs, indent=1) + "\n")
            counts[split] = len(pairs)
        (tmp / MARKER).write_text(json.dumps({"version": VERSION, **counts}) + "\n")
        os.replace(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and (out_dir / MARKER).is_file():
            return out_dir  # another process built it first
        raise
    return out_dir
