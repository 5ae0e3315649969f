"""Tests of the memory planner (nvila_ft.plan) and the training preflight that uses it.

    /work/venv/bin/pytest tests/test_plan.py -q

Parameter, gradient and optimizer terms are checked against the real module tree: a tiny model loaded and
stepped exactly as training does, and the real NVILA shapes on the meta device against counts derived
from the config by hand. Activation formulas are checked against the tensors autograd saves in real
Qwen2 / SigLIP layers at small width. No weights are downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.media import MediaConfig
from nvila_ft.plan import report as planner
from nvila_ft.plan.memory import (
    GiB,
    checkpoint_config,
    image_sample,
    llm_layer_bytes,
    nf4_bytes,
    shipped_configs,
    vision_layer_bytes,
)
from nvila_ft.plan.report import MemoryBudgetError, check_budget, plan_recipe
from nvila_ft.train.cli import main
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun
from nvila_ft.train.tuning import param_groups

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = ROOT / "recipes" / "medical.yaml"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("plan") / "tiny-nvila", variant="nvila", seed=0)


def medical(*overrides: str):
    return load_recipe(MEDICAL, list(overrides))


def terms(plan, group: str) -> int:
    return sum(t.bytes for t in plan.terms if t.group == group)


# ---------------------------------------------------------------------------------------------- parameters
def test_nf4_bytes_match_bitsandbytes_storage():
    bnb = pytest.importorskip("bitsandbytes")
    for double_quant in (True, False):
        layer = bnb.nn.Linear4bit(192, 320, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=double_quant).to("cpu")
        qs = layer.weight.quant_state
        tensors = [layer.weight, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
        assert nf4_bytes(192 * 320, double_quant) == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("llm_mode,dtype", [("lora", "float32"), ("qlora", "float32"), ("qlora", "bfloat16"),
                                            ("full", "bfloat16")])
def test_state_terms_equal_the_loaded_model(tiny, tmp_path, llm_mode, dtype):
    """Weights, gradients and AdamW states of the tiny model, loaded and stepped as training does
    (bf16 QLoRA: the frozen embeddings, lm_head and norms in bf16 next to the nf4 Linear weights)."""
    # llm full + vision_tower full: peft modules_to_save copies, their originals released as training does.
    full = ["tune.vision_tower=full"] if llm_mode == "full" else []
    recipe = load_recipe(QUICKSTART, [f"model.path={tiny}", f"tune.llm={llm_mode}", "train.mixed_precision=bf16",
                                      f"train.output_dir={tmp_path}", f"model.dtype={dtype}", *full])
    plan = plan_recipe(recipe)
    run = TrainingRun(recipe)
    model, _ = run.load_model()
    params = list(model.parameters())
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "name")}
                                   for g in param_groups(model, recipe.train)])
    optimizer.step()
    seen, weights = set(), 0
    for p in params:
        qs = getattr(p, "quant_state", None)
        extra = [qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset] if qs is not None else []
        for t in [p, *extra]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                weights += t.numel() * t.element_size()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.ndim)
    # nf4 code tensors may be shared between layers by bitsandbytes: allow their 64 bytes each.
    assert abs(terms(plan, "weights") - weights) <= (64 * 14 if llm_mode == "qlora" else 0)
    assert terms(plan, "gradients") == grads
    assert terms(plan, "optimizer") == states
    if llm_mode == "qlora":
        assert any(p.kind == "nf4" for p in plan.parameters)
        assert {p.kind for p in plan.parameters if p.part == "llm"} == {"nf4", "lora", dtype}


def _llm_count(tc, rows: int, tied: bool) -> int:
    h, f, kv = tc["hidden_size"], tc["intermediate_size"], tc["num_key_value_heads"] * (
        tc["hidden_size"] // tc["num_attention_heads"])
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    return tc["num_hidden_layers"] * layer + rows * h * (1 if tied else 2) + h


@pytest.mark.parametrize("name", ["NVILA-8B", "NVILA-15B", "NVILA-Lite-2B", "NVILA-Lite-8B"])
def test_real_shapes_count_exactly_on_meta(name):
    """Parameter and LoRA counts of the meta model equal counts derived from the shipped config by hand."""
    recipe = medical(f"model.path=Efficient-Large-Model/{name}", "tune.llm=lora", "lora.r=64")
    plan = plan_recipe(recipe)
    cfg = json.loads((ROOT / "nvila_ft" / "model" / "configs" / name / "config.json").read_text())
    tc = cfg["llm_cfg"]
    rows = cfg["video_token_id"] + 1
    llm_total = sum(p.count for p in plan.parameters if p.part == "llm" and p.kind != "lora")
    assert llm_total == _llm_count(tc, rows, tc["tie_word_embeddings"])
    h, f, kv = tc["hidden_size"], tc["intermediate_size"], tc["num_key_value_heads"] * (
        tc["hidden_size"] // tc["num_attention_heads"])
    lora_per_layer = 64 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))
    lora = sum(p.trainable for p in plan.parameters if p.part == "llm")
    assert lora == tc["num_hidden_layers"] * lora_per_layer
    vt = cfg["vision_tower_cfg"]
    used = vt["num_hidden_layers"] - 1  # features from the second-to-last layer
    assert sum(p.trainable for p in plan.parameters if p.part == "vision_tower") == used * 4 * vt["hidden_size"]
    # Gradients are fp32 trainables, AdamW keeps two fp32 states each.
    trainable = sum(p.trainable for p in plan.parameters)
    assert terms(plan, "gradients") == 4 * trainable
    assert terms(plan, "optimizer") == 8 * trainable


# ---------------------------------------------------------------------------------------------- activations
def _saved_bytes(fn, exclude: list[torch.Tensor], tokens: int) -> int:
    """Bytes of the distinct storages autograd saves that have a token dimension (weights excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip and tokens in t.shape:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


ALL_LLM = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ALL_VISION = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_llm_layer_formula_matches_autograd():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    tc = Qwen2Config(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=1, vocab_size=64)
    tc._attn_implementation = "sdpa"
    holder = nn.Module()
    holder.layer = Qwen2DecoderLayer(tc, 0).to(torch.bfloat16).requires_grad_(False)
    layer = get_peft_model(holder, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                              target_modules=sorted(ALL_LLM))).base_model.model.layer
    s = 300
    x = torch.randn(1, s, 128, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(s)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = Qwen2RotaryEmbedding(tc)(x, pos)
        measured = _saved_bytes(lambda: layer(x, position_embeddings=(cos, sin), attention_mask=None,
                                              position_ids=pos), [*layer.parameters(), cos, sin], s)
    # CPU dropout keeps an fp32 noise tensor where CUDA keeps a bool mask: mask_bytes=4 here.
    predicted = llm_layer_bytes(tc, mode="lora", lora_targets=ALL_LLM, r=8, dropout=0.05, act=2, mask_bytes=4)
    assert predicted * s == measured


@pytest.mark.parametrize("mode", ["layernorm", "lora"])
def test_vision_layer_formula_matches_autograd(mode):
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    vc = SiglipVisionConfig(hidden_size=128, intermediate_size=320, num_attention_heads=4)
    vc._attn_implementation = "sdpa"
    holder = nn.Module()
    holder.layer = SiglipEncoderLayer(vc).to(torch.bfloat16).requires_grad_(False)
    layer = holder.layer
    if mode == "layernorm":
        for name, p in layer.named_parameters():
            if "layer_norm" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
    else:
        layer = get_peft_model(holder, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=sorted(ALL_VISION))).base_model.model.layer
    s = 300
    x = torch.randn(1, s, 128, dtype=torch.bfloat16, requires_grad=mode == "lora")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_bytes(lambda: layer(x, attention_mask=None), list(layer.parameters()), s)
    # CPU autocast keeps LayerNorm in bf16 (CUDA autocast runs it in fp32): ln_fp32=False here.
    predicted = vision_layer_bytes(vc, mode=mode, lora_targets=ALL_VISION, r=8, dropout=0.05, act=2,
                                   mask_bytes=4, ln_fp32=False)
    assert predicted * s == pytest.approx(measured, rel=0.005)  # LoRA: a frozen LayerNorm's stats differ


# ---------------------------------------------------------------------------------------------- monotonicity
def test_more_tiles_frames_or_length_never_predict_less():
    base = ["model.path=Efficient-Large-Model/NVILA-Lite-2B", "tune.llm=lora"]
    # At a fixed text length (media no longer displace text, and the label bound is the text share).
    totals = [plan_recipe(medical(*base, f"model.max_tiles={n}"), text_tokens=512).total for n in range(1, 13)]
    assert all(a <= b for a, b in zip(totals, totals[1:])) and totals[0] < totals[-1]
    s2 = [plan_recipe(medical(f"model.max_tiles={n}"), text_tokens=512).total for n in (9, 10, 12)]
    assert s2[0] < s2[1] < s2[2]
    # Text filling data.max_length: more tiles displace label tokens, but the plan keeps the worst of every
    # tile count and a text-only sample, so allowing more tiles still never predicts less.
    filled = [plan_recipe(medical(f"model.max_tiles={n}", f"data.max_length={length}")).total
              for length in (4096, 8192) for n in (1, 4, 9, 12)]
    assert all(a <= b for a, b in zip(filled[:4], filled[1:4])) and all(a <= b for a, b in zip(filled[4:], filled[5:]))
    lengths = [plan_recipe(medical(*base, f"data.max_length={n}")).total for n in (2048, 4096, 8192)]
    assert lengths[0] < lengths[1] < lengths[2]
    video = [plan_recipe(medical(*base, "data.max_length=16384"), num_frames=n, text_tokens=512).total
             for n in (8, 16, 32, 64)]
    assert video[0] <= video[1] < video[2] < video[3]
    pooled = [plan_recipe(medical(*base, "data.max_length=16384"), num_frames=64, temporal_pool=(t, 1, 1),
                          text_tokens=512).sample.media_tokens for t in (8, 4, 1)]
    assert pooled[0] < pooled[1] < pooled[2]
    batch = [plan_recipe(medical(*base, f"train.per_device_train_batch_size={b}")).total for b in (1, 2)]
    assert batch[0] < batch[1]


def test_gradient_checkpointing_and_qlora_lower_the_plan():
    on = plan_recipe(medical())
    off = plan_recipe(medical("train.gradient_checkpointing.llm=false"))
    assert off.total > on.total
    llm_on = next(t for t in on.terms if t.group == "activations" and t.name == "llm")
    llm_off = next(t for t in off.terms if t.group == "activations" and t.name == "llm")
    assert llm_on.alt_bytes == llm_off.bytes and llm_off.alt_bytes == llm_on.bytes
    assert plan_recipe(medical("tune.llm=lora")).total > on.total


def test_media_longer_than_max_length_is_an_error():
    with pytest.raises(ValueError, match="data.max_length"):
        plan_recipe(medical("data.max_length=2048"))  # 12 dynamic_s2 tiles are 3073 tokens


# ---------------------------------------------------------------------------------------------- CLI and budget
def test_cli_plans_the_medical_recipe_offline(capsys):
    assert planner.main([str(MEDICAL), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "Efficient-Large-Model/NVILA-8B" in out and "nf4" in out and "logits/loss buffer" in out
    assert "budget 24.0 GiB: fits" in out
    assert planner.main([str(MEDICAL), "tune.llm=lora", "--gpu-memory", "20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["total_bytes"] > 20 * GiB
    # The worst of the candidates is the text-only sample (4096 answer tokens through lm_head), not the 17-tile image.
    assert data["sample"]["media"] == "text" and data["sample"]["llm_tokens"] == 4096
    media = MediaConfig.resolve(checkpoint_config("Efficient-Large-Model/NVILA-8B")[0], max_length=4096)
    assert image_sample(media, 1).vision_tiles == 17
    assert set(shipped_configs()) >= {f"Efficient-Large-Model/{n}" for n in ("NVILA-8B", "NVILA-Lite-2B")}


def test_unknown_hub_id_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no shipped config"):
        plan_recipe(medical("model.path=someone/not-a-model"))


def test_training_refuses_before_loading_weights(tiny, tmp_path, monkeypatch):
    recipe = load_recipe(QUICKSTART, [f"model.path={tiny}", f"train.output_dir={tmp_path}",
                                      "train.gpu_memory_gb=0.01"])
    loaded = []
    monkeypatch.setattr(TrainingRun, "load_model", lambda self: loaded.append(1))
    with pytest.raises(MemoryBudgetError) as err:
        TrainingRun(recipe).run()
    message = str(err.value)
    assert "> budget 0.0 GiB" in message and "Largest terms" in message
    assert "tune.llm=qlora" in message and "--force" in message
    assert not loaded
    assert check_budget(recipe, force=True).fits is False  # --force: planned, reported, not refused
    code = main([str(QUICKSTART), f"model.path={tiny}", f"train.output_dir={tmp_path}", "train.gpu_memory_gb=0.01"])
    assert code == 3 and not loaded


def test_no_budget_and_no_cuda_skips_the_check(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device gives a budget")
    recipe = load_recipe(QUICKSTART, [f"model.path={tiny}", f"train.output_dir={tmp_path}"])
    assert check_budget(recipe) is None


def test_gpu_benchmark_runs_on_cpu_at_tiny_shapes(tmp_path):
    """benchmarks/gpu_memory.py --tiny: measurement and the planner's prediction side by side in its JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--tiny", "--steps", "1",
                           "--modes", "lora", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = tmp_path.glob("gpu_memory-*-tiny.json")
    run = json.loads(out.read_text())["runs"][0]
    # weights and AdamW states exact; gradients: the plan counts every trainable, a text-only sample
    # sends none to the projector / vision tower
    assert run["static"]["weights"] == run["predicted_static"]["weights"]
    assert run["static"]["optimizer"] == run["predicted_static"]["optimizer"]
    assert 0 < run["static"]["gradients"] <= run["predicted_static"]["gradients"]
    assert run["predicted_bytes"] > 0 and run["measured_bytes"] > 0 and -10 < run["error_pct"] < 60
    # the vision tower stops at layer -2 (issue 18): the discarded layer's checkpointed input is no longer
    # measured, so the CPU stand-in over-predicts more at these toy shapes (about +55%).
    assert run["plan"]["sample"]["llm_tokens"] == run["llm_tokens"] and run["samples_per_s"] > 0


def test_shared_prefixes_and_packing_price_the_attention_mask_of_the_worst_pack():
    off = plan_recipe(medical("data.share_prefix=false"))
    on = plan_recipe(medical("data.share_prefix=false", "data.packing=true"))
    shared = plan_recipe(medical("data.share_prefix=true"))
    mask = [t for t in on.terms if t.name == "attention mask"]
    assert not [t for t in off.terms if t.name == "attention mask"] and len(mask) == 1
    length, batch = on.sample.llm_tokens, on.batch_size
    act = 2  # bf16 on the GPU the planner assumes
    assert mask[0].bytes == batch * length * (-(-length // 16) * 16) * act
    assert on.total - off.total == mask[0].bytes == shared.total - off.total
