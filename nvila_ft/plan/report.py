"""Memory planner: a training run's peak GPU memory, predicted from its recipe without loading weights.

    python -m nvila_ft.plan recipes/medical.yaml                      # table; fits 24 GiB?
    python -m nvila_ft.plan recipes/medical.yaml tune.llm=lora --gpu-memory 40 --json
    python -m nvila_ft.plan recipes/medical.yaml --num-gpus 8 --strategy zero3   # one GPU of 8

The model is built on PyTorch's `meta` device from the checkpoint's `config.json` (a local folder, or the
configs shipped in `nvila_ft/model/configs/` for the official hub ids), the recipe's tuning is applied with the
same code training uses (`nvila_ft.train.tuning.apply_tuning`, peft), and every parameter is priced in the dtype
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

import torch

from nvila_ft.cli_errors import user_errors
from nvila_ft.model.media import MediaConfig
from nvila_ft.plan.memory import (
    CUDA_ALLOWANCE,
    DTYPE_BYTES,
    OPTIMIZER_STATES,
    GiB,
    ParameterRow,
    Sample,
    checkpoint_config,
    image_samples,
    llm_layer_bytes,
    lora_target_short_names,
    meta_model,
    parameter_rows,
    projector_bytes,
    shipped_configs,
    text_sample,
    unwrap,
    video_sample,
    vision_layer_bytes,
)
from nvila_ft.train.tuning import apply_tuning, release_full_originals, used_vision_layers

logger = logging.getLogger(__name__)


class MemoryBudgetError(RuntimeError):
    """The predicted peak exceeds the GPU memory budget; the message lists the largest terms and fixes."""


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
    num_gpus: int = 1
    strategy: str = "ddp"

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
            "num_gpus": self.num_gpus, "strategy": self.strategy,
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
            f"LLM {s.llm_tokens} tokens; batch {self.batch_size}"
            + (f" per GPU; {self.num_gpus} GPUs, {self.strategy} (GiB per GPU)" if self.num_gpus > 1 else ""),
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

    from nvila_ft.model.checkpoint import DTYPES

    config, tok_len, source = checkpoint_config(path)
    model = meta_model(config, tok_len, DTYPES[dtype])
    tune_ns = SimpleNamespace(**dict(tune))
    lora_ns = SimpleNamespace(**dict(lora))
    recipe_like = SimpleNamespace(model=SimpleNamespace(dtype=dtype), tune=tune_ns, lora=lora_ns)
    targets = {part: lora_target_short_names(model, part, recipe_like) for part in ("llm", "vision_tower")}
    tuned = apply_tuning(model, tune_ns, lora_ns)
    release_full_originals(tuned, tune_ns)  # as training does
    rows = parameter_rows(tuned, recipe_like, mp)
    return config, tok_len, source, unwrap(tuned), rows, targets


def plan_recipe(recipe, gpu_memory_gb: float | None = None, text_tokens: int | None = None,
                num_frames: int | None = None, temporal_pool: tuple[int, int, int] | None = None,
                label_tokens: int | None = None, num_gpus: int = 1, strategy: str = "ddp") -> MemoryPlan:
    """Predicts the peak GPU memory of training with `recipe`, without loading weights.

    Args:
        recipe: a :class:`~nvila_ft.train.recipe.Recipe`.
        gpu_memory_gb: budget in GiB to judge against (None: no verdict).
        text_tokens: plan a sample with this many text tokens instead of one that fills `data.max_length`.
        num_frames, temporal_pool: also plan a video sample (default: the recipe's `model.num_video_frames`
            and `model.temporal_pool` when the recipe has them); the worse sample counts.
        label_tokens: answer tokens per sample (labels != -100) for the logits/loss buffer; None: every
            text token of the sample (the bound for a sample of many turns).
        num_gpus, strategy: price one GPU of `num_gpus` under `ddp`, `fsdp`, `zero2` or `zero3`
            (:func:`nvila_ft.plan.sharding.shard_terms`); the default is one GPU.

    Raises:
        ValueError: `strategy` not one of ddp / fsdp / zero2 / zero3, or `num_gpus` < 1.

    Returns:
        :class:`MemoryPlan`. Peak = weights + gradients + optimizer states + autocast weight copies
        + activations kept for backward (vision tower, projector, LLM) + the larger of the logits/loss
        buffer and one LLM layer's recompute + backward working set + the CUDA allowance.

    Raises:
        FileNotFoundError: the checkpoint config cannot be found (see :func:`checkpoint_config`).
        ValueError: the recipe's media alone exceed `data.max_length`.
    """
    m, tune, lora, train = recipe.model, recipe.tune, recipe.lora, recipe.train
    mp = recipe.train.resolved_mixed_precision(gpu_bf16=True)
    lora_key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in lora.model_dump().items()))
    config, tok_len, source, model, rows, targets = _parameters(
        m.path, m.dtype, tuple(sorted(tune.model_dump().items())), lora_key, mp)
    act = 2 if mp in ("bf16", "fp16") else DTYPE_BYTES[m.dtype]
    batch = train.per_device_train_batch_size
    # DPO (nvila_ft.train.preference): each row is two LLM sequences (chosen, rejected) sharing one media encoding;
    # the reference forward runs without grad (nothing kept, no extra weights: the base under disable_adapter).
    seqs = 2 if train.objective == "dpo" else 1
    n_end = len(config.end_token_ids or [198])
    media = MediaConfig.from_recipe(config, recipe).replace(num_video_frames=num_frames, temporal_pool=temporal_pool)
    samples = [*image_samples(media, n_end, text_tokens), text_sample(media.max_length, text_tokens)]
    if num_frames or m.num_video_frames:  # the recipe (or the caller) trains on videos
        samples.append(video_sample(media, n_end, text_tokens))
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
        n_llm = seqs * batch * sample.llm_tokens
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
                      f"{llm_layers} layers x {n_llm} tokens{' (chosen + rejected)' if seqs == 2 else ''}, "
                      f"GC {'on' if gc.llm else 'off'}",
                      llm_off if gc.llm else llm_on))
        if (recipe.data.share_prefix or recipe.data.packing) and recipe.train.objective == "sft":
            # Shared-prefix groups and packs (nvila_ft.data.grouping) are at most max_length long and at most
            # `batch` per micro-batch, so the sequences priced here bound them; what they add is the 4D mask,
            # one (L, L rounded up to 16) tensor in the compute dtype per row, shared by all layers.
            length = sample.llm_tokens
            out.append(Term("activations", "attention mask", batch * length * (-(-length // 16) * 16) * act,
                            f"{batch} x {length}^2 (data.share_prefix / data.packing; the worst group or pack "
                            "fills max_length)"))
        vocab = model.llm.get_output_embeddings().weight.shape[0]
        # Training applies lm_head only where a label is predicted (NvilaForConditionalGeneration._label_only_loss).
        # Worst case: every text token of the sample is an answer token (a multi-turn sample can come close), so
        # the bound is the sample's text share, llm_tokens - media_tokens; media rows never carry a label.
        text = sample.llm_tokens - sample.media_tokens
        n_label = seqs * batch * (text if label_tokens is None else min(label_tokens, text))
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
    from nvila_ft.plan.sharding import shard_terms

    terms = shard_terms(terms, num_gpus, strategy, tc.num_hidden_layers)  # one GPU of num_gpus (1: unchanged)
    terms.append(Term("cuda", "context + allocator allowance", CUDA_ALLOWANCE, "fixed"))
    budget = None if gpu_memory_gb is None else int(gpu_memory_gb * GiB)
    return MemoryPlan(
        model=m.path, source=source, tune={**tune.model_dump(), "lora_r": lora.r, "mixed_precision": mp},
        sample=sample, batch_size=batch, parameters=rows, terms=terms, budget_bytes=budget,
        gradient_checkpointing=gc.model_dump(), num_gpus=num_gpus, strategy=strategy)


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
    from nvila_ft.train.recipe import Recipe
    from nvila_ft.train.recipe_io import apply_overrides

    out = []
    data = recipe.model_dump()
    for fix in candidate_fixes(recipe, plan):
        try:
            fixed = Recipe.model_validate(apply_overrides(data, [fix]))
            out.append((fix, plan_recipe(fixed, num_gpus=plan.num_gpus, strategy=plan.strategy).total / GiB))
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
    CPU-only machine) the check is skipped and None returned. Under a launcher the plan is per GPU of the
    launch (`WORLD_SIZE` GPUs, the strategy of the accelerate config: :func:`nvila_ft.plan.sharding.launch_layout`).

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
    from nvila_ft.plan.sharding import launch_layout

    num_gpus, strategy = launch_layout()  # under accelerate launch / torchrun: one GPU of the launch
    plan = plan_recipe(recipe, gpu_memory_gb=budget, num_gpus=num_gpus, strategy=strategy)
    logger.info("memory plan: predicted peak %.1f GiB of %.1f GiB (%s)", plan.total / GiB, budget,
                ", ".join(f"{t.name} {t.bytes / GiB:.1f}" for t in plan.largest(3)))
    if not plan.fits:
        message = refusal_message(recipe, plan)
        if not force:
            raise MemoryBudgetError(message)
        logger.warning("--force: training although %s", message.splitlines()[0])
    return plan


# ---------------------------------------------------------------------------------------------- CLI
@user_errors
def main(argv: list[str] | None = None) -> int:
    from nvila_ft.train.recipe import RecipeError
    from nvila_ft.train.recipe_io import load_recipe

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
    parser.add_argument("--measure", action="store_true", help="fit check: run real training steps with random "
                        "weights on this machine's GPU (nothing downloaded), measured peak beside the plan")
    parser.add_argument("--steps", type=int, default=3, help="--measure: timed steps after one warm-up step")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="price one GPU of N (all nodes' GPUs; see recipes/accelerate/)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp", "zero2", "zero3"), default="ddp",
                        help="how N GPUs share the model: ddp (whole copies), fsdp / zero3 (all sharded), "
                        "zero2 (gradients and optimizer sharded)")
    args = parser.parse_intermixed_args(argv)  # options before or after the overrides
    logging.basicConfig(level=logging.WARNING)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        budget = args.gpu_memory or recipe.train.gpu_memory_gb or device_memory_gb() or 24.0
        plan = plan_recipe(recipe, gpu_memory_gb=budget, text_tokens=args.text_tokens, label_tokens=args.label_tokens,
                           num_gpus=args.num_gpus, strategy=args.strategy)
    except (RecipeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.measure:
        from nvila_ft.plan.measure import measure_recipe, measurement_table

        try:
            result = measure_recipe(recipe, args.steps, memory_cap_gib=args.gpu_memory)
        except ValueError as err:  # an FSDP / ZeRO launch
            print(f"error: {err}", file=sys.stderr)
            return 2
        from nvila_ft.train.distributed import is_main_process

        if is_main_process():  # under a launch every rank measures, rank 0 prints
            print(json.dumps(result, indent=2) if args.json else measurement_table(result))
        return 0
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(plan.table())
    if not plan.fits:
        print("\n" + refusal_message(recipe, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
