"""Reading the DICOM files that the pydicom wheel ships: which ones are usable images, their header fields,
and how they render as 8-bit RGB (for the quickstart set of `nvila_ft.demo.medical`).

No network: the files are read straight from ``pydicom/data/test_files`` (never through
``pydicom.data.get_testdata_files``, which may download the external pydicom-data set). Only
images whose pixel data decodes with numpy and pydicom's own decoders are kept (uncompressed,
deflated or RLE transfer syntaxes: no Pillow/pylibjpeg/GDCM codec, so the PNGs are bit-identical
everywhere), only real imaging modalities (CT, MR, US, CR, ...; not OT test patterns, SEG masks
or RT dose grids), one image per SOP Instance UID (pydicom ships the same image in several
encodings).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import pydicom
except ImportError as err:  # the demo extra is optional: say which one to install
    raise ImportError('the medical demo set needs pydicom: pip install -e ".[demo]"') from err
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import RLELossless, UncompressedTransferSyntaxes

logger = logging.getLogger(__name__)

PYDICOM_VERSION = pydicom.__version__

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
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # it logs every odd header of its test files
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
