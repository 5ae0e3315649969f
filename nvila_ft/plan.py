"""Memory planner: a training run's peak GPU memory, predicted from its recipe without loading weights.

    python -m nvila_ft.plan recipes/medical.yaml                      # table; fits 24 GiB?
    python -m nvila_ft.plan recipes/medical.yaml tune.llm=lora --gpu-memory 40 --json

The model is built on PyTorch's `meta` device from the checkpoint's `config.json` (a local folder, or the
configs shipped in `nvila_ft/configs/` for the official hub ids), the recipe's tuning is applied with the
same code training uses (`nvila_ft.tuning.apply_tuning`, peft), and every parameter is priced in the dtype
training keeps it in. Activations come from an analytic per-layer model (see :func:`llm_layer_bytes`) for
the recipe's worst-case sample. Training calls :func:`check_budget` before loading any weight.

All sizes are bytes; tables print GiB (2**30 bytes, the unit of nvidia-smi's MiB / 1024).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .configuration import NvilaConfig
from .image_processing import TilingConfig, candidate_grids, num_tiles
from .processing import _pool_list, count_image_tokens, count_video_tokens, tokens_per_tile
from .projector import SpatialToChannel
from .tuning import apply_tuning, base_model, lora_target_names, used_vision_layers

logger = logging.getLogger(__name__)

GiB = 2**30
CONFIGS = Path(__file__).parent / "configs"
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


class MemoryBudgetError(RuntimeError):
    """The predicted peak exceeds the GPU memory budget; the message lists the largest terms and fixes."""


# ---------------------------------------------------------------------------------------------- checkpoint
def shipped_configs() -> dict[str, Path]:
    """Hub id -> shipped `config.json` (`nvila_ft/configs/<name>/config.json`)."""
    return {f"{HUB_OWNER}/{p.parent.name}": p for p in sorted(CONFIGS.glob("*/config.json"))}


def checkpoint_config(path_or_id: str) -> tuple[NvilaConfig, int, str]:
    """The config of a recipe's `model.path`, its tokenizer length, and where both came from.

    A local folder: its `config.json` and `llm/` tokenizer (media tokens added as the loader does). A hub id
    with a shipped config: that config, tokenizer length = `video_token_id + 1` (the media tokens are the
    tokenizer's last ids). Otherwise the hub snapshot (:func:`nvila_ft.modeling.resolve_checkpoint`).

    Raises:
        FileNotFoundError: no local folder, no shipped config and the hub cannot be reached.
    """
    from .modeling import load_tokenizer, resolve_checkpoint

    shipped = shipped_configs()
    if not Path(path_or_id).expanduser().is_dir() and path_or_id in shipped:
        config = NvilaConfig.from_json_file(str(shipped[path_or_id]))
        return config, config.video_token_id + 1, f"shipped config {shipped[path_or_id].parent.name}"
    try:
        folder = resolve_checkpoint(path_or_id)
    except FileNotFoundError as err:
        names = ", ".join(shipped)
        raise FileNotFoundError(
            f"model.path={path_or_id!r}: no local checkpoint folder, no shipped config ({names}) and no hub "
            f"snapshot: {err}"
        ) from err
    config = NvilaConfig.from_json_file(str(Path(folder) / "config.json"))
    if (Path(folder) / "llm").is_dir():
        tokenizer = load_tokenizer(folder)
        config.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
        return config, len(tokenizer), f"checkpoint folder {folder}"
    return config, config.video_token_id + 1, f"checkpoint folder {folder}"


def meta_model(config: NvilaConfig, tokenizer_length: int, dtype: torch.dtype) -> nn.Module:
    """The NVILA model on the `meta` device (shapes only, no memory), embeddings resized to the tokenizer
    length as :meth:`NvilaForConditionalGeneration.from_pretrained` does."""
    from .modeling import NvilaForConditionalGeneration

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
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def parameter_rows(model: nn.Module, recipe) -> list[ParameterRow]:
    """Prices each parameter as training keeps it (train.py `TrainingRun.load_model`).

    - QLoRA: LLM Linear weights in nf4 (:func:`nf4_bytes`); the other LLM parameters (embeddings, lm_head,
      norms, biases) in `model.dtype`: peft's `prepare_model_for_kbit_training` upcasts them to fp32 and
      training casts the frozen ones back (:func:`nvila_ft.train.undo_kbit_upcast`).
    - LoRA weights in fp32 (peft's `autocast_adapter_dtype`); under mixed precision every trainable in fp32.
    - Everything else in `model.dtype`.

    Args:
        model: the meta model *after* :func:`nvila_ft.tuning.apply_tuning`.
        recipe: the :class:`~nvila_ft.recipe.Recipe`.
    """
    mp = _mixed_precision(recipe)
    base_bytes = DTYPE_BYTES[recipe.model.dtype]
    qlora = recipe.tune.llm == "qlora"
    quantized = _quantized_names(_unwrap(model)) if qlora else set()
    rows: dict[tuple[str, str], ParameterRow] = {}
    for name, p in model.named_parameters():
        clean = _strip_peft(name)
        part = clean.split(".")[0]
        n = p.numel()
        if "lora_" in clean:
            kind, nbytes = "lora", 4 * n
        elif clean in quantized:
            kind, nbytes = "nf4", nf4_bytes(n)
        elif p.requires_grad and mp != "no":
            kind, nbytes = "float32", 4 * n
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


def _unwrap(model: nn.Module) -> nn.Module:
    return base_model(model)


def _mixed_precision(recipe) -> str:
    """The autocast precision of the GPU run: `auto` plans for bf16 (what train.py picks on a bf16 GPU)."""
    mp = recipe.train.mixed_precision
    return "bf16" if mp == "auto" else mp


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


def image_samples(config: NvilaConfig, tiling: TilingConfig, max_length: int, num_end_tokens: int,
                  text_tokens: int | None = None) -> list[Sample]:
    """One-image samples for every tile count the tiling can produce (one per candidate grid's aspect ratio).

    Tile and token counts come from the processor's own functions (`num_tiles`, `count_image_tokens`).
    The LLM sequence is `data.max_length` (the worst sample fills it with text) or, with `text_tokens`,
    `min(max_length, media_tokens + text_tokens)`. Few tiles leave more text (more label tokens, a larger
    logits buffer); many tiles cost vision activations: the planner prices each and keeps the worst.
    """
    per_tile = tokens_per_tile(config, tiling)
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
        tokens = count_image_tokens(tiling, per_tile, num_end_tokens, [(w, h)])
        if (tokens, tiles) in samples:
            continue
        visual = tokens - (tiles if tiling.image_aspect_ratio == "dynamic" and tiles > 1 else 1) * num_end_tokens
        grid = f"{block[1]}x{block[0]} grid" if block else f"{w // t}x{h // t} grid"
        detail = f"1 image, {tiling.image_aspect_ratio}, {tiles} tiles ({grid}, max_tiles {tiling.max_tiles})"
        llm = max_length if text_tokens is None else min(max_length, tokens + text_tokens)
        samples[(tokens, tiles)] = Sample("image", tiles, visual, tokens, llm, detail, (w, h))
    return [samples[k] for k in sorted(samples)]


def image_sample(config: NvilaConfig, tiling: TilingConfig, max_length: int, num_end_tokens: int,
                 text_tokens: int | None = None) -> Sample:
    """The one-image sample with the most tiles and visual tokens the tiling allows (see :func:`image_samples`)."""
    return image_samples(config, tiling, max_length, num_end_tokens, text_tokens)[-1]


def text_sample(max_length: int, text_tokens: int | None = None) -> Sample:
    """A sample without media: all of `data.max_length` (or `text_tokens`) is text, every token a possible label."""
    llm = max_length if text_tokens is None else min(max_length, text_tokens)
    return Sample("text", 0, 0, 0, llm, "text only (no media): the most label tokens")


def video_sample(config: NvilaConfig, tiling: TilingConfig, max_length: int, num_end_tokens: int,
                 num_frames: int, temporal_pool=None, text_tokens: int | None = None) -> Sample:
    """The video sample: `num_frames` single 448 px frames through the vision tower, their projected tokens
    pooled by `temporal_pool` ([t, h, w] or a list of them; None = the checkpoint's `video_encoder` pools)
    into the LLM, counted by the processor's own :func:`~nvila_ft.processing.count_video_tokens`."""
    per_tile = tokens_per_tile(config, tiling)
    pools = config.pool_sizes if temporal_pool is None else _pool_list(temporal_pool)
    tokens = count_video_tokens(per_tile, num_end_tokens, pools, num_frames)
    temporal_pool = [list(p) for p in pools] or [1, 1, 1]
    llm = max_length if text_tokens is None else min(max_length, tokens + text_tokens)
    detail = f"1 video, {num_frames} frames, temporal pool {list(temporal_pool)}"
    return Sample("video", num_frames, num_frames * per_tile, tokens, llm, detail)


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


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Term:
    """One line of the plan: `bytes` counts in the total; `alt_bytes` is the other gradient-checkpointing
    setting (activations only), for comparison."""

    group: str
    name: str
    bytes: int
    note: str = ""
    alt_bytes: int | None = None


@dataclass
class MemoryPlan:
    """Predicted peak GPU memory of one training step (bytes), term by term."""

    model: str
    source: str
    tune: dict
    sample: Sample
    batch_size: int
    parameters: list[ParameterRow]
    terms: list[Term]
    budget_bytes: int | None = None
    gradient_checkpointing: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Predicted peak incl. the CUDA allowance (what must fit the card)."""
        return sum(t.bytes for t in self.terms)

    @property
    def allocated(self) -> int:
        """Predicted peak of `torch.cuda.max_memory_allocated` (the total without the CUDA allowance)."""
        return sum(t.bytes for t in self.terms if t.group != "cuda")

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total <= self.budget_bytes

    def largest(self, n: int = 4) -> list[Term]:
        return sorted(self.terms, key=lambda t: -t.bytes)[:n]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "source": self.source, "tune": self.tune, "sample": dataclasses.asdict(self.sample),
            "batch_size": self.batch_size, "gradient_checkpointing": self.gradient_checkpointing,
            "parameters": [dataclasses.asdict(p) for p in self.parameters],
            "terms": [dataclasses.asdict(t) for t in self.terms],
            "total_bytes": self.total, "allocated_bytes": self.allocated, "total_gib": round(self.total / GiB, 3),
            "budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GiB, 3),
            "fits": self.fits,
        }

    def table(self) -> str:
        """A readable breakdown: parameters per part and dtype, then every term, the total and the verdict."""
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        s = self.sample
        lines = [
            f"memory plan: {self.model} ({self.source})",
            "tune: " + ", ".join(f"{k}={v}" for k, v in self.tune.items()),
            f"worst-case sample: {s.detail} -> vision tower {s.vision_tiles} tiles, {s.media_tokens} media tokens, "
            f"LLM {s.llm_tokens} tokens; batch {self.batch_size}",
            "",
            f"{'parameters':<30}{'count':>14}{'GiB':>9}{'trainable':>14}",
        ]
        for p in self.parameters:
            lines.append(f"  {p.part + ' ' + p.kind:<28}{p.count:>14,}{g(p.bytes)}{p.trainable:>14,}")
        lines += ["", f"{'term':<44}{'GiB':>8}   {'other GC setting':>16}  note"]
        for t in self.terms:
            alt = f"{t.alt_bytes / GiB:16.2f}" if t.alt_bytes is not None else " " * 16
            lines.append(f"  {t.group + ': ' + t.name:<42}{g(t.bytes)}   {alt}  {t.note}")
        lines.append(f"  {'total (predicted peak)':<42}{g(self.total)}")
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"budget {self.budget_bytes / GiB:.1f} GiB: {verdict} "
                         f"({(self.budget_bytes - self.total) / GiB:+.2f} GiB headroom)")
        return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def _parameters(path: str, dtype: str, tune: tuple, lora: tuple, mp: str):
    """Meta model + tuning + priced parameters; cached because fixes re-plan with other activation settings."""
    from types import SimpleNamespace

    from .modeling import DTYPES

    config, tok_len, source = checkpoint_config(path)
    model = meta_model(config, tok_len, DTYPES[dtype])
    tune_ns = SimpleNamespace(**dict(tune))
    lora_ns = SimpleNamespace(**dict(lora))
    recipe_like = SimpleNamespace(
        model=SimpleNamespace(dtype=dtype), tune=tune_ns, lora=lora_ns, train=SimpleNamespace(mixed_precision=mp))
    targets = {part: lora_target_short_names(model, part, recipe_like) for part in ("llm", "vision_tower")}
    tuned = apply_tuning(model, tune_ns, lora_ns)
    rows = parameter_rows(tuned, recipe_like)
    return config, tok_len, source, _unwrap(tuned), rows, targets


def plan_recipe(recipe, gpu_memory_gb: float | None = None, text_tokens: int | None = None,
                num_frames: int | None = None, temporal_pool: tuple[int, int, int] | None = None,
                label_tokens: int | None = None) -> MemoryPlan:
    """Predicts the peak GPU memory of training with `recipe`, without loading weights.

    Args:
        recipe: a :class:`~nvila_ft.recipe.Recipe`.
        gpu_memory_gb: budget in GiB to judge against (None: no verdict).
        text_tokens: plan a sample with this many text tokens instead of one that fills `data.max_length`.
        num_frames, temporal_pool: also plan a video sample (default: the recipe's `model.num_video_frames`
            and `model.temporal_pool` when the recipe has them); the worse sample counts.
        label_tokens: answer tokens per sample (labels != -100) for the logits/loss buffer; None: every
            text token of the sample (the bound for a sample of many turns).

    Returns:
        :class:`MemoryPlan`. Peak = weights + gradients + optimizer states + autocast weight copies
        + activations kept for backward (vision tower, projector, LLM) + the larger of the logits/loss
        buffer and one LLM layer's recompute + backward working set + the CUDA allowance.

    Raises:
        FileNotFoundError: the checkpoint config cannot be found (see :func:`checkpoint_config`).
        ValueError: the recipe's media alone exceed `data.max_length`.
    """
    m, tune, lora, train = recipe.model, recipe.tune, recipe.lora, recipe.train
    mp = _mixed_precision(recipe)
    lora_key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in lora.model_dump().items()))
    config, tok_len, source, model, rows, targets = _parameters(
        m.path, m.dtype, tuple(sorted(tune.model_dump().items())), lora_key, mp)
    act = 2 if mp in ("bf16", "fp16") else DTYPE_BYTES[m.dtype]
    batch = train.per_device_train_batch_size
    n_end = len(config.end_token_ids or [198])
    tiling = config.tiling(m.image_aspect_ratio, m.max_tiles)
    samples = [*image_samples(config, tiling, recipe.data.max_length, n_end, text_tokens),
               text_sample(recipe.data.max_length, text_tokens)]
    frames = num_frames or m.num_video_frames
    if frames:
        pool = temporal_pool or m.temporal_pool
        samples.append(video_sample(config, tiling, recipe.data.max_length, n_end, frames, pool, text_tokens))
    for s in samples:
        if s.media_tokens > recipe.data.max_length:
            raise ValueError(
                f"the worst-case {s.media} ({s.detail}) alone is {s.media_tokens} tokens > data.max_length="
                f"{recipe.data.max_length}: no such sample can train. Raise data.max_length or lower model.max_tiles.")

    terms: list[Term] = []
    for p in rows:
        terms.append(Term("weights", f"{p.part} {p.kind}", p.bytes, f"{p.count / 1e9:.3f}B params"))
    per_part: dict[str, list[int]] = {}
    for p in rows:
        agg = per_part.setdefault(p.part, [0, 0])
        agg[0] += p.trainable
        agg[1] += p.trainable_bytes
    n_states = OPTIMIZER_STATES["adamw"]
    for part, (count, nbytes) in per_part.items():
        if count:
            terms.append(Term("gradients", part, nbytes, f"{count / 1e6:.1f}M trainable"))
    for part, (count, nbytes) in per_part.items():
        if count:
            terms.append(Term("optimizer", f"{part} AdamW m, v", n_states * nbytes, "2 states in the param dtype"))
    if act == 2:
        trainable = sum(c for c, _ in per_part.values())
        terms.append(Term("autocast", "bf16 copies of fp32 trainables", 2 * trainable,
                          "cached by autocast during the forward"))

    tc, vc = model.llm.config, model.vision_tower.config
    gc = train.gradient_checkpointing

    def sample_terms(sample: Sample) -> list[Term]:
        out: list[Term] = []
        llm_layers = tc.num_hidden_layers
        n_llm = batch * sample.llm_tokens
        layer = llm_layer_bytes(tc, mode=tune.llm, lora_targets=targets["llm"], r=lora.r, dropout=lora.dropout,
                                act=act, gqa_native=batch == 1) * n_llm
        llm_off = llm_layers * layer
        llm_on = llm_layers * act * tc.hidden_size * n_llm
        v_layers = used_vision_layers(model)
        n_vis = batch * sample.vision_tiles * (vc.image_size // vc.patch_size) ** 2
        v_layer = vision_layer_bytes(vc, mode=tune.vision_tower, lora_targets=targets["vision_tower"], r=lora.r,
                                     dropout=lora.dropout, act=act) * n_vis
        v_off = v_layers * v_layer
        v_on = v_layers * act * vc.hidden_size * n_vis + v_layer if v_layer else 0
        out.append(Term("activations", "vision_tower", v_on if gc.vision_tower else v_off,
                      f"{v_layers} layers x {n_vis} tokens, GC {'on' if gc.vision_tower else 'off'}",
                      v_off if gc.vision_tower else v_on))
        proj = projector_bytes(model.mm_projector, batch * sample.projector_tokens, tune.mm_projector == "full",
                               tune.vision_tower != "frozen", act)
        out.append(Term("activations", "mm_projector", proj, f"{batch * sample.projector_tokens} tokens out"))
        out.append(Term("activations", "llm", llm_on if gc.llm else llm_off,
                      f"{llm_layers} layers x {n_llm} tokens, GC {'on' if gc.llm else 'off'}",
                      llm_off if gc.llm else llm_on))
        vocab = model.llm.get_output_embeddings().weight.shape[0]
        # Training applies lm_head only where a label is predicted (NvilaForConditionalGeneration._label_only_loss).
        # Worst case: every text token of the sample is an answer token (a multi-turn sample can come close), so
        # the bound is the sample's text share, llm_tokens - media_tokens; media rows never carry a label.
        text = sample.llm_tokens - sample.media_tokens
        n_label = batch * (text if label_tokens is None else min(label_tokens, text))
        logits = 12 * n_label * vocab  # fp32 log-probs kept + their gradient + the input gradient (backward)
        h, f = tc.hidden_size, tc.intermediate_size
        recompute = (layer if gc.llm else 0) + act * (h + 3 * f) * n_llm
        if logits >= recompute:
            out.append(Term("transient", "logits/loss buffer", logits,
                          f"12 B x {n_label} label tokens ({'all the text' if label_tokens is None else 'given'}) "
                          f"x {vocab} vocab (fp32 loss); "
                          f"> layer backward {recompute / GiB:.2f}"))
        else:
            out.append(Term("transient", "LLM layer recompute + backward", recompute,
                          f"> logits/loss buffer {logits / GiB:.2f} GiB"))
        return out

    # The worst sample: every image tile count (text fills the rest), text only, and the video sample.
    sample, sample_specific = max(((c, sample_terms(c)) for c in samples), key=lambda x: sum(t.bytes for t in x[1]))
    terms += sample_specific
    terms.append(Term("cuda", "context + allocator allowance", CUDA_ALLOWANCE, "fixed"))
    budget = None if gpu_memory_gb is None else int(gpu_memory_gb * GiB)
    return MemoryPlan(
        model=m.path, source=source, tune={**tune.model_dump(), "lora_r": lora.r, "mixed_precision": mp},
        sample=sample, batch_size=batch, parameters=rows, terms=terms, budget_bytes=budget,
        gradient_checkpointing=gc.model_dump())


# ---------------------------------------------------------------------------------------------- budget
def candidate_fixes(recipe, plan: MemoryPlan) -> list[str]:
    """Overrides that lower memory, in the order worth trying (only those that change this recipe)."""
    fixes = []
    if recipe.tune.llm in ("lora", "full"):
        fixes.append("tune.llm=qlora")
    if not recipe.train.gradient_checkpointing.llm:
        fixes.append("train.gradient_checkpointing.llm=true")
    if not recipe.train.gradient_checkpointing.vision_tower and recipe.tune.vision_tower != "frozen":
        fixes.append("train.gradient_checkpointing.vision_tower=true")
    if recipe.tune.vision_tower in ("lora", "full"):
        fixes.append("tune.vision_tower=layernorm")
    if recipe.train.per_device_train_batch_size > 1:
        fixes.append("train.per_device_train_batch_size=1")
    mode = recipe.model.image_aspect_ratio
    max_tiles = recipe.model.max_tiles or 12
    if mode in (None, "dynamic_s2") and max_tiles > 9:
        fixes.append("model.max_tiles=9")
    elif mode == "dynamic" and max_tiles > 6:
        fixes.append("model.max_tiles=6")
    if plan.sample.llm_tokens > plan.sample.media_tokens + 512:
        shorter = max(plan.sample.media_tokens + 512, recipe.data.max_length // 2)
        fixes.append(f"data.max_length={-(-shorter // 256) * 256}")
    if recipe.tune.uses_lora and recipe.lora.r > 16:
        fixes.append("lora.r=16")
    return fixes


def fix_predictions(recipe, plan: MemoryPlan) -> list[tuple[str, float | None]]:
    """Each candidate fix with the predicted total (GiB) after applying it (None if it does not validate)."""
    from .recipe import Recipe, apply_overrides

    out = []
    data = recipe.model_dump()
    for fix in candidate_fixes(recipe, plan):
        try:
            fixed = Recipe.model_validate(apply_overrides(data, [fix]))
            out.append((fix, plan_recipe(fixed).total / GiB))
        except (ValueError, FileNotFoundError):
            out.append((fix, None))
    return out


def refusal_message(recipe, plan: MemoryPlan) -> str:
    """Why the run does not fit and what would: the largest terms and each fix's predicted total."""
    lines = [
        f"predicted peak GPU memory {plan.total / GiB:.1f} GiB > budget {plan.budget_bytes / GiB:.1f} GiB "
        f"(train.gpu_memory_gb, default the device's memory). Largest terms:",
    ]
    lines += [f"  {t.bytes / GiB:7.2f} GiB  {t.group}: {t.name} ({t.note})" for t in plan.largest(4)]
    lines.append("Ways to fit (predicted total after the change):")
    for fix, total in fix_predictions(recipe, plan):
        verdict = "" if total is None else f"{total:6.1f} GiB{'  fits' if total * GiB <= plan.budget_bytes else ''}"
        lines.append(f"  {fix:<44}{verdict}")
    lines.append("Full breakdown: python -m nvila_ft.plan RECIPE [overrides]; to train anyway: --force.")
    return "\n".join(lines)


def device_memory_gb() -> float | None:
    """Total memory of the current CUDA device in GiB, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB


def check_budget(recipe, force: bool = False) -> MemoryPlan | None:
    """Training preflight: plans the run and refuses it when the prediction exceeds the budget.

    The budget is `train.gpu_memory_gb` (GiB) or, when null, the CUDA device's memory; with neither (a
    CPU-only machine) the check is skipped and None returned.

    Raises:
        MemoryBudgetError: predicted peak > budget and not `force`; the message lists the largest terms
            and concrete fixes with their predicted totals.
    """
    budget = recipe.train.gpu_memory_gb
    if budget is None:
        budget = device_memory_gb()
    if budget is None:
        logger.info("memory check skipped: no CUDA device and train.gpu_memory_gb is null")
        return None
    plan = plan_recipe(recipe, gpu_memory_gb=budget)
    logger.info("memory plan: predicted peak %.1f GiB of %.1f GiB (%s)", plan.total / GiB, budget,
                ", ".join(f"{t.name} {t.bytes / GiB:.1f}" for t in plan.largest(3)))
    if not plan.fits:
        message = refusal_message(recipe, plan)
        if not force:
            raise MemoryBudgetError(message)
        logger.warning("--force: training although %s", message.splitlines()[0])
    return plan


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from .recipe import RecipeError, load_recipe

    parser = argparse.ArgumentParser(
        prog="python -m nvila_ft.plan", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m nvila_ft.plan recipes/medical.yaml\n"
        "  python -m nvila_ft.plan recipes/medical.yaml model.path=Efficient-Large-Model/NVILA-Lite-2B "
        "tune.llm=lora --json\nShipped configs (no network needed): " + ", ".join(shipped_configs()))
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.max_length=2048")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="budget in GiB (default: train.gpu_memory_gb, else this machine's GPU, else 24)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="plan a sample with this many text tokens (default: text fills data.max_length)")
    parser.add_argument("--label-tokens", type=int, default=None,
                        help="answer tokens per sample for the logits/loss buffer (default: all its text tokens)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.model.tiny_variant and not Path(recipe.model.path).exists():
            from .tiny import build_tiny_checkpoint  # as training's bootstrap does (model.tiny_variant)

            build_tiny_checkpoint(recipe.model.path, variant=recipe.model.tiny_variant, seed=0)
        budget = args.gpu_memory or recipe.train.gpu_memory_gb or device_memory_gb() or 24.0
        plan = plan_recipe(recipe, gpu_memory_gb=budget, text_tokens=args.text_tokens, label_tokens=args.label_tokens)
    except (RecipeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(plan.table())
    if not plan.fits:
        print("\n" + refusal_message(recipe, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
