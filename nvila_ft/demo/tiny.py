"""Writes a random, seeded, tiny NVILA checkpoint in the original hub layout, for tests and the offline quickstart.

    python -m nvila_ft.tiny runs/tiny-nvila --variant nvila --seed 0   # or --variant nvila-lite, --overwrite
    python -m nvila_ft.tiny runs/tiny-nvila-hf --layout hf               # NVIDIA's -hf layout (or hf-0626)

The folder mirrors the official layout file by file (`../shared/parity/checkpoints/<variant>/` and
`../shared/docs/nvila-architecture.md`, "Checkpoint layouts on the hub"):

    config.json      LlavaLlamaModel config with llm_cfg / vision_tower_cfg / mm_projector_cfg embedded
    llm/             Qwen2ForCausalLM + a Qwen2 byte-level BPE tokenizer (`nvila_ft.demo.tokenizer`, no download)
    vision_tower/    SiglipVisionModel (keys `vision_model.*`) + SigLIP preprocessor_config.json
    mm_projector/    MultimodalProjector (keys `layers.<i>.*`)

With `--layout hf` / `hf-0626` the same weights are written as one folder (`config.json` with `text_config` /
`vision_config`, `model.safetensors`, tokenizer): see `nvila_ft.model.hf_layout`.

Weights are random (seeded), stored in bf16. The media tokens (`<image>`, ...) are not in the
tokenizer: the loader adds them, as with the official checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from nvila_ft.cli_errors import user_errors
from nvila_ft.demo.tokenizer import (  # noqa: F401 - TOKENIZER_SIZE, build_tiny_tokenizer: re-exported
    ENDOFTEXT,
    IM_END,
    SPECIAL_TOKENS,
    TOKENIZER_SIZE,
    build_tiny_tokenizer,
    save_tokenizer,
    write_json,
)
from nvila_ft.model.configuration import with_v4_keys
from nvila_ft.model.projector import PROJECTOR_TYPES, MultimodalProjector

logger = logging.getLogger(__name__)

# SigLIP geometry of NVILA (448 px tiles, patch 14 -> 32x32 patches); tiling code relies on it, so it is fixed.
IMAGE_SIZE, PATCH_SIZE = 448, 14
S2_SCALES = "448,896,1344"

@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes and settings of a tiny checkpoint (`nvila` defaults; see VARIANTS).

    Sizes are the parity checkpoints' (`../shared/parity/README.md`); the parity `nvila` projector is named
    `mlp_downsample`, the original alias of `mlp_downsample_2x2_fix` (same layers and keys).
    """

    image_aspect_ratio: str = "dynamic_s2"
    """`dynamic_s2` (NVILA: scales 448/896/1344, features 3x wide) or `dynamic` (NVILA-Lite: tiles + thumbnail)."""
    mm_projector_type: str = "mlp_downsample_2x2_fix"
    """Projector layout, one of `nvila_ft.model.projector.PROJECTOR_TYPES`."""
    model_max_length: int = 8192
    """Tokenizer/LLM max length in tokens (official: 8192 NVILA, 4096 NVILA-Lite)."""
    tie_word_embeddings: bool = False
    """Share the LLM input embedding and `lm_head` (True for NVILA-Lite, like Qwen2.5-1.5B)."""
    hidden_size: int = 64
    """LLM (Qwen2) hidden size; the projector's output width."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 160
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    vision_hidden_size: int = 32
    """SigLIP hidden size (so400m: 1152)."""
    vision_num_hidden_layers: int = 3
    vision_num_attention_heads: int = 2
    vision_intermediate_size: int = 96

    def __post_init__(self):
        if self.image_aspect_ratio not in ("dynamic_s2", "dynamic"):
            raise ValueError(
                f"image_aspect_ratio={self.image_aspect_ratio!r}: choose 'dynamic_s2' or 'dynamic'."
            )
        if self.mm_projector_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"mm_projector_type={self.mm_projector_type!r}: choose one of {PROJECTOR_TYPES}."
            )
        for width, heads in [
            ("hidden_size", "num_attention_heads"),
            ("vision_hidden_size", "vision_num_attention_heads"),
            ("num_attention_heads", "num_key_value_heads"),
        ]:
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"{width}={getattr(self, width)} must be a multiple of {heads}={getattr(self, heads)}."
                )

    @property
    def dynamic_s2(self) -> bool:
        return self.image_aspect_ratio == "dynamic_s2"

    @property
    def mm_hidden_size(self) -> int:
        """Projector input width: SigLIP width x 3 scales with dynamic_s2, else the SigLIP width."""
        return self.vision_hidden_size * (3 if self.dynamic_s2 else 1)


VARIANTS = {
    "nvila": TinySpec(),
    "nvila-lite": TinySpec(
        image_aspect_ratio="dynamic",
        mm_projector_type="mlp_downsample_3x3_fix",
        model_max_length=4096,
        tie_word_embeddings=True,
    ),
}


class _ProjectorConfig(PretrainedConfig):
    """The official `MultimodalProjectorConfig` (`mm_projector/config.json`), for its `to_dict()` layout."""

    model_type = "v2l_projector"

    def __init__(self, mm_projector_type: str | None = None, **kwargs):
        self.mm_projector_type = mm_projector_type
        super().__init__(**kwargs)


@torch.no_grad()
def _randomize_(model: nn.Module) -> None:
    """Draws every parameter at random, in place, with the scales of the parity checkpoints.

    Default inits leave norm scales at 1 and biases at 0, so a loader that drops or swaps them would go unnoticed.
    Here matrices are N(0, 1/fan_in), embedding tables N(0, 0.25^2), norm scales 1 + N(0, 0.1^2) and
    biases N(0, 0.1^2). A tied `lm_head` keeps its embedding's values.
    """
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Embedding):
                param.normal_(0.0, 0.25)
            elif param.ndim > 1:
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.normal_(0.0 if name == "bias" else 1.0, 0.1)


def _top_config(spec: TinySpec, origin: str, llm: dict, vision_tower: dict, mm_projector: dict) -> dict:
    """The root `config.json`: the field set of the official NVILA configs (parity checkpoints)."""
    s2 = spec.dynamic_s2
    return {
        "_attn_implementation_autoset": True,
        "_name_or_path": origin,
        "architectures": ["LlavaLlamaModel"],
        "chat_template": None,
        "drop_path_rate": 0.0,
        "dynamic_s2": s2,
        "fps": 0.0,
        "hidden_size": spec.hidden_size,
        "image_aspect_ratio": spec.image_aspect_ratio,
        "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
        "interpolate_mode": "linear",
        "llm_cfg": llm,
        "max_tiles": 12,
        "min_tiles": 1,
        "mm_hidden_size": spec.mm_hidden_size,
        "mm_projector_cfg": mm_projector,
        "mm_projector_lr": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "cls_patch",
        "mm_vision_select_layer": -2,
        "model_dtype": "torch.bfloat16",
        "model_type": "llava_llama",
        "num_time_tokens": 0,
        "num_video_frames": 8,
        "resume_path": origin,
        "s2": False,  # dynamic_s2 replaces plain S2 in NVILA; the official configs keep s2 false
        "s2_max_split_size": IMAGE_SIZE if s2 else None,
        "s2_resize_output_to_scale_idx": -1 if s2 else 0,
        "s2_scales": S2_SCALES if s2 else None,
        "soft_ce_std": 1.0,
        "time_token_format": "<t{t}>",
        "time_token_ids": [],
        "transformers_version": transformers.__version__,
        "tune_language_model": True,
        "tune_mm_projector": True,
        "tune_vision_tower": True,
        "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"}),
        "vision_resolution": -1,
        "vision_tower_cfg": vision_tower,
    }


def parameter_counts(checkpoint: str | os.PathLike) -> dict[str, int]:
    """Counts the stored parameters of each part of an original-layout NVILA checkpoint.

    Args:
        checkpoint: folder with `llm/`, `vision_tower/`, `mm_projector/` (single-file `model.safetensors` each).

    Returns:
        {"llm": n, "vision_tower": n, "mm_projector": n}, numbers of scalars (a tied `lm_head` is not stored,
        so not counted).
    """
    counts = {}
    for part in ("llm", "vision_tower", "mm_projector"):
        with safe_open(Path(checkpoint) / part / "model.safetensors", "pt") as f:
            counts[part] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return counts


def _write_checkpoint(out: Path, spec: TinySpec, variant: str, seed: int) -> None:
    """Writes config.json and the three part folders into the empty folder `out`."""
    origin = f"nvila_ft.tiny/{variant}-seed{seed}"
    tokenizer = build_tiny_tokenizer(spec.model_max_length)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    llm_cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=32768,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=ids[ENDOFTEXT],  # Qwen2 convention: bos id = <|endoftext|>, though no bos is prepended
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        # The official NVILA code stores the tokenizer settings in the LLM config too.
        model_max_length=spec.model_max_length,
        tokenizer_model_max_length=spec.model_max_length,
        tokenizer_padding_side="right",
        architectures=["Qwen2ForCausalLM"],
        dtype="bfloat16",
    )
    vt_cfg = SiglipVisionConfig(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_num_hidden_layers,
        num_attention_heads=spec.vision_num_attention_heads,
        intermediate_size=spec.vision_intermediate_size,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
        architectures=["SiglipVisionModel"],
        dtype="bfloat16",
    )
    proj_cfg = _ProjectorConfig(
        spec.mm_projector_type, architectures=["MultimodalProjector"], dtype="bfloat16"
    )
    for name, cfg in [("llm", llm_cfg), ("vision_tower", vt_cfg), ("mm_projector", proj_cfg)]:
        cfg.name_or_path = f"{origin}/{name}"

    # fork_rng: seed the weights without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM(llm_cfg)
        vision_tower = SiglipVisionModel(vt_cfg)
        mm_projector = MultimodalProjector(spec.mm_projector_type, spec.mm_hidden_size, spec.hidden_size)
        for model in (llm, vision_tower, mm_projector):
            _randomize_(model)
            model.to(torch.bfloat16)

    llm_dir, vt_dir, proj_dir = out / "llm", out / "vision_tower", out / "mm_projector"
    llm.save_pretrained(llm_dir)
    write_json(llm_dir / "config.json", with_v4_keys(llm_cfg.to_diff_dict()))
    save_tokenizer(tokenizer, llm_dir)

    # transformers 5 saves SiglipVisionModel without the `vision_model.` prefix; the official files have it.
    vt_dir.mkdir()
    write_json(vt_dir / "config.json", with_v4_keys(vt_cfg.to_diff_dict()))
    state = {f"vision_model.{k}": v.contiguous() for k, v in vision_tower.state_dict().items()}
    save_file(state, vt_dir / "model.safetensors", metadata={"format": "pt"})
    SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=None,
    ).save_pretrained(vt_dir)

    proj_dir.mkdir()
    write_json(proj_dir / "config.json", with_v4_keys(proj_cfg.to_diff_dict()))
    state = {k: v.contiguous() for k, v in mm_projector.state_dict().items()}
    save_file(state, proj_dir / "model.safetensors", metadata={"format": "pt"})

    sub = {
        name: with_v4_keys(cfg.to_dict())
        for name, cfg in [("llm", llm_cfg), ("vision_tower", vt_cfg), ("mm_projector", proj_cfg)]
    }
    write_json(
        out / "config.json", _top_config(spec, origin, sub["llm"], sub["vision_tower"], sub["mm_projector"])
    )


def build_tiny_checkpoint(
    out_dir: str | os.PathLike,
    variant: str = "nvila",
    seed: int = 0,
    *,
    overwrite: bool = False,
    layout: str = "original",
    **size_overrides: Any,
) -> Path:
    """Writes a random tiny NVILA checkpoint in the official original hub layout (or an -hf one, `layout`).

    The folder is built in a temporary sibling and renamed into place, so `out_dir` is never left half-written.
    The same `variant`, `seed` and overrides give byte-identical safetensors files.

    Args:
        out_dir: destination folder; must be missing or empty unless `overwrite`.
        variant: `nvila` (dynamic_s2, 2x2 projector, untied head, max length 8192) or `nvila-lite`
            (dynamic tiles, 3x3 projector, tied head, max length 4096); see VARIANTS.
        seed: `torch.manual_seed` for the weights (the tokenizer does not depend on it).
        overwrite: replace a non-empty `out_dir`.
        layout: `original`, `hf` (NVIDIA's single-folder -hf layout: model_type `nvila` for the `nvila` variant,
            `nvila_lite` for `nvila-lite`) or `hf-0626` (model_type `vila`, `nvila-lite` only); the same weights
            in every layout (:mod:`nvila_ft.model.hf_layout`).
        **size_overrides: fields of TinySpec, e.g. `num_hidden_layers=4, vision_hidden_size=64`.

    Returns:
        The absolute path of the checkpoint folder.

    Raises:
        ValueError: unknown `variant` or an invalid size.
        TypeError: an override that is not a TinySpec field.
        FileExistsError: `out_dir` is not empty and `overwrite` is False.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {sorted(VARIANTS)}.")
    fields = {f.name for f in dataclasses.fields(TinySpec)}
    if unknown := sorted(set(size_overrides) - fields):
        raise TypeError(f"Unknown tiny checkpoint setting(s) {unknown}; choose from {sorted(fields)}.")
    spec = dataclasses.replace(VARIANTS[variant], **size_overrides)

    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a folder path for the checkpoint.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; choose an empty folder or pass overwrite=True (CLI: --overwrite)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if layout != "original":
        return _write_hf(out, spec, variant, seed, layout)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(tmp, spec, variant, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Move the old folder aside first, so `out` is always either the old or the complete new checkpoint.
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("Wrote tiny %s checkpoint (seed %d) to %s", variant, seed, out)
    return out


def _write_hf(out: Path, spec: TinySpec, variant: str, seed: int, layout: str) -> Path:
    """The original-layout tiny checkpoint, loaded and saved as `layout` by `hf_layout.save_hf` (atomic)."""
    from nvila_ft.model.hf_layout import LAYOUTS, hf_model_type, save_hf
    from nvila_ft.model.modeling import NvilaForConditionalGeneration

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {sorted(LAYOUTS)}.")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.orig-", dir=out.parent) as tmp:
        _write_checkpoint(Path(tmp), spec, variant, seed)
        model = NvilaForConditionalGeneration.from_pretrained(tmp, dtype=torch.bfloat16)
        hf_model_type(model.config, layout)  # refuses a projector the layout cannot hold, before writing
        save_hf(model, out, layout)
    logger.info("Wrote tiny %s checkpoint (seed %d, layout %s) to %s", variant, seed, layout, out)
    return out


def build_nvila(out_dir: str | os.PathLike) -> Path:
    """`demo:tiny-nvila` (built by :func:`nvila_ft.demo.resolve`): the `nvila` variant, seed 0."""
    return build_tiny_checkpoint(out_dir, "nvila", 0)


def build_nvila_lite(out_dir: str | os.PathLike) -> Path:
    """`demo:tiny-nvila-lite` (built by :func:`nvila_ft.demo.resolve`): the `nvila-lite` variant, seed 0."""
    return build_tiny_checkpoint(out_dir, "nvila-lite", 0)


@user_errors
def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m nvila_ft.tiny OUT [--variant nvila|nvila-lite] [--seed N] [--overwrite]`."""
    parser = argparse.ArgumentParser(prog="python -m nvila_ft.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="checkpoint folder to create (must be missing or empty)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="nvila")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--layout", choices=["original", "hf", "hf-0626"], default="original",
                        help="checkpoint layout: original (llm/ vision_tower/ mm_projector/), hf (NVIDIA's -hf "
                        "single folder), hf-0626 (model_type vila; nvila-lite only)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # one "Writing model shards" bar per save otherwise
    try:
        out = build_tiny_checkpoint(args.out, args.variant, args.seed, overwrite=args.overwrite, layout=args.layout)
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(out)
    if args.layout != "original":
        print(f"{args.variant} seed {args.seed}, layout {args.layout}")
        return 0
    counts = parameter_counts(out)
    print(f"{args.variant} seed {args.seed}: " + " | ".join(f"{k} {v:,} params" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
