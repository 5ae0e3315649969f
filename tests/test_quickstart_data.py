"""Tests for the offline quickstart set built from pydicom's bundled DICOM files.

pytest tests/test_quickstart_data.py
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from nvila_ft.demo import medical as qd


def _no_network(*args, **kwargs):
    raise AssertionError("the quickstart set must be built without network access")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The set, built once for the module with every socket call failing."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("connect", "connect_ex"):
            mp.setattr(socket.socket, name, _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        return qd.build_quickstart_dataset(tmp_path_factory.mktemp("qs") / "quickstart", seed=0)


def _load(root: Path) -> tuple[list[dict], list[dict], dict[str, dict]]:
    train, test = (json.loads((root / f"{split}.json").read_text()) for split in ("train", "test"))
    meta = {m["name"]: m for m in json.loads((root / "metadata.json").read_text())}
    return train, test, meta


def _qa(row: dict) -> tuple[str, str]:
    human, gpt = row["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n")
    return human["value"].removeprefix("<image>\n"), gpt["value"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_layout_and_rows_reference_existing_rgb_pngs(built):
    assert {"images", "train.json", "test.json", "README.md", "metadata.json", qd.MARKER} <= {
        p.name for p in built.iterdir()
    }
    train, test, meta = _load(built)
    rows = train + test
    assert len({r["id"] for r in rows}) == len(rows)
    assert {Path(r["image"]).stem for r in rows} == set(meta)
    for name in meta:
        with Image.open(built / "images" / f"{name}.png") as im:
            assert im.mode == "RGB" and im.size == (meta[name]["width"], meta[name]["height"])
    for row in rows:
        assert set(row) == {"id", "image", "conversations", "answer_type"}
        assert row["image"].startswith("images/") and (built / row["image"]).is_file()
    readme = (built / "README.md").read_text()
    assert "pydicom" in readme and "licen" in readme.lower()
    assert (
        (built / "PYDICOM_TEST_FILES_README.txt")
        .read_text()
        .startswith("Test Files used for testing pydicom")
    )


def test_images_are_real_uncompressed_modalities_one_per_sop_instance(built):
    _, _, meta = _load(built)
    assert len(meta) >= 20
    modalities = {m["modality"] for m in meta.values()}
    assert {"CT", "MR", "US", "CR"} <= modalities <= set(qd.MODALITY_WORDS)
    assert len({m["sop_instance_uid"] for m in meta.values()}) == len(meta)
    for m in meta.values():
        ds = pydicom.dcmread(qd.SOURCE_DIR / m["source"], stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID in qd.NATIVE_TRANSFER_SYNTAXES
        assert ds.SOPInstanceUID == m["sop_instance_uid"]


def test_answers_match_the_source_dicom_header(built):
    train, test, meta = _load(built)
    all_modalities = {qd.MODALITY_WORDS[m["modality"]] for m in meta.values()}
    word_of_question = {qd.MODALITY_QUESTIONS[word]: word for word in all_modalities}
    headers = {
        name: pydicom.dcmread(qd.SOURCE_DIR / m["source"], stop_before_pixels=True)
        for name, m in meta.items()
    }
    for row in train + test:
        name = Path(row["image"]).stem
        ds, (question, answer) = headers[name], _qa(row)
        own_word = qd.MODALITY_WORDS[ds.Modality]
        part = qd.body_part_from_header(ds)[0]
        if question == "What imaging modality is shown?":
            assert answer == own_word, name
        elif question in word_of_question:
            assert answer == ("yes" if word_of_question[question] == own_word else "no"), (name, question)
        elif question == "Which body part is imaged?":
            assert part is not None and answer == part, name
        else:
            assert question.startswith("Does this image show the ") and part is not None, question
            shown = question.removeprefix("Does this image show the ").removesuffix("?")
            assert answer == ("yes" if shown == part else "no"), (name, question)
        assert row["answer_type"] == ("CLOSED" if answer in ("yes", "no") else "OPEN")

    # A few rows checked against hand-read headers, not through the module's own tables.
    answers = {(Path(r["image"]).stem, _qa(r)[0]): _qa(r)[1] for r in train + test}
    cr = "dicomdirtests-77654033-CR1-6154"
    assert answers["CT_small", "What imaging modality is shown?"] == "CT"
    assert answers["MR_small", "What imaging modality is shown?"] == "MRI"
    assert answers["examples_rgb_color", "What imaging modality is shown?"] == "ultrasound"
    assert answers[cr, "What imaging modality is shown?"] == "X-ray"
    assert answers[cr, "Which body part is imaged?"] == "cervical spine"  # BodyPartExamined CSPINE
    assert answers["examples_overlay", "Which body part is imaged?"] == "abdomen"  # BodyPartExamined ABDOMEN
    assert ("CT_small", "Which body part is imaged?") not in answers  # its header names no body part


def test_closed_answers_are_balanced_yes_no(built):
    train, test, _ = _load(built)
    for rows in (train, test):
        closed = [_qa(r)[1] for r in rows if r["answer_type"] == "CLOSED"]
        assert set(closed) == {"yes", "no"}
        assert closed.count("yes") == closed.count("no")
        assert any(r["answer_type"] == "OPEN" for r in rows)


def test_split_by_image_and_series_without_leaks(built):
    train, test, meta = _load(built)
    train_images = {Path(r["image"]).stem for r in train}
    test_images = {Path(r["image"]).stem for r in test}
    assert train_images and test_images and not train_images & test_images
    assert 0.1 <= len(test_images) / len(meta) <= 0.3
    assert {meta[n]["series_uid"] for n in train_images}.isdisjoint(
        meta[n]["series_uid"] for n in test_images
    )
    assert {meta[n]["split"] for n in test_images} == {"test"}
    assert {(Path(r["image"]).stem, _qa(r)[0]) for r in train}.isdisjoint(
        {(Path(r["image"]).stem, _qa(r)[0]) for r in test}
    )


def test_pngs_are_the_rendered_dicom_and_monochrome1_is_inverted(built):
    _, _, meta = _load(built)
    cr = meta["dicomdirtests-77654033-CR1-6154"]
    ds = pydicom.dcmread(qd.SOURCE_DIR / cr["source"])
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    rgb = qd.dicom_to_rgb(ds)
    np.testing.assert_array_equal(np.asarray(Image.open(built / "images" / f"{cr['name']}.png")), rgb)
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(qd.dicom_to_rgb(ds), 255 - rgb)
    ct = qd.dicom_to_rgb(pydicom.dcmread(qd.SOURCE_DIR / "CT_small.dcm"))
    assert ct.shape == (128, 128, 3) and ct.dtype == np.uint8 and (ct.min(), ct.max()) == (0, 255)
    assert (ct[..., 0] == ct[..., 2]).all()


def test_deterministic_for_a_seed_and_rerun_is_a_noop(built, tmp_path):
    again = qd.build_quickstart_dataset(tmp_path / "again", seed=0)
    assert _files(again) == _files(built)

    before = {p: p.stat().st_mtime_ns for p in built.rglob("*")}
    assert qd.build_quickstart_dataset(built, seed=0) == built
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*")} == before

    with pytest.raises(FileExistsError, match="overwrite=True"):
        qd.build_quickstart_dataset(again, seed=1)
    qd.build_quickstart_dataset(again, seed=1, overwrite=True)
    assert json.loads((again / qd.MARKER).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left behind

    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a quickstart set"):
        qd.build_quickstart_dataset(tmp_path / "mine")


def test_cli_prints_counts_per_split_and_modality(built, capsys):
    qd.main([str(built)])
    out = capsys.readouterr().out
    counts = qd.summarize(built)
    assert counts["train"]["all"]["rows"] + counts["test"]["all"]["rows"] == sum(
        len(json.loads((built / f"{s}.json").read_text())) for s in ("train", "test")
    )
    for split in ("train", "test"):
        for modality, n in counts[split].items():
            assert f"{split:5s} | {modality:8s} | {n['images']:6d} | {n['rows']:4d}" in out
