"""`bash benchmarks/gpu_suite.sh --cpu-smoke`: the GPU suite end to end at tiny shapes on the CPU, so it cannot rot.

    python -m pytest tests/test_gpu_suite.py -q

Every row runs (the 24 GiB-capped medical recipe, 8B and Lite-2B LoRA, the vision-tower LoRA variant, the
accelerate-launched main job with `model.init=random` on a VQA-RAD subset and predict on its output) on tiny
checkpoints; the test checks the JSON the GPU machine will write has every figure the suite promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

VQA_RAD = ROOT.parent / "shared" / "data" / "vqa_rad"


def test_model_flops_counts_the_llm_forward_like_torch():
    """The suite's FLOP formula for the LLM forward against torch's own FLOP counter on a small Qwen2."""
    import torch
    from gpu_suite import model_flops
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2Model

    tc = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
    config = type("C", (), {"text_config": tc, "vision_config": None, "mm_hidden_size": 1, "hidden_size": 64,
                            "video_token_id": 99})()
    tokens = 32
    with FlopCounterMode(display=False) as counter:
        Qwen2Model(tc)(input_ids=torch.zeros(1, tokens, dtype=torch.long))
    counted = counter.get_total_flops()
    vision = type("V", (), {"image_size": 14, "patch_size": 14, "num_hidden_layers": 0, "hidden_size": 1,
                            "intermediate_size": 1})()
    config.vision_config = vision
    predicted = model_flops(config, {"llm": "frozen", "vision_tower": "frozen", "mm_projector": "frozen"},
                            tokens, 0, 0, 0)["llm"] / 2  # forward only (frozen LLM: forward + input grads = 2x)
    # eager attention computes the full T x T scores; the formula counts the causal half of them
    full_attention = tc.num_hidden_layers * 2 * tokens ** 2 * tc.hidden_size
    assert predicted + full_attention == counted


@pytest.mark.slow
@pytest.mark.skipif(not (VQA_RAD / "trainset.json").is_file(), reason="needs ../shared/data/vqa_rad")
def test_gpu_suite_cpu_smoke(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(out),
                           "--data", str(tmp_path / "none")], capture_output=True, text=True, timeout=1800,
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"medical-24GiB", "8B-lora", "2B-lora", "8B-lora-vlora", "main-job"}
    assert result["cpu_smoke"] and result["versions"]["torch"]
    for name in ("medical-24GiB", "8B-lora", "2B-lora", "8B-lora-vlora"):
        r = rows[name]
        assert not r["oom"] and r["measured_bytes"] > 0 and r["predicted_bytes"] > 0
        # weights and AdamW states exact; gradients: the plan counts every trainable, a text-only sample
        # sends none to the projector / vision tower
        assert r["static"]["weights"] == r["predicted_static"]["weights"]
        assert r["static"]["optimizer"] == r["predicted_static"]["optimizer"]
        assert 0 < r["static"]["gradients"] <= r["predicted_static"]["gradients"]
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_sample"] > 0
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
    assert rows["medical-24GiB"]["tune"]["llm"] == "qlora" and rows["8B-lora-vlora"]["tune"]["vision_tower"] == "lora"
    job = rows["main-job"]
    assert job["train_rc"] == 0 and job["predict_rc"] == 0, job.get("train_log_tail", "") + job.get("predict_log_tail", "")
    assert job["log_says_random"] and job["card_says_random"]
    assert len(job["predictions"]) == 4 and job["metrics"]["train"]["train_loss"] > 0
    assert "vision tower LayerNorm / LoRA step time" in proc.stdout and "main-job" in proc.stdout
