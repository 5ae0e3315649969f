"""Fine-tune NVILA with a recipe: LoRA on the LLM, LayerNorm-only vision tower, full projector (paper default).

    accelerate launch --config_file recipes/accelerate/single_process.yaml \
        -m nvila_ft.train recipes/medical.yaml [key=value ...]
    python -m nvila_ft.train recipes/quickstart.yaml train.max_steps=10

Steps: recipe -> checkpoint (hub id, folder or demo:<name>) -> data + preflight -> per-part tuning ->
`transformers.Trainer` (resumable checkpoints, TensorBoard, eval loss + generated answers every
`eval.eval_steps`, best checkpoint, early stopping) -> peft adapter (LoRA + trained copies) -> final evaluation ->
`metrics.json`, `loss_curve.png`, model card (README.md) -> optional push to the Hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, TrainerState, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback

from nvila_ft.data import load_split
from nvila_ft.data.grouping import GroupCollator, plan_micro_batches
from nvila_ft.metrics import PRIMARY
from nvila_ft.model.checkpoint import DTYPES, nf4_config
from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.model.media import MediaConfig
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import NvilaProcessor
from nvila_ft.plan.report import check_budget
from nvila_ft.train.checkpoints import (
    ADAPTER,
    LogAtSave,
    ResumePlan,
    append_bad_row,
    finished_message,
    latest_checkpoint,  # noqa: F401 - re-exported: nvila_ft.train.trainer.latest_checkpoint
    plan_resume,
    publish_checkpoint,
    read_bad_rows,
    remove_stale,
    staging_dir,
    whole_run_loss,
)
from nvila_ft.train.curves import task_metric
from nvila_ft.train.dataset import (  # noqa: F401 - SupervisedDataset, check_samples re-exported
    EpochLengthGroupedSampler,
    GroupedDataset,
    SupervisedDataset,
    check_samples,
    prepare_data,
    resolve_grouping,
)
from nvila_ft.train.distributed import (
    ShardedAdapterSaves,
    Unwrapped,
    adapter_sources,
    is_main_process,
    quiet_other_ranks,
    sharded_evaluate,
    sharded_launch,
)
from nvila_ft.train.recipe import Recipe
from nvila_ft.train.recipe_io import recipe_to_yaml, run_info
from nvila_ft.train.tuning import (
    apply_tuning,
    base_model,
    param_groups,
    release_full_originals,
    trainable_table,
    undo_kbit_upcast,
)
from nvila_ft.train.watch import DenseLog, LossCurve, WatchedTrainer, summary_line

logger = logging.getLogger("nvila_ft.train")

# ---------------------------------------------------------------------------------------------- trainer
class NvilaTrainer(ShardedAdapterSaves, WatchedTrainer):
    """`transformers.Trainer` (eval answers and the best-checkpoint choice from `WatchedTrainer`) with short overrides.

    The model is a `PeftModel` whose adapter holds the LoRA weights and the copies of the parts trained in full
    (peft `modules_to_save`, see :func:`nvila_ft.train.tuning.apply_tuning`), so Trainer's own PEFT save and
    resume cover everything the recipe trains. Overridden: checkpoints are staged and renamed into place
    (`_save_checkpoint`, `_get_output_dir`), and rows that failed to encode are counted (`training_step`) or
    left out of an evaluation batch (`prediction_step`). Under FSDP the adapter is saved and resumed by
    :class:`~nvila_ft.train.distributed.ShardedAdapterSaves`.

    Shared prefixes and packing (`data.share_prefix`, `data.packing`): an input `{"micro_batches": [...]}` (one
    optimizer step of `per_device_train_batch_size x gradient_accumulation_steps` answers, from
    :class:`~nvila_ft.train.dataset.GroupedDataset`) runs forward and backward per micro-batch, each loss divided
    by the labelled tokens of the whole step, as transformers' gradient accumulation does; a step needs as many
    micro-batches as its groups fill, which the Trainer's fixed accumulation count cannot express.
    """

    _staging: str | None = None
    _bad_rows_seen: set | None = None
    train_config = None  # the recipe's `train` section (learning rates per part), set by TrainingRun
    param_ndims: dict[str, int] | None = None  # FSDP: dimensions before flattening, set by TrainingRun

    def create_optimizer(self, model=None):
        # The per-part AdamW groups (nvila_ft.train.tuning.param_groups) are built from the model the Trainer
        # hands over here, not passed in ready-made: under FSDP the Trainer refuses an optimizer made before it
        # wrapped the model (its parameters would be the pre-wrap ones).
        if self.optimizer is None and self.train_config is not None:
            t = self.train_config
            # Unwrapped: FSDP (use_orig_params) prefixes the names with `_fsdp_wrapped_module.`.
            groups = param_groups(Unwrapped(model if model is not None else self.model), t, self.param_ndims)
            self.optimizer = torch.optim.AdamW(
                [{k: v for k, v in g.items() if k not in ("names", "name")} for g in groups], lr=t.lr,
                weight_decay=t.weight_decay)
        return super().create_optimizer(model)

    def _save_checkpoint(self, model, trial):
        # Trainer writes checkpoint-<step> in place, file by file: a job killed mid-save leaves a folder that
        # looks like a checkpoint. Its own save (adapter, optimizer, scheduler, RNG, trainer_state, rotation) runs
        # unchanged into a staging folder, renamed into place once complete. The hook is `_get_output_dir`, the
        # one place the save asks for its folder; copying `_save_checkpoint` (~60 lines) would fork transformers.
        step, main = self.state.global_step, self.args.should_save
        self._staging = self._staging_used = staging_dir(self.args.output_dir, step, main_process=main)
        self.accelerator.wait_for_everyone()  # staging cleared before any process writes its RNG state
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process wrote its files
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == Path(self._staging_used):  # the Trainer noted the staged path: the final one
            self.state.best_model_checkpoint = str(Path(self.args.output_dir) / Path(best).name)
            staged_state = Path(self._staging_used) / f"checkpoint-{step}" / "trainer_state.json"
            if main and staged_state.is_file():  # the checkpoint's own record, for a resume
                self.state.save_to_json(str(staged_state))
        if main:
            publish_checkpoint(self.args.output_dir, step, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Rows SupervisedDataset could not encode were left out of the batch; they are recorded here, in the
        # training process (the DataLoader workers' state is lost). A batch left with no row trains nothing:
        # zero loss, no forward, so no gradient from it.
        for row in inputs.pop("bad_rows", None) or []:
            if self._bad_rows_seen is None:
                self._bad_rows_seen = set()
            if (row["source"], row["index"]) not in self._bad_rows_seen:
                self._bad_rows_seen.add((row["source"], row["index"]))
                append_bad_row(self.args.output_dir, row)  # each process appends its own rows, a line each
        parts = inputs.get("micro_batches")
        if parts is not None:
            total = sum(int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in parts)
            total = torch.tensor(max(total, 1), device=self.args.device)
            losses = []
            for k, part in enumerate(parts):  # gradients synchronised once, at the step's last backward (DDP, FSDP)
                with self.accelerator.no_sync(model) if k < len(parts) - 1 else contextlib.nullcontext():
                    losses.append(super().training_step(model, part, total))
            return sum(losses)
        if inputs["input_ids"].shape[0] == 0:
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        # Trainer's `group_by_length` sampler given the lengths the dataset knows (`SupervisedDataset.lengths`):
        # left alone, Trainer would encode every sample (images tiled) to measure `input_ids`, which also miss
        # the media tokens.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        return EpochLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                         dataset.lengths, self.args.seed)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # An eval row that failed to encode is left out of its batch (see SupervisedDataset.collate).
        inputs.pop("bad_rows", None)
        if inputs["input_ids"].shape[0] == 0:
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


# ---------------------------------------------------------------------------------------------- run
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
        self.model = self.processor = None  # set by load_model; stay None when run() finds the run finished
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
        if quant is not None and sharded_launch():  # FSDP / ZeRO-3 flatten the nf4 weights beside `dtype` ones
            quant.bnb_4bit_quant_storage = dtype
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
        model = NvilaForConditionalGeneration.from_pretrained(
            m.path, dtype=dtype, attn_implementation=m.attn_implementation, llm_quantization_config=quant,
            device_map=device_map, init=m.init)
        if torch.cuda.is_available():
            model.vision_tower.to(model.llm.device)
            model.mm_projector.to(model.llm.device)
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            # Checkpointing is enabled below for every part (peft's would call the deprecated
            # gradient_checkpointing_enable; with use_reentrant=False it adds nothing else).
            prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)
            undo_kbit_upcast(model.llm, dtype)
        gc_parts = [p for p in ("llm", "vision_tower") if getattr(train.gradient_checkpointing, p)]
        if gc_parts:
            model.activation_checkpointing_enable(parts=gc_parts)
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
        if self.recipe.train.objective == "dpo":  # preference pairs: their loader and preflight
            from nvila_ft.train.preference import load_preference_data

            return load_preference_data(self)
        d = self.recipe.data
        given_train, given_eval = self.given_samples
        limit = self.recipe.eval.max_samples
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
        # eval_loss_samples: the eval loss (up to data.max_eval_samples); eval_samples: the first
        # eval.max_samples of them, also answered by generation.
        self.eval_loss_samples = []
        if given_eval is not None:
            self.eval_loss_samples = check_samples(self.recipe, self.processor, given_eval[: d.max_eval_samples],
                                                   "eval")
        elif self.recipe.eval.enabled and d.eval_split and given_train is None:
            self.eval_loss_samples = prepare_data(self.recipe, self.processor, d.eval_split, d.max_eval_samples)
        self.eval_samples = self.eval_loss_samples[:limit]

    def training_arguments(self) -> TrainingArguments:
        """The recipe as `TrainingArguments` (no network: the Hub repo is created when the Trainer is built)."""
        r, t, e = self.recipe, self.recipe.train, self.recipe.eval
        mp = r.train.resolved_mixed_precision()
        periodic = bool(self.eval_loss_samples) and e.eval_steps is not None
        grouped = any(self.grouping())  # one data-loader item = one optimizer step (GroupedDataset)
        return TrainingArguments(
            output_dir=str(self.output_dir),
            per_device_train_batch_size=1 if grouped else t.per_device_train_batch_size,
            per_device_eval_batch_size=t.per_device_eval_batch_size,
            gradient_accumulation_steps=1 if grouped else t.gradient_accumulation_steps,
            num_train_epochs=t.num_train_epochs,
            max_steps=t.max_steps, learning_rate=t.lr, weight_decay=t.weight_decay,
            lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
            logging_steps=t.logging_steps,
            save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed,
            bf16=mp == "bf16", fp16=mp == "fp16", report_to=t.report_to, remove_unused_columns=False,
            label_names=["labels"], dataloader_num_workers=t.dataloader_num_workers,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
            train_sampling_strategy="group_by_length" if t.resolved_group_by_length() and not grouped else "random",
            eval_strategy="steps" if periodic else "no", eval_steps=e.eval_steps if periodic else None,
            load_best_model_at_end=t.load_best_model_at_end and periodic,
            metric_for_best_model=f"eval_{t.metric_for_best_model.removeprefix('eval_')}"
            if t.load_best_model_at_end else None,
            push_to_hub=t.push_to_hub, hub_model_id=t.hub_model_id, hub_strategy="end",
        )

    def build_trainer(self) -> NvilaTrainer:
        t = self.recipe.train
        args = self.training_arguments()
        if is_main_process():
            print(trainable_table(base_model(self.model), param_groups(self.model, t)), flush=True)
        # With load_best_model_at_end the Trainer reloads the best adapter, trained copies included (peft).
        callbacks = [LossCurve(self.output_dir, self.metric_name), LogAtSave()]
        if t.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
        trainer_class, dataset_class = NvilaTrainer, SupervisedDataset
        if self.recipe.train.objective == "dpo":
            from nvila_ft.train.preference import NvilaDPOTrainer as trainer_class
            from nvila_ft.train.preference import PreferenceDataset as dataset_class
        share_prefix, packing = self.grouping()
        answers = t.per_device_train_batch_size * t.gradient_accumulation_steps
        if share_prefix or packing:  # one item = one optimizer step's rows, grouped / packed into micro-batches
            steps = plan_micro_batches(self.train_samples, answers, t.seed, share_prefix)
            collator = GroupCollator(self.processor, share_prefix, packing, t.per_device_train_batch_size)
            dataset = GroupedDataset(self.train_samples, self.processor, steps, collator)
        else:
            dataset = dataset_class(self.train_samples, self.processor)
        self.trainer = trainer_class(
            model=self.model, args=args, train_dataset=dataset,
            eval_dataset=dataset_class(self.eval_loss_samples, self.processor) if self.eval_loss_samples else None,
            data_collator=dataset.collate, processing_class=self.processor.tokenizer,
            callbacks=callbacks,
        )
        self.trainer.train_config = t  # the optimizer (per-part groups) is made in NvilaTrainer.create_optimizer
        self.trainer.dpo_config = self.recipe.dpo  # read by NvilaDPOTrainer only
        if self.trainer.is_fsdp_enabled:  # mapped before the Trainer wraps the model (ShardedAdapterSaves)
            self.trainer.adapter_sources = adapter_sources(self.model)
            self.trainer.param_ndims = {n: p.ndim for n, p in self.model.named_parameters()}
        self.trainer.answer_metrics = self.answer_metrics if self.eval_samples else None
        self.trainer.write_card = self.write_model_card
        self.trainer.remove_callback(ProgressCallback)
        self.trainer.add_callback(DenseLog(rows_per_item=answers if share_prefix or packing else 1))
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = str(self.output_dir / "logs")  # per run; TENSORBOARD_LOGGING_DIR wins
        return self.trainer

    def grouping(self) -> tuple[bool, bool]:
        """(share_prefix, packing) as this run trains them (:func:`nvila_ft.train.dataset.resolve_grouping`)."""
        if getattr(self, "_grouping", None) is None:
            attn = getattr(base_model(self.model).llm.config, "_attn_implementation", "sdpa")
            self._grouping = resolve_grouping(self.recipe, self.train_samples, attn)
        return self._grouping

    # -- run
    def resume_plan(self) -> ResumePlan:
        """What to do with `train.output_dir`: finished, resume from a checkpoint, or start (see
        :func:`nvila_ft.train.checkpoints.plan_resume`; raises its `RunStateError`, a user error)."""
        plan = plan_resume(self.recipe.train)
        if plan.checkpoint and plan.finished is None:
            logger.info("resuming from %s", plan.checkpoint)
        return plan

    @property
    def metric_name(self) -> str | None:
        """The task metric's headline number (e.g. overall_accuracy), plotted and printed; None if unknown."""
        if isinstance(self.metric, str):
            return PRIMARY.get(self.metric)
        return None

    def answer_metrics(self) -> dict:
        """Generated-answer metrics at a Trainer evaluation (predictions_step<N>.jsonl, or _final after training)."""
        in_train = getattr(self, "_in_train", False)
        return self.evaluate(f"step{self.trainer.state.global_step}" if in_train else "final")

    def evaluate(self, tag: str = "final") -> dict:
        """Generated answers to the eval samples, scored; writes `predictions_<tag>.jsonl`."""
        e = self.recipe.eval
        if not self.eval_samples:
            return {}
        # Each rank answers its slice; every rank gets all answers and the same metrics (one process: as before).
        metrics, rows = sharded_evaluate(self.model, self.processor, self.eval_samples, self.metric,
                                         e.max_new_tokens, e.batch_size,
                                         model_wrapped=self.trainer.model_wrapped if self.trainer else None)
        if self.trainer is None or self.trainer.args.should_save:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / f"predictions_{tag}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return metrics

    def run(self) -> dict:
        """Bootstrap, load, train (resuming if a checkpoint exists), save, evaluate. Returns metrics.

        A finished run in `train.output_dir` is reported and left as it is (returns its metrics.json); a
        `train.max_steps` below the steps trained there is a `RunStateError` (see :meth:`resume_plan`).
        """
        quiet_other_ranks()  # under a launcher: logs, preflight reports and plans from rank 0 only
        plan = self.resume_plan()  # before anything is built, loaded or written
        if plan.finished is not None:
            if is_main_process():
                print(finished_message(self.recipe.train.output_dir, plan.finished), flush=True)
            return plan.finished
        self.bootstrap()
        check_budget(self.recipe, force=self.force)  # before any weight is loaded (nvila_ft.plan)
        self.load_model()
        self.load_data()
        self.build_trainer()
        if self.trainer.args.should_save:  # rank 0 of a launch
            remove_stale(plan.stale)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))
            self.processor.save_pretrained(self.output_dir)
            (self.output_dir / "run_info.json").write_text(json.dumps(run_info(self.recipe), indent=2))
        started = time.time()
        self._in_train = True
        try:
            if plan.trained:
                # Training reached its target in the checkpoint, the end of the run did not happen. Trainer.train
                # would run one more step (it checks the target after a step): load adapter and state as its resume does.
                logger.info("%s reached the target step; finishing the run without training", plan.checkpoint)
                self.model.load_adapter(plan.checkpoint, adapter_name="default", is_trainable=True)
                self.trainer.state = TrainerState.load_from_json(os.path.join(plan.checkpoint, "trainer_state.json"))
                this_call = {}
            else:
                if plan.checkpoint and self.trainer.adapter_sources is not None:  # FSDP: before wrapping
                    self.model.load_adapter(plan.checkpoint, adapter_name="default", is_trainable=True)
                this_call = self.trainer.train(resume_from_checkpoint=plan.checkpoint).metrics
        finally:
            self._in_train = False
        self.trainer.save_model(str(self.output_dir))
        state = self.trainer.state
        # The whole run's figures (across resumes) from the trainer state; speeds and runtime of this call.
        train = {**this_call, "train_loss": whole_run_loss(state.log_history), "global_step": state.global_step,
                 "max_steps": state.max_steps, "num_train_epochs": state.num_train_epochs, "epoch": state.epoch}
        metrics = {"train": train, "train_samples": len(self.train_samples),
                   "bad_rows_in_training": len(read_bad_rows(self.output_dir))}
        if getattr(self, "prune_stats", None):
            metrics["prune"] = self.prune_stats
        eval_metrics = self.final_evaluation()
        if eval_metrics:
            metrics["eval"] = eval_metrics
        if state.best_model_checkpoint:
            metrics["best"] = {"checkpoint": Path(state.best_model_checkpoint).name,
                               "metric": self.trainer.args.metric_for_best_model, "value": state.best_metric}
        if self.trainer.args.should_save:
            self.trainer.save_state()  # trainer_state.json: the whole log history, for the curve and the app
            tmp = self.output_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            os.replace(tmp, self.output_dir / "metrics.json")
            print(json.dumps(metrics, indent=2), flush=True)
            LossCurve(self.output_dir, self.metric_name).draw(state)  # with the final evaluation
            self.write_model_card()
            print(summary_line(state, metrics, time.time() - started, self.output_dir,
                               self.metric_name or task_metric(state.log_history)), flush=True)
        if self.recipe.train.push_to_hub:
            url = self.trainer.push_to_hub(commit_message=f"nvila-ft: {self.output_dir.name}, step {state.global_step}")
            logger.info("pushed %s to %s", self.output_dir, url)
        if self.trainer.args.should_save:  # the last line: where the results are
            out = Path(self.recipe.train.output_dir)  # as the user wrote it
            print(f"adapter {out / ADAPTER}, metrics {out / 'metrics.json'}, model card {out / 'README.md'}",
                  flush=True)
        return metrics

    def final_evaluation(self) -> dict:
        """The eval metrics of the model the run folder holds, `eval_` dropped (loss, answer metrics, step).

        The Trainer already evaluated at the last step when `eval.eval_steps` is set, and at the best step
        when it loaded the best checkpoint: those numbers (and predictions) are reused, not recomputed.
        Otherwise the Trainer evaluates now (logged like a periodic evaluation, at the last step).
        """
        if not self.eval_loss_samples:
            return {}
        state, args = self.trainer.state, self.trainer.args
        step = state.global_step
        if args.load_best_model_at_end and state.best_model_checkpoint:
            step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
        done = [h for h in state.log_history if h.get("step") == step and "eval_loss" in h]
        if done:
            entry = done[-1]
            predictions = self.output_dir / f"predictions_step{step}.jsonl"
            if predictions.is_file() and args.should_save:
                shutil.copyfile(predictions, self.output_dir / "predictions_final.jsonl")
        else:
            entry = self.trainer.evaluate()
        skip = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
        result = {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and k not in skip}
        return {**result, "step": step}

    def write_model_card(self) -> Path:
        """`README.md` in the run folder (after PEFT's own adapter card, which it replaces)."""
        from nvila_ft.model_card import write_model_card

        data = "in-memory samples (Python API)" if self.given_samples[0] is not None else None
        metric = self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "custom")
        return write_model_card(self.output_dir, train_samples=len(self.train_samples),
                                eval_samples=len(self.eval_samples), data_source=data, metric=metric,
                                steps=self.trainer.state.global_step if self.trainer else None,
                                epochs=self.trainer.state.epoch if self.trainer else None)
