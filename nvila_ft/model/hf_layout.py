"""NVIDIA's single-folder "-hf" NVILA checkpoints, in and out, without remote code.

    python -m nvila_ft.merge runs/medical runs/medical-hf --layout hf      # export a tuned run
    NvilaForConditionalGeneration.from_pretrained("Efficient-Large-Model/NVILA-8B-hf")   # load one

NVIDIA publishes NVILA twice: the original layout (`config.json` with `model_type: llava_llama` + `llm/` +
`vision_tower/` + `mm_projector/`, handled by :mod:`nvila_ft.model.checkpoint`) and single-folder "-hf"
checkpoints, which serving engines read. The -hf layouts, as SGLang's loaders read them
(sgl-project/sglang, `python/sglang/srt/models/`):

- `nvila` (NVILA-8B-hf; `nvila.py`): `NVILAConfig.model_type = "nvila"`, `sub_configs` `text_config`
  (`Qwen2Config`) and `vision_config` (`SiglipVisionConfig`), `image_token_id`, `video_token_id`; module tree
  `vision_tower = SiglipVisionModel(...)` (weights `vision_tower.vision_model.*`), `llm = Qwen2ForCausalLM`
  (`load_weights` strips `llm.`), `mm_projector.layers = Sequential(DownsampleBlock, LayerNorm(4*3456),
  Linear, GELU, Linear)` (weights `mm_projector.layers.{1,2,4}`). Hard-wired there: `MM_HIDDEN_SIZE = 3456`
  (3 x 1152), `hidden_states[-2]`, `scales=[448, 896, 1344]`, `resize_output_to_scale_idx=-1` (dynamic_s2).
- `nvila_lite` (NVILA-Lite-*-hf; `nvila_lite.py`): same config fields, `model_type = "nvila_lite"`, projector
  `Sequential(Downsample3x3, LayerNorm(9*1152), Linear, GELU, LayerNorm(3*1152), Linear, GELU, Linear)`
  (weights `mm_projector.layers.{1,2,4,5,7}`), `hidden_states[-2]`, every tile its own image.
- `vila` (NVILA-Lite-2B-hf-0626; `vila.py`): `VILAConfig.model_type = "vila"` with `text_config`,
  `vision_config` and flat `hidden_size`, `image_token_id`, `mm_hidden_size`, `mm_projector_type` (only
  `mlp_downsample_3x3_fix`), `mm_vision_select_feature` (`cls_patch`), `mm_vision_select_layer`,
  `video_token_id`; same weight names as `nvila_lite`.

All three name the weights exactly as :class:`~nvila_ft.model.modeling.NvilaForConditionalGeneration`
does (`llm.*`, `vision_tower.vision_model.*`, `mm_projector.layers.<i>.*`), so loading converts the config
only, and :func:`save_hf` writes `model.state_dict()` as it is. The tokenizer lives in the folder itself.

Inputs. NVIDIA's -hf processors (remote code `processing_nvila.NVILAProcessor`,
`processing_nvila_lite.NVILALiteProcessor`) write the media into `input_ids`: each tile / frame is its feature
rows of media tokens followed by one "\n" id, and for a single image each tile's text placeholder is
`<image>\n` (their "HACK: NVILA mistakenly suffixes line feeds"), several images and videos get no text "\n".
NVIDIA's own files were not in the sources available here; this is read from an Apache-2.0 re-implementation
of `NVILALiteProcessor` (Datature Vi SDK, `vi/inference/loaders/architectures/nvila/processing.py`) and SGLang's
`multimodal/processors/nvila.py` (it calls that HF processor and fills the media-token positions in order).
It is the original layout's LLM input (one placeholder per item, features + "\n" spliced in by `embed`,
`<image>\n` per NVILA-Lite tile) except that nothing is dropped after a placeholder: for an -hf checkpoint the
model keeps `<|im_end|>` after an image-only turn. :func:`expand_media_tokens` gives the -hf `input_ids`.
The NVILA (dynamic_s2) -hf processor was not available: the same rule, rows*cols*256 tokens + "\n" per image
(what SGLang's `nvila.py` returns per image), is assumed.

`-hf-preview` checkpoints (e.g. NVILA-Lite-2B-hf-preview) are NVIDIA's remote-code "HF compatible mode"; their
`config.json` was not available to verify: a config with `text_config` + `vision_config` and a model_type
not listed here loads as `nvila_lite` when its projector is 3x3 (`mm_projector_type`), else as `nvila`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
from transformers.utils import logging as transformers_logging

from nvila_ft.model.configuration import MEDIA_TOKENS, NvilaConfig, with_v4_keys
from nvila_ft.model.projector import MultimodalProjector

# model_type -> (architectures entry SGLang dispatches on, NVILA image mode, projector, S2 scales).
HF_MODEL_TYPES = {
    "nvila": ("NVILAForConditionalGeneration", "dynamic_s2", "mlp_downsample_2x2_fix", "448,896,1344"),
    "nvila_lite": ("NVILALiteForConditionalGeneration", "dynamic", "mlp_downsample_3x3_fix", None),
    "vila": ("VILAForConditionalGeneration", "dynamic", "mlp_downsample_3x3_fix", None),
}
# Layout names (`--layout`) -> model_type, None = chosen from the projector (2x2: nvila, 3x3: nvila_lite).
LAYOUTS = {"original": None, "hf": None, "hf-0626": "vila"}
# NVILA settings kept in an exported -hf config.json (SGLang ignores them; this kit reads them back).
KEPT_FIELDS = ("image_aspect_ratio", "dynamic_s2", "max_tiles", "min_tiles", "s2_scales", "s2_max_split_size",
               "s2_resize_output_to_scale_idx", "num_video_frames", "fps", "video_encoder", "model_dtype",
               "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature")
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def detect_layout(folder: str | os.PathLike) -> str:
    """`original` (config `model_type: llava_llama`, sub-folders) or the -hf model_type of `folder`.

    Returns:
        "original", "nvila", "nvila_lite" or "vila".

    Raises:
        FileNotFoundError: `config.json` is missing. ValueError: a config that is neither layout.
    """
    cfg = json.loads((Path(folder) / "config.json").read_text())
    if "llm_cfg" in cfg or cfg.get("model_type") == NvilaConfig.model_type:
        return "original"
    if "text_config" in cfg and "vision_config" in cfg:
        if cfg.get("model_type") in HF_MODEL_TYPES:
            return cfg["model_type"]
        return "nvila_lite" if "3x3" in str(cfg.get("mm_projector_type", "")) else "nvila"
    raise ValueError(f"{folder}/config.json: model_type {cfg.get('model_type')!r} is neither the original NVILA "
                     "layout (llava_llama) nor an -hf one (nvila, nvila_lite, vila)")


def hf_config_to_nvila(cfg: dict) -> NvilaConfig:
    """An -hf `config.json` (dict) as this kit's :class:`NvilaConfig` (original-layout fields).

    Fields SGLang hard-wires (see the module doc) become explicit: dynamic_s2 with scales 448/896/1344 and
    `mm_hidden_size` = 3 x SigLIP width for `nvila`, dynamic tiles and the SigLIP width for `nvila_lite` /
    `vila`, `mm_vision_select_layer` -2. Fields an exported config carries (:data:`KEPT_FIELDS`) win.
    """
    model_type = cfg.get("model_type") if cfg.get("model_type") in HF_MODEL_TYPES else None
    if model_type is None:
        model_type = "nvila_lite" if "3x3" in str(cfg.get("mm_projector_type", "")) else "nvila"
    _, mode, projector, scales = HF_MODEL_TYPES[model_type]
    text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
    vision.setdefault("model_type", "siglip_vision_model")
    s2 = mode == "dynamic_s2"
    fields = {
        "image_aspect_ratio": mode, "dynamic_s2": s2, "s2_scales": scales, "s2_max_split_size": 448 if s2 else None,
        "s2_resize_output_to_scale_idx": -1 if s2 else 0, "mm_projector_type": projector,
        "mm_hidden_size": vision["hidden_size"] * (3 if s2 else 1), "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "model_dtype": f"torch.{text.get('dtype') or text.get('torch_dtype') or cfg.get('torch_dtype') or 'bfloat16'}",
    }
    fields.update({k: cfg[k] for k in KEPT_FIELDS if cfg.get(k) is not None})
    projector = fields.pop("mm_projector_type")
    return NvilaConfig(
        llm_cfg=text, vision_tower_cfg=vision, mm_projector_cfg={"mm_projector_type": projector},
        hidden_size=text["hidden_size"], image_token_id=cfg.get("image_token_id"),
        video_token_id=cfg.get("video_token_id"), hf_model_type=model_type, **fields,
    )


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        return sorted({folder / f for f in json.loads((folder / INDEX).read_text())["weight_map"].values()})
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} or {INDEX} (-hf NVILA layout expected)")


def hf_tokenizer(folder: Path, config: NvilaConfig):
    """The folder's tokenizer with `media_token_ids` / `sentinel_token_id` set from its `<image>` and
    `<vila/video>` tokens (NVIDIA's -hf tokenizers carry them; added, official order, when missing)."""
    from nvila_ft.model.checkpoint import add_media_tokens

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # it reads config.json, whose model_type it does not know
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    finally:
        transformers_logging.set_verbosity(verbosity)
    vocab = tokenizer.get_vocab()
    if any(t not in vocab for t in MEDIA_TOKENS.values()):
        return add_media_tokens(tokenizer)
    tokenizer.media_token_ids = {k: vocab[v] for k, v in MEDIA_TOKENS.items()}
    tokenizer.sentinel_token_id = vocab.get("<vila/sentinel>")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    return tokenizer


def load_hf(folder: Path, dtype: torch.dtype, attn_implementation: str | None = None,
            llm_quantization_config=None, device_map=None) -> tuple[NvilaConfig, object, dict[str, nn.Module]]:
    """The parts of an -hf checkpoint folder, as :func:`nvila_ft.model.checkpoint.load_official` returns them.

    The LLM and vision tower load with transformers' `from_pretrained(folder, key_mapping=...)` (the `llm.` /
    `vision_tower.` prefixes stripped; the other parts' keys are skipped as unexpected), so 4-bit loading and
    `device_map` work as for the original layout; the projector is read from its `mm_projector.layers.*` keys.

    Raises:
        FileNotFoundError: no weights in `folder`.
    """
    config = hf_config_to_nvila(json.loads((folder / "config.json").read_text()))
    files = _weight_files(folder)
    tokenizer = hf_tokenizer(folder, config)
    kwargs = {"dtype": dtype, "device_map": device_map}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if llm_quantization_config is not None:
        kwargs["quantization_config"] = llm_quantization_config
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # one folder, three models: the other parts' keys are expected
    try:
        llm = AutoModelForCausalLM.from_pretrained(folder, config=config.text_config,
                                                   key_mapping={r"^llm\.": ""}, **kwargs)
        vision_tower = SiglipVisionModel.from_pretrained(folder, config=config.vision_config, dtype=dtype,
                                                         attn_implementation=attn_implementation,
                                                         key_mapping={r"^vision_tower\.": ""})
    finally:
        transformers_logging.set_verbosity(verbosity)
    state = {}
    for path in files:
        with safe_open(path, "pt") as f:
            state.update({k[len("mm_projector."):]: f.get_tensor(k) for k in f.keys() if k.startswith("mm_projector.")})
    mm_projector = MultimodalProjector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
    mm_projector.load_state_dict(state)
    mm_projector.to(dtype=dtype, device=llm.get_input_embeddings().weight.device)
    return config, tokenizer, {"llm": llm, "vision_tower": vision_tower, "mm_projector": mm_projector}


def hf_model_type(config: NvilaConfig, layout: str = "hf") -> str:
    """The -hf model_type a model with `config` is exported as: `vila` for `layout="hf-0626"`, else `nvila`
    for a 2x2 projector with dynamic_s2 and `nvila_lite` for a 3x3 one.

    Raises:
        ValueError: an unknown layout, or a projector / image mode the layout's loader does not have (SGLang's
            `nvila.py` is 2x2 + dynamic_s2 only; `nvila_lite.py` and `vila.py` 3x3 only).
    """
    if layout not in LAYOUTS or layout == "original":
        raise ValueError(f"layout {layout!r}: choose one of hf, hf-0626 (or original)")
    projector = config.mm_projector_type
    if layout == "hf-0626" or "3x3" in projector:
        if "3x3" not in projector:
            raise ValueError(f"layout {layout}: SGLang's vila.py loads only mlp_downsample_3x3_fix projectors, "
                             f"this model has {projector}; use --layout hf")
        return LAYOUTS[layout] or "nvila_lite"
    if projector not in ("mlp_downsample", "mlp_downsample_2x2_fix") or not config.dynamic_s2:
        raise ValueError(f"layout hf: SGLang's nvila.py is a 2x2 projector with dynamic_s2; this model has "
                         f"{projector} with image_aspect_ratio {config.image_aspect_ratio}; use --layout original")
    return "nvila"


def hf_weight_name(name: str) -> str:
    """The -hf name of a parameter of `NvilaForConditionalGeneration`: unchanged, except that transformers 5's
    `SiglipVisionModel` holds its layers without the `vision_model.` level that SGLang's (transformers 4)
    `SiglipVisionModel` has, so `vision_tower.encoder.*` becomes `vision_tower.vision_model.encoder.*`."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def hf_config_dict(model: nn.Module, model_type: str) -> dict:
    """The -hf `config.json` of `model` (an `NvilaForConditionalGeneration`): the fields SGLang's config class
    reads (`text_config`, `vision_config`, `image_token_id`, `video_token_id`, and for `vila` the flat
    `hidden_size` / `mm_*` fields) plus this kit's NVILA settings (:data:`KEPT_FIELDS`)."""
    config = model.config
    dtype = str(next(model.llm.parameters()).dtype).replace("torch.", "")
    out = {
        "architectures": [HF_MODEL_TYPES[model_type][0]], "model_type": model_type,
        "text_config": with_v4_keys(model.llm.config.to_dict()),
        "vision_config": with_v4_keys(model.vision_tower.config.to_dict()),
        "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
        "hidden_size": config.hidden_size, "torch_dtype": dtype,
    }
    out.update({k: getattr(config, k) for k in KEPT_FIELDS if getattr(config, k, None) is not None})
    return out


def save_hf(model: nn.Module, save_directory: str | os.PathLike, layout: str = "hf", state_dict: dict | None = None,
            max_shard_size: str = "5GB", code_from: str | os.PathLike | None = None) -> Path:
    """Writes `model` (an `NvilaForConditionalGeneration`, LoRA merged) as an -hf checkpoint, atomically (temp
    folder, then rename): `config.json` (:func:`hf_config_dict`), `model.safetensors` (or shards + index) with
    the model's own parameter names, the tokenizer (+ chat template) at the top level, and
    `preprocessor_config.json` (SigLIP, 448 px, mean/std 0.5).

    Args:
        layout: `hf` (model_type `nvila` or `nvila_lite`, from the projector) or `hf-0626` (`vila`).
        code_from: an -hf checkpoint folder (the run's base) whose remote code comes along: its `*.py`
            (`configuration_*`, `modeling_*`, `processing_*`), `processor_config.json`, `generation_config.json`
            and the `auto_map` of its `config.json`. SGLang loads the config and processor of an -hf folder
            through them (`--trust-remote-code`); this kit never runs them.

    Returns:
        The output folder. Raises ValueError: see :func:`hf_model_type`.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    model_type = hf_model_type(model.config, layout)
    out = Path(save_directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = dict(state_dict if state_dict is not None else model.state_dict())
        if model.llm.config.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)  # tied: SGLang's Qwen2 loader ties it again
        state = {hf_weight_name(k): v.detach().contiguous() for k, v in state.items()}
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            (tmp / INDEX).write_text(json.dumps({"metadata": split.metadata,
                                                 "weight_map": split.tensor_to_filename}, indent=2))
        config = hf_config_dict(model, model_type)
        if code_from is not None:
            config.update(_copy_remote_code(Path(code_from), tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp, save_jinja_files=False)
            _name_media_tokens(tmp / "tokenizer_config.json")
        tiling = model.config.tiling()
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(tiling.image_mean), "image_std": list(tiling.image_std),
            "image_processor_type": "SiglipImageProcessor", "resample": 3,
            "rescale_factor": 1 / 255, "size": {"height": tiling.tile_size, "width": tiling.tile_size},
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_remote_code(src: Path, dst: Path) -> dict:
    """Copies `src`'s remote code and processor files into `dst`; returns {"auto_map": ...} of its config (or {})."""
    for path in [*src.glob("*.py"), src / "processor_config.json", src / "generation_config.json"]:
        if path.is_file():
            shutil.copy2(path, dst / path.name)
    auto_map = json.loads((src / "config.json").read_text()).get("auto_map")
    return {"auto_map": auto_map} if auto_map else {}


def _name_media_tokens(path: Path) -> None:
    """Names the media tokens in `tokenizer_config.json` (`extra_special_tokens` dict), so that
    `tokenizer.image_token` / `video_token` exist: SGLang's `NVILAMultimodalProcessor` reads them
    (`multimodal/processors/nvila.py`: `image_token=tokenizer.image_token`)."""
    cfg = json.loads(path.read_text())
    named = {"image_token": MEDIA_TOKENS["image"], "video_token": MEDIA_TOKENS["video"]}
    extra = cfg.get("extra_special_tokens")
    cfg["extra_special_tokens"] = {**(extra if isinstance(extra, dict) else {}), **named}
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def expand_media_tokens(input_ids: Sequence[int], image_token_id: int, video_token_id: int,
                        end_token_ids: Sequence[int], groups: Sequence[Sequence[int]]) -> list[int]:
    """NVIDIA's -hf `input_ids` for this kit's compact ones (one `<image>` / `<vila/video>` token per item).

    NVIDIA's -hf processors write the media in `input_ids` (processing_nvila_lite.NVILALiteProcessor
    `_preprocess_text`: each tile / frame is `121 + 1` media tokens whose last one is replaced by the "\\n" id),
    and SGLang (`general_mm_embed_routine`) puts the features at the media positions. This kit keeps one
    placeholder per item and splices features + "\\n" embeddings in `NvilaForConditionalGeneration.embed`:
    the two give the same LLM input (tests/test_hf_layout.py checks it), and for an -hf checkpoint nothing
    after a placeholder is dropped (NVIDIA's -hf path drops no `<|im_end|>`; `segment_skip_token_ids`).

    Args:
        groups: per placeholder in order of appearance, the feature rows of each of its groups: [N] for an
            image (N = its projected tokens, e.g. 121 per NVILA-Lite tile), [tokens per frame] * frames (or per
            pooled frame group) for a video.

    Returns:
        The ids with each placeholder replaced by, per group, `rows` x its media id followed by `end_token_ids`.

    Raises:
        ValueError: placeholder count and `groups` differ.
    """
    out, items = [], iter(groups)
    count = 0
    for token in input_ids:
        if token not in (image_token_id, video_token_id):
            out.append(token)
            continue
        count += 1
        item = next(items, None)
        if item is None:
            break
        for rows in item:
            out += [token] * rows + list(end_token_ids)
    if count != len(groups):
        raise ValueError(f"{count} media placeholders in input_ids but {len(groups)} groups")
    return out
