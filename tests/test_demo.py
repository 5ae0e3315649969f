"""`demo:` resources (nvila_ft.demo): recipes, loaders, the planner, predict and a run's recorded base resolve
them, they are built once into $NVILA_FT_DEMO_DIR (conftest: a session folder), and nothing but the demo needs
pydicom.

    pytest tests/test_demo.py
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nvila_ft.demo as demo
from nvila_ft.data import DataError, load_samples
from nvila_ft.inference import base_checkpoint, load_model
from nvila_ft.model.checkpoint import resolve_checkpoint
from nvila_ft.train.cli import main as train_main
from nvila_ft.train.recipe import RecipeError
from nvila_ft.train.recipe_io import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_paths_build_once_into_the_demo_dir(demo_dir, monkeypatch, tiny_assets):
    data = demo.resolve("demo:medical")
    assert data == demo_dir / "medical" and (data / "train.json").is_file()
    samples = load_samples("demo:medical", "test")
    assert len(samples) == 33 and all(Path(s["images"][0]).parent == data / "images" for s in samples)
    model = resolve_checkpoint("demo:tiny-nvila")
    assert model == demo_dir / "tiny-nvila"
    # The same seeded build as `build_tiny_checkpoint(..., "nvila", seed=0)`: byte-identical weights.
    for part in ("llm", "vision_tower", "mm_projector"):
        assert digest(model / part / "model.safetensors") == digest(tiny_assets.model / part / "model.safetensors")
    # Built: later resolutions never call a builder again.
    monkeypatch.setattr(importlib, "import_module", lambda name: pytest.fail(f"rebuilt via {name}"))
    assert demo.resolve("demo:medical") == data and resolve_checkpoint("demo:tiny-nvila") == model


def test_bad_demo_paths_are_one_line_errors_before_any_load(monkeypatch, capsys):
    with pytest.raises(RecipeError, match="'demo:nope' is not a demo data set; choose one of demo:medical, demo:medical-pairs, demo:video"):
        load_recipe(QUICKSTART, ["data.path=demo:nope"])
    with pytest.raises(RecipeError, match="not a demo checkpoint; choose one of demo:tiny-nvila, demo:tiny-nvila-lite"):
        load_recipe(QUICKSTART, ["model.path=demo:medical"])
    with pytest.raises(DataError, match="not a demo data set"):
        load_samples("demo:tiny-nvila", "train")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydicom" else real(name, *a))
    assert train_main([str(QUICKSTART)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'demo:medical needs pydicom' in err and 'pip install -e ".[demo]"' in err


def test_nvila_ft_trains_on_real_data_without_pydicom(tmp_path):
    """pydicom (the demo extra) is imported by nothing but the medical demo set."""
    (tmp_path / "train.json").write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]))
    code = f"""
import sys
sys.modules["pydicom"] = None  # as if not installed: importing it raises ImportError
import nvila_ft, nvila_ft.api, nvila_ft.train.trainer, nvila_ft.plan.report, nvila_ft.predict, nvila_ft.merge
from nvila_ft.data import load_split
recipe = nvila_ft.load_recipe({str(QUICKSTART)!r}, ["data.path={tmp_path}", "model.path=demo:tiny-nvila"])
assert len(load_split(recipe.data, "train")) == 1
try:
    import nvila_ft.demo.medical
except ImportError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == 'the medical demo set needs pydicom: pip install -e ".[demo]"'


def test_pydicom_is_only_in_the_demo_extra_and_dev_covers_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0] for dep in project["dependencies"]}
    assert not names & {"pydicom", "scikit-video", "rich"}  # trl is used (DPO, nvila_ft.train.preference)
    extras = {k: {d.split(">")[0] for d in v} for k, v in project["optional-dependencies"].items()}
    assert extras["demo"] == {"pydicom", "scikit-video"} and extras["demo"] <= extras["dev"]
    assert ('pip install -e ".[demo]" && accelerate launch --config_file recipes/accelerate/single_process.yaml '
            "-m nvila_ft.train recipes/quickstart.yaml") in (ROOT / "README.md").read_text()


def test_a_run_on_a_demo_base_loads_from_its_recipe(tiny_assets, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.output_dir, run)
    recipe = (run / "recipe.yaml").read_text().replace(str(tiny_assets.model), "demo:tiny-nvila")
    (run / "recipe.yaml").write_text(recipe)  # as a run of recipes/quickstart.yaml records it
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "base_model_path": None}))

    assert base_checkpoint(run) == "demo:tiny-nvila"
    model, _ = load_model(run, dtype="float32", device="cpu")
    sample = tiny_run.eval_samples[0]
    batch = tiny_run.processor.collate([tiny_run.processor(sample["conversations"], sample["images"])])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, tiny_run.model.eval()(**batch).logits)


def test_planner_and_predict_take_demo_paths(tiny_run, tmp_path, capsys):
    from nvila_ft.plan.report import main as plan_main
    from nvila_ft.predict import main as predict_main

    assert plan_main([str(QUICKSTART), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "demo:tiny-nvila" and "tiny-nvila" in plan["source"]

    out = tmp_path / "predictions.jsonl"
    assert predict_main([str(tiny_run.output_dir), "--data", "demo:medical", "--split", "test", "--max-samples",
                         "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(r["reference"] and r["answer_type"] for r in rows)


def test_tiny_cli_and_the_lite_demo_write_the_same_checkpoint(demo_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "nvila_ft.tiny", str(tmp_path / "lite"), "--variant", "nvila-lite"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == str(tmp_path / "lite")
    lite = resolve_checkpoint("demo:tiny-nvila-lite")
    assert lite == demo_dir / "tiny-nvila-lite"
    assert json.loads((lite / "config.json").read_text())["image_aspect_ratio"] == "dynamic"
    for part in ("llm", "vision_tower", "mm_projector"):
        assert digest(lite / part / "model.safetensors") == digest(tmp_path / "lite" / part / "model.safetensors")


def test_video_demo_set_loads_by_name(demo_dir):
    pytest.importorskip("decord")
    train, test = load_samples("demo:video", "train"), load_samples("demo:video", "test")
    assert len(train) == 16 and len(test) == 3
    assert train[0]["videos"][0].startswith(str(demo_dir / "video" / "videos"))
    assert test[0]["videos"] == [str(demo_dir / "video" / "frames" / "carphone")]  # a frames folder
