"""Memory formulas of the planner: parameters priced in the dtype training keeps them in (nf4 and LoRA
included), activations per layer with and without gradient checkpointing, and the samples worth pricing.

All sizes are bytes. `nvila_ft.plan.report` adds them up into a `MemoryPlan`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nvila_ft.model.configuration import NvilaConfig
from nvila_ft.model.image_processing import candidate_grids, num_tiles
from nvila_ft.model.media import MediaConfig, expanded_length
from nvila_ft.model.projector import SpatialToChannel
from nvila_ft.train.tuning import base_model, is_original, lora_target_names, official_name

logger = logging.getLogger(__name__)

GiB = 2**30
CONFIGS = Path(__file__).parents[1] / "model" / "configs"
HUB_OWNER = "Efficient-Large-Model"
# CUDA context (~0.3-0.6 GiB with PyTorch's kernels loaded) + caching-allocator fragmentation. Not seen by
# torch.cuda.max_memory_allocated, but it comes out of the card's memory. An allowance, to be calibrated by
# benchmarks/gpu_memory.py.
CUDA_ALLOWANCE = 1 * GiB
# bitsandbytes nf4 layout (bitsandbytes.functional.quantize_4bit, checked against Params4bit storage in
# tests/test_plan.py): 2 values per byte, one absmax per 64 values; with double quantization the absmax are
# uint8 with one fp32 absmax per 256 of them, a 256-entry fp32 code and an fp32 offset; a 16-entry fp32 code.
NF4_BLOCK, NF4_BLOCK2 = 64, 256
# torch.optim.AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (training uses it: train.py).
OPTIMIZER_STATES = {"adamw": 2}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# ---------------------------------------------------------------------------------------------- checkpoint
def shipped_configs() -> dict[str, Path]:
    """Hub id -> shipped `config.json` (`nvila_ft/model/configs/<name>/config.json`)."""
    return {f"{HUB_OWNER}/{p.parent.name}": p for p in sorted(CONFIGS.glob("*/config.json"))}


def checkpoint_config(path_or_id: str) -> tuple[NvilaConfig, int, str]:
    """The config of a recipe's `model.path`, its tokenizer length, and where both came from.

    A local folder: its `config.json` and `llm/` tokenizer (media tokens added as the loader does). A hub id
    with a shipped config: that config, tokenizer length = `video_token_id + 1` (the media tokens are the
    tokenizer's last ids). Otherwise the hub snapshot (:func:`nvila_ft.model.modeling.resolve_checkpoint`).

    Raises:
        FileNotFoundError: no local folder, no shipped config and the hub cannot be reached.
    """
    from nvila_ft.model.checkpoint import read_checkpoint, resolve_checkpoint
    from nvila_ft.model.hf_layout import detect_layout
    from nvila_ft.model.random_init import apply_reduced_depth  # tests / CPU benchmarks: fewer layers

    shipped = shipped_configs()
    if not Path(path_or_id).expanduser().is_dir() and path_or_id in shipped:
        config = apply_reduced_depth(NvilaConfig.from_json_file(str(shipped[path_or_id])))
        return config, config.video_token_id + 1, f"shipped config {shipped[path_or_id].parent.name}"
    try:
        folder = resolve_checkpoint(path_or_id)
    except FileNotFoundError as err:
        names = ", ".join(shipped)
        raise FileNotFoundError(
            f"model.path={path_or_id!r}: no local checkpoint folder, no shipped config ({names}) and no hub "
            f"snapshot: {err}"
        ) from err
    if (Path(folder) / "llm").is_dir() or detect_layout(folder) != "original":  # -hf: tokenizer at the top
        config, tokenizer = read_checkpoint(folder)
        config = apply_reduced_depth(config)
        config.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
        # -hf embeddings are only ever grown to the tokenizer (see checkpoint.load_official).
        rows = len(tokenizer) if (Path(folder) / "llm").is_dir() else max(len(tokenizer), config.text_config.vocab_size)
        return config, rows, f"checkpoint folder {folder}"
    config = apply_reduced_depth(NvilaConfig.from_json_file(str(Path(folder) / "config.json")))
    return config, config.video_token_id + 1, f"checkpoint folder {folder}"


def meta_model(config: NvilaConfig, tokenizer_length: int, dtype: torch.dtype) -> nn.Module:
    """The NVILA model on the `meta` device (shapes only, no memory), embeddings resized to the tokenizer
    length as :meth:`NvilaForConditionalGeneration.from_pretrained` does."""
    from nvila_ft.model.modeling import NvilaForConditionalGeneration

    with torch.device("meta"):
        model = NvilaForConditionalGeneration(config).to(dtype)
    if model.llm.get_input_embeddings().weight.shape[0] != tokenizer_length:
        model.llm.resize_token_embeddings(tokenizer_length, mean_resizing=False)
    return model


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes nf4 weight of `numel` values: packed 4-bit values + quantization constants.

    ceil(n/2) + per 64-block absmax (fp32, or uint8 with double quantization plus one fp32 absmax per 256
    blocks, a 256-entry fp32 code and an fp32 offset) + the 16-entry fp32 nf4 code.
    """
    blocks = -(-numel // NF4_BLOCK)
    constants = blocks * 4
    if double_quant:
        constants = blocks + -(-blocks // NF4_BLOCK2) * 4 + 256 * 4 + 4
    return -(-numel // 2) + constants + 16 * 4


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class ParameterRow:
    """Parameters of one part in one storage kind (`bfloat16`, `float32`, `nf4`, `lora`)."""

    part: str
    kind: str
    count: int
    bytes: int
    trainable: int = 0
    trainable_bytes: int = 0  # bytes of the trainable ones (the dtype of their grads and AdamW states)


def _quantized_names(model: nn.Module) -> set[str]:
    """Weights bitsandbytes stores in 4 bit under QLoRA: every Linear of the LLM except `lm_head`
    (transformers' bnb quantizer keeps the output embedding in the compute dtype). Works on a peft-wrapped
    model (the base Linear is then `<name>.base_layer`)."""
    return {
        f"llm.{name.replace('.base_layer', '')}.weight"
        for name, module in model.llm.named_modules()
        if isinstance(module, nn.Linear) and "lm_head" not in name and "lora_" not in name
    }


def _strip_peft(name: str) -> str:
    return official_name(name)


def parameter_rows(model: nn.Module, recipe, mixed_precision: str) -> list[ParameterRow]:
    """Prices each parameter as training keeps it (train.py `TrainingRun.load_model`).

    - QLoRA: LLM Linear weights in nf4 (:func:`nf4_bytes`); the other LLM parameters (embeddings, lm_head,
      norms, biases) in `model.dtype`: peft's `prepare_model_for_kbit_training` upcasts them to fp32 and
      training casts the frozen ones back (:func:`nvila_ft.train.undo_kbit_upcast`).
    - LoRA weights in fp32 (peft's `autocast_adapter_dtype`); under mixed precision every trainable in fp32.
    - Parts trained in full are peft `modules_to_save`: a trainable copy (above) plus the frozen original in
      `model.dtype`, kept for `disable_adapter()`; priced as its own row, kind `"<dtype> original"`
      (NVILA-8B in bf16: projector 0.116 GiB, vision LayerNorms < 0.001 GiB). Training empties the originals
      of whole parts in `full` modes (:func:`nvila_ft.train.tuning.release_full_originals`; they would cost
      14.2 GiB for `llm: full`, 0.86 GiB for `vision_tower: full`): they cost nothing here.
    - Everything else in `model.dtype`.

    Args:
        model: the meta model *after* :func:`nvila_ft.train.tuning.apply_tuning`.
        recipe: the :class:`~nvila_ft.train.recipe.Recipe` (its `model.dtype`, `tune`).
        mixed_precision: "no" | "bf16" | "fp16", resolved (`TrainConfig.resolved_mixed_precision`).
    """
    mp = mixed_precision
    base_bytes = DTYPE_BYTES[recipe.model.dtype]
    qlora = recipe.tune.llm == "qlora"
    quantized = _quantized_names(unwrap(model)) if qlora else set()
    rows: dict[tuple[str, str], ParameterRow] = {}
    for name, p in model.named_parameters():
        clean = _strip_peft(name)
        part = clean.split(".")[0]
        n = p.numel()
        if n == 0:  # an original emptied by release_full_originals
            continue
        if "lora_" in clean:
            kind, nbytes = "lora", 4 * n
        elif clean in quantized:
            kind, nbytes = "nf4", nf4_bytes(n)
        elif p.requires_grad and mp != "no":
            kind, nbytes = "float32", 4 * n
        elif is_original(name):
            kind, nbytes = f"{recipe.model.dtype} original", base_bytes * n
        else:
            kind, nbytes = recipe.model.dtype, base_bytes * n
        row = rows.setdefault((part, kind), ParameterRow(part, kind, 0, 0))
        row.count += n
        row.bytes += nbytes
        if p.requires_grad:
            row.trainable += n
            row.trainable_bytes += nbytes
    order = {"llm": 0, "vision_tower": 1, "mm_projector": 2}
    return sorted(rows.values(), key=lambda r: (order.get(r.part, 3), r.kind))


def unwrap(model: nn.Module) -> nn.Module:
    return base_model(model)


# ---------------------------------------------------------------------------------------------- the sample
@dataclass
class Sample:
    """The worst-case training sample of a recipe.

    Attributes:
        media: "image" or "video".
        vision_tiles: 448 px tiles through the vision tower per sample (frames for a video).
        projector_tokens: tokens out of the projector per sample (before temporal pooling).
        media_tokens: LLM input rows of the media (visual + end tokens).
        llm_tokens: LLM sequence length (<= data.max_length).
        detail: human-readable geometry (grid, frames).
        image_size: (width, height) in pixels of an image with the worst aspect ratio (images only).
    """

    media: str
    vision_tiles: int
    projector_tokens: int
    media_tokens: int
    llm_tokens: int
    detail: str
    image_size: tuple[int, int] | None = None


def image_samples(media: MediaConfig, num_end_tokens: int, text_tokens: int | None = None) -> list[Sample]:
    """One-image samples for every tile count the tiling can produce (one per candidate grid's aspect ratio).

    Tile and token counts come from the processor's own functions (`num_tiles`, `media.expanded_length`),
    with the run's resolved :class:`~nvila_ft.model.media.MediaConfig`. The LLM sequence is `max_length`
    (the worst sample fills it with text) or, with `text_tokens`, `min(max_length, expanded length)`. Few
    tiles leave more text (more label tokens, a larger logits buffer); many tiles cost vision activations:
    the planner prices each and keeps the worst.
    """
    tiling, max_length = media.tiling, media.max_length
    t = tiling.tile_size
    if tiling.image_aspect_ratio == "resize":
        sizes = [(t, t)]
    elif tiling.image_aspect_ratio == "dynamic":
        sizes = [(c * t, r * t) for c, r in candidate_grids(tiling.min_tiles, tiling.max_tiles)]
    else:
        low = (tiling.s2_scales[-1] // tiling.s2_scales[0]) ** 2
        sizes = [(c * t, r * t) for c, r in candidate_grids(low, max(tiling.max_tiles, low))]
    samples: dict[tuple[int, int], Sample] = {}
    for w, h in sizes:
        tiles, block = num_tiles(w, h, tiling)
        tokens = expanded_length(media, num_end_tokens, 0, [(w, h)])
        if (tokens, tiles) in samples:
            continue
        visual = tokens - (tiles if tiling.image_aspect_ratio == "dynamic" and tiles > 1 else 1) * num_end_tokens
        grid = f"{block[1]}x{block[0]} grid" if block else f"{w // t}x{h // t} grid"
        detail = f"1 image, {tiling.image_aspect_ratio}, {tiles} tiles ({grid}, max_tiles {tiling.max_tiles})"
        llm = max_length if text_tokens is None else min(max_length, expanded_length(
            media, num_end_tokens, text_tokens, [(w, h)]))
        samples[(tokens, tiles)] = Sample("image", tiles, visual, tokens, llm, detail, (w, h))
    return [samples[k] for k in sorted(samples)]


def image_sample(media: MediaConfig, num_end_tokens: int, text_tokens: int | None = None) -> Sample:
    """The one-image sample with the most tiles and visual tokens the tiling allows (see :func:`image_samples`)."""
    return image_samples(media, num_end_tokens, text_tokens)[-1]


def text_sample(max_length: int, text_tokens: int | None = None) -> Sample:
    """A sample without media: all of `data.max_length` (or `text_tokens`) is text, every token a possible label."""
    llm = max_length if text_tokens is None else min(max_length, text_tokens)
    return Sample("text", 0, 0, 0, llm, "text only (no media): the most label tokens")


def video_sample(media: MediaConfig, num_end_tokens: int, text_tokens: int | None = None) -> Sample:
    """The video sample: `media.num_video_frames` single 448 px frames through the vision tower, their projected
    tokens pooled by `media.temporal_pool` into the LLM, counted by `media.expanded_length` as the processor
    counts them."""
    frames, per_tile = media.num_video_frames, media.tokens_per_tile
    tokens = expanded_length(media, num_end_tokens, 0, video_frames=[frames])
    llm = max_length = media.max_length
    if text_tokens is not None:
        llm = min(max_length, expanded_length(media, num_end_tokens, text_tokens, video_frames=[frames]))
    temporal_pool = [list(p) for p in media.temporal_pool] or [1, 1, 1]
    detail = f"1 video, {frames} frames, temporal pool {list(temporal_pool)}"
    return Sample("video", frames, frames * per_tile, tokens, llm, detail)


# ---------------------------------------------------------------------------------------------- activations
# Per-token bytes that PyTorch autograd keeps for the backward pass, layer by layer, adapted from
# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1:
# sbh(34 + 5as/h) per GPT layer) to what runs here: frozen base weights (a frozen Linear keeps nothing for
# the input gradient), peft LoRA (each adapter keeps its dropout mask and the dropped input, cast to the
# autocast dtype, plus its rank-r output), SDPA flash/memory-efficient kernels (q, k, v, output and an fp32
# logsumexp; no s x s matrix), grouped-query attention (k, v at KV-head width when SDPA runs GQA natively,
# i.e. without padding mask), SwiGLU (gate, SiLU output and up projection kept), RMSNorm computed in fp32
# (Qwen2RMSNorm keeps the fp32 input), LayerNorm autocast to fp32 (SigLIP). Checked against the tensors
# autograd actually saves in tests/test_plan.py.

def _lora_bytes(widths: list[int], dropout: float, act: int, r: int, mask_bytes: int) -> int:
    # Per adapter: the dropout mask, lora_A's input cast to the autocast dtype, lora_B's rank-r input.
    return sum(((mask_bytes if dropout > 0 else 0) + act) * k + act * r for k in widths)


def llm_layer_bytes(tc, *, mode: str, lora_targets: set[str], r: int, dropout: float, act: int,
                    gqa_native: bool = True, mask_bytes: int = 1) -> int:
    """Bytes per token one Qwen2 decoder layer keeps for backward.

    Per token, h = hidden, f = MLP width, kv = KV heads x head_dim, a = heads, p = `act`:
    2 RMSNorms 2 x 4h (fp32 input) + SDPA p(2h + 2kv) + 4a + SwiGLU 3pf + per LoRA adapter of input width k
    (mask + p)k + pr; full fine-tuning adds the Linear inputs p(8h + f) (the fp32 norms' outputs are cast
    once per consumer, and the norms keep their normalized input for the weight gradient).

    Args:
        tc: the LLM config (`hidden_size`, `intermediate_size`, heads, KV heads).
        mode: recipe `tune.llm` (lora, qlora, full, frozen).
        lora_targets: short names of the adapted Linear layers (q_proj, ..., down_proj).
        r, dropout: LoRA rank and dropout.
        act: bytes per activation element (2 under bf16/fp16 autocast, 4 in fp32).
        gqa_native: SDPA runs GQA without repeating k, v (no attention mask: batch 1).
        mask_bytes: bytes per dropout-mask element (1: CUDA's bool mask; 4: the CPU kernel's fp32 noise).
    """
    h, f, a = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads
    d = getattr(tc, "head_dim", None) or h // a
    kv = tc.num_key_value_heads * d * (1 if gqa_native else a // tc.num_key_value_heads)
    norms = 2 * (4 * h + 4)  # two RMSNorms keep their fp32 input and rsqrt
    sdpa = act * (h + 2 * kv + a * d) + 4 * a  # q, k, v, output, fp32 logsumexp per head
    mlp = act * 3 * f  # SiLU input, SiLU output, up output
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": a * d, "gate_proj": h, "up_proj": h, "down_proj": f}
    lora = 0
    if mode in ("lora", "qlora"):
        lora = _lora_bytes([w for n, w in widths.items() if n in lora_targets], dropout, act, r, mask_bytes)
    full = act * (8 * h + f) if mode == "full" else 0
    return norms + sdpa + mlp + lora + full


def vision_layer_bytes(vc, *, mode: str, lora_targets: set[str], r: int, dropout: float, act: int,
                       mask_bytes: int = 1, ln_fp32: bool = True) -> int:
    """Bytes per token one SigLIP encoder layer keeps for backward (0 when the tower gets no gradient).

    layer_norm1/2 keep their input (fp32 under CUDA autocast, `ln_fp32`) + mean and rstd; SDPA keeps q, k, v,
    output and the logsumexp; gelu(tanh) keeps its input; frozen Linear layers keep nothing, LoRA ones keep
    the dropped input (see :func:`llm_layer_bytes`), fully trained ones their input (q, k and v each cast
    their own copy of an fp32 LayerNorm output).
    """
    if mode == "frozen":
        return 0
    h, f, a = vc.hidden_size, vc.intermediate_size, vc.num_attention_heads
    ln = 4 if ln_fp32 else act
    norms = 2 * (ln * h + 8)
    sdpa = act * 4 * h + 4 * a
    mlp = act * f
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "out_proj": h, "fc1": h, "fc2": f}
    lora = 0
    if mode == "lora":
        lora = _lora_bytes([w for n, w in widths.items() if n in lora_targets], dropout, act, r, mask_bytes)
    qkv_copies = 3 if ln_fp32 else 1
    full = act * ((qkv_copies + 2) * h + f) if mode == "full" else 0
    return norms + sdpa + mlp + lora + full


def projector_bytes(projector: nn.Module, output_tokens: int, trainable: bool, grads_flow: bool, act: int) -> int:
    """Bytes the projector keeps for backward for `output_tokens` tokens out.

    Walks the real module list: an STC reshape multiplies the width by k*k; a LayerNorm keeps its fp32
    input (autocast) and stats; a trained Linear keeps its input; GELU keeps its input.
    """
    if not (trainable or grads_flow):
        return 0
    layers = projector.layers if isinstance(projector.layers, nn.Sequential) else [projector.layers]
    width, total = None, 0
    for module in layers:
        if isinstance(module, SpatialToChannel):
            continue
        if isinstance(module, nn.LayerNorm):
            total += (4 * module.normalized_shape[0] + 8) * output_tokens
        elif isinstance(module, nn.Linear):
            if trainable:
                total += act * module.in_features * output_tokens
            width = module.out_features
        elif isinstance(module, nn.GELU) and width is not None:
            total += act * width * output_tokens
    return total


def lora_target_short_names(model: nn.Module, part: str, recipe) -> set[str]:
    """Short names (`q_proj`, `fc1`, ...) of the Linear layers of `part` that get LoRA under the recipe."""
    return {n.split(".")[-1] for n in lora_target_names(model, part, recipe.lora.target_modules)}
