"""`model.init: random` (nvila_ft.model.random_init) and the planner's `--measure` fit check, on the CPU.

    python -m pytest tests/test_random_init.py -q

The real-shape test builds NVILA-Lite-2B from its shipped config (real widths, 2 + 2 layers, the 151,651-row
embedding) through the hub-id path with the hub offline, and compares every buffer with a normally constructed
model's: a builder that leaves buffers uninitialised (meta + `to_empty()`: SigLIP `position_ids`, rotary
`inv_freq`) fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, SiglipVisionModel

from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.checkpoint import nf4_config
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.random_init import random_config, reduced_depth
from nvila_ft.plan.report import main as plan_main
from nvila_ft.train.recipe import RecipeError
from nvila_ft.train.recipe_io import load_recipe

ROOT = Path(__file__).resolve().parents[1]
LITE = "Efficient-Large-Model/NVILA-Lite-2B"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("random") / "tiny-nvila", variant="nvila", seed=0)


def test_hub_id_at_real_widths_has_the_buffers_of_a_normally_built_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with reduced_depth(llm=2, vision_tower=2):
        model = NvilaForConditionalGeneration.from_pretrained(LITE, init="random", dtype=torch.bfloat16)
        config, folder = random_config(LITE)
    assert folder is None  # the shipped config, nothing fetched
    reference = {"llm": AutoModelForCausalLM.from_config(config.text_config, dtype=torch.bfloat16),
                 "vision_tower": SiglipVisionModel._from_config(config.vision_config, dtype=torch.bfloat16)}
    for part, ref in reference.items():
        built, expected = dict(getattr(model, part).named_buffers()), dict(ref.named_buffers())
        assert built.keys() == expected.keys() and expected
        for name, buf in expected.items():
            assert built[name].dtype == buf.dtype and torch.equal(built[name], buf), f"{part}.{name}"
    assert model.llm.config.hidden_size == 1536 and model.vision_tower.config.hidden_size == 1152
    assert model.llm.get_input_embeddings().weight.shape[0] == 151651  # official tokenizer length, not the tiny one's
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight  # Lite-2B ties them
    assert model.llm.model.norm.weight.eq(1).all() and model.llm.model.layers[0].self_attn.q_proj.bias.eq(0).all()
    assert 0.01 < model.llm.model.layers[0].mlp.up_proj.weight.float().std() < 0.05  # N(0, 1/1536)
    tok = model.tokenizer
    assert tok.convert_ids_to_tokens(model.config.image_token_id) == "<image>" and len(tok) < 2048


def test_random_is_seeded_not_the_checkpoint_and_keeps_its_tokenizer(tiny):
    a = NvilaForConditionalGeneration.from_pretrained(tiny, init="random", dtype=torch.float32)
    b = NvilaForConditionalGeneration.from_pretrained(tiny, init="random", dtype=torch.float32)
    real = NvilaForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    sa, sb, sr = a.state_dict(), b.state_dict(), real.state_dict()
    assert sa.keys() == sr.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["llm.model.layers.0.mlp.up_proj.weight"], sr["llm.model.layers.0.mlp.up_proj.weight"])
    assert all(sa[k].shape == sr[k].shape for k in sa)
    assert len(a.tokenizer) == len(real.tokenizer) and a.config.image_token_id == real.config.image_token_id


def test_random_qlora_is_quantized_as_bitsandbytes_loads_it(tiny):
    import bitsandbytes as bnb

    quant = nf4_config(torch.bfloat16)
    rand = NvilaForConditionalGeneration.from_pretrained(tiny, init="random", llm_quantization_config=quant)
    real = NvilaForConditionalGeneration.from_pretrained(tiny, llm_quantization_config=nf4_config(torch.bfloat16))

    def layout(model):
        return {n: (m.weight.shape, m.weight.quant_state.blocksize, m.weight.quant_state.nested, m.weight.quant_type,
                    m.compute_dtype, None if m.bias is None else m.bias.dtype)
                for n, m in model.llm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    assert layout(rand) == layout(real) and layout(rand)
    assert type(rand.llm.lm_head) is torch.nn.Linear
    assert rand.llm.is_loaded_in_4bit and rand.llm.config.quantization_config is quant
    x = torch.randn(1, 3, rand.llm.config.hidden_size, dtype=torch.bfloat16)
    assert torch.isfinite(rand.llm.model.layers[0].mlp.up_proj(x)).all()


def test_recipe_key_init(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "medical.yaml", ["model.init=random"])
    assert recipe.model.init == "random"
    assert load_recipe(ROOT / "recipes" / "medical.yaml").model.init == "pretrained"
    with pytest.raises(RecipeError, match="model.init"):
        load_recipe(ROOT / "recipes" / "medical.yaml", ["model.init=zeros"])


def test_measure_prints_measured_beside_planned(tiny, tmp_path, capsys):
    code = plan_main([str(ROOT / "recipes" / "quickstart.yaml"), "--measure", "--steps", "1", "--json",
                      f"model.path={tiny}", "model.image_aspect_ratio=resize",
                      "data.max_length=320", "train.per_device_train_batch_size=1", f"train.output_dir={tmp_path}"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "cpu" and not r["oom"] and r["steps"] == 1
    # weights and AdamW states exact; gradients: the plan counts every trainable, a text-only sample
    # sends none to the projector / vision tower
    assert r["static"]["weights"] == r["predicted_static"]["weights"]
    assert r["static"]["optimizer"] == r["predicted_static"]["optimizer"]
    assert 0 < r["static"]["gradients"] <= r["predicted_static"]["gradients"]
    assert r["llm_tokens"] == r["plan"]["sample"]["llm_tokens"] <= 320
    assert r["label_tokens"] > 0 and r["samples_per_s"] > 0 and abs(r["error_pct"]) < 60


@pytest.mark.slow
def test_gpu_benchmark_hub_id_path_at_real_widths(tmp_path):
    """benchmarks/gpu_memory.py at NVILA-Lite-2B widths through the hub id (offline), reduced depth."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--models", LITE, "--modes",
                           "lora", "--depth", "2", "2", "--steps", "1", "--out", str(tmp_path),
                           "model.image_aspect_ratio=resize", "data.max_length=160", "train.mixed_precision=no",
                           "model.dtype=float32"], capture_output=True, text=True, timeout=1800, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = tmp_path.glob("gpu_memory-*-depth2x2.json")
    run = json.loads(out.read_text())["runs"][0]
    assert run["plan"]["source"].startswith("shipped config") and run["llm_tokens"] <= 160
    assert run["plan"]["parameters"][0]["count"] > 151651 * 1536  # real widths: the embedding alone
    # weights and AdamW states exact; gradients: the plan counts every trainable, a text-only sample
    # sends none to the projector / vision tower
    assert run["static"]["weights"] == run["predicted_static"]["weights"]
    assert run["static"]["optimizer"] == run["predicted_static"]["optimizer"]
    assert 0 < run["static"]["gradients"] <= run["predicted_static"]["gradients"]
    assert abs(run["error_pct"]) < 50 and run["samples_per_s"] > 0
