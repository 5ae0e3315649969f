"""Offline quickstart VQA set built from the real DICOM images that the pydicom wheel ships.

    python -m nvila_ft.demo.medical data/quickstart

Recipes name it `data.path: demo:medical` (built on first use, see `nvila_ft.demo`). No network: which
DICOM files are usable and how they render is `nvila_ft.demo.dicom`. With pydicom 3.0.2 that is 37
images: 19 MR, 12 CT, 3 ultrasound, 3 CR X-rays, from 16 x 16 (the downsized `dicomdirtests` series)
to 800 x 350 pixels.

Answers come from the DICOM header only: Modality (0008,0060) for "What imaging modality is
shown?" and its yes/no twins, and Body Part Examined (0018,0015), else a body-part word in the
Study/Series Description, for "Which body part is imaged?". Every closed question that is answered
"yes" for an image has a "no" twin about another modality (or body part) of the same set, so
yes and no are balanced.

The split is by image, and images of one DICOM series stay together (neighbouring slices of a
series look alike, so splitting them would leak): per modality, whole series go to the test split
until it holds about 20% of that modality's images. There are enough images for this, so there
is no fallback to a per-question split.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from nvila_ft.demo.dicom import (  # noqa: F401 - the DICOM side, re-exported for callers of this module
    MODALITY_WORDS,
    NATIVE_TRANSFER_SYNTAXES,
    PYDICOM_VERSION,
    SOURCE_DIR,
    SourceImage,
    body_part_from_header,
    collect_images,
    dicom_to_rgb,
)

logger = logging.getLogger(__name__)

DATASET_VERSION = 1  # bump when the images, questions or split change
MARKER = ".quickstart_complete.json"
TEST_FRACTION = 0.2
# One yes/no question per modality word (MODALITY_WORDS values).
MODALITY_QUESTIONS = {
    "CT": "Is this a CT scan?",
    "MRI": "Is this an MRI?",
    "ultrasound": "Is this an ultrasound image?",
    "X-ray": "Is this an X-ray?",
    "mammography": "Is this a mammogram?",
    "nuclear medicine": "Is this a nuclear medicine scan?",
    "PET": "Is this a PET scan?",
    "angiography": "Is this an angiogram?",
    "fluoroscopy": "Is this a fluoroscopy image?",
}


def _row(image: SourceImage, key: str, question: str, answer: str) -> dict:
    return {
        "id": f"{image.name}-{key}".replace(" ", "-"),
        "image": f"images/{image.name}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "answer_type": "CLOSED" if answer in ("yes", "no") else "OPEN",
    }


def make_rows(images: list[SourceImage], seed: int = 0) -> list[dict]:
    """Writes the VQA rows (LLaVA conversation format) for a list of images.

    Per image: the open modality question; "Is this a <its modality>?" -> "yes" and the same
    question for another modality of the set -> "no"; and, when the header names the body part,
    the open body-part question and a yes/no pair "Does this image show the <part>?".

    Args:
        images: images with their header fields.
        seed: picks the modality / body part of each "no" question.

    Returns:
        Rows ``{"id", "image", "conversations", "answer_type": "OPEN" | "CLOSED"}``.
    """
    modalities = sorted({MODALITY_WORDS[im.modality] for im in images})
    parts = sorted({im.body_part for im in images if im.body_part})
    rows = []
    for im in images:
        rng = random.Random(f"{seed}-{im.name}")
        word = MODALITY_WORDS[im.modality]
        rows.append(_row(im, "modality", "What imaging modality is shown?", word))
        rows.append(_row(im, f"is-{word}", MODALITY_QUESTIONS[word], "yes"))
        if len(modalities) > 1:
            other = rng.choice([m for m in modalities if m != word])
            rows.append(_row(im, f"is-{other}", MODALITY_QUESTIONS[other], "no"))
        if im.body_part:
            rows.append(_row(im, "body-part", "Which body part is imaged?", im.body_part))
            rows.append(_row(im, f"shows-{im.body_part}", f"Does this image show the {im.body_part}?", "yes"))
            if len(parts) > 1:
                other = rng.choice([p for p in parts if p != im.body_part])
                rows.append(_row(im, f"shows-{other}", f"Does this image show the {other}?", "no"))
    return rows


def split_images(images: list[SourceImage], seed: int = 0, test_fraction: float = TEST_FRACTION) -> set[str]:
    """Chooses the test images: whole series, about `test_fraction` of each modality's images.

    Series are shuffled with `seed`; a series joins the test split while the modality's test
    count stays within ``max(1, round(test_fraction * n))`` and at least one series is left
    for training. A modality whose series are all too large gets no test image.

    Args:
        images: the images to split.
        seed: shuffles the series.
        test_fraction: wanted share of test images per modality.

    Returns:
        Names of the test images; the others are for training.
    """
    rng = random.Random(seed)
    test: set[str] = set()
    by_modality = collections.defaultdict(lambda: collections.defaultdict(list))
    for im in images:
        by_modality[im.modality][im.series_uid].append(im.name)
    for modality in sorted(by_modality):
        series = [by_modality[modality][uid] for uid in sorted(by_modality[modality])]
        rng.shuffle(series)
        target = max(1, round(test_fraction * sum(map(len, series))))
        n_test = 0
        for left, names in enumerate(series, start=1):
            if n_test + len(names) <= target and left < len(series):
                test.update(names)
                n_test += len(names)
    return test


_README = """\
# nvila-ft quickstart set: real DICOM images shipped with pydicom

Built by `python -m nvila_ft.demo.medical` (dataset version {version}, seed {seed},
pydicom {pydicom_version}). {n_images} images, {n_train} train / {n_test} test questions.

## Images

Every PNG is a DICOM file from the `pydicom/data/test_files` folder that the pydicom wheel
installs (no download). pydicom's own notes on these files, including where each one comes from
and the licences, are copied next to this file as `PYDICOM_TEST_FILES_README.txt`. In short:
CT_small/MR_small and examples_rgb_color are downsized NEMA WG04 sample images; the `dicomdirtests`
files are downsized (16 x 16) images of freely available sets from pcir.org; examples_overlay comes
from GDCM (BSD-style licence, reproduced in that file); of the rest the pydicom author writes "I
believe there is no restriction on using any of these files in this manner". pydicom itself is MIT
licensed. Patient names were replaced by the pydicom authors.

Kept: files with pixel data that numpy and pydicom's own decoders read (uncompressed, deflated,
RLE), of an imaging modality ({modalities}), one per SOP Instance UID; the middle frame of
multi-frame files. Rendering: rescale slope/intercept, then the first VOI LUT or window when the
header has one, min-max to 0..255, inverted for MONOCHROME1; palette images through their colour
LUT; saved as 8-bit RGB PNG.

## Questions and answers

Answers come from the DICOM header only, never from the pixels:
- "What imaging modality is shown?" (OPEN): Modality (0008,0060) in plain words
  ({modality_words}).
- "Is this a CT scan?"-style questions (CLOSED): "yes" for the image's modality, and one "no"
  question about another modality of this set per image, so yes and no are balanced.
- "Which body part is imaged?" (OPEN) and "Does this image show the <part>?" (CLOSED, yes/no
  pairs): only when Body Part Examined (0018,0015), else a body-part word in the Study or
  Series Description, names it.

Split: by image, whole DICOM series at a time (no image, and no series, in both files), about
{test_pct}% of each modality's images in `test.json`. `metadata.json` lists every image with its
source file, header fields and split.

| image | source | modality | body part | split |
|---|---|---|---|---|
{table}
"""


def _write_dataset(root: Path, seed: int) -> dict:
    """Writes the whole set into the empty folder `root`; returns the marker contents."""
    (root / "images").mkdir()
    images = [info for info, _ in collect_images(root / "images")]
    if not images:
        raise RuntimeError(f"no usable DICOM image found in {SOURCE_DIR}")
    test_names = split_images(images, seed)
    rows = make_rows(images, seed)
    test_rows = [r for r in rows if Path(r["image"]).stem in test_names]
    train_rows = [r for r in rows if Path(r["image"]).stem not in test_names]
    for name, data in (("train.json", train_rows), ("test.json", test_rows)):
        (root / name).write_text(json.dumps(data, indent=1) + "\n")
    meta = [asdict(im) | {"split": "test" if im.name in test_names else "train"} for im in images]
    (root / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copyfile(SOURCE_DIR / "README.txt", root / "PYDICOM_TEST_FILES_README.txt")
    table = "\n".join(
        f"| {m['name']}.png | {m['source']} | {m['modality']} | {m['body_part'] or '-'} | {m['split']} |"
        for m in meta
    )
    used = sorted({im.modality for im in images})
    (root / "README.md").write_text(
        _README.format(
            version=DATASET_VERSION,
            seed=seed,
            pydicom_version=PYDICOM_VERSION,
            n_images=len(images),
            n_train=len(train_rows),
            n_test=len(test_rows),
            modalities=", ".join(used),
            modality_words=", ".join(f"{m} -> {MODALITY_WORDS[m]}" for m in used),
            test_pct=round(TEST_FRACTION * 100),
            table=table,
        )
    )
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return {
        "version": DATASET_VERSION,
        "seed": seed,
        "pydicom": PYDICOM_VERSION,
        "images": len(images),
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "sha256": digest.hexdigest(),
    }


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(marker: dict | None, seed: int) -> bool:
    return bool(marker) and marker.get("version") == DATASET_VERSION and marker.get("seed") == seed


def build_quickstart_dataset(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Builds the offline quickstart VQA set (see the module docstring) into `out_dir`.

    The folder gets ``images/*.png``, ``train.json``, ``test.json`` (JSON lists of LLaVA rows),
    ``metadata.json``, ``README.md``, pydicom's notes on its test files and a completion marker.
    It is written to a temporary sibling folder and renamed into place, so an interrupted build
    leaves nothing half-written. A folder already complete for this dataset version and seed is
    returned as is, in milliseconds.

    Args:
        out_dir: output folder; created with its parents.
        seed: picks the "no" questions and the test series.
        overwrite: replace `out_dir` if it exists and is not this exact build.

    Returns:
        `out_dir` as a Path.

    Raises:
        FileExistsError: `out_dir` exists, is not this build (other version or seed, or not a
            quickstart set) and `overwrite` is False.
        RuntimeError: the installed pydicom ships no usable image.
    """
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if _is_complete(marker, seed):
        logger.info("quickstart set already built in %s", out_dir)
        return out_dir
    if out_dir.exists() and not overwrite:
        found = (
            f"version {marker.get('version')}, seed {marker.get('seed')}"
            if marker
            else "not a quickstart set"
        )
        raise FileExistsError(
            f"{out_dir} exists ({found}); wanted version {DATASET_VERSION}, seed {seed}. "
            "Pass overwrite=True (CLI: --overwrite) to replace it, or choose another folder."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
    try:
        marker = _write_dataset(tmp, seed)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if out_dir.exists():  # overwrite: move the old one aside first, a directory rename can't replace
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "data")
            shutil.rmtree(old)
        os.replace(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and _is_complete(_read_marker(out_dir), seed):
            return out_dir  # another process (e.g. another rank) finished the same build first
        raise
    logger.info(
        "built quickstart set in %s: %d images, %d train / %d test rows",
        out_dir,
        marker["images"],
        marker["train_rows"],
        marker["test_rows"],
    )
    return out_dir


def summarize(out_dir: str | Path) -> dict[str, dict[str, dict[str, int]]]:
    """Counts the images and rows of a built set per split and modality.

    Args:
        out_dir: a folder made by :func:`build_quickstart_dataset`.

    Returns:
        ``{split: {modality_code | "all": {"images": n, "rows": n}}}``, e.g.
        ``counts["test"]["CT"]["rows"]``.
    """
    out_dir = Path(out_dir)
    modality = {m["name"]: m["modality"] for m in json.loads((out_dir / "metadata.json").read_text())}
    counts = {}
    for split in ("train", "test"):
        stems = [Path(r["image"]).stem for r in json.loads((out_dir / f"{split}.json").read_text())]
        groups = {"all": stems} | {
            m: [s for s in stems if modality[s] == m] for m in sorted(set(modality.values()))
        }
        counts[split] = {k: {"images": len(set(v)), "rows": len(v)} for k, v in groups.items()}
    return counts


def main(argv: list[str] | None = None) -> None:
    """CLI: build the quickstart set and print row counts per split and modality."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="output folder, e.g. data/quickstart")
    parser.add_argument("--seed", type=int, default=0, help="picks the 'no' questions and the test series")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it holds another build")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = build_quickstart_dataset(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    print("split | modality | images | rows")
    for split, counts in summarize(out_dir).items():
        for modality, n in counts.items():
            print(f"{split:5s} | {modality:8s} | {n['images']:6d} | {n['rows']:4d}")
    print(f"-> {out_dir}")


if __name__ == "__main__":
    main()
