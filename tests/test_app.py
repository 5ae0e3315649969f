"""Tests of the preview app's functions (app/previewer.py, app/media.py) on two real tiny fine-tuned runs (conftest `tiny_runs`).

    /work/venv/bin/pytest tests/test_app.py -q

The answers the app streams are checked against the library's own path (`nvila_ft.inference.load_model` of the
base checkpoint and of each run folder, then `generate`), so switching runs on one cached base must give exactly
what loading each run on its own gives.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.app import main, parse_args
from app.media import UploadError, check_upload, denormalize, page_message, tile_preview, video_support
from app.previewer import BASE, Previewer, find_runs, stream_answer
from nvila_ft.inference import RunError, generate, load_model, prepare_inputs
from nvila_ft.model.image_processing import tile_image
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.train.tuning import base_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "What imaging modality is shown?"


@pytest.fixture(scope="module")
def previewer(tiny_runs) -> Previewer:
    return Previewer(runs_dir=tiny_runs.runs)


@pytest.fixture(scope="module")
def wide_image(tiny_runs) -> Path:
    """A real 800 x 350 image from the quickstart set (pydicom's examples_palette): several tiles."""
    path = tiny_runs.data / "images" / "examples_palette.png"
    assert Image.open(path).size == (800, 350)
    return path


def test_runs_are_found_with_their_base(tiny_runs, previewer):
    base = str(tiny_runs.model)
    assert previewer.bases() == [base]  # recorded by the runs (run_info.json), once
    assert previewer.runs_for(base) == ["medical", "medical/checkpoint-2", "medical-r4", "medical-r4/checkpoint-2"]
    assert previewer.runs_for("elsewhere") == []
    assert previewer.problems() == []
    assert [p.name for p in find_runs(tiny_runs.runs)] == ["medical", "checkpoint-2", "medical-r4", "checkpoint-2"]
    assert find_runs(tiny_runs.root / "missing") == []


def test_run_outside_runs_dir_and_a_moved_base(tiny_runs, tmp_path):
    moved = tmp_path / "moved-run"
    shutil.copytree(tiny_runs.runs / "medical", moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    for name in ("run_info.json",):
        info = json.loads((moved / name).read_text())
        info["base_model_path"] = str(tmp_path / "gone")
        (moved / name).write_text(json.dumps(info))
    (moved / "recipe.yaml").write_text((moved / "recipe.yaml").read_text().replace(str(tiny_runs.model),
                                                                                  str(tmp_path / "gone")))
    alone = Previewer(runs_dir=None, runs=[moved])
    assert alone.bases() == [] and "start the app with --base" in alone.problems()[0]

    with_base = Previewer(runs_dir=None, base=str(tiny_runs.model), runs=[moved])
    assert with_base.bases() == [str(tiny_runs.model)]
    assert with_base.runs_for(str(tiny_runs.model)) == ["moved-run"]

    with pytest.raises(RunError, match="not a run folder"):
        Previewer(runs_dir=None, runs=[tiny_runs.data])


def test_base_and_tuned_answers_match_loading_each_on_its_own(tiny_runs, previewer, wide_image):
    base = previewer.default_base()
    states = list(previewer.answer(wide_image, QUESTION, base, ["medical", "medical-r4"], max_new_tokens=12))
    final = states[-1]
    assert list(final) == [BASE, "medical", "medical-r4"]  # base first, then the runs in the order asked

    expected = {}
    for key, path in [(BASE, tiny_runs.model), ("medical", tiny_runs.runs / "medical"),
                      ("medical-r4", tiny_runs.runs / "medical-r4")]:
        model, processor = load_model(path)
        expected[key] = generate(model, processor, str(wide_image), QUESTION, max_new_tokens=12)
    assert final == expected
    assert all(final.values())  # non-empty answers
    assert final["medical"] != final[BASE] and final["medical-r4"] != final[BASE]  # the runs changed the model

    # Streamed: each answer only grows, in more than one step overall.
    for key in final:
        seen = [s[key] for s in states if key in s]
        assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))
    assert len(states) > len(final) + 1

    # After the runs, the base model is itself again (LoRA off, base projector / LayerNorms restored).
    again = list(previewer.answer(wide_image, QUESTION, base, [], max_new_tokens=12))[-1]
    assert again == {BASE: expected[BASE]}


def test_sampling_settings_reach_generation(tiny_runs, previewer, wide_image):
    settings = {"max_new_tokens": 10, "temperature": 1.5, "top_p": 0.9}
    base = previewer.default_base()
    previewer.load(base, ["medical"])  # loading draws random numbers (module init): load everything first
    alone = {BASE: load_model(tiny_runs.model), "medical": load_model(tiny_runs.runs / "medical")}
    torch.manual_seed(0)
    sampled = list(previewer.answer(wide_image, QUESTION, base, ["medical"], **settings))[-1]
    torch.manual_seed(0)
    expected = {key: generate(model, processor, str(wide_image), QUESTION, **settings)
                for key, (model, processor) in alone.items()}
    assert sampled == expected
    greedy = list(previewer.answer(wide_image, QUESTION, base, ["medical"], max_new_tokens=10))[-1]
    assert greedy != sampled  # temperature 1.5 on a random model: not the greedy answers


def test_switching_runs_keeps_one_base_model(tiny_runs, wide_image, monkeypatch):
    loads = []
    original = NvilaForConditionalGeneration.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(NvilaForConditionalGeneration, "from_pretrained", classmethod(counting))
    fresh = Previewer(runs_dir=tiny_runs.runs)
    base = fresh.default_base()
    models = []
    for runs in (["medical"], ["medical-r4"], [], ["medical-r4", "medical"]):
        answers = list(fresh.answer(wide_image, QUESTION, base, runs, max_new_tokens=2))[-1]
        assert list(answers) == [BASE, *runs]
        models.append(base_model(fresh.load(base).bank.model))
    assert loads == [base]  # loaded once
    assert all(m is models[0] for m in models)

    # Each run, switched in on the shared base, computes what the run loaded on its own computes.
    loaded = fresh.load(base)
    batch = prepare_inputs(loaded.processor, str(wide_image), QUESTION)
    batch.pop("num_tokens")
    logits = {}
    for run in (None, "medical-r4", "medical", None):
        with torch.no_grad():
            logits[run] = loaded.bank.activate(loaded.adapters.get(run)).forward(**batch).logits[0, -1]
        alone, _ = load_model(tiny_runs.runs / run if run else tiny_runs.model)
        with torch.no_grad():
            torch.testing.assert_close(logits[run], alone.forward(**batch).logits[0, -1])
    assert not torch.allclose(logits["medical"], logits["medical-r4"])


def test_tile_preview_shows_what_each_model_sees(previewer, wide_image):
    base = previewer.default_base()
    tiles = previewer.tiles(wide_image, base)  # the tiny base checkpoint: NVILA dynamic_s2
    # 800 x 350 (aspect 2.29): last scale 2 rows x 5 cols (closest grid with 9..12 tiles) after 1 + 4 tiles.
    assert tiles.block_sizes == [(2, 5)]
    assert len(tiles.tiles) == len(tiles.captions) == 1 + 4 + 10
    assert tiles.captions[0] == "448 px scale" and tiles.captions[-1] == "last scale 2x5, row 2 col 5"
    processor = previewer.processor(base)
    assert tiles.media_tokens == sum(processor.layout_media([wide_image]).media_tokens)
    assert f"{tiles.media_tokens:,} visual tokens" in tiles.summary and "2 rows x 5 cols" in tiles.summary
    # The gallery shows exactly the pixels the vision tower gets (de-normalized back to uint8).
    reference, _ = tile_image(Image.open(wide_image), processor.tiling)
    for shown, ref in zip(tiles.tiles, reference):
        assert shown.size == (448, 448)
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(ref))

    run_tiles = previewer.tiles(wide_image, base, "medical")  # trained with dynamic, max_tiles 4
    assert len(run_tiles.tiles) == 3 and run_tiles.captions == ["tile 1", "tile 2", "thumbnail"]
    assert run_tiles.block_sizes == [None] * 3  # NVILA-Lite style: one placeholder per tile
    assert run_tiles.media_tokens < tiles.media_tokens


def test_denormalize_inverts_normalize():
    pixels = torch.tensor([[[[0.0, 255.0]]]]).repeat(1, 3, 1, 1) / 255 * 2 - 1  # (1, 3, 1, 2) in [-1, 1]
    image = denormalize(pixels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[0]
    assert np.asarray(image).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_video_frames_preview(previewer):
    processor = previewer.processor(previewer.default_base())
    frames = [Image.new("RGB", (640, 360), (i * 40, 0, 0)) for i in range(4)]
    preview = tile_preview(processor, [frames], kind="video")
    assert preview.captions == ["frame 1", "frame 2", "frame 3", "frame 4"]
    assert len(preview.tiles) == 4  # one 448 px resize per frame, no tiling
    assert preview.media_tokens == processor.count_video_tokens(4)  # <vila/video>: pooled frames + end tokens


def test_uploads_are_checked(tmp_path, wide_image):
    assert check_upload(wide_image, max_upload_mb=5) == "image"
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(UploadError, match=r"\.txt files are not accepted; upload one of \.png"):
        check_upload(text, 5)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG but not really")
    with pytest.raises(UploadError, match="does not open as an image"):
        check_upload(fake, 5)
    with pytest.raises(UploadError, match=r"limit is 0.001 MB \(--max-upload-mb\)"):
        check_upload(wide_image, max_upload_mb=0.001)


def test_uploads_are_decoded_in_full_and_errors_name_no_server_folder(tmp_path, wide_image):
    folder = tmp_path / "gradio-tmp-123"
    folder.mkdir()
    whole = folder / "scan.jpg"
    Image.open(wide_image).convert("RGB").save(whole, quality=90)
    assert check_upload(whole, 5) == "image"
    cut = folder / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # header intact: Image.open and verify pass
    with pytest.raises(UploadError, match=r"^cut\.jpg does not open as an image: .*truncated") as err:
        check_upload(cut, 5)
    assert str(folder) not in str(err.value)
    gone = folder / "gone.mp4"
    message = page_message(FileNotFoundError(f"video file not found: {gone}"), gone)
    assert message == "video file not found: gone.mp4"


@pytest.mark.skipif(video_support() is not None, reason="needs the video extra (decord)")
def test_a_file_named_mp4_must_open_as_a_video(tmp_path):
    fake = tmp_path / "holiday.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)  # an mp4 header, no video
    with pytest.raises(UploadError, match=r"^holiday\.mp4 does not open as a video") as err:
        check_upload(fake, 5)
    assert str(tmp_path) not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_a_gpu_is_refused_at_start(tiny_runs, capsys):
    assert main(["--runs-dir", str(tiny_runs.runs), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: torch finds no CUDA GPU") and "\n" not in err
    assert main(["--runs-dir", str(tiny_runs.runs), "--device", "tpu7"]) == 2
    assert "not a torch device" in capsys.readouterr().err


def test_page_values_are_labels_not_paths(previewer, wide_image, tiny_runs):
    base = previewer.default_base()
    with pytest.raises(KeyError, match="unknown base"):
        next(previewer.answer(wide_image, QUESTION, str(tiny_runs.root), []))
    with pytest.raises(KeyError, match="not runs of base"):
        next(previewer.answer(wide_image, QUESTION, base, [str(tiny_runs.runs / "medical")]))
    with pytest.raises(ValueError, match="type a question"):
        next(previewer.answer(wide_image, "  ", base, []))
    with pytest.raises(ValueError, match="at most 3 runs"):
        next(previewer.answer(wide_image, QUESTION, base, previewer.runs_for(base)))


def test_run_summary_shows_recipe_and_metrics(tiny_runs, previewer):
    summary = previewer.run_summary("medical")
    metrics = json.loads((tiny_runs.runs / "medical" / "metrics.json").read_text())
    assert "r 8, alpha 16" in summary and "dynamic, max_tiles 4" in summary and "2 steps" in summary
    assert f"| train.train_loss | {metrics['train']['train_loss']:.4g} |" in summary
    assert f"| eval.n | {metrics['eval']['n']} |" in summary
    assert "llm lora, vision_tower frozen" in previewer.run_summary("medical-r4")
    assert "No `metrics.json`" in previewer.run_summary("medical/checkpoint-2")


def test_loss_curve_is_shown_with_the_run(tiny_runs, previewer):
    from nvila_ft.train.curves import read_series

    image = previewer.loss_curve("medical")
    assert image is not None and image.size == (640, 360)  # loss_curve.png as the run wrote it
    series = read_series(tiny_runs.runs / "medical" / "loss_curve.png")
    assert [step for step, _ in series["train loss"]] == [1, 2]  # train.max_steps=2, logged every step
    assert [step for step, _ in series["eval loss"]] == [2]  # the final evaluation
    assert previewer.loss_curve("medical/checkpoint-2") is not None  # a checkpoint shows its run's curve


def test_examples_come_from_the_eval_split(tiny_runs, previewer, tmp_path):
    rows, note = previewer.examples("medical", n=3)
    assert note is None and len(rows) == 3
    test_rows = json.loads((tiny_runs.data / "test.json").read_text())
    pairs = {(r["conversations"][0]["value"].replace("<image>", "").strip(), r["conversations"][1]["value"])
             for r in test_rows}
    for image, question, reference in rows:
        assert Path(image).parent == previewer.media_dir and Image.open(image).mode == "RGB"
        assert (question, reference) in pairs
    assert len({image for image, _, _ in rows}) > 1  # different images first

    moved = tmp_path / "no-data"
    shutil.copytree(tiny_runs.runs / "medical", moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    (moved / "recipe.yaml").write_text((moved / "recipe.yaml").read_text().replace(str(tiny_runs.data),
                                                                                  str(tmp_path / "gone")))
    other = Previewer(runs_dir=None, runs=[moved])
    rows, note = other.examples("no-data")
    assert rows == [] and "not a local path" in note


def test_stopping_a_stream_stops_its_generation(previewer, wide_image):
    base = previewer.default_base()
    loaded = previewer.load(base)
    model = loaded.bank.activate(None)
    steps = []
    hook = base_model(model).llm.register_forward_hook(lambda *_: steps.append(1))
    try:
        stream = stream_answer(model, loaded.processor, [Image.open(wide_image).convert("RGB")], QUESTION,
                               max_new_tokens=2000)
        next(stream)
        stream.close()  # what gradio does when the page is closed mid-answer
        assert not any(t.name == "nvila-ft-generate" for t in threading.enumerate())
        stopped_at = len(steps)
        assert stopped_at < 200  # the tiny model does not stop by itself: it would run all 2000 steps
    finally:
        hook.remove()
    assert len(steps) == stopped_at  # nothing runs on after close()


def test_cli_is_safe_by_default(tmp_path, capsys):
    args = parse_args([])
    assert (args.host, args.share, args.runs_dir, args.max_upload_mb) == ("127.0.0.1", False, "runs", 20.0)
    assert main(["--runs-dir", str(tmp_path)]) == 2
    assert "nothing to preview" in capsys.readouterr().err
