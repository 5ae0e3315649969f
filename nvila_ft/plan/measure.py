"""The fit check: real training steps on this machine's GPU, with random weights, beside the memory plan.

    python -m nvila_ft.plan recipes/medical.yaml --measure --steps 3        # nothing is downloaded
    python -m nvila_ft.plan recipes/medical.yaml --measure --gpu-memory 24  # cap the allocator at 24 GiB

The recipe is loaded as training loads it (`TrainingRun.load_model`: quantization, k-bit preparation,
gradient checkpointing, LoRA + LayerNorm tuning, fp32 trainables) but with `model.init=random`
(:mod:`nvila_ft.model.random_init`: the checkpoint's config, seeded random weights built on the GPU). The
sample is the one the plan prices as the worst case: an image of the worst aspect ratio (random pixels) at
the recipe's tiling, or text only, with an answer long enough to fill the planned LLM length, so every
text token but the prompt's is a label. Each step: forward under the recipe's autocast, backward, AdamW
step (the optimizer's parameter groups from `param_groups`), after one warm-up step that creates the AdamW
states of every trainable. Measured: `torch.cuda.max_memory_allocated` and `max_memory_reserved` over the timed steps, the
process's device memory beyond the allocator (CUDA context, cuBLAS / bitsandbytes workspaces: what the plan's
CUDA allowance stands for), samples/s and LLM tokens/s. The plan is recomputed for the exact sample measured
(`plan_recipe(text_tokens=..., label_tokens=...)`) so both sides price the same tokens.

On a CPU the same steps run (tiny or reduced models; labelled CPU): there is no allocator to ask, so the
"measured peak" is the exact bytes of parameters, gradients and AdamW states plus the distinct storages
autograd saves for backward, against the matching plan terms.

Under a data-parallel launch (the training launcher: `accelerate launch --config_file
recipes/accelerate/multi_gpu.yaml --num_processes N -m nvila_ft.plan RECIPE --measure`) every rank measures its own
GPU with the model in accelerate's DDP wrapper (gradient all-reduce and its buckets included), the plan prices one
GPU of the launch, and rank 0 prints. FSDP / ZeRO launches are refused (`--num-gpus N --strategy S` plans them).
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch
from PIL import Image

from nvila_ft.plan.memory import GiB
from nvila_ft.plan.report import plan_recipe
from nvila_ft.plan.sharding import launch_layout

QUESTION = "Describe."  # short: the plan's worst case counts every text token as a label
FILLER = "yes"


def random_recipe(recipe):
    """A copy of `recipe` with `model.init=random`, no eval and no preflight (the sample is built here), and
    one sample per sequence (no shared-prefix group or pack, so the plan prices no 4D mask either)."""
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"init": "random"}),
        "eval": recipe.eval.model_copy(update={"enabled": False}),
        "data": recipe.data.model_copy(update={"preflight": False, "share_prefix": False, "packing": False}),
    })


def worst_case_sample(processor, plan) -> tuple[list[dict], list[Image.Image]]:
    """The conversation and images of the plan's worst-case sample (image or text only), text filling
    `plan.sample.llm_tokens` with an answer (labels). Raises ValueError for a video sample."""
    s = plan.sample
    if s.media == "video":
        raise ValueError("--measure builds image and text samples; for a video recipe measure its image or "
                         "text case (e.g. model.num_video_frames=null) or train a few steps with model.init=random")
    images, sizes, prompt = [], [], QUESTION
    if s.media == "image":
        w, h = s.image_size
        rng = torch.Generator().manual_seed(0)
        images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())]
        sizes, prompt = [(w, h)], "<image>\n" + QUESTION

    def conv(k: int) -> list[dict]:
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": " ".join([FILLER] * k)}]

    low, high = 1, max(2, s.llm_tokens)  # the most filler words that keep the sample within llm_tokens
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if processor.num_tokens(conv(mid), sizes) <= s.llm_tokens else (low, mid - 1)
    return conv(low), images


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward (the CPU stand-in for the allocator peak)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude if t.device.type != "meta"}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def state_bytes(model, optimizer) -> dict[str, int]:
    """Exact bytes of parameters (incl. nf4 quantization constants), gradients and optimizer states."""
    seen, weights = set(), 0
    for p in model.parameters():
        tensors = [p]
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            if key not in seen:
                seen.add(key)
                weights += t.untyped_storage().nbytes()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1)
    return {"weights": weights, "gradients": grads, "optimizer": states}


def run_steps(run, batch: dict, steps: int) -> dict:
    """`steps` timed training steps (after one warm-up) of `run.model` on `batch`; bytes and seconds."""
    from nvila_ft.train.tuning import param_groups

    model, recipe = run.model, run.recipe
    model.train()
    wrapped, backward = model, torch.Tensor.backward
    if launch_layout()[0] > 1:  # data-parallel launch: the DDP wrapper training runs under (see the module doc)
        from accelerate import Accelerator

        accelerator = Accelerator()
        wrapped, backward = accelerator.prepare_model(model), accelerator.backward
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    groups = param_groups(model, recipe.train)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "name")} for g in groups])
    mp = recipe.train.resolved_mixed_precision()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    cuda = device.type == "cuda"
    meter = SavedTensorMeter(list(model.parameters()))
    times, static = [], {}
    for step in range(steps + 1):  # step 0 warms up (creates the AdamW states, loads kernels)
        if cuda and step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        hooks = (torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t)
                 if not cuda and step == steps else contextlib.nullcontext())
        with autocast, hooks:
            loss = wrapped(**batch).loss
        backward(loss)
        if step == 0:  # AdamW states for every trainable, as training has them once any sample reached it
            for p in model.parameters():  # (a text-only sample sends no gradient to the projector)
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        if step == steps:
            static = state_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {"step_seconds": times, "static": static, "loss": float(loss.detach().float()),
           "saved_bytes": meter.bytes, "torch_device": str(device),
           "vocab": inner.llm.get_output_embeddings().weight.shape[0]}
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        out.update(max_allocated=torch.cuda.max_memory_allocated(device),
                   max_reserved=torch.cuda.max_memory_reserved(device),
                   beyond_allocator=(total - free) - torch.cuda.memory_reserved(device), device_total=total)
    del optimizer
    return out


def measure_recipe(recipe, steps: int = 3, memory_cap_gib: float | None = None) -> dict:
    """Loads `recipe` with random weights, runs `steps` training steps on its worst-case sample, returns
    measured and planned bytes (see the module doc).

    Args:
        recipe: a :class:`~nvila_ft.train.recipe.Recipe` (its `model.init` is set to random here).
        steps: timed steps after one warm-up step.
        memory_cap_gib: CUDA only: cap this process's allocator at this many GiB
            (`torch.cuda.set_per_process_memory_fraction`) to test a smaller card on a bigger one; an
            out-of-memory error is then a result (`"oom": true`), not a crash.

    Returns:
        dict with `measured_bytes` / `predicted_bytes` / `error_pct` (allocated peak on CUDA, state + saved
        bytes on CPU), `max_reserved`, `beyond_allocator` (CUDA), `samples_per_s`, `tokens_per_s`,
        `llm_tokens`, `vision_tiles`, `oom`, the plan of the measured sample (`plan`) and more.
    """
    from nvila_ft.train.trainer import TrainingRun

    num_gpus, strategy = launch_layout()
    if strategy != "ddp":
        raise ValueError(f"--measure measures data-parallel launches; this one is {strategy}: plan it with "
                         f"--num-gpus {num_gpus} --strategy {strategy}, or train a few steps with model.init=random")
    recipe = random_recipe(recipe)
    worst = plan_recipe(recipe, num_gpus=num_gpus, strategy=strategy)
    run = TrainingRun(recipe)
    cuda = torch.cuda.is_available()
    if cuda and memory_cap_gib:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * GiB / total))
    result = {"model": recipe.model.path, "tune": recipe.tune.model_dump(), "memory_cap_gib": memory_cap_gib,
              "ranks": num_gpus,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "oom": False, "steps": steps}
    try:
        model, processor = run.load_model()
        conversation, images = worst_case_sample(processor, worst)
        batch = processor.collate([processor(conversation, images)] * recipe.train.per_device_train_batch_size)
        n_text = int(batch["input_ids"].shape[1]) - len(images)  # minus the <image> placeholders
        n_label = int((batch["labels"][:1, 1:] != -100).sum())  # rows per sample the forward sends through lm_head
        plan = plan_recipe(recipe, text_tokens=n_text, label_tokens=n_label, num_gpus=num_gpus, strategy=strategy)
        measured = run_steps(run, batch, steps)
        del model
    except torch.OutOfMemoryError as err:
        result.update(oom=True, error=str(err).splitlines()[0], plan=worst.to_dict(),
                      predicted_bytes=worst.allocated)
        return result
    finally:
        run.model = None  # free the device for the next measurement (the caller's gc.collect)
        gc.collect()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    step = sum(measured["step_seconds"]) / len(measured["step_seconds"])
    static = measured.pop("static")
    by_group = {g: sum(t.bytes for t in plan.terms if t.group == g) for g in ("weights", "gradients", "optimizer")}
    predicted_static = sum(by_group.values())
    result.update(measured, llm_tokens=plan.sample.llm_tokens, vision_tiles=plan.sample.vision_tiles,
                  text_tokens=n_text, label_tokens=n_label, sample=plan.sample.detail,
                  samples_per_s=round(plan.batch_size / step, 4),
                  tokens_per_s=round(plan.batch_size * plan.sample.llm_tokens / step, 1),
                  measured_static_bytes=sum(static.values()), predicted_static_bytes=predicted_static,
                  static=static, predicted_static=by_group, plan=plan.to_dict(), planned_total_bytes=plan.total)
    if cuda:
        measured_bytes, predicted = measured["max_allocated"], plan.allocated
        result["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        vocab = measured["vocab"]
        log_probs = 4 * plan.batch_size * n_label * vocab  # saved by cross-entropy's log_softmax, at the labelled rows only
        measured_bytes = sum(static.values()) + measured["saved_bytes"]
        predicted = predicted_static + sum(t.bytes for t in plan.terms if t.group == "activations") + log_probs
        result["peak_kind"] = "cpu: state bytes + autograd-saved bytes (no allocator peak)"
    result.update(measured_bytes=measured_bytes, predicted_bytes=predicted,
                  error_pct=round(100 * (predicted - measured_bytes) / measured_bytes, 2))
    return result


def measurement_table(r: dict) -> str:
    """The measured-vs-planned table `python -m nvila_ft.plan --measure` prints."""
    g = lambda b: f"{b / GiB:8.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:8.1f} MiB"  # noqa: E731
    where = r["device"] + (f", allocator capped at {r['memory_cap_gib']:g} GiB" if r.get("memory_cap_gib") else "")
    ranks = f", rank 0 of {r['ranks']} (DDP)" if r.get("ranks", 1) > 1 else ""
    lines = [f"fit check: {r['model']} on {where}{ranks}, random weights (model.init=random), {r['steps']} steps"]
    if r["oom"]:
        lines += [f"  OUT OF MEMORY: {r['error']}", f"  planned allocated peak {g(r['predicted_bytes'])}"]
        return "\n".join(lines)
    lines += [f"  sample: {r['sample']}; LLM {r['llm_tokens']} tokens ({r['label_tokens']} labels), "
              f"{r['vision_tiles']} vision tiles", f"  {'':<34}{'measured':>12}{'planned':>14}{'error':>9}"]
    if r["device"] == "cpu":
        lines.append(f"  {'CPU: state + autograd-saved bytes':<34}{g(r['measured_bytes'])}{g(r['predicted_bytes'])}"
                     f"{r['error_pct']:+8.1f}%")
    else:
        lines.append(f"  {'peak allocated':<34}{g(r['measured_bytes'])}{g(r['predicted_bytes'])}"
                     f"{r['error_pct']:+8.1f}%")
        used = r["max_reserved"] + r["beyond_allocator"]
        lines += [f"  {'peak reserved':<34}{g(r['max_reserved'])}",
                  f"  {'+ context/workspaces (outside)':<34}{g(r['beyond_allocator'])}",
                  f"  {'= card memory used':<34}{g(used)}{g(r['planned_total_bytes'])}"
                  f"{100 * (r['planned_total_bytes'] - used) / used:+8.1f}%"]
    lines.append(f"  {'weights + grads + AdamW (exact)':<34}{g(r['measured_static_bytes'])}"
                 f"{g(r['predicted_static_bytes'])}")
    lines.append(f"  speed: {r['samples_per_s']:.3f} samples/s, {r['tokens_per_s']:.0f} LLM tokens/s "
                 f"(batch {r['plan']['batch_size']}); loss {r['loss']:.3f}")
    return "\n".join(lines)
