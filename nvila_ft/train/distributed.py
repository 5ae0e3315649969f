"""More than one process: the main process, quiet logs on the others, evaluation sharded across ranks.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 2 -m nvila_ft.train recipes/quickstart.yaml
    accelerate launch --multi_gpu --num_processes 2 -m nvila_ft.train recipes/quickstart.yaml   # no GPU: 2 CPU ranks (gloo)

Training itself is data parallel through `transformers.Trainer` / accelerate (DDP, FSDP or DeepSpeed ZeRO, chosen
by the accelerate config in `recipes/accelerate/`). What is NVILA-specific lives here: logs, tables and run files
come from rank 0; the generation-based evaluation gives each rank its slice of the questions and gathers the
answers, so N ranks generate each answer once and score the rows a single process scores; and under FSDP the
peft adapter (LoRA + the trained copies of projector and LayerNorms) is saved and resumed without peft's
rank-0-only collectives (:class:`ShardedAdapterSaves`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from nvila_ft.evaluate import generate_answers, score_answers

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process: from torch.distributed once initialized, else from the
    launcher's `RANK` / `WORLD_SIZE` (torchrun, accelerate launch), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the one that logs, prints and writes run files."""
    return rank_and_world()[0] == 0


def quiet_other_ranks(level: int = logging.WARNING) -> None:
    """On every rank but 0, raises the log level to `level` (preflight reports, memory plans and progress lines
    appear once) and turns off transformers' progress bars. Warnings and errors still show on every rank."""
    if is_main_process():
        return
    logging.getLogger().setLevel(level)
    for name in ("nvila_ft", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def sharded_launch() -> bool:
    """True when `accelerate launch` shards the weights (FSDP, or DeepSpeed ZeRO-3), read from the launcher's
    environment before the model loads."""
    from nvila_ft.plan.sharding import launch_layout

    return launch_layout()[1] in ("fsdp", "zero3")


def shard(items: Sequence, rank: int, world: int) -> list:
    """This rank's slice, strided (`items[rank::world]`): slices differ by at most one item, and the rows of a
    sorted eval set (similar lengths together) spread evenly over the ranks."""
    return list(items[rank::world])


def unshard(parts: Sequence[Sequence]) -> list:
    """Inverse of :func:`shard`: the per-rank slices (in rank order) back in the original item order."""
    out: list = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def gather_objects(obj) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (picklable objects; gloo and NCCL)."""
    _, world = rank_and_world()
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def unwrapped_named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """`model.named_parameters()` without the prefixes FSDP and activation checkpointing insert
    (`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`), so the per-part rules that read names
    (:func:`nvila_ft.train.tuning.param_groups`) work on a wrapped model. FSDP shows the original parameters
    only with `fsdp_use_orig_params: true` (recipes/accelerate/fsdp.yaml)."""
    for name, p in model.named_parameters():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, p


class Unwrapped:
    """A view of `model` whose `named_parameters()` is :func:`unwrapped_named_parameters`, for code that reads a
    module's parameter names (`param_groups(Unwrapped(model), train)`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return unwrapped_named_parameters(self.model)


def forwards_are_collective(model_wrapped) -> bool:
    """True when the model's forwards gather sharded weights across ranks: an FSDP-wrapped model, or a DeepSpeed
    engine at ZeRO stage 3. Then all ranks must run the same forwards in the same order, so
    :func:`sharded_evaluate` has every rank generate every row (a greedy decode gives identical answers, and
    the same number of forwards, on every rank) instead of a slice each."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model_wrapped, FSDP):
        return True
    stage = getattr(model_wrapped, "zero_optimization_stage", None)
    return callable(stage) and stage() == 3


def full_parameters(model_wrapped) -> contextlib.AbstractContextManager:
    """Context in which an FSDP-wrapped model holds its full weights on every rank (generation calls the
    unwrapped model, outside the root FSDP forward that would gather the root's own weights: the embeddings);
    a no-op otherwise. The full weights then occupy each GPU for the evaluation."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model_wrapped, FSDP):
        return FSDP.summon_full_params(model_wrapped, writeback=False, recurse=True)
    return contextlib.nullcontext()


def sharded_evaluate(
    model,
    processor,
    samples: Sequence[dict],
    metric: str | Callable = "vqa_rad",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    model_wrapped=None,
) -> tuple[dict, list[dict]]:
    """:func:`nvila_ft.evaluate.evaluate_samples` across all ranks: each rank generates the answers of its
    :func:`shard` of `samples`, the answers are gathered (every rank gets all) and every rank scores the full
    list, so metrics and rows equal those of one process (same greedy answers, same order).

    Args:
        model: the unwrapped model (a `PeftModel` around NVILA), on this rank's device.
        samples, metric, max_new_tokens, batch_size: as for `evaluate_samples`; every rank passes the same list.
        model_wrapped: the engine-wrapped model (`Trainer.model_wrapped`); under FSDP / ZeRO-3 every rank
            generates every row (:func:`forwards_are_collective`). None outside a Trainer.

    Returns:
        (metrics, rows), identical on every rank.
    """
    rank, world = rank_and_world()
    if world == 1 or forwards_are_collective(model_wrapped):
        with full_parameters(model_wrapped):
            answers = generate_answers(model, processor, samples, max_new_tokens, batch_size, progress=rank == 0)
        return score_answers(samples, answers, metric)
    mine = generate_answers(model, processor, shard(samples, rank, world), max_new_tokens, batch_size,
                            progress=rank == 0)
    answers = unshard(gather_objects(mine))
    logger.info("evaluation: %d rows over %d ranks (%d on rank 0)", len(answers), world, len(mine))
    return score_answers(samples, answers, metric)


# ---------------------------------------------------------------------------------------------- FSDP + peft saves
def adapter_sources(peft_model) -> dict[str, str]:
    """Where each tensor of the peft adapter comes from: {adapter key: model state-dict key}, read from peft's own
    `get_peft_model_state_dict` on the model before FSDP wraps it (peft returns the state dict's tensors
    themselves, so identity maps them back). LoRA keys and the `modules_to_save` copies (projector, LayerNorms).

    Raises:
        RuntimeError: peft transformed a tensor instead of selecting it (it selects them for LoRA +
            modules_to_save, the kit's default tuning, as tests/test_multigpu.py checks; others are untested).
    """
    from peft import get_peft_model_state_dict

    full = peft_model.state_dict()
    by_id = {id(v): k for k, v in full.items()}
    adapter = get_peft_model_state_dict(peft_model, state_dict=full)
    missing = [k for k, v in adapter.items() if id(v) not in by_id]
    if missing:
        raise RuntimeError(f"FSDP adapter save: peft computed {missing[:3]} instead of selecting model tensors")
    return {k: by_id[id(v)] for k, v in adapter.items()}


class ShardedAdapterSaves:
    """`Trainer` overrides that save and resume the peft adapter of an FSDP-wrapped model (mixed in before
    `Trainer`; inactive, i.e. plain Trainer behaviour, while `adapter_sources` is None: DDP, DeepSpeed, one process).

    Why: peft's adapter state dict asks each `modules_to_save` copy for its `state_dict()` key names; under FSDP
    those copies are FSDP units (peft's wrap policy gives every trainable leaf its own unit, one dtype per flat
    parameter), so that call is an all-gather. Trainer runs peft's save on rank 0 only (and accelerate's
    `save_fsdp_model(adapter_only=True)` on every rank against a state dict that `rank0_only` left empty on the
    others): the ranks' collectives no longer match and gloo / NCCL abort ("Received data size doesn't match").
    Here the adapter keys are mapped once before wrapping (:func:`adapter_sources`); a save takes the full state
    dict that `Trainer.save_model` gathers on rank 0 (accelerate: FULL_STATE_DICT, offloaded to CPU) and writes
    `adapter_model.safetensors` + `adapter_config.json` as peft would, with no further collective. A resume
    loads that adapter before the model is wrapped (`TrainingRun.run`), and FSDP's optimizer state as Trainer does.
    """

    adapter_sources: dict[str, str] | None = None

    def _save(self, output_dir=None, state_dict=None):
        if self.adapter_sources is None or state_dict is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        import copy

        from safetensors.torch import save_file
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_file({k: state_dict[src].contiguous() for k, src in self.adapter_sources.items()},
                  os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_model = self.accelerator.unwrap_model(self.model)
        config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = peft_model.base_model.model.__dict__.get("name_or_path")
        base = type(peft_model.base_model.model)
        config.save_pretrained(output_dir, auto_mapping_dict=None if config.task_type else {
            "base_model_class": base.__name__, "parent_library": base.__module__})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.adapter_sources is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The adapter is in the checkpoint already (_save); accelerate's save_fsdp_model would run peft's state
        # dict on the wrapped model (see the class docstring). Optimizer (gathered) and scheduler as Trainer saves them.
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.adapter_sources is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # FSDP: the adapter was loaded into the model before the Trainer wrapped it (TrainingRun.run, peft's
        # load_adapter), as for a fresh run; accelerate's load_fsdp_model would look for pytorch_model_fsdp.bin.
        # The optimizer (optimizer.bin) and scheduler load as Trainer loads them.
        return None
