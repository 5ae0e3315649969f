"""Random weights at a checkpoint's real shapes (`model.init: random`): the real code path without a download.

    accelerate launch -m nvila_ft.train recipes/medical.yaml model.init=random train.max_steps=20
    python -m nvila_ft.plan recipes/medical.yaml --measure      # the fit check uses it

The config comes from a local checkpoint folder, the configs shipped in `nvila_ft/model/configs/` (the official
hub ids, no network), or else the hub's `config.json` alone. Parameters are created on the `meta` device and
materialised one by one directly on the target device in the recipe's dtype, drawn from a seeded generator;
buffers (SigLIP `position_ids`, the LLM's rotary `inv_freq`) are computed by the modules' own constructors,
so they equal a normally constructed model's. Under QLoRA every LLM Linear but `lm_head` becomes a bitsandbytes
`Linear4bit` quantized from its random bf16 weight, as transformers' bitsandbytes loader leaves it.

Tokenizer: with no download there is no real tokenizer. A hub id without a local folder gets the tiny demo
tokenizer (`nvila_ft.demo.tiny.build_tiny_tokenizer`, ~1k byte-level BPE ids, Qwen2 chat template) plus
NVILA's sentinel and media tokens, while the embedding keeps the official tokenizer length
(`video_token_id + 1`, e.g. 151,651 rows for NVILA-8B): memory and FLOPs are the real model's, token ids
above ~1k are never produced. A local folder's own tokenizer is used as is. Nothing learnt on random
weights is meaningful; the loader logs a warning and the model card says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, SiglipVisionModel

from nvila_ft.demo import is_demo_path
from nvila_ft.demo import resolve as resolve_demo
from nvila_ft.model.configuration import MEDIA_TOKENS, SENTINEL_TOKEN, NvilaConfig
from nvila_ft.model.projector import MultimodalProjector

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
HUB_OWNER = "Efficient-Large-Model"
WARNING = ("model.init=random: RANDOM WEIGHTS at the real shapes of {path} (seed {seed}); for memory, speed and "
           "code-path checks only, nothing learnt is meaningful")

_DEPTH: dict[str, int] = {}  # set by `reduced_depth` only


@contextlib.contextmanager
def reduced_depth(llm: int, vision_tower: int):
    """Builds random models with fewer layers (real widths) inside the block: tests and CPU benchmark runs.

        with reduced_depth(llm=2, vision_tower=3):
            model = NvilaForConditionalGeneration.from_pretrained(hub_id, init="random")
    """
    from nvila_ft.plan import report  # the planner caches meta models per checkpoint: plan the reduced one

    _DEPTH.update(llm=llm, vision_tower=vision_tower)
    report._parameters.cache_clear()
    try:
        yield
    finally:
        _DEPTH.clear()
        report._parameters.cache_clear()


def apply_reduced_depth(config: NvilaConfig) -> NvilaConfig:
    """`config` with the layer counts of an enclosing :func:`reduced_depth` (unchanged outside one); the
    planner applies it too, so plan and model agree."""
    if _DEPTH:
        config.llm_cfg = {**config.llm_cfg, "num_hidden_layers": _DEPTH["llm"], "max_window_layers": _DEPTH["llm"]}
        config.llm_cfg.pop("layer_types", None)
        config.vision_tower_cfg = {**config.vision_tower_cfg, "num_hidden_layers": _DEPTH["vision_tower"]}
    return config


def random_config(path_or_id: str | os.PathLike, revision: str | None = None) -> tuple[NvilaConfig, Path | None]:
    """The NVILA config to build at random, and the local folder it came from (None: shipped or hub config).

    Raises:
        FileNotFoundError: no local folder, no shipped config and the hub's config.json cannot be fetched.
    """
    config, folder = _find_config(path_or_id, revision)
    return apply_reduced_depth(config), folder


def _find_config(path_or_id, revision):
    if is_demo_path(path_or_id):  # demo:<name>: the demo checkpoint's folder (built on first use)
        path_or_id = resolve_demo(path_or_id, "checkpoint")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (model.init=random needs the checkpoint's config)")
        return NvilaConfig.from_json_file(str(path / "config.json")), path
    name = str(path_or_id)
    shipped = CONFIGS / name.split("/")[-1] / "config.json"
    if name.startswith(HUB_OWNER + "/") and shipped.is_file():
        return NvilaConfig.from_json_file(str(shipped)), None
    from huggingface_hub import hf_hub_download

    try:
        return NvilaConfig.from_json_file(hf_hub_download(name, "config.json", revision=revision)), None
    except Exception as err:  # offline, typo, gated: one message
        names = ", ".join(sorted(f"{HUB_OWNER}/{p.parent.name}" for p in CONFIGS.glob("*/config.json")))
        raise FileNotFoundError(f"model.path={name!r} with model.init=random: no local folder, no shipped config "
                                f"({names}) and the hub's config.json could not be fetched ({err})") from err


def random_tokenizer(config: NvilaConfig, folder: Path | None):
    """The checkpoint folder's tokenizer, or the tiny demo tokenizer with NVILA's media tokens (see module doc).

    Returns a tokenizer with `media_token_ids` and `sentinel_token_id`, as `load_tokenizer` gives.
    """
    from nvila_ft.model.checkpoint import load_tokenizer

    if folder is not None and (folder / "llm").is_dir():
        return load_tokenizer(folder)
    from nvila_ft.demo.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(model_max_length=config.llm_cfg.get("model_max_length", 8192) or 8192)
    tokenizer.add_tokens([SENTINEL_TOKEN], special_tokens=True)
    tokenizer.add_tokens(list(MEDIA_TOKENS.values()), special_tokens=True)
    tokenizer.sentinel_token_id = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    tokenizer.media_token_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in MEDIA_TOKENS.items()}
    return tokenizer


def _device(device_map) -> torch.device:
    """The single device of a `device_map` ({"": 0}, "cuda", None = CPU)."""
    if isinstance(device_map, dict):
        device_map = next(iter(device_map.values()), None)
    if device_map is None or device_map == "cpu":
        return torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def materialize_(model: nn.Module, device: torch.device, dtype: torch.dtype, generator: torch.Generator,
                 quantize=None) -> None:
    """Replaces every `meta` parameter of `model` by a random one on `device` in `dtype`, in place.

    Norm scales 1, biases 0, embeddings N(0, 0.02^2), other matrices N(0, 1/fan_in) (activations stay O(1) at any
    depth). Shared (tied) parameters stay shared. With `quantize` (a `BitsAndBytesConfig`), `nn.Linear` layers
    listed in `quantize._nvila_targets` become bitsandbytes `Linear4bit` (nf4 of the random weight).
    """
    targets = getattr(quantize, "_nvila_targets", set()) if quantize is not None else set()
    made: dict[int, nn.Parameter] = {}
    for mod_name, module in list(model.named_modules()):
        if mod_name in targets:
            _quantize_linear(model, mod_name, module, device, dtype, generator, quantize)
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if id(param) not in made:
                value = torch.empty(param.shape, dtype=dtype, device=device)
                if _is_norm(module) and name == "weight":
                    value.fill_(1.0)
                elif name == "bias" or param.ndim == 1:
                    value.zero_()
                elif isinstance(module, nn.Embedding):
                    value.normal_(0.0, 0.02, generator=generator)
                else:
                    value.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
                made[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]


def _quantize_linear(model, name, module, device, dtype, generator, quant) -> None:
    import bitsandbytes as bnb

    weight = torch.empty(module.weight.shape, dtype=dtype, device=device).normal_(
        0.0, module.in_features ** -0.5, generator=generator)
    q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                          compute_dtype=quant.bnb_4bit_compute_dtype, quant_type=quant.bnb_4bit_quant_type,
                          compress_statistics=quant.bnb_4bit_use_double_quant,
                          quant_storage=quant.bnb_4bit_quant_storage, device="meta")
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant.bnb_4bit_quant_type,
                                 compress_statistics=quant.bnb_4bit_use_double_quant,
                                 quant_storage=quant.bnb_4bit_quant_storage, module=q)._quantize(device)
    if module.bias is not None:
        q.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device), requires_grad=False)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, q)


def random_official(path_or_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    attn_implementation: str | None = None, llm_quantization_config=None, device_map=None,
                    revision: str | None = None, seed: int = 0):
    """What :func:`nvila_ft.model.checkpoint.load_official` returns, with random weights (see module doc).

    Args:
        path_or_id: checkpoint folder or hub id (its config only is read).
        dtype: dtype of every non-quantized parameter; buffers keep the dtype their constructor gives them.
        attn_implementation, llm_quantization_config, device_map: as for `load_official`; the whole model goes
            to `device_map`'s one device (None: CPU).
        seed: seed of the weights' generator (same seed, device and dtype: same weights).

    Returns:
        (config with the resolved token ids, tokenizer with media tokens, {"llm", "vision_tower", "mm_projector"}).

    Raises:
        FileNotFoundError: see :func:`random_config`.
    """
    from accelerate import init_empty_weights

    config, folder = random_config(path_or_id, revision)
    tokenizer = random_tokenizer(config, folder)
    device = _device(device_map)
    logger.warning(WARNING.format(path=path_or_id, seed=seed))
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # Parameters on meta, buffers computed for real by the constructors (on the CPU, then moved).
    with init_empty_weights(include_buffers=False):
        llm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype, **attn)
        vision_tower = SiglipVisionModel._from_config(config.vision_config, dtype=dtype, **attn)
        mm_projector = MultimodalProjector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
    official_rows = (config.video_token_id + 1) if folder is None or not (folder / "llm").is_dir() else len(tokenizer)
    if llm.get_input_embeddings().weight.shape[0] != official_rows:
        llm.resize_token_embeddings(official_rows, mean_resizing=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    if llm_quantization_config is not None:
        llm_quantization_config._nvila_targets = {
            n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    for part, quant in ((llm, llm_quantization_config), (vision_tower, None), (mm_projector, None)):
        materialize_(part, device, dtype, generator, quant)
        for mod in part.modules():
            for name, buf in list(mod.named_buffers(recurse=False)):
                mod._buffers[name] = buf.to(device)
    if llm.config.tie_word_embeddings:
        llm.tie_weights()
    if llm_quantization_config is not None:
        del llm_quantization_config._nvila_targets
        llm.is_loaded_in_4bit, llm.quantization_method = True, "bitsandbytes"
        llm.config.quantization_config = llm_quantization_config
        if device.type == "cpu":
            from nvila_ft.model.checkpoint import keep_nf4_unpacked_on_cpu

            keep_nf4_unpacked_on_cpu(llm)
    config.llm_cfg = llm.config.to_dict()
    config.image_token_id = tokenizer.media_token_ids["image"]
    config.video_token_id = tokenizer.media_token_ids["video"]
    config.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
    config._name_or_path = str(path_or_id)
    config.random_init_seed = seed
    return config, tokenizer, {"llm": llm, "vision_tower": vision_tower, "mm_projector": mm_projector}


def is_random(model: nn.Module) -> bool:
    """Whether `model` (or the NVILA model inside a peft wrapper) was built by :func:`random_official`."""
    inner = getattr(model, "get_base_model", lambda: model)()
    return getattr(getattr(inner, "config", None), "random_init_seed", None) is not None

