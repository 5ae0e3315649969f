"""Benchmark 3: measured peak memory and samples/s of training steps next to the planner's prediction.

    python benchmarks/gpu_memory.py                      # CUDA: NVILA-Lite-2B and NVILA-8B, bf16 LoRA and QLoRA
    python benchmarks/gpu_memory.py --tiny --steps 2     # CPU: the tiny model (what tests/test_plan.py runs)

Models are random-initialised at the real shapes of the shipped configs (nvila_ft/configs; memory and speed
need no weights), loaded through `TrainingRun.load_model` (quantization, k-bit preparation, gradient
checkpointing, LoRA + LayerNorm tuning, fp32 trainables: exactly what training does). One VQA-RAD-like
sample: a worst-aspect image at the recipe's image mode and max tiles (medical.yaml: dynamic_s2, 12 tiles),
a question and a short answer. Each step: forward under autocast, backward, AdamW step. On CUDA the peak is
`torch.cuda.max_memory_allocated`; on CPU (`--tiny`) it is the bytes of parameters + gradients + AdamW
states + the tensors autograd saves (no allocator to ask). The planner's prediction for the same sample
(`plan_recipe(..., text_tokens=<the sample's text>)`) is printed next to each measurement, with the error
in %. Raw JSON goes to benchmarks/results/gpu_memory-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvila_ft.model.checkpoint import keep_nf4_unpacked_on_cpu  # noqa: E402
from nvila_ft.model.configuration import MEDIA_TOKENS, SENTINEL_TOKEN  # noqa: E402
from nvila_ft.model.modeling import NvilaForConditionalGeneration  # noqa: E402
from nvila_ft.plan.memory import GiB, checkpoint_config, image_sample, meta_model  # noqa: E402
from nvila_ft.plan.report import plan_recipe  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402
from nvila_ft.train.trainer import TrainingRun  # noqa: E402
from nvila_ft.train.tuning import param_groups  # noqa: E402

QUESTION = "Is there evidence of a pneumothorax in the left lung on this chest x-ray?"
ANSWER = "no"


def random_model(path: str, dtype: torch.dtype, llm_quantization_config=None, device_map=None, **_unused):
    """Stands in for `NvilaForConditionalGeneration.from_pretrained`: the shipped config's shapes with random
    weights on the target device, the LLM's Linear layers in nf4 when asked (as bitsandbytes loads them),
    and a small stand-in tokenizer (ids < 1k; the embedding keeps the official tokenizer length)."""
    from nvila_ft.demo.tiny import build_tiny_tokenizer

    config, tok_len, _ = checkpoint_config(path)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = meta_model(config, tok_len, dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    if llm_quantization_config is not None:
        _quantize_llm(model.llm, llm_quantization_config, device)
        if device.type == "cpu":
            keep_nf4_unpacked_on_cpu(model.llm)  # as the real loader does
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([SENTINEL_TOKEN], special_tokens=True)
    tokenizer.add_tokens(list(MEDIA_TOKENS.values()), special_tokens=True)
    tokenizer.media_token_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in MEDIA_TOKENS.items()}
    tokenizer.sentinel_token_id = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    tokenizer.pad_token = "<|endoftext|>"
    model.config.image_token_id = tokenizer.media_token_ids["image"]
    model.config.video_token_id = tokenizer.media_token_ids["video"]
    model.config.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
    model.tokenizer = tokenizer
    return model


def _quantize_llm(llm: torch.nn.Module, quant, device: torch.device) -> None:
    """Replaces every decoder Linear by a bitsandbytes Linear4bit holding its weight in nf4."""
    import bitsandbytes as bnb

    for name, module in list(llm.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        parent = llm.get_submodule(name.rsplit(".", 1)[0])
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=quant.bnb_4bit_compute_dtype, quant_type=quant.bnb_4bit_quant_type,
                              compress_statistics=quant.bnb_4bit_use_double_quant, device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data.cpu() if device.type == "cpu" else module.weight.data,
                                     requires_grad=False, quant_type=quant.bnb_4bit_quant_type,
                                     compress_statistics=quant.bnb_4bit_use_double_quant)
        q.weight = q.weight._quantize(device) if hasattr(q.weight, "_quantize") else q.weight.to(device)
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[1], q)
        del module
    llm.is_loaded_in_4bit = True
    if device.type == "cuda":
        torch.cuda.empty_cache()


def worst_image(run: TrainingRun) -> Image.Image:
    """A random-pixel image with the aspect ratio that gives the most tiles under the run's tiling."""
    proc = run.processor
    w, h = image_sample(proc.media, len(proc.end_token_ids)).image_size
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward (CPU stand-in for the allocator peak)."""

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


def measure(recipe, steps: int) -> dict:
    """Loads the model as training does, runs `steps` steps on one worst-case sample, returns measurements."""
    run = TrainingRun(recipe)
    cuda = torch.cuda.is_available()
    patch = (mock.patch.object(NvilaForConditionalGeneration, "from_pretrained", side_effect=random_model)
             if not Path(recipe.model.path).is_dir() else contextlib.nullcontext())
    with patch:
        model, processor = run.load_model()
    model.train()
    image = worst_image(run)
    conversation = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER}]
    batch = processor.collate([processor(conversation, [image])])
    n_text = int(batch["input_ids"].shape[1]) - 1  # minus the <image> placeholder
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    groups = param_groups(model, recipe.train)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "name")} for g in groups])
    mp = recipe.train.resolved_mixed_precision()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mp == "bf16" else contextlib.nullcontext()
    meter = SavedTensorMeter([p for p in model.parameters()])
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # step 0 warms up (creates the AdamW states)
        start = time.perf_counter()
        hooks = (torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t)
                 if not cuda and step == steps else contextlib.nullcontext())
        with autocast, hooks:
            loss = model(**batch).loss
        loss.backward()
        if step == steps:
            static = state_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    n_label = int((batch["labels"][:, 1:] != -100).sum())  # rows the training forward sends through lm_head
    plan = plan_recipe(recipe, text_tokens=n_text, label_tokens=n_label)
    predicted_static = sum(t.bytes for t in plan.terms if t.group in ("weights", "gradients", "optimizer"))
    result = {
        "model": recipe.model.path, "tune_llm": recipe.tune.llm, "tune_vision_tower": recipe.tune.vision_tower,
        "vision_tiles": int(batch["pixel_values"].shape[0]), "llm_tokens": plan.sample.llm_tokens,
        "text_tokens": n_text, "samples_per_s": round(1 / (sum(times) / len(times)), 4),
        "measured_static_bytes": sum(static.values()), "predicted_static_bytes": predicted_static,
        "static": static, "plan": plan.to_dict(),
    }
    if cuda:
        measured, predicted = torch.cuda.max_memory_allocated(), plan.allocated
        result["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        # CPU: parameters + gradients + optimizer states + saved activations, against the same plan terms.
        measured = sum(static.values()) + meter.bytes
        vocab = model.get_base_model().llm.get_output_embeddings().weight.shape[0] if hasattr(
            model, "get_base_model") else model.llm.get_output_embeddings().weight.shape[0]
        log_probs = 4 * n_label * vocab  # saved by cross-entropy's log_softmax, at the labelled rows only
        predicted = predicted_static + sum(t.bytes for t in plan.terms if t.group == "activations") + log_probs
        result["peak_kind"] = "cpu: state bytes + autograd-saved bytes (no allocator peak)"
    result.update(measured_bytes=measured, predicted_bytes=predicted,
                  error_pct=round(100 * (predicted - measured) / measured, 2))
    del model, optimizer, run
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["Efficient-Large-Model/NVILA-Lite-2B",
                                                        "Efficient-Large-Model/NVILA-8B"])
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"], help="tune.llm values to compare")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--tiny", action="store_true", help="CPU check: the tiny checkpoint instead of --models")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. model.max_tiles=9")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    models = args.models
    # One sample, one sequence: no shared-prefix group or pack, so the plan prices no 4D mask either.
    base = ["eval.enabled=false", "train.mixed_precision=bf16", "data.preflight=false", "data.share_prefix=false"]
    if args.tiny:
        from nvila_ft.demo.tiny import build_tiny_checkpoint

        models = [str(build_tiny_checkpoint(Path(tmp.name) / "tiny-nvila", variant="nvila", seed=0))]
    rows = []
    for path in models:
        for mode in args.modes:
            recipe = load_recipe(ROOT / "recipes" / "medical.yaml",
                                 [f"model.path={path}", f"tune.llm={mode}", *base, *args.overrides])
            rows.append(measure(recipe, args.steps))
            r = rows[-1]
            print(f"{Path(path).name:<16}{mode:<7}measured {r['measured_bytes'] / GiB:7.2f} GiB  predicted "
                  f"{r['predicted_bytes'] / GiB:7.2f} GiB  error {r['error_pct']:+6.1f}%  "
                  f"{r['samples_per_s']:.3f} samples/s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    out = Path(args.out) / f"gpu_memory-{device.replace(' ', '_')}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "runs": rows}, indent=2))
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"{Path(a['model']).name}: {b['tune_llm']}/{a['tune_llm']} peak ratio "
              f"{b['measured_bytes'] / a['measured_bytes']:.2f}, speed ratio {b['samples_per_s'] / a['samples_per_s']:.2f}")
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
