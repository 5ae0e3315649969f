"""The Python API (nvila_ft.api): its rows go through the one row normaliser, videos included, and `train`
trains on a video row.

    pytest tests/test_api.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvila_ft import api
from nvila_ft.demo.video import clip_path
from nvila_ft.model.modeling import NvilaForConditionalGeneration

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CLIP = str(clip_path("carphone_distorted"))  # 7 KB, 176x144, 120 frames

pytestmark = pytest.mark.usefixtures("one_thread")


def qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_as_samples_keeps_videos_and_normalises_answer_types():
    samples = api.as_samples([
        {"videos": ["clip.mp4"], "conversations": qa("What happens?", "A man talks."), "answer_type": "closed "},
        {"video": "b.mp4", "conversations": qa("<vila/video>\nAnd here?", "Cars."), "answer_type": "OPEN"},
        {"videos": ["c.mp4"], "conversations": qa("Is it?", "yes"), "answer_type": "maybe"},
    ])
    assert samples[0]["videos"] == ["clip.mp4"] and samples[0]["images"] == []
    assert samples[0]["answer_type"] == "CLOSED" and samples[1]["answer_type"] == "OPEN"
    assert samples[1]["videos"] == ["b.mp4"]
    assert "answer_type is 'maybe'" in samples[2]["error"]  # a bad row is reported by preflight, not a crash


def test_train_on_a_video_row_feeds_its_frames_to_the_model(tmp_path, monkeypatch):
    seen = []  # (training?, frames of the batch's videos) per forward call
    forward = NvilaForConditionalGeneration.forward

    def spy(self, *args, **kwargs):
        videos = kwargs.get("pixel_values_videos")
        seen.append((self.training, None if videos is None else tuple(videos.shape)))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(NvilaForConditionalGeneration, "forward", spy)
    rows = [{"videos": [CLIP], "conversations": qa("What happens in the video?", "A man talks in a car.")},
            {"videos": [CLIP], "conversations": qa("Is the video animated?", "no"), "answer_type": "CLOSED"}]
    run = api.train(RECIPES / "video_qa_tiny.yaml", train_data=rows, overrides=[
        f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2", "train.save_steps=100", "train.logging_steps=1",
        "model.num_video_frames=4", "model.temporal_pool=[4,1,1]", "data.video_cache_dir=null", "eval.enabled=false",
    ])
    assert run.metrics["train_samples"] == 2
    trained = [shape for training, shape in seen if training]
    assert len(trained) == 2  # two steps of one batch of two rows
    # The two rows ask about one clip: data.share_prefix (auto) encodes its 4 frames (448 px) once per step.
    assert all(shape == (4, 3, 448, 448) for shape in trained), trained
