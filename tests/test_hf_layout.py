"""NVIDIA's -hf checkpoints in and out (`nvila_ft.model.hf_layout`): the exported names are SGLang's, every
layout loads through the normal loaders with the same weights, an export computes what its source computed,
the inputs are those of NVIDIA's -hf processor, and an -hf checkpoint fine-tunes.

    pytest tests/test_hf_layout.py
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN_OVERRIDES
from PIL import Image
from safetensors import safe_open

from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.demo.tiny import main as tiny_main
from nvila_ft.inference import load_model
from nvila_ft.merge import main as merge_main
from nvila_ft.merge import merge
from nvila_ft.model.hf_layout import detect_layout, expand_media_tokens, save_hf
from nvila_ft.model.modeling import NvilaForConditionalGeneration

pytestmark = pytest.mark.usefixtures("one_thread")

# Images of three aspect ratios (landscape, portrait, square) and an 8-frame video.
SIZES = [(640, 360), (300, 900), (500, 500)]


def image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


VIDEO = [image((320, 240), 100 + i) for i in range(8)]
QUESTION = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A test pattern."}]


def batches(processor) -> list[dict]:
    """One batch per image (a single image is tiled) and one with the video."""
    out = [processor.collate([processor(QUESTION, [image(size, i)])]) for i, size in enumerate(SIZES)]
    out.append(processor.collate([processor(QUESTION, videos=[VIDEO])]))
    return out


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


def same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def weight_names(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny `nvila` and `nvila-lite` checkpoints in each layout they have (same seed: same weights)."""
    root = tmp_path_factory.mktemp("hf-layout")
    out = {}
    for variant, layouts in (("nvila", ("original", "hf")), ("nvila-lite", ("original", "hf", "hf-0626"))):
        for layout in layouts:
            out[variant, layout] = build_tiny_checkpoint(root / f"{variant}-{layout}", variant, 0, layout=layout)
    return out


def test_exported_config_and_weight_names_are_those_sglang_reads(tiny):
    # sgl-project/sglang python/sglang/srt/models/nvila.py: NVILAConfig(model_type "nvila", text_config Qwen2Config,
    # vision_config SiglipVisionConfig, image_token_id, video_token_id); NVILAForConditionalGeneration: vision_tower
    # = SiglipVisionModel (transformers 4: params `vision_model.*`), mm_projector.layers = Sequential(downsample,
    # LayerNorm, Linear, GELU, Linear) -> params layers.1/2/4; llm = Qwen2ForCausalLM, load_weights strips "llm.".
    # nvila_lite.py: model_type "nvila_lite", layers Sequential(downsample, LN, Linear, GELU, LN, Linear, GELU,
    # Linear) -> 1/2/4/5/7. vila.py: VILAConfig(model_type "vila") with flat hidden_size, mm_hidden_size,
    # mm_projector_type "mlp_downsample_3x3_fix", mm_vision_select_feature, mm_vision_select_layer.
    expected = {
        ("nvila", "hf"): ("nvila", "NVILAForConditionalGeneration", {1, 2, 4}),
        ("nvila-lite", "hf"): ("nvila_lite", "NVILALiteForConditionalGeneration", {1, 2, 4, 5, 7}),
        ("nvila-lite", "hf-0626"): ("vila", "VILAForConditionalGeneration", {1, 2, 4, 5, 7}),
    }
    for key, (model_type, arch, layers) in expected.items():
        folder = tiny[key]
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == model_type and config["architectures"] == [arch]
        assert config["text_config"]["model_type"] == "qwen2"
        assert config["vision_config"]["model_type"] == "siglip_vision_model"
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
        vocab = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        ids = {t["content"]: t["id"] for t in vocab}
        assert (config["image_token_id"], config["video_token_id"]) == (ids["<image>"], ids["<vila/video>"])
        # SGLang's NVILAMultimodalProcessor reads tokenizer.image_token / tokenizer.video_token.
        assert tokenizer["extra_special_tokens"] == {"image_token": "<image>", "video_token": "<vila/video>"}
        if model_type == "vila":
            assert config["mm_projector_type"] == "mlp_downsample_3x3_fix"
            assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "cls_patch"
            assert config["hidden_size"] == config["text_config"]["hidden_size"]
            assert config["mm_hidden_size"] == config["vision_config"]["hidden_size"]
        names = weight_names(folder)
        prefixes = {n.split(".")[0] for n in names}
        assert prefixes == {"llm", "vision_tower", "mm_projector"}
        assert all(n.startswith("vision_tower.vision_model.") for n in names if n.startswith("vision_tower"))
        assert {int(n.split(".")[2]) for n in names if n.startswith("mm_projector.")} == layers
        assert all(n.startswith(("llm.model.", "llm.lm_head.")) for n in names if n.startswith("llm"))
        tied = config["text_config"]["tie_word_embeddings"]
        assert ("llm.lm_head.weight" in names) == (not tied)


@pytest.mark.parametrize("key", [("nvila", "hf"), ("nvila-lite", "hf"), ("nvila-lite", "hf-0626")])
def test_every_layout_loads_through_the_normal_loaders_with_the_same_weights(tiny, key):
    original = NvilaForConditionalGeneration.from_pretrained(tiny[key[0], "original"], dtype=torch.float32)
    hf = NvilaForConditionalGeneration.from_pretrained(tiny[key], dtype=torch.float32)
    assert detect_layout(tiny[key]) == {"hf": "nvila" if key[0] == "nvila" else "nvila_lite",
                                        "hf-0626": "vila"}[key[1]]
    a, b = original.state_dict(), hf.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for field in ("image_aspect_ratio", "mm_projector_type", "mm_hidden_size", "dynamic_s2", "scales",
                  "image_token_id", "video_token_id", "end_token_ids"):
        assert getattr(hf.config, field) == getattr(original.config, field), field
    model, processor = load_model(tiny[key], dtype="float32", device="cpu")
    assert isinstance(model, NvilaForConditionalGeneration)
    assert processor.tokens_per_tile == (256 if key[0] == "nvila" else 121)


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite"])
def test_original_exported_to_hf_gives_identical_inputs_and_logits(tiny, tmp_path, variant):
    original, original_processor = load_model(tiny[variant, "original"], dtype="float32", device="cpu")
    save_hf(original, tmp_path / "hf")
    hf, hf_processor = load_model(tmp_path / "hf", dtype="float32", device="cpu")
    for a, b in zip(batches(original_processor), batches(hf_processor), strict=True):
        same_batch(a, b)
        torch.testing.assert_close(logits(hf, b), logits(original, a), rtol=0, atol=0)


def test_merged_run_exports_to_either_layout_with_identical_logits(tiny_run, tmp_path, capsys):
    assert merge_main([str(tiny_run.output_dir), str(tmp_path / "hf"), "--layout", "hf", "--dtype", "fp32"]) == 0
    assert "-hf layout" in capsys.readouterr().out
    merge(tiny_run.output_dir, tmp_path / "original", dtype="fp32")
    assert detect_layout(tmp_path / "hf") == "nvila" and detect_layout(tmp_path / "original") == "original"
    hf, hf_processor = load_model(tmp_path / "hf", dtype="float32", device="cpu")
    original, original_processor = load_model(tmp_path / "original", dtype="float32", device="cpu")
    # The run's media config (resize tiles) travels in the exported config.json.
    assert hf_processor.media == original_processor.media and hf.config.image_aspect_ratio == "resize"
    for a, b in zip(batches(original_processor), batches(hf_processor), strict=True):
        same_batch(a, b)
        torch.testing.assert_close(logits(hf, b), logits(original, a), rtol=0, atol=0)


def test_layouts_that_cannot_hold_the_projector_are_refused(tiny, tmp_path, capsys):
    # SGLang's vila.py builds only mlp_downsample_3x3_fix; the tiny nvila has a 2x2 projector.
    with pytest.raises(SystemExit) as exit_info:
        tiny_main([str(tmp_path / "x"), "--variant", "nvila", "--layout", "hf-0626"])
    assert exit_info.value.code == 2
    assert "vila.py loads only mlp_downsample_3x3_fix" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def sglang_embeds(model, ids: torch.Tensor, features: torch.Tensor, media_ids) -> torch.Tensor:
    """What SGLang's `general_mm_embed_routine` feeds the LLM for NVIDIA's -hf input_ids: token embeddings, with
    the media-token positions replaced, in order, by the media features (no "\\n" rows: those are text tokens)."""
    embeds = model.get_input_embeddings()(ids)
    is_media = torch.isin(ids, torch.tensor(media_ids))
    assert int(is_media.sum()) == features.shape[0]
    embeds[is_media] = features.to(embeds.dtype)
    return embeds


@pytest.mark.parametrize("key", [("nvila", "hf"), ("nvila-lite", "hf")])
@torch.no_grad()
def test_hf_inputs_are_what_nvidias_hf_processor_and_sglang_build(tiny, key):
    model, processor = load_model(tiny[key], dtype="float32", device="cpu")
    lf = processor.end_token_ids
    image_turn = [{"from": "human", "value": ""}, {"from": "gpt", "value": "A test pattern."}]  # image-only turn
    for turns, images, videos in [(QUESTION, [image(SIZES[0], 0)], []), (image_turn, [image(SIZES[1], 1)], []),
                                  (QUESTION, [image(SIZES[0], 0), image(SIZES[2], 2)], []), (QUESTION, [], [VIDEO])]:
        batch = processor.collate([processor(turns, images, videos=videos)])
        embeds, _, _ = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                   batch.get("block_sizes"), pixel_values_videos=batch.get("pixel_values_videos"),
                                   video_frames=batch.get("video_frames"))
        if images:
            feats = model.encode_images(batch["pixel_values"], batch.get("block_sizes"))
            groups = [[f.shape[0]] for f in feats]
            if key[0] == "nvila-lite":
                # processing_nvila_lite.NVILALiteProcessor: 121 media tokens per tile, the last id of the 121 + 1
                # reserved ones replaced by "\n".
                assert {g[0] for g in groups} == {121}
            media = torch.cat(feats)
        else:
            groups, media = [[processor.tokens_per_tile] * len(VIDEO)], torch.cat(
                model.encode_images(batch["pixel_values_videos"], None))
        ids = expand_media_tokens(batch["input_ids"][0].tolist(), model.config.image_token_id,
                                  model.config.video_token_id, lf, groups)
        media_id = model.config.image_token_id if images else model.config.video_token_id
        run = [i for i, t in enumerate(ids) if t == media_id]
        assert ids[run[groups[0][0] - 1] + 1 : run[groups[0][0] - 1] + 1 + len(lf)] == lf  # "\n" ends each item
        expected = sglang_embeds(model, torch.tensor(ids), media, [media_id])
        # The LLM input of an -hf checkpoint is exactly NVIDIA's (no <|im_end|> dropped after an image-only turn).
        torch.testing.assert_close(embeds[0], expected, rtol=0, atol=0)


def test_an_hf_checkpoint_fine_tunes_and_its_run_answers(tiny, tiny_assets, tmp_path):
    from pathlib import Path

    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

    base = tiny["nvila", "hf"]
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    overrides = [f"model.path={base}", f"data.path={tiny_assets.data}", f"train.output_dir={tmp_path / 'run'}",
                 *TINY_RUN_OVERRIDES]
    run = TrainingRun(load_recipe(recipe_path, overrides))
    run.run()
    model, processor = load_model(tmp_path / "run", dtype="float32", device="cpu")
    base_model = NvilaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    from nvila_ft.train.tuning import is_original, official_name

    tuned = {official_name(k): v for k, v in model.named_parameters() if not is_original(k)}  # the trained copies
    changed = [n for n, p in base_model.mm_projector.named_parameters()
               if not torch.equal(p, tuned[f"mm_projector.{n}"])]
    assert changed  # training moved the (fully trained) projector
    sample = run.eval_samples[0]
    batch = processor.collate([processor(sample["conversations"][:1], sample["images"], add_generation_prompt=True)])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 4)
    assert isinstance(processor.decode(out[0]), str)


def test_an_hf_bases_remote_code_travels_with_the_export(tiny, tmp_path):
    # NVIDIA's -hf folders carry configuration_/modeling_/processing_nvila.py, processor_config.json and an
    # auto_map; SGLang loads their config and processor through them (--trust-remote-code).
    base = tmp_path / "base"
    build_tiny_checkpoint(base, "nvila-lite", 0, layout="hf")
    auto_map = {"AutoConfig": "configuration_nvila_lite.NVILALiteConfig",
                "AutoProcessor": "processing_nvila_lite.NVILALiteProcessor"}
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    (base / "processing_nvila_lite.py").write_text("# NVIDIA's processor\n")
    (base / "processor_config.json").write_text(json.dumps({"auto_map": {"AutoProcessor": auto_map["AutoProcessor"]}}))
    model = NvilaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    save_hf(model, tmp_path / "out", code_from=base)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"] == auto_map
    for name in ("processing_nvila_lite.py", "processor_config.json"):
        assert (tmp_path / "out" / name).read_text() == (base / name).read_text()
    save_hf(model, tmp_path / "plain")  # an original base has no remote code to carry
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_the_planner_reads_an_hf_checkpoint_as_its_original(tiny):
    from nvila_ft.plan.memory import checkpoint_config

    hf, hf_rows, _ = checkpoint_config(str(tiny["nvila-lite", "hf"]))
    original, rows, _ = checkpoint_config(str(tiny["nvila-lite", "original"]))
    assert hf_rows == rows
    for field in ("mm_projector_type", "mm_hidden_size", "image_aspect_ratio", "hidden_size", "end_token_ids"):
        assert getattr(hf, field) == getattr(original, field), field
    assert hf.text_config.num_hidden_layers == original.text_config.num_hidden_layers


def test_an_hf_checkpoint_loads_in_4_bit_like_the_original(tiny):
    # QLoRA (`tune.llm: qlora`): the -hf LLM goes through transformers' from_pretrained with the nf4 config too.
    hf, _ = load_model(tiny["nvila", "hf"], dtype="float32", device="cpu", quantize=True)
    original, _ = load_model(tiny["nvila", "original"], dtype="float32", device="cpu", quantize=True)
    assert type(hf.llm.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    a, b = dict(hf.llm.named_parameters()), dict(original.llm.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
