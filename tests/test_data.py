"""Tests for nvila_ft.data: every source format, and preflight catching every kind of bad row.

Run: pytest tests/test_data.py
"""

import io
import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from nvila_ft.data import DataError, detect_format, load_samples, preflight

SHARED = Path(__file__).resolve().parents[2] / "shared"
VQA_RAD = SHARED / "data" / "vqa_rad"
needs_vqa_rad = pytest.mark.skipif(
    not (VQA_RAD / "trainset.json").is_file(), reason=f"shared VQA-RAD data not found at {VQA_RAD}"
)


def png_bytes(size=(8, 6), color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg_bytes() -> bytes:
    """A JPEG cut in half: `Image.open` reads its header fine, only decoding the pixels fails."""
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def qa(question="<image>\nWhat is it?", answer="A lung."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def llava_dir(tmp_path):
    """A LLaVA folder: train.json (image / images / text-only rows), test.jsonl, images in img/."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(png_bytes())
    train = [
        {"id": "one", "image": "img/a.png", "conversations": qa()},
        {"id": 2, "images": ["img/a.png", "img/b.png"], "conversations": qa("<image>\n<image>\nSame?", "No")},
        {
            "id": "text",
            "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}],
        },
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    lines = [json.dumps({"id": "t0", "image": "img/b.png", "conversations": qa()}), "{not json", ""]
    (tmp_path / "test.jsonl").write_text("\n".join(lines))
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# VQA-RAD (shared real data)


@needs_vqa_rad
def test_vqa_rad_train_and_test_splits():
    train = load_samples(VQA_RAD, "train")
    assert len(train) == 3064
    assert train[0] == {
        "id": "1",
        "images": [str(VQA_RAD / "images" / "synpic54610.jpg")],
        "videos": [],
        "conversations": qa("<image>\nAre regions of the brain infarcted?", "Yes"),
        "answer_type": "CLOSED",
        "source": str(VQA_RAD / "trainset.json"),
        "index": 0,
    }
    # The raw file has "CLOSED " (trailing space) and integer answers: both normalized, no error rows.
    assert {s["answer_type"] for s in train} == {"CLOSED", "OPEN"}
    assert all(isinstance(s["conversations"][1]["value"], str) for s in train)
    assert not any("error" in s for s in train)

    test = load_samples(VQA_RAD, "test", format="vqa_rad")
    assert Counter(s["answer_type"] for s in test) == {"CLOSED": 272, "OPEN": 179}  # shared README
    assert [s["index"] for s in load_samples(VQA_RAD, "train", max_samples=5)] == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="VQA-RAD has splits"):
        load_samples(VQA_RAD, "validation")


@needs_vqa_rad
def test_vqa_rad_test_split_passes_preflight():
    samples = load_samples(VQA_RAD, "test")
    report = preflight(samples, progress=False)
    assert report.bad == [] and report.ok == samples


# ---------------------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL


def test_detect_format(llava_dir, tmp_path_factory):
    assert detect_format(llava_dir, "train") == "llava"
    assert detect_format(llava_dir / "train.json", "anything") == "llava"
    assert detect_format(llava_dir, "validation") == "hf"  # no validation.json(l): not a LLaVA split
    vqa = tmp_path_factory.mktemp("vqa")
    (vqa / "trainset.json").write_text("[]")
    assert detect_format(vqa, "test") == "vqa_rad"
    assert detect_format("someone/some-dataset", "train") == "hf"


def test_llava_json_folder_resolves_images_and_roles(llava_dir):
    samples = load_samples(llava_dir, "train")
    assert [s["id"] for s in samples] == ["one", "2", "text"]
    assert samples[0]["images"] == [str(llava_dir / "img" / "a.png")]
    assert samples[1]["images"] == [str(llava_dir / "img" / "a.png"), str(llava_dir / "img" / "b.png")]
    assert samples[2]["images"] == []
    assert [t["from"] for t in samples[2]["conversations"]] == ["human", "gpt"]  # user/assistant mapped
    assert all(s["source"] == str(llava_dir / "train.json") and s["answer_type"] is None for s in samples)
    assert preflight(samples, progress=False).ok == samples

    other = load_samples(llava_dir / "train.json", "train", image_folder="/data/imgs", max_samples=1)
    assert other[0]["images"] == ["/data/imgs/img/a.png"]


def test_llava_jsonl_bad_line_becomes_error_row(llava_dir):
    samples = load_samples(llava_dir, "test")
    assert len(samples) == 2  # blank line ignored
    assert "error" not in samples[0] and samples[0]["images"] == [str(llava_dir / "img" / "b.png")]
    assert "line 2 is not valid JSON" in samples[1]["error"] and samples[1]["index"] == 1


def test_llava_unreadable_files_raise(llava_dir):
    with pytest.raises(DataError, match="no validation.json or validation.jsonl"):
        load_samples(llava_dir, "validation", format="llava")
    (llava_dir / "broken.json").write_text('[{"id": 1,}]')
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON \(line 1"):
        load_samples(llava_dir / "broken.json", "train")
    (llava_dir / "dict.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="must hold a JSON list"):
        load_samples(llava_dir / "dict.json", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_samples(llava_dir / "missing.json", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_samples(llava_dir / "missing_folder", "train")
    (llava_dir / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="has no rows"):
        load_samples(llava_dir / "empty.json", "train")
    with pytest.raises(DataError, match="choose one of"):
        load_samples(llava_dir, "train", format="coco")


# ---------------------------------------------------------------------------------------------------------
# Preflight


@pytest.fixture
def bad_rows_file(llava_dir):
    """One good row and one row per problem preflight must catch, in a single train.json."""
    (llava_dir / "img" / "garbage.png").write_bytes(b"this is not an image")
    (llava_dir / "img" / "truncated.jpg").write_bytes(truncated_jpeg_bytes())
    rows = [
        {"id": "good", "image": "img/a.png", "conversations": qa()},
        {"id": "missing", "image": "img/nope.png", "conversations": qa()},
        {"id": "garbage", "image": "img/garbage.png", "conversations": qa()},
        {"id": "truncated", "image": "img/truncated.jpg", "conversations": qa()},
        {"id": "empty", "image": "img/a.png", "conversations": qa(answer="  \n")},
        {"id": "nohuman", "image": "img/a.png", "conversations": [{"from": "gpt", "value": "Yes"}]},
        {"id": "placeholders", "image": "img/a.png", "conversations": qa("<image>\n<image>\nSame?")},
        {"id": "noconv", "image": "img/a.png"},
        {"id": "video", "video": "clip.mp4", "conversations": qa("<vila/video>\nWhat happens?")},
        {"id": "role", "conversations": [{"from": "system", "value": "x"}]},
        {"id": "long", "image": "img/a.png", "conversations": qa(answer="word " * 50)},
    ]
    path = llava_dir / "rows.json"
    path.write_text(json.dumps(rows))
    return path


EXPECTED_REASONS = {
    "missing": "image file not found",
    "garbage": "unreadable image",
    "truncated": "unreadable image",
    "empty": "empty answer",
    "nohuman": "no human turn",
    "placeholders": "2 <image> placeholder(s) but 1 image(s)",
    "noconv": "missing key 'conversations'",
    "video": "video file not found",
    "role": "conversations[0]['from'] is 'system'",
    "long": "tokens > max_length 40",
}


def word_count(sample):
    return sum(len(turn["value"].split()) for turn in sample["conversations"])


def test_preflight_error_lists_every_bad_row(bad_rows_file):
    samples = load_samples(bad_rows_file, "train")
    with pytest.raises(DataError) as caught:
        preflight(samples, length_fn=word_count, max_length=40, progress=False)
    message = str(caught.value)
    assert "11 rows checked, 1 ok, 10 bad" in message
    assert "data.on_bad_row=skip" in message
    for index, (sample_id, reason) in enumerate(EXPECTED_REASONS.items(), start=1):
        line = next(line for line in message.splitlines() if f"id={sample_id}:" in line)
        assert line.strip().startswith(f"{bad_rows_file}[{index}] id={sample_id}: ")
        assert reason in line


def test_preflight_skip_keeps_good_rows_and_warns(bad_rows_file, caplog):
    samples = load_samples(bad_rows_file, "train")
    with caplog.at_level(logging.WARNING, logger="nvila_ft.data"):
        report = preflight(samples, on_bad_row="skip", length_fn=word_count, max_length=40, progress=False)
    assert [s["id"] for s in report.ok] == ["good"]
    assert [b.id for b in report.bad] == list(EXPECTED_REASONS)
    assert "skipping 10 bad row(s)" in caplog.text and "id=garbage" in caplog.text
    # Without image checks, only the structural problems remain.
    report = preflight(samples, on_bad_row="skip", check_images=False, progress=False)
    assert {b.id for b in report.bad} == set(EXPECTED_REASONS) - {"missing", "garbage", "truncated", "long"}


def test_preflight_summary_truncates_after_50(tmp_path):
    rows = [{"id": f"r{i}", "conversations": qa("Hi?", "")} for i in range(60)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    report = preflight(load_samples(tmp_path, "train"), on_bad_row="skip", progress=False)
    lines = report.summary().splitlines()
    assert lines[0] == "preflight: 60 rows checked, 0 ok, 60 bad"
    assert (
        len(lines) == 1 + 50 + 1
        and "id=r49:" in lines[50]
        and lines[-1].strip() == "... and 10 more bad rows"
    )


def test_preflight_rejects_bad_arguments():
    with pytest.raises(ValueError, match="choose 'error' or 'skip'"):
        preflight([], on_bad_row="ignore")
    with pytest.raises(ValueError, match="no max_length"):
        preflight([], length_fn=len)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face datasets (local only: saved folders and parquet)

FEATURES = datasets.Features(
    {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
)


def image_rows(answers):
    return {
        "image": [{"bytes": png_bytes(), "path": None} for _ in answers],
        "question": [f"Question {i}?" for i in range(len(answers))],
        "answer": answers,
    }


def test_hf_saved_dataset_dict(tmp_path):
    train = datasets.Dataset.from_dict(image_rows(["Yes", "left lung", "NO"]), features=FEATURES)
    test = datasets.Dataset.from_dict(image_rows(["no"]), features=FEATURES)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    assert detect_format(tmp_path / "saved", "train") == "hf"

    samples = load_samples(tmp_path / "saved", "train")
    assert [s["answer_type"] for s in samples] == ["CLOSED", "OPEN", "CLOSED"]
    assert samples[1]["conversations"] == qa("<image>\nQuestion 1?", "left lung")
    assert samples[1]["id"] == "1" and samples[1]["source"] == str(tmp_path / "saved")
    image = samples[0]["images"][0]
    assert isinstance(image, Image.Image) and image.size == (8, 6)
    report = preflight(samples, progress=False)
    assert report.ok == samples
    assert image.getpixel((0, 0)) == (200, 10, 10)  # still usable after preflight
    assert len(load_samples(tmp_path / "saved", "test")) == 1
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\], not 'validation'"):
        load_samples(tmp_path / "saved", "validation")


def test_hf_parquet_folder_with_paths_and_answer_type_column(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(png_bytes())
    rows = {
        "image": ["x.png", "x.png"],
        "question": ["Is it red?", "<image>\nWhere?"],
        "answer": ["Yes", "left"],
        "answer_type": ["OPEN", "CLOSED"],  # the dataset's own labels win over yes/no inference
    }
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "data" / "train.parquet")
    samples = load_samples(tmp_path / "data", "train", image_folder=tmp_path / "images")
    assert [s["answer_type"] for s in samples] == ["OPEN", "CLOSED"]
    assert samples[0]["images"] == [str(tmp_path / "images" / "x.png")]
    assert samples[1]["conversations"][0]["value"] == "<image>\nWhere?"  # existing placeholder kept
    assert preflight(samples, progress=False).ok == samples
    with pytest.raises(DataError, match="cannot load split 'test'"):
        load_samples(tmp_path / "data", "test")


def test_hf_conversations_column_and_image_lists(tmp_path):
    conversations = [qa("<image>\n<image>\nCompare.", "Same."), qa("Text only?", "Sure.")]
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "conversations": datasets.List(
                {"from": datasets.Value("string"), "value": datasets.Value("string")}
            ),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"images": [[{"bytes": png_bytes(), "path": None}] * 2, []], "conversations": conversations},
        features=features,
    )
    ds.save_to_disk(tmp_path / "single")  # a single Dataset (no splits) is used for any split
    samples = load_samples(tmp_path / "single", "train", image_column="images")
    assert [len(s["images"]) for s in samples] == [2, 0]
    assert [s["conversations"] for s in samples] == conversations
    assert all(s["answer_type"] is None for s in samples)
    assert preflight(samples, progress=False).ok == samples


def test_hf_bad_rows_and_missing_columns(tmp_path):
    rows = image_rows(["yes", "", "no"])
    rows["image"][2] = {"bytes": b"garbage", "path": None}  # fails at load: Image.open cannot identify it
    rows["image"][0] = {"bytes": truncated_jpeg_bytes(), "path": None}  # fails only in preflight's decode
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=FEATURES)}).save_to_disk(
        tmp_path
    )
    samples = load_samples(tmp_path, "train")
    assert "unreadable image bytes" in samples[2]["error"]
    report = preflight(samples, on_bad_row="skip", progress=False)
    assert (
        "error" not in samples[0]
        and "in-memory image (OSError: image file is truncated" in report.bad[0].reason
    )
    assert [(b.index, b.reason) for b in report.bad[1:]] == [
        (1, "empty answer (a gpt turn is empty or whitespace)"),
        (2, samples[2]["error"]),
    ]
    with pytest.raises(DataError, match=r"no column\(s\) \['label'\]; its columns are \['image', 'question'"):
        load_samples(tmp_path, "train", answer_column="label")
