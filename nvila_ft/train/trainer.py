"""Fine-tune NVILA with a recipe: LoRA on the LLM, LayerNorm-only vision tower, full projector (paper default).

    accelerate launch -m nvila_ft.train recipes/medical.yaml [key=value ...]
    python -m nvila_ft.train recipes/quickstart.yaml train.max_steps=10

Steps: recipe -> checkpoint (hub id, folder or demo:<name>) -> data + preflight -> per-part tuning ->
`transformers.Trainer` (resumable checkpoints, TensorBoard) -> peft adapter (LoRA + trained copies) ->
VQA evaluation -> `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from nvila_ft.data import VideoCheck, load_split, preflight
from nvila_ft.evaluate import evaluate_samples
from nvila_ft.model.checkpoint import DTYPES, nf4_config
from nvila_ft.model.media import MediaConfig
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import NvilaProcessor
from nvila_ft.plan.report import check_budget
from nvila_ft.train.recipe import Recipe
from nvila_ft.train.recipe_io import recipe_to_yaml
from nvila_ft.train.tuning import (
    apply_tuning,
    base_model,
    param_groups,
    release_full_originals,
    trainable_table,
)

logger = logging.getLogger("nvila_ft.train")

# ---------------------------------------------------------------------------------------------- data
class SupervisedDataset(Dataset):
    """Encodes samples lazily; a row that fails at training time is logged and replaced by the next one.

    Preflight already refused bad rows; this guards against files that change during a long run
    (a bad row must never kill a run after an hour of training).
    """

    def __init__(self, samples: list[dict], processor: NvilaProcessor, max_failures: int = 100):
        self.samples, self.processor, self.max_failures, self.failures = samples, processor, max_failures, 0

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample after media expansion: the preflight's count (`num_tokens`), else computed the same
        way from image sizes (headers only, nothing is tiled or encoded)."""
        return [s["num_tokens"] if "num_tokens" in s else expanded_tokens(self.processor, s) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            try:
                return self.processor(sample["conversations"], sample.get("images", []), sample_id=sample.get("id"),
                                      videos=sample.get("videos", []))
            except Exception as err:  # noqa: BLE001 - any failure of one row is reported, not fatal
                self.failures += 1
                logger.error("skipping %s[%s] id=%s at train time: %s", sample.get("source"), sample.get("index"),
                             sample.get("id"), err)
                if self.failures > self.max_failures:
                    raise RuntimeError(f"more than {self.max_failures} rows failed at train time") from err
        raise RuntimeError("no sample of the dataset can be encoded")


def prepare_data(recipe: Recipe, processor: NvilaProcessor, split: str, max_samples: int | None) -> list[dict]:
    """Loads one split and runs the preflight (all rows checked, bad rows reported with file and index)."""
    return check_samples(recipe, processor, load_split(recipe.data, split, max_samples), split)


def check_samples(recipe: Recipe, processor: NvilaProcessor, samples: list[dict], split: str) -> list[dict]:
    """Preflight of loaded samples per the recipe (`data.preflight`, `data.on_bad_row`); returns the good ones."""
    d = recipe.data
    if not d.preflight:
        return samples

    video_check = VideoCheck.for_media(processor.media, short_videos=d.short_videos, sample=d.preflight_video_sample,
                                       seed=recipe.train.seed, cache_dir=d.video_cache_dir,
                                       tokens_fn=processor.count_video_tokens)
    report = preflight(samples, on_bad_row=d.on_bad_row, length_fn=lambda s: expanded_tokens(processor, s),
                       max_length=processor.max_length, video_check=video_check)
    lines = report.summary().splitlines()
    logger.info("%s split: %s", split, lines[0])
    video_lines = [line for line in lines if line.startswith("video rows:")]
    if video_lines:
        pool = [list(p) for p in processor.pool_sizes] or "none"
        logger.info("%s split: %s; %d frames per video, %d tokens per frame, temporal pool %s -> %d visual tokens "
                    "per video", split, video_lines[0], processor.num_video_frames, processor.tokens_per_tile, pool,
                    processor.count_video_tokens())
    return report.ok


def expanded_tokens(processor: NvilaProcessor, sample: dict) -> int:
    """A sample's token count after media expansion (`NvilaProcessor.num_tokens`; images: only their sizes)."""
    sizes = [_image_size(im) for im in sample.get("images", [])]
    return processor.num_tokens(sample["conversations"], sizes, sample.get("video_frames", ()))


def _image_size(image) -> tuple[int, int]:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as im:
        return im.size


# ---------------------------------------------------------------------------------------------- trainer
class NvilaTrainer(Trainer):
    """`transformers.Trainer`; the model is a `PeftModel` whose adapter holds the LoRA weights and the copies of
    the parts trained in full (peft `modules_to_save`, see :func:`nvila_ft.train.tuning.apply_tuning`), so
    Trainer's own PEFT save and resume cover everything the recipe trains."""

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's `group_by_length` sampler, given the lengths the dataset knows (`SupervisedDataset.lengths`):
        left alone, Trainer would encode every sample (images tiled) to measure `input_ids`, which also miss
        the media tokens."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        return EpochLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                         dataset.lengths, self.args.seed)


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Trainer's `LengthGroupedSampler` with its order drawn from (seed, epoch), not the global RNG: a resumed run
    skips into exactly the batches of the uninterrupted one (Trainer calls `set_epoch` through accelerate)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class DenseLog(ProgressCallback):
    """Progress bar plus one dense line per logging step: `step | loss | lr | samples/s | mem`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if torch.cuda.is_available():
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GB cuda"
        else:
            mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB rss"
        elapsed = time.time() - getattr(self, "_t0", time.time())
        self._t0 = time.time()
        done = state.global_step - getattr(self, "_last_step", 0)
        self._last_step = state.global_step
        rate = done * args.per_device_train_batch_size * args.gradient_accumulation_steps / max(elapsed, 1e-9)
        line = (f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                f"lr {logs.get('learning_rate', 0):.2e} | {rate:.2f} samples/s | mem {mem}")
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._t0, self._last_step = time.time(), state.global_step


class PeriodicEval(TrainerCallback):
    """Generation-based VQA evaluation every `eval.eval_steps` optimizer steps."""

    def __init__(self, run):
        self.run = run

    def on_step_end(self, args, state, control, **kwargs):
        every = self.run.recipe.eval.eval_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            metrics = self.run.evaluate(tag=f"step{state.global_step}")
            self.run.trainer.log({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, float)})


# ---------------------------------------------------------------------------------------------- run
def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest `checkpoint-<step>` folder that was completely written (has `trainer_state.json`, saved last)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def undo_kbit_upcast(llm: nn.Module, dtype: torch.dtype) -> None:
    """Casts the frozen LLM weights that `prepare_model_for_kbit_training` upcast to fp32 back to `dtype`.

    peft upcasts every parameter that is not 4-bit to fp32 (and freezes it). All of them are frozen
    here; the largest are the vocabulary matrices (NVILA-8B: embed_tokens + lm_head = 2 x 151,651 x
    3,584 = 1.09B params, 4.05 GiB in fp32 vs 2.03 GiB in bf16), the rest are norms and biases. All go
    back, not only the vocabulary matrices: an fp32 final norm feeding a bf16 `lm_head` would fail
    without autocast. The model is then in `dtype` as loaded, like a LoRA run; the trainables are made
    later (fp32 under mixed precision, see :meth:`TrainingRun.load_model`). No-op for fp32 recipes.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return
    for param in llm.parameters():
        if param.dtype == torch.float32 and not param.requires_grad:
            param.data = param.data.to(dtype)


def run_info(recipe: Recipe) -> dict:
    """What ran: package versions, git commit of this kit, platform."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    pkgs = ["nvila-ft", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"]
    versions = {}
    for p in pkgs:
        try:
            versions[p] = version(p)
        except Exception:  # noqa: BLE001 - optional packages
            versions[p] = None
    local = Path(recipe.model.path)
    return {"base_model": recipe.model.path, "base_model_path": str(local.resolve()) if local.is_dir() else None,
            "git_commit": commit, "versions": versions,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


class TrainingRun:
    """One fine-tuning run wired from a recipe (used by :func:`main` and the Python API).

    Args:
        recipe: the validated recipe.
        train_samples, eval_samples: normalized samples (`conversations`, `images`, ...) to use instead of
            loading `data.path` (Python API: a user's own dataset); they still go through preflight.
        metric: scores the eval answers instead of `eval.metric`: a metric name or a callable
            `(predictions, references) -> dict | float` (see :func:`nvila_ft.metrics.get_metric`).
        force: train even if the memory plan predicts more than `train.gpu_memory_gb`.
    """

    def __init__(self, recipe: Recipe, train_samples: list[dict] | None = None,
                 eval_samples: list[dict] | None = None, metric=None, force: bool = False):
        self.recipe = recipe
        self.force = force  # train even if the memory plan predicts more than train.gpu_memory_gb
        self.output_dir = Path(recipe.train.output_dir)
        self.trainer: NvilaTrainer | None = None
        self.given_samples = (train_samples, eval_samples)
        self.metric = metric if metric is not None else recipe.eval.metric

    # -- setup
    def bootstrap(self) -> None:
        """Builds the `demo:` checkpoint / data set the recipe names (`nvila_ft.demo.resolve`), if not built yet.

        The model and data loaders resolve `demo:` paths themselves; doing it first only puts the build (and
        where it went) at the top of the log, before the memory plan. Other paths are left to the loaders.
        """
        from nvila_ft.demo import is_demo_path, resolve

        wanted = [(self.recipe.model.path, "checkpoint")]
        if self.given_samples[0] is None:  # Python API samples replace data.path
            wanted.append((self.recipe.data.path, "data"))
        for path, kind in wanted:
            if is_demo_path(path):
                resolve(path, kind)

    def load_model(self):
        m, tune, train = self.recipe.model, self.recipe.tune, self.recipe.train
        dtype = DTYPES[m.dtype]
        quant = nf4_config(dtype) if tune.llm == "qlora" else None
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
        model = NvilaForConditionalGeneration.from_pretrained(
            m.path, dtype=dtype, attn_implementation=m.attn_implementation, llm_quantization_config=quant,
            device_map=device_map)
        if torch.cuda.is_available():
            model.vision_tower.to(model.llm.device)
            model.mm_projector.to(model.llm.device)
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=train.gradient_checkpointing.llm,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
            undo_kbit_upcast(model.llm, dtype)
        gc_parts = [p for p in ("llm", "vision_tower") if getattr(train.gradient_checkpointing, p)]
        if gc_parts:
            model.gradient_checkpointing_enable(parts=gc_parts)
        # The run's one media config (checkpoint config + recipe): the processor saves it in processor_config.json;
        # written into the model config too, so that the model's default video pooling follows the run.
        media = MediaConfig.from_recipe(model.config, self.recipe)
        media.write_to(model.config)
        processor = NvilaProcessor(model.tokenizer, media=media,
                                   system_prompt=self.recipe.data.system_prompt,
                                   video_cache_dir=self.recipe.data.video_cache_dir)
        set_seed(train.seed)  # adapter init (peft draws lora_A from the global RNG) follows train.seed
        model = apply_tuning(model, tune, self.recipe.lora)
        freed = release_full_originals(model, tune)  # own path for full parts: the frozen originals cost GiBs
        if freed:
            logger.info("released %.2f GiB of frozen originals of parts trained in full", freed / 2**30)
        if self.recipe.train.resolved_mixed_precision() != "no":
            # Trainables in fp32 under autocast: AdamW on bf16 weights loses small updates.
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        self.model, self.processor = model, processor
        return model, processor

    def load_data(self) -> None:
        d = self.recipe.data
        given_train, given_eval = self.given_samples
        limit = self.recipe.eval.max_samples or d.max_eval_samples
        if given_train is not None:
            train = given_train[: d.max_train_samples]
        else:
            train = load_split(d, d.train_split, d.max_train_samples)
        self.prune_stats = None
        if d.prune.enabled:  # DeltaLoss / random pruning (nvila_ft.data.prune), before the preflight checks rows
            from nvila_ft.data.prune import prune_samples

            train, self.prune_stats = prune_samples(train, d.prune, seed=self.recipe.train.seed)
        self.train_samples = check_samples(self.recipe, self.processor, train, "train")
        if not self.train_samples:
            raise RuntimeError(f"{d.path}: no usable training rows in split {d.train_split!r}")
        self.eval_samples = []
        if given_eval is not None:
            self.eval_samples = check_samples(self.recipe, self.processor, given_eval[:limit], "eval")
        elif self.recipe.eval.enabled and d.eval_split and given_train is None:
            self.eval_samples = prepare_data(self.recipe, self.processor, d.eval_split, limit)

    def build_trainer(self) -> NvilaTrainer:
        r, t = self.recipe, self.recipe.train
        mp = r.train.resolved_mixed_precision()
        args = TrainingArguments(
            output_dir=str(self.output_dir), per_device_train_batch_size=t.per_device_train_batch_size,
            per_device_eval_batch_size=t.per_device_eval_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.num_train_epochs,
            max_steps=t.max_steps, learning_rate=t.lr, weight_decay=t.weight_decay,
            lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
            logging_steps=t.logging_steps,
            save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed,
            bf16=mp == "bf16", fp16=mp == "fp16", report_to=t.report_to, remove_unused_columns=False,
            label_names=["labels"], dataloader_num_workers=t.dataloader_num_workers,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
            train_sampling_strategy="group_by_length" if t.resolved_group_by_length() else "random",
        )
        groups = param_groups(self.model, t)
        print(trainable_table(base_model(self.model), groups), flush=True)
        optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k not in ("names", "name")} for g in groups], lr=t.lr,
            weight_decay=t.weight_decay)
        self.trainer = NvilaTrainer(
            model=self.model, args=args, train_dataset=SupervisedDataset(self.train_samples, self.processor),
            data_collator=self.processor.collate, processing_class=self.processor.tokenizer,
            optimizers=(optimizer, None), callbacks=[PeriodicEval(self)],
        )
        self.trainer.remove_callback(ProgressCallback)
        self.trainer.add_callback(DenseLog())
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = str(self.output_dir / "logs")  # per run; TENSORBOARD_LOGGING_DIR wins
        return self.trainer

    # -- run
    def resume_path(self) -> str | None:
        value = self.recipe.train.resume_from_checkpoint
        if value == "never":
            return None
        if value == "auto":
            return latest_checkpoint(self.output_dir)
        if not Path(value).is_dir():
            raise FileNotFoundError(f"train.resume_from_checkpoint: {value} is not a checkpoint folder")
        return value

    def evaluate(self, tag: str = "final") -> dict:
        e = self.recipe.eval
        if not self.eval_samples:
            return {}
        metrics, rows = evaluate_samples(self.model, self.processor, self.eval_samples, self.metric,
                                         e.max_new_tokens, e.batch_size)
        if self.trainer is None or self.trainer.args.should_save:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / f"predictions_{tag}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return metrics

    def run(self) -> dict:
        """Bootstrap, load, train (resuming if a checkpoint exists), save, evaluate. Returns metrics."""
        self.bootstrap()
        check_budget(self.recipe, force=self.force)  # before any weight is loaded (nvila_ft.plan)
        self.load_model()
        self.load_data()
        self.build_trainer()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))
        self.processor.save_pretrained(self.output_dir)
        (self.output_dir / "run_info.json").write_text(json.dumps(run_info(self.recipe), indent=2))
        resume = self.resume_path()
        if resume:
            logger.info("resuming from %s", resume)
        result = self.trainer.train(resume_from_checkpoint=resume)
        self.trainer.save_model(str(self.output_dir))
        metrics = {"train": {k: v for k, v in result.metrics.items()}, "train_samples": len(self.train_samples)}
        if getattr(self, "prune_stats", None):
            metrics["prune"] = self.prune_stats
        eval_metrics = self.evaluate("final")
        if eval_metrics:
            metrics["eval"] = eval_metrics
            self.trainer.log({f"eval_{k}": v for k, v in eval_metrics.items() if isinstance(v, float)})
        if self.trainer.args.should_save:
            tmp = self.output_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            os.replace(tmp, self.output_dir / "metrics.json")
            print(json.dumps(metrics, indent=2), flush=True)
            self.write_model_card()
        return metrics

    def write_model_card(self) -> Path:
        """`README.md` in the run folder (after PEFT's own adapter card, which it replaces)."""
        from nvila_ft.model_card import write_model_card

        data = "in-memory samples (Python API)" if self.given_samples[0] is not None else None
        metric = self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "custom")
        return write_model_card(self.output_dir, train_samples=len(self.train_samples),
                                eval_samples=len(self.eval_samples), data_source=data, metric=metric,
                                steps=self.trainer.state.global_step if self.trainer else None)
