"""Tests of `python -m nvila_ft.merge`: merged logits equal the adapter model's, official layout on disk.

    pytest tests/test_merge.py
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tiny_run
from safetensors import safe_open

from nvila_ft.inference import AdapterBank, RunError, load_model
from nvila_ft.merge import MergeError, export_non_lora, main, merge
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.train.tuning import NON_LORA_FILE, non_lora_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def batch_of(run) -> dict:
    sample = run.eval_samples[0]
    return run.processor.collate([run.processor(sample["conversations"], sample["images"])])


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


def dtypes(path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.fixture(scope="module")
def merged_fp32(tiny_run, tmp_path_factory):
    return merge(tiny_run.output_dir, tmp_path_factory.mktemp("merge") / "merged", dtype="fp32")


def test_merged_checkpoint_gives_the_adapter_models_logits(tiny_run, merged_fp32):
    batch = batch_of(tiny_run)
    adapter, _ = load_model(tiny_run.output_dir, dtype="float32", device="cpu")
    merged = NvilaForConditionalGeneration.from_pretrained(merged_fp32, dtype=torch.float32)

    # W x + s B (A x) against (W + s B A) x in fp32: the two orders of summation differ by float rounding,
    # ~1e-6 relative on these logits (|logit| < 10); 1e-4 leaves room and is far below what LoRA changes.
    torch.testing.assert_close(logits(merged, batch), logits(adapter, batch), rtol=1e-4, atol=1e-4)
    base = NvilaForConditionalGeneration.from_pretrained(tiny_run.recipe.model.path, dtype=torch.float32)
    assert (logits(base, batch) - logits(merged, batch)).abs().max() > 1e-2  # the merge changed the model


def test_merged_projector_and_layernorms_are_the_trained_copies(tiny_run, merged_fp32):
    trained = non_lora_state_dict(tiny_run.model)  # the run's modules_to_save copies, official names
    merged = dict(NvilaForConditionalGeneration.from_pretrained(merged_fp32, dtype=torch.float32).named_parameters())
    base = dict(NvilaForConditionalGeneration.from_pretrained(tiny_run.recipe.model.path,
                                                               dtype=torch.float32).named_parameters())
    assert trained and any(k.startswith("mm_projector.") for k in trained)
    for name, value in trained.items():
        assert torch.equal(merged[name], value.float()), name
        assert not torch.equal(merged[name], base[name]), name


def test_non_lora_export_writes_the_official_layout_and_loads_to_the_same_model(tiny_run, tmp_path):
    out = export_non_lora(tiny_run.output_dir, tmp_path / "export")

    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] is None and adapter["target_modules"]
    assert all("lora_" in k for k in dtypes(out / "adapter_model.safetensors"))
    with safe_open(out / NON_LORA_FILE, "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    trained = non_lora_state_dict(tiny_run.model)
    assert set(exported) == set(trained)  # official names: mm_projector.layers.1.weight, ...
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    batch = batch_of(tiny_run)
    run_model, _ = load_model(tiny_run.output_dir, dtype="float32", device="cpu")
    exported_model, _ = load_model(out, dtype="float32", device="cpu")  # the earlier run layout still loads
    torch.testing.assert_close(logits(exported_model, batch), logits(run_model, batch), rtol=0, atol=0)
    bank = AdapterBank(NvilaForConditionalGeneration.from_pretrained(tiny_run.recipe.model.path))
    with pytest.raises(RunError, match="cannot be switched"):
        bank.add(out)
    assert main([str(tiny_run.output_dir), str(tmp_path / "cli"), "--non-lora-trainables"]) == 0
    assert (tmp_path / "cli" / NON_LORA_FILE).is_file() and (tmp_path / "cli" / "recipe.yaml").is_file()


def test_merged_folder_has_the_official_layout(tiny_run, merged_fp32):
    base = tiny_run.recipe.model.path
    for name in ("config.json", "llm/config.json", "llm/model.safetensors", "llm/tokenizer.json",
                 "llm/tokenizer_config.json", "vision_tower/config.json", "vision_tower/model.safetensors",
                 "vision_tower/preprocessor_config.json", "mm_projector/config.json", "mm_projector/model.safetensors"):
        assert (merged_fp32 / name).is_file(), name
    config = json.loads((merged_fp32 / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaModel"] and config["model_type"] == "llava_llama"
    assert config["image_aspect_ratio"] == "resize"  # the run's tiling (a test override) became the checkpoint's
    assert "chat_template" in json.loads((merged_fp32 / "llm" / "tokenizer_config.json").read_text())
    assert json.loads((merged_fp32 / "mm_projector" / "config.json").read_text())["model_type"] == "v2l_projector"
    # Same tensor names as the base checkpoint (no lora_A/B, no base_layer), vision keys `vision_model.*`.
    for part in ("vision_tower", "mm_projector"):
        assert set(dtypes(merged_fp32 / part / "model.safetensors")) == set(dtypes(f"{base}/{part}/model.safetensors"))
    llm = set(dtypes(merged_fp32 / "llm" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in llm)
    assert set(dtypes(f"{base}/llm/model.safetensors")) <= llm
    # and it loads back with nvila_ft's loader, with the media tokens in place
    model, processor = load_model(merged_fp32, device="cpu")
    assert processor.image_token_id == tiny_run.processor.image_token_id
    assert processor.tiling.image_aspect_ratio == "resize"


def test_bf16_merge_stores_bf16(tiny_run, tmp_path):
    out = merge(tiny_run.output_dir, tmp_path / "bf16", dtype="bf16")
    assert set(dtypes(out / "llm" / "model.safetensors").values()) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["model_dtype"] == "torch.bfloat16"


def test_qlora_run_merges_into_dequantized_weights_and_says_so(tiny_assets, tmp_path, caplog):
    run = train_tiny_run(tiny_assets, tmp_path / "qlora-run", "tune.llm=qlora")
    batch = batch_of(run)
    adapter, _ = load_model(run.output_dir, dtype="float32", device="cpu")  # 4-bit base, as trained
    assert type(adapter.get_base_model().llm.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"

    with caplog.at_level("WARNING"):
        out = merge(run.output_dir, tmp_path / "merged", dtype="fp32")

    assert "nf4 weights dequantized" in caplog.text and "--qlora-base original" in caplog.text
    merged = NvilaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    # bitsandbytes' 4-bit matmul dequantizes the same nf4 weights to fp32: equal up to fp32 rounding.
    torch.testing.assert_close(logits(merged, batch), logits(adapter, batch), rtol=1e-4, atol=1e-4)

    original = merge(run.output_dir, tmp_path / "original", dtype="fp32", qlora_base="original")
    unquantized, _ = load_model(run.output_dir, dtype="float32", device="cpu", quantize=False)
    merged_original = NvilaForConditionalGeneration.from_pretrained(original, dtype=torch.float32)
    torch.testing.assert_close(logits(merged_original, batch), logits(unquantized, batch), rtol=1e-4, atol=1e-4)
    assert (logits(merged_original, batch) - logits(merged, batch)).abs().max() > 0  # the two choices differ


def test_refuses_to_write_into_the_run_or_to_merge_a_plain_checkpoint(tiny_assets, tiny_run, capsys):
    with pytest.raises(MergeError, match="overlaps the run folder"):
        merge(tiny_run.output_dir, tiny_run.output_dir / "merged")
    with pytest.raises(MergeError, match="not a run folder"):
        merge(tiny_assets.model, tiny_assets.root / "x")
    assert main([str(tiny_run.output_dir), str(tiny_run.output_dir)]) == 2
    assert "choose a separate folder" in capsys.readouterr().err
    assert (tiny_run.output_dir / "adapter_model.safetensors").is_file()  # untouched
