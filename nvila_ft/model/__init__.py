"""The NVILA model and its inputs: what the official checkpoints are, and nothing about training.

- `configuration`: `NvilaConfig`, the official `config.json` (`model_type: llava_llama`).
- `checkpoint`: hub id or folder -> local folder, the tokenizer with NVILA's media tokens, nf4 quantization.
- `projector`: `mm_projector` (spatial-to-channel 2x2 / 3x3 + MLP).
- `image_processing`: `dynamic_s2` / `dynamic` / `resize` tiling and SigLIP normalisation.
- `video`: frame sampling and decoding (decord), temporal pooling.
- `media`: `MediaConfig`, a run's one resolved media config (tiling, frames, fps, temporal pool, max_length),
  and `expanded_length`, the one count of a sample's tokens after media expansion.
- `processing`: `NvilaProcessor` (a transformers `ProcessorMixin`; `AutoProcessor` loads it), conversations +
  media -> `input_ids`, `labels`, `pixel_values`.
- `modeling`: `NvilaForConditionalGeneration` = `vision_tower` + `mm_projector` + `llm`.
"""

from nvila_ft.model.configuration import NvilaConfig
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import NvilaProcessor

__all__ = ["NvilaConfig", "NvilaForConditionalGeneration", "NvilaProcessor"]
