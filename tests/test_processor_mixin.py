"""NvilaProcessor as a transformers ProcessorMixin, and the one media config a run saves and everything reads.

    pytest tests/test_processor_mixin.py

Uses the session's tiny checkpoint and quickstart set (tests/conftest.py) and one extra 3-step run that
samples 4 frames per video and pools them in pairs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny_run
from PIL import Image
from transformers import AutoConfig, AutoProcessor

import nvila_ft  # noqa: F401 - registers NvilaConfig / NvilaProcessor with the Auto classes
from nvila_ft.data.checks import VideoCheck
from nvila_ft.inference import load_processor
from nvila_ft.model.checkpoint import load_tokenizer
from nvila_ft.model.configuration import NvilaConfig
from nvila_ft.model.media import MediaConfig, expanded_length
from nvila_ft.model.processing import NvilaProcessor
from nvila_ft.train.tuning import base_model

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A scan."}]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def frames(n: int = 5) -> list[Image.Image]:
    return [picture(320, 240, seed=10 + i) for i in range(n)]


def assert_same_encoding(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.fixture(scope="module")
def video_run(tiny_assets, monkeypatch_module):
    """A 3-step run with `model.num_video_frames=4`, `model.temporal_pool=[2,1,1]`, `dynamic` tiling of at most
    4 tiles; records the VideoCheck that the trainer's preflight got."""
    import nvila_ft.train.dataset as trainer  # where the trainer's preflight call lives

    seen = []

    def recording_preflight(samples, **kwargs):
        seen.append(kwargs["video_check"])
        return real(samples, **kwargs)

    real = trainer.preflight
    monkeypatch_module.setattr(trainer, "preflight", recording_preflight)
    run = train_tiny_run(tiny_assets, tiny_assets.root / "video-run", "model.num_video_frames=4",
                         "model.temporal_pool=[2,1,1]", "model.image_aspect_ratio=dynamic", "model.max_tiles=4")
    run.video_checks = seen
    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("which", ["tiny_run", "video_run"])
def test_auto_processor_on_a_run_folder_encodes_as_the_run(request, which):
    run = request.getfixturevalue(which)
    loaded = AutoProcessor.from_pretrained(run.output_dir)
    assert type(loaded) is NvilaProcessor and loaded.media == run.processor.media
    assert loaded.system_prompt == run.processor.system_prompt
    for size in [(640, 480), (300, 900), (1344, 448)]:  # landscape, portrait, 3:1 (several tiles under dynamic)
        image = picture(*size)
        assert_same_encoding(loaded(QA, [image]), run.processor(QA, [image]))
        prompt = QA[:1]
        assert_same_encoding(loaded(prompt, [image], add_generation_prompt=True),
                             run.processor(prompt, [image], add_generation_prompt=True))
    video = frames()
    ours, theirs = loaded(QA, videos=[video]), run.processor(QA, videos=[video])
    assert_same_encoding(ours, theirs)
    if which == "video_run":
        assert ours["video_frames"] == [6] and ours["pool_sizes"] == [[2, 1, 1]]  # 5 frames padded to t=2
    batch, reference = loaded.collate([ours]), run.processor.collate([theirs])
    assert_same_encoding(batch, reference)


def test_auto_processor_and_auto_config_on_an_official_checkpoint(tiny_assets):
    assert type(AutoConfig.from_pretrained(tiny_assets.model)) is NvilaConfig
    processor = AutoProcessor.from_pretrained(tiny_assets.model)
    config = NvilaConfig.from_json_file(str(tiny_assets.model / "config.json"))
    direct = NvilaProcessor(load_tokenizer(tiny_assets.model), config)
    assert type(processor) is NvilaProcessor and processor.media == direct.media
    assert processor.media.image_aspect_ratio == config.image_aspect_ratio == "dynamic_s2"
    image = picture(900, 500)
    assert_same_encoding(processor(QA, [image]), direct(QA, [image]))
    assert AutoProcessor.from_pretrained(tiny_assets.model, max_tiles=9).media.max_tiles == 9


def test_save_and_load_round_trip(tiny_assets, tmp_path):
    config = NvilaConfig.from_json_file(str(tiny_assets.model / "config.json"))
    processor = NvilaProcessor(load_tokenizer(tiny_assets.model), config, image_aspect_ratio="dynamic", max_tiles=6,
                               max_length=1234, system_prompt="Answer briefly.", num_video_frames=6,
                               temporal_pool=[3, 1, 1])
    path = processor.save_pretrained(tmp_path / "saved")
    saved = json.loads(path.read_text())
    assert path.name == "processor_config.json" and saved["processor_class"] == "NvilaProcessor"
    assert saved["max_tiles"] == 6 and saved["temporal_pool"] == [[3, 1, 1]] and saved["max_length"] == 1234

    loaded = NvilaProcessor.from_pretrained(tmp_path / "saved")
    assert loaded.media == processor.media and loaded.system_prompt == "Answer briefly."
    assert loaded.to_dict() == processor.to_dict()
    assert_same_encoding(loaded(QA, [picture(700, 300)]), processor(QA, [picture(700, 300)]))
    overridden = NvilaProcessor.from_pretrained(tmp_path / "saved", max_length=99, temporal_pool=[1, 1, 1])
    assert overridden.max_length == 99 and overridden.pool_sizes == [] and overridden.media.max_tiles == 6
    with pytest.raises(ValueError, match="not a multiple of the temporal pool size 4"):
        NvilaProcessor.from_pretrained(tmp_path / "saved", temporal_pool=[4, 1, 1])


def test_the_runs_media_config_is_what_preflight_planner_and_inference_read(video_run, monkeypatch):
    import nvila_ft.plan.report as report

    saved = json.loads((video_run.output_dir / "processor_config.json").read_text())
    media = MediaConfig.from_dict(saved)
    assert saved["num_video_frames"] == 4 and saved["temporal_pool"] == [[2, 1, 1]]
    assert saved["image_aspect_ratio"] == "dynamic" and saved["max_tiles"] == 4
    assert saved["max_length"] == video_run.recipe.data.max_length
    assert media == video_run.processor.media

    # preflight: the VideoCheck the trainer built samples what the processor samples
    assert video_run.video_checks
    for check in video_run.video_checks:
        assert (check.num_frames, check.fps) == (4, 0.0)
        assert check.tokens_fn(4) == video_run.processor.count_video_tokens(4)
    assert VideoCheck.for_media(media).num_frames == 4

    # planner: its video sample is priced with the same media config
    planned = []

    def recording_video_sample(media_config, *args, **kwargs):
        planned.append((media_config, report_video_sample(media_config, *args, **kwargs)))
        return planned[-1][1]

    report_video_sample = report.video_sample
    monkeypatch.setattr(report, "video_sample", recording_video_sample)
    report.plan_recipe(video_run.recipe)
    (planner_media, sample), = planned
    assert planner_media == media
    n_end = len(video_run.processor.end_token_ids)
    assert sample.vision_tiles == 4 and sample.media_tokens == video_run.processor.count_video_tokens(4)
    assert sample.media_tokens == expanded_length(media, n_end, 0, video_frames=[4]) == 2 * (media.tokens_per_tile + 1)

    # inference: the run's processor, read back from the folder
    processor = load_processor(base_model(video_run.model), video_run.output_dir)
    assert processor.media == media and processor.num_video_frames == 4 and processor.pool_sizes == [(2, 1, 1)]
    # the model config follows the run too (the model's default pooling)
    assert video_run.model.config.num_video_frames == 4


def test_one_count_of_the_expanded_length(tiny_assets):
    """The encoding, the size-only count and `expanded_length` agree, for images of several shapes and videos."""
    config = NvilaConfig.from_json_file(str(tiny_assets.model / "config.json"))
    for mode in ("dynamic_s2", "dynamic", "resize"):
        processor = NvilaProcessor(load_tokenizer(tiny_assets.model), config, image_aspect_ratio=mode, max_tiles=9,
                                   num_video_frames=4, temporal_pool=[2, 1, 1])
        for images in ([picture(640, 480)], [picture(200, 1000)], [picture(1500, 400)],
                       [picture(640, 480), picture(300, 300)]):
            enc = processor(QA, images, videos=[frames(3)])
            sizes = [im.size for im in images]
            assert processor.num_tokens(QA, sizes, [3]) == enc["num_tokens"]
            text = len(enc["input_ids"]) - len(enc["block_sizes"]) - 1  # minus the <image> and <vila/video> ids
            n_end = len(processor.end_token_ids)
            assert expanded_length(processor.media, n_end, text, sizes, [3]) == enc["num_tokens"]
