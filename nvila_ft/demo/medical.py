"""Offline quickstart VQA set built from the real DICOM images that the pydicom wheel ships.

    python -m nvila_ft.demo.medical data/quickstart

No network: the files are read straight from ``pydicom/data/test_files`` (never through
``pydicom.data.get_testdata_files``, which may download the external pydicom-data set). Only
images whose pixel data decodes with numpy and pydicom's own decoders are kept (uncompressed,
deflated or RLE transfer syntaxes: no Pillow/pylibjpeg/GDCM codec, so the PNGs are bit-identical
everywhere), only real imaging modalities (CT, MR, US, CR, ...; not OT test patterns, SEG masks
or RT dose grids), one image per SOP Instance UID (pydicom ships the same image in several
encodings). With pydicom 3.0.2 that is 37 images: 19 MR, 12 CT, 3 ultrasound, 3 CR X-rays,
from 16 x 16 (the downsized `dicomdirtests` series) to 800 x 350 pixels.

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
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import RLELossless, UncompressedTransferSyntaxes

logger = logging.getLogger(__name__)

DATASET_VERSION = 1  # bump when the images, questions or split change
MARKER = ".quickstart_complete.json"
TEST_FRACTION = 0.2
SOURCE_DIR = Path(DATA_ROOT) / "test_files"
"""Where pydicom keeps the test files that ship inside its wheel."""
NATIVE_TRANSFER_SYNTAXES = {*UncompressedTransferSyntaxes, RLELossless}
"""Transfer syntaxes that numpy and pydicom's own decoders read, with no optional codec."""

# DICOM Modality (PS3.3 C.7.3.1.1.1) -> the plain word used in answers. Codes not listed here
# (OT, SEG, RTDOSE, SR, ...) are not imaging modalities a reader would name, so they are skipped.
MODALITY_WORDS = {
    "CT": "CT",
    "MR": "MRI",
    "US": "ultrasound",
    "CR": "X-ray",
    "DX": "X-ray",
    "MG": "mammography",
    "NM": "nuclear medicine",
    "PT": "PET",
    "XA": "angiography",
    "RF": "fluoroscopy",
}
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
# Body Part Examined defined terms (PS3.16 Annex L) and description keywords -> answer word.
# HEAD and BRAIN both answer "head" so that one anatomy has one answer.
BODY_PART_WORDS = {
    "HEAD": "head",
    "BRAIN": "head",
    "SKULL": "head",
    "NECK": "neck",
    "CAROTID": "neck",
    "CSPINE": "cervical spine",
    "TSPINE": "thoracic spine",
    "LSPINE": "lumbar spine",
    "CHEST": "chest",
    "THORAX": "chest",
    "LUNG": "chest",
    "HEART": "heart",
    "BREAST": "breast",
    "ABDOMEN": "abdomen",
    "LIVER": "abdomen",
    "PELVIS": "pelvis",
    "KNEE": "knee",
    "HAND": "hand",
    "FOOT": "foot",
    "SHOULDER": "shoulder",
    "WHOLE BODY": "whole body",
    "WHOLEBODY": "whole body",
}
_BODY_PART_RE = re.compile(r"\b(" + "|".join(sorted(BODY_PART_WORDS, key=len, reverse=True)) + r")S?\b")


@dataclass
class SourceImage:
    """One DICOM file kept for the quickstart set, with the header fields the answers come from.

    Attributes:
        name: image file stem in ``images/`` (from the DICOM path, e.g. ``CT_small``).
        source: path of the DICOM file relative to ``pydicom/data/test_files``.
        modality: DICOM Modality code (``CT``, ``MR``, ``US``, ``CR``, ...).
        body_part: plain-word body part, or None when the header does not say.
        body_part_source: the header field the body part was read from, or None.
        study_description, series_description, body_part_examined: raw header values ("" if absent).
        photometric_interpretation: e.g. ``MONOCHROME2``, ``RGB``, ``PALETTE COLOR``.
        width, height: size of the PNG in pixels.
        frames: number of frames in the DICOM file (the middle one is used).
        series_uid: Series Instance UID, the unit of the train/test split.
        sop_instance_uid: SOP Instance UID, used to drop re-encoded copies of one image.
    """

    name: str
    source: str
    modality: str
    body_part: str | None
    body_part_source: str | None
    study_description: str
    series_description: str
    body_part_examined: str
    photometric_interpretation: str
    width: int
    height: int
    frames: int
    series_uid: str
    sop_instance_uid: str


def body_part_from_header(ds: Dataset) -> tuple[str | None, str | None]:
    """Reads the imaged body part from a DICOM header, if the header says it.

    Body Part Examined wins; otherwise the first body-part keyword (``BRAIN``, ``CAROTIDS``,
    ``LIVER``...) of the Study Description, then of the Series Description, is used.

    Args:
        ds: a DICOM dataset.

    Returns:
        ``(word, keyword)``: the plain answer word (e.g. ``"cervical spine"``) and the header keyword
        it came from (e.g. ``"BodyPartExamined"``), or ``(None, None)``.
    """
    for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription"):
        match = _BODY_PART_RE.search(str(ds.get(keyword, "") or "").upper())
        if match:
            return BODY_PART_WORDS[match.group(1)], keyword
    return None, None


def dicom_to_rgb(ds: Dataset) -> np.ndarray:
    """Renders a DICOM image as an 8-bit RGB array, the way a viewer would show it by default.

    Multi-frame files give their middle frame. Grey images get the modality LUT (rescale
    slope/intercept), then the first VOI LUT or window when the header has one, then a min-max
    stretch to 0..255 (of the rescaled values when the window saturates every pixel), inverted
    for MONOCHROME1. Palette images go through their colour LUT;
    RGB/YBR images (pydicom converts YBR to RGB) are scaled from Bits Stored to 8 bits.

    Args:
        ds: a DICOM dataset with decodable Pixel Data.

    Returns:
        ``(height, width, 3) uint8`` array.

    Raises:
        ValueError: the image is constant (nothing to show).
        Exception: whatever pydicom raises when the pixel data cannot be decoded.
    """
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        arr = arr[frames // 2]
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = ds.RedPaletteColorLookupTableDescriptor[2]  # 8 or 16 bits per LUT entry
        return np.rint(arr / (2**bits - 1) * 255).astype(np.uint8)
    if ds.SamplesPerPixel == 3:
        return np.rint(arr / (2**ds.BitsStored - 1) * 255).astype(np.uint8)
    rescaled = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(rescaled, ds)
    if arr.min() == arr.max():  # the window saturates every pixel (some downsized test files)
        arr = rescaled
    arr = arr.astype(np.float64)
    lo, hi = arr.min(), arr.max()
    if hi <= lo:
        raise ValueError("constant image")
    grey = np.rint((arr - lo) / (hi - lo) * 255).astype(np.uint8)
    if pi == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def _read_candidate(path: Path) -> Dataset | None:
    """Reads one file and says why it is skipped (DEBUG log), or returns the dataset."""
    try:
        with warnings.catch_warnings():  # e.g. "Expected explicit VR, but found implicit VR"
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except Exception as err:  # not DICOM (dumps, JSON, ICC profiles) or broken on purpose
        logger.debug("skip %s: unreadable (%s)", path.name, err)
        return None
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if "PixelData" not in ds:
        reason = "no pixel data"
    elif ds.get("Modality") not in MODALITY_WORDS:
        reason = f"modality {ds.get('Modality')!r} is not an imaging modality"
    elif ts not in NATIVE_TRANSFER_SYNTAXES:
        reason = f"transfer syntax {ts!r} needs an optional codec"
    else:
        return ds
    logger.debug("skip %s: %s", path.name, reason)
    return None


def collect_images(image_dir: Path | None = None) -> list[tuple[SourceImage, np.ndarray]]:
    """Finds the usable images among the DICOM files inside the installed pydicom package.

    Reads only ``pydicom/data/test_files`` on disk; nothing touches the network.

    Args:
        image_dir: when given, each image is also written there as ``<name>.png``.

    Returns:
        ``(info, rgb)`` pairs sorted by name; ``rgb`` is ``(height, width, 3) uint8``.
    """
    kept: dict[str, tuple[SourceImage, np.ndarray]] = {}
    for path in sorted(p for p in SOURCE_DIR.rglob("*") if p.is_file()):
        ds = _read_candidate(path)
        if ds is None:
            continue
        rel = path.relative_to(SOURCE_DIR).as_posix()
        if ds.SOPInstanceUID in kept:
            logger.debug("skip %s: same image as %s", rel, kept[ds.SOPInstanceUID][0].source)
            continue
        try:
            ds.pixel_array_options(decoding_plugin="pydicom")  # native decoders only
            rgb = dicom_to_rgb(ds)
        except Exception as err:
            logger.debug("skip %s: pixel data does not decode (%s)", rel, err)
            continue
        body_part, body_part_source = body_part_from_header(ds)
        info = SourceImage(
            name=re.sub(r"[^A-Za-z0-9_+-]", "-", rel.removesuffix(".dcm")),
            source=rel,
            modality=ds.Modality,
            body_part=body_part,
            body_part_source=body_part_source,
            study_description=str(ds.get("StudyDescription", "") or ""),
            series_description=str(ds.get("SeriesDescription", "") or ""),
            body_part_examined=str(ds.get("BodyPartExamined", "") or ""),
            photometric_interpretation=ds.PhotometricInterpretation,
            width=rgb.shape[1],
            height=rgb.shape[0],
            frames=int(ds.get("NumberOfFrames") or 1),
            series_uid=str(ds.get("SeriesInstanceUID", rel)),
            sop_instance_uid=str(ds.SOPInstanceUID),
        )
        if image_dir is not None:
            Image.fromarray(rgb, "RGB").save(image_dir / f"{info.name}.png")
        kept[ds.SOPInstanceUID] = (info, rgb)
    return sorted(kept.values(), key=lambda pair: pair[0].name)


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
            pydicom_version=pydicom.__version__,
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
        "pydicom": pydicom.__version__,
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
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # it logs every odd header it reads
    out_dir = build_quickstart_dataset(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    print("split | modality | images | rows")
    for split, counts in summarize(out_dir).items():
        for modality, n in counts.items():
            print(f"{split:5s} | {modality:8s} | {n['images']:6d} | {n['rows']:4d}")
    print(f"-> {out_dir}")


if __name__ == "__main__":
    main()
