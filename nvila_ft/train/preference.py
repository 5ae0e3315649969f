"""Preference tuning (DPO) of NVILA on the SFT recipe's parts and learning-rate groups (`train.objective: dpo`).

    accelerate launch --config_file recipes/accelerate/single_process.yaml -m nvila_ft.train recipes/preference.yaml

The policy is the run's peft model (LoRA / QLoRA LLM, LayerNorm vision tower, projector: `apply_tuning` as for SFT);
the reference is the same model under `disable_adapter()`: peft bypasses the LoRA layers and the trained copies of
the `modules_to_save` parts, so the reference is the base checkpoint with no second copy in memory (hence no
`full` mode with DPO: a full part's frozen original is released, see `Recipe._check_dpo`). Everything else is the
SFT path: `NvilaTrainer` (per-part AdamW groups, staged resumable checkpoints, bad-row accounting), the run
folder, metrics.json, loss curve, model card and the preview app.

Why not `trl.DPOTrainer` (trl 1.16) itself: it tokenizes `prompt` / `chosen` / `rejected` with its own
`processing_class` and collator (`completion_mask`), which cannot produce NVILA's inputs (media expanded by
`NvilaProcessor`: `pixel_values` tiles with `block_sizes`, `pixel_values_videos` with frame counts and temporal
pools, the official chat template and placeholder rules); and its loss reads per-token log-probs from
`model(..., fused_lm_head=True)`, a forward that `trl.add_fused_lm_head` patches onto a causal LM's backbone /
`lm_head` layout, which NVILA's media splicing (`NvilaForConditionalGeneration.embed`) does not have. Its loss
is not a standalone function either (inline in `DPOTrainer._compute_loss`, reading the trainer's config), so
:func:`dpo_loss` writes out the same formulas for `sigmoid`, `hinge` and `ipo`, and :func:`sequence_logps` uses
trl's `selective_log_softmax`. The metric names are trl's (`rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`; `eval_` prefixed at evaluation).

A batch is the B chosen sequences then the B rejected ones (2B rows); the prompt's media are encoded once per
forward and spliced into both halves (:func:`_media_twice`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.utils import selective_log_softmax

from nvila_ft.data.pairs import ANSWERS, answer_sample, load_pair_split, preflight_pairs
from nvila_ft.train.dataset import SupervisedDataset, expanded_tokens, video_check
from nvila_ft.train.trainer import NvilaTrainer
from nvila_ft.train.tuning import base_model

logger = logging.getLogger("nvila_ft.train")

MEDIA_KEYS = ("pixel_values", "block_sizes", "pixel_values_videos", "video_frames", "pool_sizes")


# ---------------------------------------------------------------------------------------------- data
class PreferenceDataset(SupervisedDataset):
    """Preference pairs encoded lazily: each item is `{"chosen": encoded, "rejected": encoded}` (processor output
    of the prompt with that answer); a pair that fails is left out of its batch like an SFT row."""

    def count_tokens(self, pair: dict) -> int:
        return max(expanded_tokens(self.processor, answer_sample(pair, k)) for k in ANSWERS)

    def encode(self, pair: dict, media_layout=None) -> dict:
        return {k: super(PreferenceDataset, self).encode(answer_sample(pair, k), media_layout) for k in ANSWERS}

    def collate_encoded(self, features: list[dict]) -> dict:
        """Chosen rows then rejected rows, (2B, L) `input_ids` / `labels`; the media of the B prompts once (the
        rejected halves carry none: both halves of a pair share its prompt's media)."""
        rejected = [{k: v for k, v in f["rejected"].items() if k not in MEDIA_KEYS} for f in features]
        return self.processor.collate([f["chosen"] for f in features] + rejected)


def load_preference_data(run) -> None:
    """`TrainingRun.load_data` for `train.objective: dpo`: pairs loaded (or the Python API's, normalized pairs),
    preflighted; sets `run.train_samples`, `run.eval_loss_samples`, and `run.eval_samples` = [] (no generation
    metrics: a DPO evaluation reports the loss and reward metrics on the eval pairs)."""
    d, recipe = run.recipe.data, run.recipe
    given_train, given_eval = run.given_samples
    train = given_train[: d.max_train_samples] if given_train is not None else load_pair_split(
        d, d.train_split, d.max_train_samples)
    run.prune_stats = None
    run.train_samples = check_pairs(recipe, run.processor, train, "train")
    if not run.train_samples:
        raise RuntimeError(f"{d.path}: no usable preference pairs in split {d.train_split!r}")
    run.eval_loss_samples = []
    if given_eval is not None:
        run.eval_loss_samples = check_pairs(recipe, run.processor, given_eval[: d.max_eval_samples], "eval")
    elif recipe.eval.enabled and d.eval_split and given_train is None:
        run.eval_loss_samples = check_pairs(recipe, run.processor,
                                            load_pair_split(d, d.eval_split, d.max_eval_samples), d.eval_split)
    run.eval_samples = []


def check_pairs(recipe, processor, pairs: list[dict], split: str) -> list[dict]:
    """Preflight of preference pairs per the recipe (`data.preflight`, `data.on_bad_row`); returns the good ones."""
    d = recipe.data
    if not d.preflight:
        return pairs
    report = preflight_pairs(pairs, on_bad_row=d.on_bad_row, length_fn=lambda s: expanded_tokens(processor, s),
                             max_length=processor.max_length, video_check=video_check(recipe, processor))
    logger.info("%s split: %s", split, report.summary().splitlines()[0])
    return report.ok


# ---------------------------------------------------------------------------------------------- loss
@contextmanager
def _media_twice(model):
    """Within: `model.embed` encodes the media of a (chosen; rejected) batch once and splices them into both halves.

    `embed` consumes media in row order; the batch holds the B prompts' media once (`collate_encoded`), so the
    encoders' outputs are returned twice over: rows B..2B-1 get the same embeddings as rows 0..B-1 (and their
    gradients add up), at half the vision tower's compute and activations.
    """
    images, videos = model.media_embeddings, model.video_embeddings
    model.media_embeddings = lambda *args, **kwargs: 2 * images(*args, **kwargs)
    model.video_embeddings = lambda *args, **kwargs: 2 * videos(*args, **kwargs)
    try:
        yield
    finally:
        del model.media_embeddings, model.video_embeddings  # the class's methods again


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's answer tokens, and how many there are.

    Args:
        model: the run's model (a `PeftModel` over NVILA, or NVILA itself); adapters as currently enabled.
        batch: :meth:`PreferenceDataset.collate_encoded` output: `input_ids` / `attention_mask` / `labels` (2B, L)
            and the media of the B prompts.

    Returns:
        logps (2B,) fp32 and tokens (2B,) int64: over the positions whose label is not -100 (answer + `<|im_end|>`),
        logits computed only there and scored with trl's `selective_log_softmax`
        (`NvilaForConditionalGeneration.forward(..., answer_logprob_fn=...)`, called through `model`, so that a DDP /
        FSDP wrapper sees the pass and synchronises the gradients).
    """
    media = {k: batch[k] for k in MEDIA_KEYS if batch.get(k) is not None}
    with _media_twice(base_model(extract_model_from_parallel(model))):  # the NVILA module under DDP / peft
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     answer_logprob_fn=selective_log_softmax, **media)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss (B,) from policy and reference sequence log-probs (B,), as trl 1.16's `DPOTrainer`.

    With r_c = chosen - ref_chosen and r_r = rejected - ref_rejected (log-ratios), d = r_c - r_r:
    sigmoid: -log sigmoid(beta d) (DPO, arXiv 2305.18290 eq. 7); hinge: relu(1 - beta d) (SLiC);
    ipo: (r_c / n_c - r_r / n_r - 1 / (2 beta))^2 with n the answers' token counts (IPO, arXiv 2310.12036 eq. 17,
    length-normalized as trl does).

    Raises:
        ValueError: an unknown `loss_type`, or ipo without token counts.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_loss: loss_type ipo needs chosen_tokens and rejected_tokens")
        normalized = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (normalized - 1 / (2 * beta)) ** 2
    raise ValueError(f"dpo.loss_type {loss_type!r} is not one of sigmoid, hinge, ipo")


# ---------------------------------------------------------------------------------------------- trainer
class NvilaDPOTrainer(NvilaTrainer):
    """`NvilaTrainer` whose loss is DPO's on (chosen; rejected) batches (module docstring).

    Overridden: `compute_loss` (policy and reference log-probs, the loss, the metrics kept for the next log),
    `prediction_step` (eval loss of pairs: Trainer's would look for logits), `log` (the kept metrics averaged into
    the Trainer's log line, as trl's `DPOTrainer.log`).
    """

    dpo_config = None  # the recipe's `dpo` section, set by TrainingRun

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # a mean over pairs: the Trainer divides it for accumulation
        self._dpo_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "bad_rows"}
        beta, loss_type = self.dpo_config.beta, self.dpo_config.loss_type
        logps, tokens = sequence_logps(model, inputs)
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            ref_logps, _ = sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, *tokens.chunk(2))
        rewards_chosen = beta * (chosen - ref_chosen).detach()
        rewards_rejected = beta * (rejected - ref_rejected).detach()
        margins = rewards_chosen - rewards_rejected
        metrics = {"rewards/chosen": rewards_chosen, "rewards/rejected": rewards_rejected, "rewards/margins": margins,
                   "rewards/accuracies": (margins > 0).float(), "logps/chosen": chosen.detach(),
                   "logps/rejected": rejected.detach()}
        kept = self._dpo_metrics["train" if model.training else "eval"]
        for name, value in metrics.items():
            kept[name].append(self.accelerator.gather_for_metrics(value).mean().item())
        loss = losses.mean()
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop("bad_rows", None)
        if inputs["input_ids"].shape[0] == 0:
            return None, None, None
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _get_eval_sampler(self, eval_dataset):
        # Trainer's group_by_length eval sampler measures `item["input_ids"]`; a pair item has two. The dataset's
        # lengths (the preflight's counts) instead, as NvilaTrainer._get_train_sampler does for training.
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(eval_dataset, "lengths"):
            return LengthGroupedSampler(self.args.eval_batch_size, lengths=eval_dataset.lengths,
                                        generator=torch.Generator().manual_seed(self.args.seed))
        return super()._get_eval_sampler(eval_dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        kept = self._dpo_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in kept.items() if v})
        kept.clear()
        super().log(logs, start_time)
