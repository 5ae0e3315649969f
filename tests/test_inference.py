"""Tests of nvila_ft.inference: loading run folders, switching runs on one base, generation.

    pytest tests/test_inference.py

Uses the session's tiny runs (tests/conftest.py: 3 real training steps of the quickstart recipe each).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import train_tiny_run
from peft import PeftModel

from nvila_ft.evaluate import generate_answers
from nvila_ft.inference import (
    AdapterBank,
    RunError,
    base_checkpoint,
    generate,
    is_run,
    load_model,
    load_processor,
    prepare_inputs,
    split_media,
    stream_generate,
)
from nvila_ft.model.modeling import NvilaForConditionalGeneration

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def other_run(tiny_assets):
    """A second run on the same base, different seed and data order: different adapter and projector."""
    return train_tiny_run(tiny_assets, tiny_assets.root / "other-run", "train.seed=1", "lora.r=4")


def batch_of(run, index: int = 0) -> dict:
    sample = run.eval_samples[index]
    return run.processor.collate([run.processor(sample["conversations"], sample["images"])])


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


def test_load_model_on_a_run_folder_reproduces_the_trained_model(tiny_run):
    batch = batch_of(tiny_run)
    expected = logits(tiny_run.model, batch)

    model, processor = load_model(tiny_run.output_dir, dtype="float32", device="cpu")

    assert isinstance(model, PeftModel) and not model.training
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    # The processor settings of the run (here image_aspect_ratio=resize) come back too.
    assert processor.tiling.image_aspect_ratio == "resize" == tiny_run.processor.tiling.image_aspect_ratio
    assert processor.max_length == tiny_run.processor.max_length


def test_load_model_on_a_checkpoint_gives_the_plain_model(tiny_assets, tiny_run):
    model, processor = load_model(tiny_assets.model, dtype="float32", device="cpu")
    assert type(model) is NvilaForConditionalGeneration
    assert processor.tiling.image_aspect_ratio == "dynamic_s2"  # the checkpoint's own mode
    assert not is_run(tiny_assets.model) and is_run(tiny_run.output_dir)


def test_base_checkpoint_falls_back_to_the_recorded_absolute_path(tiny_assets, tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.output_dir, run)
    recipe = (run / "recipe.yaml").read_text().replace(str(tiny_assets.model), "runs/models/tiny-nvila")
    (run / "recipe.yaml").write_text(recipe)  # trained with a relative model.path, from another folder
    # (one slash, e.g. models/tiny, would read as a hub id: the error then comes when it cannot be fetched)
    monkeypatch.chdir(tmp_path)

    assert base_checkpoint(run) == str(tiny_assets.model)  # from run_info.json's base_model_path

    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "base_model_path": str(tmp_path / "gone")}))
    with pytest.raises(RunError, match="runs/models/tiny-nvila.*base="):
        base_checkpoint(run)
    model, _ = load_model(run, base=tiny_assets.model, dtype="float32", device="cpu")  # the documented fix
    torch.testing.assert_close(logits(model, batch_of(tiny_run)), logits(tiny_run.model, batch_of(tiny_run)))


def test_adapter_bank_switches_runs_exactly(tiny_assets, tiny_run, other_run):
    batch = batch_of(tiny_run)
    base = NvilaForConditionalGeneration.from_pretrained(tiny_assets.model, dtype=torch.float32)
    base_logits = logits(base, batch)
    run_a, run_b = logits(tiny_run.model, batch), logits(other_run.model, batch)
    assert (run_a - run_b).abs().max() > 1e-2 and (run_a - base_logits).abs().max() > 1e-2  # three models

    bank = AdapterBank(base)
    assert bank.add(tiny_run.output_dir, "a") == "a"
    assert bank.add(other_run.output_dir, "b") == "b"
    for name, expected in [(None, base_logits), ("a", run_a), ("b", run_b), ("a", run_a), (None, base_logits),
                           ("b", run_b)]:
        model = bank.activate(name)
        assert bank.active == name
        torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5, msg=f"run {name}")
    with pytest.raises(KeyError, match="unknown run 'c'"):
        bank.activate("c")


def test_generate_and_stream_generate_give_the_greedy_answer_of_evaluation(tiny_run):
    model, processor = load_model(tiny_run.output_dir, dtype="float32", device="cpu")
    sample = tiny_run.eval_samples[0]
    question = sample["conversations"][0]["value"].replace("<image>\n", "")

    answer = generate(model, processor, sample["images"][0], question, max_new_tokens=6)
    chunks = list(stream_generate(model, processor, sample["images"], question, max_new_tokens=6))

    assert answer == generate_answers(model, processor, [sample], max_new_tokens=6, progress=False)[0]
    assert chunks and chunks[-1] == answer
    assert all(chunks[i + 1].startswith(chunks[i]) for i in range(len(chunks) - 1))  # text only grows


def test_load_processor_overrides_the_saved_settings(tiny_run):
    processor = load_processor(tiny_run.model.get_base_model(), tiny_run.output_dir, max_length=512)
    assert processor.max_length == 512 and processor.tiling.image_aspect_ratio == "resize"


def test_split_media_tells_videos_from_images(tmp_path):
    from PIL import Image

    from nvila_ft.demo.video import clip_path

    clip, image = clip_path("carphone_distorted"), Image.new("RGB", (8, 8))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        image.save(frames / f"frame_{i}.png")
    assert split_media(None) == ([], [])
    assert split_media(image) == ([image], [])
    assert split_media(str(clip)) == ([], [str(clip)])
    assert split_media([image, clip, frames, b"raw"]) == ([image], [str(clip), str(frames), b"raw"])
    assert split_media([[image, image]]) == ([], [[image, image]])  # a list of PIL frames is one video


def test_generate_answers_about_a_video_with_the_runs_frame_settings(tiny_assets):
    from nvila_ft.demo.video import clip_path

    model, _ = load_model(tiny_assets.model, dtype="float32", device="cpu")
    processor = load_processor(model, None, num_video_frames=4, temporal_pool=[2, 1, 1])
    question = "What happens in the video?"
    clip = clip_path("carphone_distorted")

    batch = prepare_inputs(processor, clip, question)
    assert batch["video_frames"].tolist() == [4] and batch["pool_sizes"].tolist() == [[2, 1, 1]]
    assert batch["num_tokens"] > processor.count_video_tokens(4)  # video tokens + the prompt's text

    answer = generate(model, processor, clip, question, max_new_tokens=5)
    expected = model.generate_content(question, videos=[clip], num_video_frames=4, temporal_pool=[2, 1, 1],
                                      max_new_tokens=5)
    assert answer == expected
