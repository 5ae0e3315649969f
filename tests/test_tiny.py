"""Tests of nvila_ft.tiny: the tiny checkpoint mirrors the official layout of ../shared/parity/checkpoints.

/work/venv/bin/pytest tests/test_tiny.py -q
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2ForCausalLM, SiglipVisionModel

from nvila_ft.demo.tiny import TOKENIZER_SIZE, build_tiny_checkpoint, main
from nvila_ft.model.projector import STC_FACTOR, MultimodalProjector

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity" / "checkpoints"
VARIANTS = ["nvila", "nvila-lite"]
PARTS = ["llm", "vision_tower", "mm_projector"]
PATH_KEYS = {"_name_or_path", "resume_path"}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(path, "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "nvila": build_tiny_checkpoint(root / "nvila", "nvila"),
        "nvila-lite": build_tiny_checkpoint(root / "nvila-lite", "nvila-lite"),
        "nvila-again": build_tiny_checkpoint(root / "nvila-again", "nvila"),
        "nvila-seed1": build_tiny_checkpoint(root / "nvila-seed1", "nvila", seed=1),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_file_layout_matches_parity(built, variant):
    assert _files(built[variant]) == _files(PARITY / variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_top_config_matches_parity(built, variant):
    ours, ref = _json(built[variant] / "config.json"), _json(PARITY / variant / "config.json")
    assert set(ours) == set(ref)
    skip = PATH_KEYS | {"transformers_version", "llm_cfg", "vision_tower_cfg", "mm_projector_cfg"}
    assert {k: ours[k] for k in set(ours) - skip} == {k: ref[k] for k in set(ref) - skip}
    # Embedded sub-configs: same architecture facts as the parity ones.
    llm_keys = (
        "hidden_size num_hidden_layers num_attention_heads num_key_value_heads intermediate_size "
        "rms_norm_eps rope_theta tie_word_embeddings model_max_length tokenizer_model_max_length "
        "tokenizer_padding_side torch_dtype architectures"
    ).split()
    assert {k: ours["llm_cfg"][k] for k in llm_keys} == {k: ref["llm_cfg"][k] for k in llm_keys}
    vt_keys = (
        "hidden_size num_hidden_layers num_attention_heads intermediate_size image_size patch_size "
        "hidden_act layer_norm_eps vision_use_head model_type architectures"
    ).split()
    assert {k: ours["vision_tower_cfg"][k] for k in vt_keys} == {
        k: ref["vision_tower_cfg"][k] for k in vt_keys
    }
    ours_proj, ref_proj = ours["mm_projector_cfg"], ref["mm_projector_cfg"]
    assert ours_proj["model_type"] == ref_proj["model_type"] == "v2l_projector"
    # nvila: ours is `mlp_downsample_2x2_fix`, the parity one its alias `mlp_downsample` (same 2x2 STC).
    assert STC_FACTOR[ours_proj["mm_projector_type"]] == STC_FACTOR[ref_proj["mm_projector_type"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_part_configs(built, variant):
    ckpt = built[variant]
    proj = _json(ckpt / "mm_projector" / "config.json")
    assert proj["architectures"] == ["MultimodalProjector"] and proj["model_type"] == "v2l_projector"
    assert (
        proj["mm_projector_type"]
        == {"nvila": "mlp_downsample_2x2_fix", "nvila-lite": "mlp_downsample_3x3_fix"}[variant]
    )
    assert _json(ckpt / "vision_tower" / "preprocessor_config.json") == _json(
        PARITY / variant / "vision_tower" / "preprocessor_config.json"
    )
    llm = _json(ckpt / "llm" / "config.json")
    ref = _json(PARITY / variant / "llm" / "config.json")
    # 4.x spellings kept for the official code next to transformers 5's `dtype` / `rope_parameters`.
    assert llm["torch_dtype"] == "bfloat16" and llm["rope_theta"] == ref["rope_theta"] == 1e6
    assert llm["vocab_size"] == TOKENIZER_SIZE and TOKENIZER_SIZE % 8 == 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("part", PARTS)
def test_safetensors_keys_shapes_dtypes_match_parity(built, variant, part):
    ours = _tensors(built[variant] / part / "model.safetensors")
    ref = _tensors(PARITY / variant / part / "model.safetensors")
    assert set(ours) == set(ref)
    vocab_rows = {"lm_head.weight", "model.embed_tokens.weight"}  # parity vocab 8192, ours TOKENIZER_SIZE
    for key, (shape, dtype) in ours.items():
        ref_shape = ref[key][0]
        expected = (TOKENIZER_SIZE, *ref_shape[1:]) if key in vocab_rows else ref_shape
        assert (shape, dtype) == (expected, "BF16"), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_parts_load_with_transformers_and_projector(built, variant):
    ckpt = built[variant]
    llm, info = Qwen2ForCausalLM.from_pretrained(ckpt / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert llm.config.rope_parameters["rope_theta"] == 1e6
    assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == (variant == "nvila-lite")
    tower, info = SiglipVisionModel.from_pretrained(ckpt / "vision_tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.zeros(1, 3, 448, 448, dtype=tower.dtype)
    assert tower(pixels).last_hidden_state.shape == (1, 32 * 32, 32)  # 448/14 = 32 patches per side
    top = _json(ckpt / "config.json")
    proj = MultimodalProjector(top["mm_projector_cfg"]["mm_projector_type"], top["mm_hidden_size"], 64)
    with safe_open(ckpt / "mm_projector" / "model.safetensors", "pt") as f:
        proj.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)
    # Norm scales and biases are random too (not 1 / 0), so a loader that drops one is noticed.
    norm = next(m for m in tower.modules() if isinstance(m, torch.nn.LayerNorm))
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))
    assert not torch.allclose(norm.bias, torch.zeros_like(norm.bias))
    assert type(AutoImageProcessor.from_pretrained(ckpt / "vision_tower")).__name__.startswith(
        "SiglipImageProcessor"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer(built, variant):
    tok = AutoTokenizer.from_pretrained(built[variant] / "llm")
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == TOKENIZER_SIZE
    base = TOKENIZER_SIZE - 3
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        base,
        base + 1,
        base + 2,
    ]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert (
        tok.model_max_length == {"nvila": 8192, "nvila-lite": 4096}[variant] and tok.padding_side == "right"
    )
    for media in ("<image>", "<vila/video>", "<vila/sentinel>"):
        assert media not in tok.get_vocab()  # the loader adds them, as for the official checkpoints
    for text in [
        "Is this a CT or an MRI of the chest? yes",
        "Ünïcödé 日本語 🙂 Ωμέγα\n\ttabs  and   spaces",
        "x" * 300,
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert max(ids) < TOKENIZER_SIZE and tok.decode(ids) == text
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [base + 2]  # one special token, not split
    # A trained BPE, not bytes only: common words are single tokens.
    assert len(tok.encode(" chest", add_special_tokens=False)) == 1
    llm_cfg = _json(built[variant] / "llm" / "config.json")
    assert (llm_cfg["bos_token_id"], llm_cfg["eos_token_id"], llm_cfg["pad_token_id"]) == (
        base,
        base + 2,
        base,
    )


def test_chat_template(built):
    tok = AutoTokenizer.from_pretrained(built["nvila"] / "llm")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    ref = _json(PARITY / "nvila" / "llm" / "tokenizer_config.json")["chat_template"]
    assert _json(built["nvila"] / "llm" / "tokenizer_config.json")["chat_template"] == ref


def test_same_seed_is_byte_identical_other_seed_differs(built):
    first, again, other = built["nvila"], built["nvila-again"], built["nvila-seed1"]
    for part in PARTS:
        weights = (first / part / "model.safetensors").read_bytes()
        assert weights == (again / part / "model.safetensors").read_bytes(), part
        assert weights != (other / part / "model.safetensors").read_bytes(), part
    assert (first / "llm" / "tokenizer.json").read_bytes() == (other / "llm" / "tokenizer.json").read_bytes()


def test_builder_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path / "ckpt", "nvila-lite", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_refuses_to_overwrite_non_empty_folder(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_checkpoint(out)
    assert _files(out) == {"keep.txt"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    with pytest.raises(SystemExit):
        main([str(out)])
    assert build_tiny_checkpoint(out, overwrite=True) == out.resolve()
    assert "keep.txt" not in _files(out) and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_empty_existing_folder_is_fine_and_overrides_apply(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    build_tiny_checkpoint(out, "nvila-lite", num_hidden_layers=3, vision_hidden_size=48)
    top = _json(out / "config.json")
    assert (
        top["llm_cfg"]["num_hidden_layers"] == 3 and top["mm_hidden_size"] == 48
    )  # lite: mm_hidden = vision
    assert _tensors(out / "mm_projector" / "model.safetensors")["layers.1.weight"][0] == (9 * 48,)


def test_invalid_arguments(tmp_path):
    with pytest.raises(TypeError, match="num_layers"):
        build_tiny_checkpoint(tmp_path / "a", num_layers=3)
    with pytest.raises(ValueError, match="variant"):
        build_tiny_checkpoint(tmp_path / "b", "nvila-9000")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        build_tiny_checkpoint(tmp_path / "c", num_key_value_heads=3)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_path_and_summary(tmp_path, capsys):
    assert main([str(tmp_path / "ckpt"), "--variant", "nvila-lite", "--seed", "3"]) == 0
    path, summary = capsys.readouterr().out.strip().splitlines()
    assert Path(path) == (tmp_path / "ckpt").resolve()
    assert summary.startswith("nvila-lite seed 3:")
    for part in PARTS:
        assert part in summary
    assert "mm_projector 38,880 params" in summary  # 3x3 projector, C=32, H=64 (parity sizes)
