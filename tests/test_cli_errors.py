"""User errors on the command line: one `error:` line naming the thing and the fix, exit code 2, no traceback;
`NVILA_FT_DEBUG=1` shows the traceback instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvila_ft.predict import main as predict_main
from nvila_ft.train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = ROOT / "recipes" / "medical.yaml"  # no demo bootstrap: a missing path stays missing


def assert_user_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = next((text for text in err.splitlines() if text.startswith("error: ")), None)
    assert line is not None, err
    for needle in needles:
        assert needle in err, (needle, err)
    return line


def write_rows(folder: Path, rows, name="train.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(rows))
    return folder


def qa_row(image: str, i: int) -> dict:
    return {"id": f"r{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "yes"}]}


def base_overrides(tiny_assets, data: Path, out: Path) -> list[str]:
    return [f"model.path={tiny_assets.model}", f"data.path={data}", "data.format=llava", "data.eval_split=null",
            "eval.enabled=false", f"train.output_dir={out}", "train.max_steps=1", "tune.llm=lora", "model.dtype=float32",
            "train.mixed_precision=no", "model.image_aspect_ratio=resize", "lora.r=4"]


def test_unknown_scheduler_is_refused_at_recipe_load_with_a_suggestion(capsys):
    line = assert_user_error(capsys, train_main([str(MEDICAL), "train.lr_scheduler_type=cosinee"]),
                             "train.lr_scheduler_type", "did you mean 'cosine'")
    assert str(MEDICAL.name) in line


def test_missing_model_path_is_one_line(tmp_path, capsys):
    code = train_main([str(MEDICAL), f"model.path={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'o'}"])
    assert_user_error(capsys, code, "nope")


def test_unreachable_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = train_main([str(MEDICAL), "model.path=Efficient-Large-Model/NoSuchModel-1B",
                       f"train.output_dir={tmp_path / 'o'}"])
    line = assert_user_error(capsys, code, "NoSuchModel-1B", "Hugging Face Hub")
    assert len(line) < 600


def test_preflight_refusal_lists_rows_without_a_traceback(tiny_assets, tmp_path, capsys):
    image = next(Path(tiny_assets.data).rglob("*.png"))
    data = write_rows(tmp_path / "d", [qa_row(str(image), 0), qa_row(str(tmp_path / "missing.png"), 1)])
    code = train_main([str(MEDICAL), *base_overrides(tiny_assets, data, tmp_path / "o"), "data.on_bad_row=error"])
    assert_user_error(capsys, code, "id=r1", "missing.png", "data.on_bad_row=skip")


def test_non_utf8_json_names_the_file(tiny_assets, tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    code = train_main([str(MEDICAL), *base_overrides(tiny_assets, data, tmp_path / "o")])
    assert_user_error(capsys, code, "train.json")


def test_predict_on_bad_row_error_is_one_line(tiny_run, tiny_assets, tmp_path, capsys):
    image = next(Path(tiny_assets.data).rglob("*.png"))
    data = write_rows(tmp_path / "d", [qa_row(str(image), 0), qa_row(str(tmp_path / "gone.png"), 1)], "test.json")
    code = predict_main([str(tiny_run.output_dir), "--data", str(data), "--split", "test", "--out", str(tmp_path / "p.jsonl"),
                         "--on-bad-row", "error"])
    assert_user_error(capsys, code, "gone.png")


def test_debug_switch_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("NVILA_FT_DEBUG", "1")
    from nvila_ft.train.recipe import RecipeError

    with pytest.raises(RecipeError):
        train_main([str(MEDICAL), "train.lr_scheduler_type=cosinee"])
