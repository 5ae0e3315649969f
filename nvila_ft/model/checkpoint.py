"""Where an NVILA checkpoint lives and how its parts load: hub id or folder, the tokenizer with NVILA's media
tokens, the QLoRA quantization config and the embedding resize the official loader does.

Kept apart from `modeling` and `processing`, which both need it (the processor loads a tokenizer, the model
resolves and quantizes), so neither imports the other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from nvila_ft.demo import is_demo_path
from nvila_ft.demo import resolve as resolve_demo
from nvila_ft.model.configuration import MEDIA_TOKENS, SENTINEL_TOKEN, NvilaConfig, with_v4_keys
from nvila_ft.model.hf_layout import detect_layout, hf_config_to_nvila, hf_tokenizer, load_hf
from nvila_ft.model.projector import MultimodalProjector

# Recipe / config dtype names -> torch dtypes.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Local folder of a checkpoint: `path_or_id` itself, a Hugging Face Hub snapshot of it, or for a
    `demo:<name>` address the demo checkpoint built on first use (:func:`nvila_ft.demo.resolve`).

    Raises:
        FileNotFoundError: the folder lacks `config.json`, the hub id cannot be fetched (offline, typo), or
            the demo name is unknown (`nvila_ft.demo.DemoError`).
    """
    if is_demo_path(path_or_id):
        return resolve_demo(path_or_id, "checkpoint")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: no config.json. An NVILA checkpoint folder holds config.json, llm/, vision_tower/ "
                "and mm_projector/ (build a tiny one with `python -m nvila_ft.tiny OUT`, or use demo:tiny-nvila)."
            )
        return path
    if path.exists() or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: not a checkpoint folder and not a hub id (owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), revision=revision))
    except Exception as err:  # network errors, gated repos, typos: all end here
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FileNotFoundError(
            f"Could not fetch {path_or_id!r} from the Hugging Face Hub ({type(err).__name__}: {detail}). "
            "Check the id and your network (HF_HUB_OFFLINE=1 uses only the local cache), or pass a local folder."
        ) from err


def load_tokenizer(folder: str | os.PathLike):
    """Loads `llm/`'s tokenizer and adds NVILA's sentinel and media tokens (official order).

    Returns the tokenizer with attributes `media_token_ids` ({"image": id, "video": id}) and
    `sentinel_token_id`. Adding is a no-op for a tokenizer saved by this kit or NVIDIA's trainer.
    """
    return add_media_tokens(AutoTokenizer.from_pretrained(Path(folder) / "llm", padding_side="right"))


def read_checkpoint(folder: str | os.PathLike) -> tuple[NvilaConfig, object]:
    """(config, tokenizer with media tokens) of a checkpoint folder in either layout: original (`config.json` +
    `llm/` tokenizer) or -hf (:mod:`nvila_ft.model.hf_layout`: config converted, tokenizer at the top)."""
    folder = Path(folder)
    if detect_layout(folder) == "original":
        return NvilaConfig.from_json_file(str(folder / "config.json")), load_tokenizer(folder)
    config = hf_config_to_nvila(json.loads((folder / "config.json").read_text()))
    return config, hf_tokenizer(folder, config)


def add_media_tokens(tokenizer):
    """Adds NVILA's sentinel and media tokens (official order) to `tokenizer` and sets `media_token_ids`
    ({"image": id, "video": id}), `sentinel_token_id` and a pad token; a no-op for a tokenizer that has them
    (saved by this kit or NVIDIA's trainer). Returns `tokenizer`."""
    tokenizer.add_tokens([SENTINEL_TOKEN], special_tokens=True)
    tokenizer.add_tokens(list(MEDIA_TOKENS.values()), special_tokens=True)
    tokenizer.sentinel_token_id = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    tokenizer.media_token_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in MEDIA_TOKENS.items()}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def nf4_config(compute_dtype: torch.dtype):
    """The QLoRA quantization of the LLM (`tune.llm: qlora`): bitsandbytes 4-bit nf4 with double quantization
    (official LoRA/QLoRA setup, architecture note "Fine-tuning facts"), computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_nf4_unpacked_on_cpu(llm: nn.Module) -> None:
    """Turns off bitsandbytes' CPU eval-mode path for the 4-bit layers of `llm`.

    That path repacks 4-bit weights in place on the first eval-mode call (and needs in_features % 64 == 0);
    training alternates train and eval, and inference must compute what training evaluated, so the plain nf4
    format stays. GPUs are unaffected.
    """
    for module in llm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def resize_embeddings_like_official(llm: nn.Module, new_rows: int, storage_dtype: torch.dtype | None) -> None:
    """Resizes input (and untied output) embeddings to `new_rows`; new rows = mean of the old rows.

    The official loader resizes to the tokenizer length with transformers' mean initialisation on
    bf16 weights; we compute the fp32 mean and round it to the checkpoint's storage dtype, which gives
    the same rows deterministically.
    """
    old_rows = llm.get_input_embeddings().weight.shape[0]
    if new_rows == old_rows:
        return
    llm.resize_token_embeddings(new_rows, mean_resizing=False)
    if new_rows < old_rows:
        return
    mats = [llm.get_input_embeddings().weight]
    out = llm.get_output_embeddings()
    if out is not None and out.weight is not mats[0]:
        mats.append(out.weight)
    with torch.no_grad():
        for w in mats:
            mean = w[:old_rows].float().mean(0)
            if storage_dtype is not None:
                mean = mean.to(storage_dtype)
            w[old_rows:] = mean.to(w.dtype)


def load_official(path_or_id: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
                  attn_implementation: str | None = None, llm_quantization_config=None, device_map=None,
                  revision: str | None = None, init: str = "pretrained",
                  ) -> tuple[NvilaConfig, object, dict[str, nn.Module]]:
    """The parts of an NVILA checkpoint (see `NvilaForConditionalGeneration.from_pretrained`): the original
    layout, or an -hf one (`detect_layout` on config.json; :func:`nvila_ft.model.hf_layout.load_hf`).

    `init="random"`: the checkpoint's config with seeded random weights, nothing downloaded
    (:func:`nvila_ft.model.random_init.random_official`).

    Returns:
        (config with the resolved token ids, tokenizer with media tokens, {"llm", "vision_tower", "mm_projector"}).

    Raises:
        FileNotFoundError: missing folder, sub-folder or hub id.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if init == "random":
        from nvila_ft.model.random_init import random_official

        return random_official(path_or_id, dtype, attn_implementation, llm_quantization_config, device_map, revision)
    folder = resolve_checkpoint(path_or_id, revision)
    hf = detect_layout(folder) != "original"
    if hf:  # NVIDIA's single-folder -hf layouts
        config, tokenizer, parts = load_hf(folder, dtype, attn_implementation, llm_quantization_config, device_map)
        llm, vision_tower, mm_projector = parts["llm"], parts["vision_tower"], parts["mm_projector"]
    else:
        config, tokenizer, llm, vision_tower, mm_projector = _load_original_parts(
            folder, dtype, attn_implementation, llm_quantization_config, device_map)
    if llm_quantization_config is not None and llm.get_input_embeddings().weight.device.type == "cpu":
        keep_nf4_unpacked_on_cpu(llm)

    # -hf checkpoints already hold the media token rows (maybe padded beyond the tokenizer): only ever grow them.
    rows = max(len(tokenizer), llm.get_input_embeddings().weight.shape[0]) if hf else len(tokenizer)
    resize_embeddings_like_official(llm, rows, DTYPES.get(config.model_dtype.split(".")[-1]))
    config.llm_cfg = llm.config.to_dict()
    config.image_token_id = tokenizer.media_token_ids["image"]
    config.video_token_id = tokenizer.media_token_ids["video"]
    config.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
    # A demo: address is neither a folder nor a hub id: tools that read name_or_path (peft) get the folder.
    config._name_or_path = str(folder if is_demo_path(path_or_id) else path_or_id)
    return config, tokenizer, {"llm": llm, "vision_tower": vision_tower, "mm_projector": mm_projector}


def _load_original_parts(folder: Path, dtype, attn_implementation, llm_quantization_config, device_map):
    """config, tokenizer, llm, vision_tower, mm_projector of an original-layout folder (`load_official`)."""
    for part in ("llm", "vision_tower", "mm_projector"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder}: missing {part}/ (official NVILA layout expected)")
    config = NvilaConfig.from_json_file(str(folder / "config.json"))
    tokenizer = load_tokenizer(folder)
    llm_kwargs = {"dtype": dtype, "device_map": device_map}
    if attn_implementation:
        llm_kwargs["attn_implementation"] = attn_implementation
    if llm_quantization_config is not None:
        llm_kwargs["quantization_config"] = llm_quantization_config
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm", **llm_kwargs)
    vision_tower = SiglipVisionModel.from_pretrained(
        folder / "vision_tower", dtype=dtype, attn_implementation=attn_implementation
    )
    proj_cfg = json.loads((folder / "mm_projector" / "config.json").read_text())
    config.mm_projector_cfg = {**config.mm_projector_cfg, **proj_cfg}
    mm_projector = MultimodalProjector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
    mm_projector.load_state_dict(load_file(folder / "mm_projector" / "model.safetensors"))
    mm_projector.to(dtype=dtype, device=llm.get_input_embeddings().weight.device)
    return config, tokenizer, llm, vision_tower, mm_projector


def save_official(model: nn.Module, save_directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Writes `model` (an `NvilaForConditionalGeneration`) in the official original layout atomically (temp
    folder, then rename): `config.json` (llm_cfg / vision_tower_cfg / mm_projector_cfg embedded), `llm/`
    (weights, config, tokenizer with media tokens, chat template), `vision_tower/` (+ `preprocessor_config.json`),
    `mm_projector/` (`config.json`, `model.safetensors` with keys `layers.<i>.*`)."""
    out = Path(save_directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = state_dict if state_dict is not None else model.state_dict()
        parts = {p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")} for p in
                 ("llm", "vision_tower", "mm_projector")}
        model.llm.save_pretrained(tmp / "llm", state_dict=parts["llm"])
        if model.tokenizer is not None:
            # Chat template inside tokenizer_config.json, where the official code (transformers 4.46) reads it.
            model.tokenizer.save_pretrained(tmp / "llm", save_jinja_files=False)
        model.vision_tower.save_pretrained(tmp / "vision_tower", state_dict=parts["vision_tower"])
        tiling = model.config.tiling()
        (tmp / "vision_tower" / "preprocessor_config.json").write_text(json.dumps({
            "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(tiling.image_mean), "image_std": list(tiling.image_std),
            "image_processor_type": "SiglipImageProcessor", "resample": 3,
            "rescale_factor": 1 / 255, "size": {"height": tiling.tile_size, "width": tiling.tile_size},
        }, indent=2))
        (tmp / "mm_projector").mkdir()
        dtype = str(next(model.mm_projector.parameters()).dtype).replace("torch.", "")
        (tmp / "mm_projector" / "config.json").write_text(json.dumps({
            "architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
            "mm_projector_type": model.config.mm_projector_type, "torch_dtype": dtype,
        }, indent=2))
        save_file({k: v.contiguous() for k, v in parts["mm_projector"].items()},
                  tmp / "mm_projector" / "model.safetensors", metadata={"format": "pt"})
        # transformers 5 writes `dtype` / `rope_parameters`; the official 4.46 code reads `torch_dtype` /
        # `rope_theta` (and would silently fall back to rope_theta 10000): write both spellings.
        for sub in ("llm", "vision_tower"):
            cfg_path = tmp / sub / "config.json"
            cfg_path.write_text(json.dumps(with_v4_keys(json.loads(cfg_path.read_text())), indent=2))
        model.config.llm_cfg = with_v4_keys(model.llm.config.to_dict())
        model.config.vision_tower_cfg = with_v4_keys(model.vision_tower.config.to_dict())
        model.config.architectures = ["LlavaLlamaModel"]
        model.config.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
