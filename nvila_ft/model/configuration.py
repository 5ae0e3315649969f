"""`NvilaConfig`: the top-level `config.json` of an official NVILA checkpoint (original layout).

Field names and defaults are those of the official configs (`model_type: llava_llama`, NVlabs/VILA); see
`../shared/docs/nvila-architecture.md` ("Checkpoint layouts on the hub"). Fields this kit does not use are
kept as attributes and written back unchanged on save.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig, Qwen2Config, SiglipVisionConfig

from nvila_ft.model.image_processing import TilingConfig

# Media placeholders and the label sentinel: special tokens the official loader adds to the Qwen2
# tokenizer, in this order (sentinel first), so with the official tokenizer they get ids 151648..151650.
SENTINEL_TOKEN = "<vila/sentinel>"
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}
IGNORE_INDEX = -100


class NvilaConfig(PretrainedConfig):
    """Configuration of an NVILA model in the official original layout.

    Args:
        llm_cfg: the LLM's config dict (`llm/config.json`, Qwen2 for NVILA).
        vision_tower_cfg: the SigLIP vision config dict (`vision_tower/config.json`).
        mm_projector_cfg: the projector config dict (`mm_projector/config.json`, key `mm_projector_type`).
        hidden_size: LLM hidden size (projector output width).
        mm_hidden_size: projector input width: vision hidden x number of S2 scales for `dynamic_s2`
            (3 x 1152 = 3456 for NVILA-8B), vision hidden (1152) otherwise.
        image_aspect_ratio: `dynamic_s2` (NVILA), `dynamic` (NVILA-Lite) or `resize`.
        s2_scales: comma-separated S2 image sides, "448,896,1344" for NVILA.
        s2_resize_output_to_scale_idx: which scale's feature map size the scales are resized to (-1: last).
        max_tiles, min_tiles: tile grid bounds (12 and 1 in the official configs).
        mm_vision_select_layer: hidden state index the features come from (-2: second-to-last layer output).
        mm_vision_select_feature: `cls_patch` (all tokens; SigLIP has no CLS token) or `patch`.
        num_video_frames, fps: video sampling defaults (8 frames, 0 = uniform; see `nvila_ft.model.video.frame_indices`).
        video_encoder: the official hydra target of the video encoder, a JSON string or dict:
            `{"_target_": "llava.model.encoders.BasicVideoEncoder"}` (no pooling; NVILA-8B, NVILA-Lite) or
            `{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}` (NVILA-8B-Video:
            average every 8 consecutive frames). Read through :attr:`pool_sizes`; written back unchanged.
        model_dtype: storage dtype of the checkpoint ("torch.bfloat16").
        image_token_id, video_token_id, end_token_ids: filled in at load time from the tokenizer
            (`<image>`, `<vila/video>` and the ids of "\\n", the text appended after every media item).
    """

    model_type = "llava_llama"

    def __init__(
        self,
        llm_cfg: dict | None = None,
        vision_tower_cfg: dict | None = None,
        mm_projector_cfg: dict | None = None,
        hidden_size: int | None = None,
        mm_hidden_size: int | None = None,
        image_aspect_ratio: str = "dynamic_s2",
        dynamic_s2: bool | None = None,
        s2_scales: str | None = "448,896,1344",
        s2_max_split_size: int | None = 448,
        s2_resize_output_to_scale_idx: int = -1,
        max_tiles: int = 12,
        min_tiles: int = 1,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "cls_patch",
        num_video_frames: int = 8,
        fps: float = 0.0,
        video_encoder: str | dict | None = '{"_target_": "llava.model.encoders.BasicVideoEncoder"}',
        model_dtype: str = "torch.bfloat16",
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        end_token_ids: list[int] | None = None,
        **kwargs,
    ):
        self.llm_cfg = _as_dict(llm_cfg)
        self.vision_tower_cfg = _as_dict(vision_tower_cfg)
        self.mm_projector_cfg = _as_dict(mm_projector_cfg)
        self.hidden_size = hidden_size if hidden_size is not None else self.llm_cfg.get("hidden_size")
        self.image_aspect_ratio = image_aspect_ratio
        self.dynamic_s2 = image_aspect_ratio == "dynamic_s2" if dynamic_s2 is None else dynamic_s2
        self.s2_scales = s2_scales
        self.s2_max_split_size = s2_max_split_size
        self.s2_resize_output_to_scale_idx = s2_resize_output_to_scale_idx
        self.max_tiles = max_tiles
        self.min_tiles = min_tiles
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.num_video_frames = num_video_frames
        self.fps = fps
        self.video_encoder = video_encoder
        self.model_dtype = model_dtype
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.end_token_ids = end_token_ids
        if mm_hidden_size is None and self.vision_tower_cfg:
            mm_hidden_size = self.vision_tower_cfg["hidden_size"] * (len(self.scales) if self.dynamic_s2 else 1)
        self.mm_hidden_size = mm_hidden_size
        super().__init__(**kwargs)

    @property
    def scales(self) -> tuple[int, ...]:
        """S2 scales as sorted ints (empty when `s2_scales` is unset)."""
        return tuple(sorted(int(s) for s in self.s2_scales.split(","))) if self.s2_scales else ()

    @property
    def pool_sizes(self) -> list[tuple[int, int, int]]:
        """Video token pooling (t, h, w) per stream from `video_encoder`; [] = none (one token set per frame)."""
        from nvila_ft.model.video import parse_video_encoder

        return parse_video_encoder(self.video_encoder)

    @property
    def mm_projector_type(self) -> str:
        return self.mm_projector_cfg.get("mm_projector_type") or self.to_dict().get("mm_projector_type")

    @property
    def text_config(self) -> PretrainedConfig:
        """The LLM config as a transformers config object (`Qwen2Config` for NVILA)."""
        cfg = dict(self.llm_cfg)
        model_type = cfg.pop("model_type", "qwen2")
        if model_type == "qwen2":
            return Qwen2Config(**cfg)
        return AutoConfig.for_model(model_type, **cfg)

    @property
    def vision_config(self) -> SiglipVisionConfig:
        cfg = {k: v for k, v in self.vision_tower_cfg.items() if k != "model_type"}
        return SiglipVisionConfig(**cfg)

    def tiling(self, image_aspect_ratio: str | None = None, max_tiles: int | None = None) -> TilingConfig:
        """Tiling settings for the image processor, optionally overriding mode and max tiles."""
        return TilingConfig(
            image_aspect_ratio=image_aspect_ratio or self.image_aspect_ratio,
            tile_size=self.vision_tower_cfg.get("image_size", 448),
            s2_scales=self.scales or (448, 896, 1344),
            max_tiles=max_tiles or self.max_tiles,
            min_tiles=self.min_tiles,
        )


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, PretrainedConfig):
        return cfg.to_dict()
    return dict(cfg)


def with_v4_keys(cfg: dict) -> dict:
    """Adds the transformers 4.x spellings (`torch_dtype`, `rope_theta`) that the official NVILA code reads.

    The official code pins transformers 4.46, which ignores v5's `dtype` / `rope_parameters` and would fall back
    to rope_theta 10000; transformers 5 accepts both spellings.
    """
    cfg = {**cfg, "torch_dtype": cfg.get("dtype") or "bfloat16"}
    if cfg.get("rope_parameters"):
        cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
        cfg.setdefault("rope_scaling", None)
    return cfg


def vision_layers_run(num_layers: int, select_layer: int) -> int:
    """SigLIP encoder layers that produce `hidden_states[select_layer]` (index 0: the patch embeddings).

    `mm_vision_select_layer` -2 with 27 layers (SigLIP so400m) gives 26: the last layer and `post_layernorm`
    are not needed (architecture note, "Vision tower").

    Raises:
        ValueError: `select_layer` is outside -(num_layers + 1) .. num_layers.
    """
    if not -(num_layers + 1) <= select_layer <= num_layers:
        raise ValueError(f"mm_vision_select_layer {select_layer} is outside the {num_layers + 1} hidden states "
                         "of the vision tower")
    return num_layers + 1 + select_layer if select_layer < 0 else select_layer
