"""Tests of `python -m nvila_ft.predict`: one row per input, resume after a kill, bad rows skipped.

    pytest tests/test_predict.py
"""

from __future__ import annotations

import json

import pytest

from nvila_ft.data import DataError, load_samples
from nvila_ft.evaluate import generate_answers
from nvila_ft.inference import load_model
from nvila_ft.predict import OutputFileError, main, meta_path, predict, read_done

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_model(tiny_run.output_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def samples(tiny_assets):
    return load_samples(tiny_assets.data, "test", max_samples=7)


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_row_per_input_with_the_greedy_answers(loaded, samples, tmp_path):
    model, processor = loaded
    out = tmp_path / "preds.jsonl"

    result = predict(model, processor, samples, out, batch_size=3, max_new_tokens=4, progress=False)

    rows = rows_of(out)
    assert result == {"written": 7, "skipped_done": 0, "bad": []}
    assert [r["id"] for r in rows] == [s["id"] for s in samples]
    expected = generate_answers(model, processor, samples, max_new_tokens=4, batch_size=7, progress=False)
    assert [r["prediction"] for r in rows] == expected  # batching (3 + 3 + 1) does not change answers
    assert [r["reference"] for r in rows] == [s["conversations"][-1]["value"] for s in samples]
    assert rows[0]["question"] == samples[0]["conversations"][0]["value"]


def test_restart_skips_written_rows_and_drops_a_cut_off_line(loaded, samples, tmp_path):
    model, processor = loaded
    out = tmp_path / "preds.jsonl"
    predict(model, processor, samples[:3], out, max_new_tokens=4, progress=False)
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": "cut off by a ki')  # the job was killed while writing row 4

    result = predict(model, processor, samples, out, batch_size=2, max_new_tokens=4, progress=False)

    assert result["written"] == 4 and result["skipped_done"] == 3
    assert out.read_text().startswith(first)  # rows already written are kept as they were
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [s["id"] for s in samples]  # each id once, in order
    assert predict(model, processor, samples, out, progress=False)["written"] == 0  # nothing left to do


def test_a_bad_row_is_reported_and_skipped_then_retried(loaded, samples, tmp_path):
    model, processor = loaded
    broken = [dict(samples[0]), *samples[1:4]]
    broken[0]["images"] = [str(tmp_path / "missing.png")]
    broken[2] = {**broken[2], "error": "conversations[0] must be a dict"}  # a row the loader flagged
    out = tmp_path / "preds.jsonl"

    result = predict(model, processor, broken, out, batch_size=4, max_new_tokens=4, progress=False)

    assert sorted(key for key, _ in result["bad"]) == sorted([broken[0]["id"], broken[2]["id"]])
    assert [r["id"] for r in rows_of(out)] == [broken[1]["id"], broken[3]["id"]]
    again = predict(model, processor, broken, out, max_new_tokens=4, progress=False)
    assert again["written"] == 0 and len(again["bad"]) == 2  # retried (still bad), the good rows not redone
    with pytest.raises(FileNotFoundError):
        predict(model, processor, broken[:2], tmp_path / "strict.jsonl", on_bad_row="error", progress=False)
    with pytest.raises(DataError, match="conversations.0. must be a dict"):
        predict(model, processor, broken[2:], tmp_path / "strict.jsonl", on_bad_row="error", progress=False)


def test_read_done_refuses_a_file_that_is_not_predictions(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("hello\n{}\n")
    with pytest.raises(ValueError, match="notes.jsonl:1 is not a JSON line"):
        read_done(path)


def test_a_file_predict_did_not_write_is_refused_and_left_as_it_is(loaded, samples, tiny_run, tmp_path, capsys):
    model, processor = loaded
    notes = tmp_path / "notes.txt"
    notes.write_text("buy milk")  # one line, no newline: it looked like a cut-off prediction row

    code = main([str(tiny_run.output_dir), "--out", str(notes), "--max-samples", "2", "--dtype", "float32",
                 "--device", "cpu"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and notes.read_text() == "buy milk" and not meta_path(notes).exists()
    assert err.startswith("error: --out ") and "not written by nvila_ft.predict" in err and "\n" not in err
    table = tmp_path / "table.jsonl"
    table.write_text('{"a": 1}\n{"b": 2}')  # JSON lines, but not predictions
    with pytest.raises(OutputFileError, match="not written by nvila_ft.predict"):
        predict(model, processor, samples, table, progress=False)
    assert table.read_text() == '{"a": 1}\n{"b": 2}'


def test_own_file_is_resumed_only_for_the_same_model_and_data(loaded, samples, tmp_path):
    model, processor = loaded
    out = tmp_path / "preds.jsonl"
    meta = {"model": "runs/a", "data": "data/x", "split": "test"}
    predict(model, processor, samples[:2], out, max_new_tokens=4, progress=False, meta=meta)
    assert json.loads(meta_path(out).read_text()) == {"written_by": "nvila_ft.predict", **meta}
    before = out.read_text()

    with pytest.raises(OutputFileError, match="holds predictions of model runs/a, not runs/b"):
        predict(model, processor, samples, out, progress=False, meta={**meta, "model": "runs/b"})
    assert out.read_text() == before

    legacy = tmp_path / "legacy.jsonl"  # complete rows written before sidecars existed: resumed
    legacy.write_text(before)
    result = predict(model, processor, samples[:3], legacy, max_new_tokens=4, progress=False, meta=meta)
    assert result["skipped_done"] == 2 and result["written"] == 1 and meta_path(legacy).is_file()


def test_cli_defaults_to_the_runs_eval_split_and_scores(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    card = (tiny_run.output_dir / "README.md").read_text()

    code = main([str(tiny_run.output_dir), "--out", str(out), "--max-samples", "5", "--max-new-tokens", "4",
                 "--metric", "vqa_rad", "--dtype", "float32", "--device", "cpu"])

    assert code == 0
    rows = rows_of(out)
    assert len(rows) == 5 and all("prediction" in r and "reference" in r for r in rows)
    metrics = json.loads((tmp_path / "cli.metrics.json").read_text())
    assert metrics["n"] == 5
    assert "5 rows written, 0 already there, 0 bad rows" in capsys.readouterr().out
    assert (tiny_run.output_dir / "README.md").read_text() == card  # the run's model card is untouched
