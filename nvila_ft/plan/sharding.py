"""Per-GPU memory under data parallel and sharding: the single-GPU plan's terms divided as each engine divides them.

    python -m nvila_ft.plan recipes/medical.yaml --num-gpus 8 --strategy zero3

Strategies (the launch configs in recipes/accelerate/):
- `ddp`: every GPU holds everything; DDP's reducer adds one flat bucket copy of the trainable gradients.
- `zero2` (DeepSpeed ZeRO-2): gradients and AdamW states split over the GPUs, weights whole.
- `zero3` (DeepSpeed ZeRO-3) and `fsdp` (FSDP FULL_SHARD): weights, gradients and states split; while a layer
  runs its full weights are gathered, two LLM layers at a time (the running one and the prefetched next).
Activations and the logits buffer do not shrink: they belong to each GPU's own batch (per_device_train_batch_size).
Sources: ZeRO paper (Rajbhandari et al. 2020, section 5, Table 1), torch DDP's gradient buckets, FSDP's
`backward_prefetch=BACKWARD_PRE` (one unit prefetched).
"""

from __future__ import annotations

import dataclasses
import os

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")

# Which groups of the plan each strategy divides by the number of GPUs.
SHARDED_GROUPS = {
    "ddp": (),
    "zero2": ("gradients", "optimizer"),
    "zero3": ("weights", "gradients", "optimizer"),
    "fsdp": ("weights", "gradients", "optimizer"),
}


def shard_terms(terms: list, num_gpus: int, strategy: str, llm_layers: int) -> list:
    """The per-GPU terms of a plan for `num_gpus` GPUs under `strategy`.

    Args:
        terms: the single-GPU :class:`~nvila_ft.plan.report.Term` list (bytes).
        num_gpus: data-parallel world size (all GPUs of all nodes), >= 1.
        strategy: one of :data:`STRATEGIES`.
        llm_layers: LLM decoder layers (`text_config.num_hidden_layers`), to price the gathered layers.

    Returns:
        New terms (bytes per GPU): sharded groups divided by `num_gpus` (rounded up), plus the strategy's own
        transient terms (DDP buckets; gathered layers under zero3 / fsdp).

    Raises:
        ValueError: unknown strategy or `num_gpus` < 1.
    """
    from nvila_ft.plan.report import Term

    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if num_gpus < 1:
        raise ValueError(f"--num-gpus {num_gpus}: must be at least 1")
    sharded = SHARDED_GROUPS[strategy] if num_gpus > 1 else ()
    out = []
    for t in terms:
        if t.group in sharded:
            out.append(dataclasses.replace(t, bytes=-(-t.bytes // num_gpus), note=f"{t.note}; 1/{num_gpus} ({strategy})"))
        else:
            out.append(t)
    if num_gpus > 1 and strategy == "ddp":
        grads = sum(t.bytes for t in terms if t.group == "gradients")
        out.append(Term("parallel", "DDP gradient buckets", grads, "one flat copy of the trainable gradients"))
    if num_gpus > 1 and "weights" in sharded:
        llm_weights = sum(t.bytes for t in terms if t.group == "weights" and t.name.startswith("llm"))
        gathered = 2 * llm_weights // max(llm_layers, 1)
        out.append(Term("parallel", "gathered layers", gathered,
                        f"2 of {llm_layers} LLM layers whole (running + prefetched)"))
    return out


def launch_layout() -> tuple[int, str]:
    """(number of GPUs, strategy) of the current launch, read from the launcher's environment: `WORLD_SIZE`
    (torchrun / accelerate launch), `ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED` with
    `ACCELERATE_DEEPSPEED_ZERO_STAGE` (3: zero3, else zero2). (1, "ddp") outside a launcher."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return world, "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return world, "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "zero2"
    return world, "ddp"
