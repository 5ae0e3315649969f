"""The GPU suite: every GPU figure the kit claims, measured in one run on one H100/H200 (no network needed).

    bash benchmarks/gpu_suite.sh              # the GPU machine (installs carried wheels, then runs this)
    bash benchmarks/gpu_suite.sh --cpu-smoke  # the same suite at tiny shapes on a CPU (tests/test_gpu_suite.py)

Rows (every model with `model.init=random`: the shipped configs' real shapes, nothing downloaded):
  medical-24GiB    recipes/medical.yaml (NVILA-8B, QLoRA + LayerNorm + projector, dynamic_s2 12 tiles) with the
                   allocator capped at 24 GiB (`torch.cuda.set_per_process_memory_fraction`): the 24 GB claim.
  8B-lora          NVILA-8B bf16 LoRA (+ LayerNorm vision tower, projector), measured vs planned.
  2B-lora          NVILA-Lite-2B bf16 LoRA, measured vs planned.
  8B-lora-vlora    as 8B-lora with LoRA on the vision tower: step-time ratio LayerNorm / LoRA (paper: ~0.75).
  main-job         `accelerate launch -m nvila_ft.train recipes/medical.yaml model.init=random` for 20 steps on the
                   carried VQA-RAD subset, then `python -m nvila_ft.predict` on its output.
Each measured row is `nvila_ft.plan.measure.measure_recipe` (the planner's `--measure` fit check) on the plan's
worst-case sample, with throughput (samples/s, LLM tokens/s) and model-FLOPs utilisation (`model_flops`).
Writes one JSON (default benchmarks/results/gpu_suite-<device>.json) and prints the table. The suite stops
starting new rows when `--budget-s` (default 480 s) is spent, recording them as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqa_rad_subset import pack_vqa_rad  # noqa: E402  (benchmarks/, on sys.path as the script's folder)

from nvila_ft.plan.measure import measure_recipe  # noqa: E402
from nvila_ft.plan.memory import GiB, checkpoint_config  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402

MEDICAL = ROOT / "recipes" / "medical.yaml"
EIGHT_B, LITE_2B = "Efficient-Large-Model/NVILA-8B", "Efficient-Large-Model/NVILA-Lite-2B"
# Dense bf16 peak of the tensor cores, FLOP/s (NVIDIA datasheets; H100 SXM and H200 share the H100 SXM's).
PEAK_BF16 = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12,
             "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic", "safetensors", "tokenizers"]


# ---------------------------------------------------------------------------------------------- FLOPs
def model_flops(config, tune: dict, llm_tokens: int, vision_tiles: int, projector_tokens: int,
                label_tokens: int, projector_params: int = 0) -> dict[str, float]:
    """Model FLOPs of one training sample (forward + backward, no recompute), by part.

    A matmul of an (n, k) input with a (k, m) weight costs 2nmk in the forward. Backward: the input gradient
    costs as much again wherever the gradient flows (every LLM layer: LoRA trains all of them; every vision
    layer unless the tower is frozen), the weight gradient 2nmk only for trained weights (LoRA's rank-r matrices
    are < 2% and left out; a fully trained part counts it). Attention scores and the weighted sum cost
    2 x 2 T^2 (heads x head_dim) per layer, halved for the causal LLM. Gradient-checkpointing recomputation is
    not counted (model FLOPs, as MFU is defined in PaLM, Chowdhery et al. 2022, appendix B).

    Args:
        config: the NVILA config (`text_config`, `vision_config`, `mm_hidden_size`, `hidden_size`).
        tune: recipe `tune` as a dict (llm, vision_tower, mm_projector modes).
        llm_tokens, vision_tiles, projector_tokens, label_tokens: of the sample (the plan's `Sample`).
        projector_params: parameters of the projector (the plan's `mm_projector` rows); each output token
            goes through all of them once (the spatial-to-channel reshape widens its input).

    Returns:
        {"llm", "vision_tower", "mm_projector", "lm_head", "total"} in FLOPs.
    """
    tc, vc = config.text_config, config.vision_config
    h, f, a, L = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_hidden_layers
    d = getattr(tc, "head_dim", None) or h // a
    kv = tc.num_key_value_heads * d
    llm_weights = L * (h * a * d + 2 * h * kv + a * d * h + 3 * h * f)  # q, k, v, o, gate, up, down
    fwd_llm = 2 * llm_weights * llm_tokens + L * 2 * llm_tokens ** 2 * a * d  # causal: half of 4 T^2 a d
    mult_llm = 2 + (1 if tune["llm"] == "full" else 0)
    vt_tokens = (vc.image_size // vc.patch_size) ** 2
    v_layers, hv, fv = vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size
    fwd_vis = vision_tiles * (2 * v_layers * (4 * hv * hv + 2 * hv * fv) * vt_tokens + v_layers * 4 * vt_tokens ** 2 * hv)
    mult_vis = {"frozen": 1, "layernorm": 2, "lora": 2, "full": 3}[tune["vision_tower"]]
    fwd_proj = 2 * projector_params * projector_tokens  # the patch embedding (3 x 14 x 14 x C per patch) is left out
    mult_proj = 3 if tune["mm_projector"] == "full" else (2 if tune["vision_tower"] != "frozen" else 1)
    vocab = config.video_token_id + 1 if config.video_token_id else tc.vocab_size
    head = 2 * 2 * h * vocab * label_tokens  # forward + input gradient at the labelled rows (frozen lm_head)
    parts = {"llm": mult_llm * fwd_llm, "vision_tower": mult_vis * fwd_vis, "mm_projector": mult_proj * fwd_proj,
             "lm_head": head}
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device), None)


# ---------------------------------------------------------------------------------------------- data
# ---------------------------------------------------------------------------------------------- rows
def measured_row(name: str, recipe_overrides: list[str], steps: int, cap: float | None, note: str) -> dict:
    recipe = load_recipe(MEDICAL, recipe_overrides)
    r = measure_recipe(recipe, steps, memory_cap_gib=cap)
    row = {"row": name, "note": note, "overrides": recipe_overrides, **r}
    if not r["oom"]:
        config = checkpoint_config(recipe.model.path)[0]
        s = r["plan"]["sample"]
        proj = sum(p["count"] for p in r["plan"]["parameters"] if p["part"] == "mm_projector")
        flops = model_flops(config, recipe.tune.model_dump(), s["llm_tokens"], s["vision_tiles"],
                            s["projector_tokens"], r["label_tokens"], proj)
        flops = {k: v * r["plan"]["batch_size"] for k, v in flops.items()}  # per step
        flops_per_sample = flops["total"] / r["plan"]["batch_size"]
        row["flops_per_step"], row["flops_per_sample"] = flops, flops_per_sample
        peak = peak_flops(r["device"])
        row["mfu"] = round(flops_per_sample * r["samples_per_s"] / peak, 4) if peak else None
        if "max_reserved" in r:  # what a 24 GB card (23.99 GiB as torch reports it) must hold: allocator + context
            row["card_gib_used"] = round((r["max_reserved"] + r["beyond_allocator"]) / GiB, 2)
            row["fits_24gb_card"] = row["card_gib_used"] <= 23.99
    return row


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        limit = None if timeout == float("inf") else max(timeout, 1)
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout:.0f} s (suite budget)")


def main_job(data: Path, work: Path, model_overrides: list[str], cuda: bool, steps: int, deadline: float) -> dict:
    """20 training steps of recipes/medical.yaml with random weights via accelerate, then predict on its output."""
    out = work / "medical-random"
    overrides = ["model.init=random", f"data.path={data}", "data.format=vqa_rad", f"train.max_steps={steps}",
                 "train.gradient_accumulation_steps=1", f"train.output_dir={out}", f"train.save_steps={steps}",
                 "train.report_to=[]", "train.logging_steps=5", "eval.enabled=false", *model_overrides]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16" if cuda else "no", "--dynamo_backend", "no"]
    if not cuda:
        launch.append("--cpu")
    t0 = time.time()
    train = _run([*launch, "-m", "nvila_ft.train", str(MEDICAL), *overrides], deadline - time.time())
    t_train = time.time() - t0
    row = {"row": "main-job", "note": f"accelerate launch -m nvila_ft.train recipes/medical.yaml model.init=random, "
           f"{steps} steps on {data.name}, then nvila_ft.predict", "overrides": overrides,
           "train_rc": train.returncode, "train_seconds": round(t_train, 1),
           "train_log_tail": (train.stdout + train.stderr)[-3000:]}
    metrics = out / "metrics.json"
    if metrics.is_file():
        row["metrics"] = json.loads(metrics.read_text())
        card = (out / "README.md").read_text() if (out / "README.md").is_file() else ""
        row["card_says_random"] = "RANDOM WEIGHTS" in card
    row["log_says_random"] = "RANDOM WEIGHTS" in train.stderr + train.stdout
    if train.returncode == 0:
        t0 = time.time()
        pred = _run([sys.executable, "-m", "nvila_ft.predict", str(out), "--data", str(data), "--split", "test",
                     "--max-samples", "4", "--max-new-tokens", "8", "--out", str(work / "predictions.jsonl")],
                    deadline - time.time())
        row.update(predict_rc=pred.returncode, predict_seconds=round(time.time() - t0, 1),
                   predict_log_tail=(pred.stdout + pred.stderr)[-2000:])
        if (work / "predictions.jsonl").is_file():
            row["predictions"] = [json.loads(x) for x in (work / "predictions.jsonl").read_text().splitlines()]
    return row


def table(rows: list[dict]) -> str:
    g = lambda b: f"{b / GiB:7.3f}"  # noqa: E731
    lines = [f"{'row':<16}{'measured GiB':>13}{'planned GiB':>12}{'error':>8}{'reserved':>9}{'outside':>8}"
             f"{'samples/s':>10}{'tok/s':>8}{'MFU':>6}  note"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['row']:<16}skipped: {r['skipped']}")
        elif r["row"] == "main-job":
            lines.append(f"{r['row']:<16}train rc {r['train_rc']} in {r['train_seconds']} s, predict rc "
                         f"{r.get('predict_rc')} ({len(r.get('predictions', []))} answers); random weights said "
                         f"in log {r['log_says_random']}, card {r.get('card_says_random')}")
        elif r["oom"]:
            lines.append(f"{r['row']:<16}{'OOM':>13}{g(r['predicted_bytes']):>12}  under {r['memory_cap_gib']} GiB: "
                         f"{r['note']}")
        else:
            mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "    -"
            lines.append(f"{r['row']:<16}{g(r['measured_bytes']):>13}{g(r['predicted_bytes']):>12}"
                         f"{r['error_pct']:+7.1f}%{g(r.get('max_reserved', 0)):>9}{g(r.get('beyond_allocator', 0)):>8}"
                         f"{r['samples_per_s']:10.3f}{r['tokens_per_s']:8.0f}{mfu}  {r['note']}")
    by = {r["row"]: r for r in rows if not r.get("skipped") and "samples_per_s" in r}
    if "8B-lora" in by and "8B-lora-vlora" in by:
        ratio = by["8B-lora-vlora"]["samples_per_s"] / by["8B-lora"]["samples_per_s"]
        lines.append(f"vision tower LayerNorm / LoRA step time: {ratio:.2f} (paper: ~0.75)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: the suite end to end")
    parser.add_argument("--data", default=str(ROOT / ".gpu_data" / "vqa_rad"),
                        help="VQA-RAD subset for the main job (benchmarks/gpu_wheels.sh packs it)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_suite-<device>.json)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measured row (GPU 3, smoke 1)")
    parser.add_argument("--job-steps", type=int, default=None, help="training steps of the main job (GPU 20, smoke 2)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new row after this many seconds (GPU 480; smoke: no limit)")
    parser.add_argument("--rows", nargs="*", default=None, help="run only these rows")
    args = parser.parse_args(argv)
    t_start = time.time()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("error: no CUDA device; run with --cpu-smoke for the tiny CPU version", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    data = Path(args.data)
    if not (data / "trainset.json").is_file():
        shared = ROOT.parent / "shared" / "data" / "vqa_rad"
        if not (shared / "trainset.json").is_file():
            print(f"error: no VQA-RAD subset at {data} (run benchmarks/gpu_wheels.sh) and none at {shared}",
                  file=sys.stderr)
            return 2
        data = pack_vqa_rad(shared, work / "vqa_rad", 16 if args.cpu_smoke else 64, 4 if args.cpu_smoke else 8)
    steps = args.steps or (1 if args.cpu_smoke else 3)
    if args.budget_s is None:
        args.budget_s = float("inf") if args.cpu_smoke else 480.0
    if args.cpu_smoke:
        from nvila_ft.demo.tiny import build_tiny_checkpoint

        torch.set_num_threads(min(2, torch.get_num_threads()))
        eight = str(build_tiny_checkpoint(work / "tiny-nvila", variant="nvila", seed=0))
        lite = str(build_tiny_checkpoint(work / "tiny-nvila-lite", variant="nvila-lite", seed=0))
        # tiny shapes and short samples (a shared 2-core CPU): the 24 GiB row keeps medical.yaml's dynamic_s2
        # (1+4+9 tiles, 2305 tokens); the others tile `dynamic` with at most 2 tiles + thumbnail.
        s2 = ["model.max_tiles=9", "data.max_length=2560"]
        small = small_lite = ["model.image_aspect_ratio=dynamic", "model.max_tiles=2", "data.max_length=1024"]
        cap = None
    else:
        eight, lite, s2, small, small_lite, cap = EIGHT_B, LITE_2B, [], [], [], 24.0
    plan = [
        ("medical-24GiB", [f"model.path={eight}", *s2], cap, "medical.yaml: 8B QLoRA+LN+proj, 12 tiles"),
        ("8B-lora", [f"model.path={eight}", "tune.llm=lora", *small], None, "8B bf16 LoRA + LN + proj"),
        ("8B-lora-vlora", [f"model.path={eight}", "tune.llm=lora", "tune.vision_tower=lora", *small], None,
         "8B LoRA, LoRA vision tower"),
        ("main-job", [f"model.path={eight}", *small] if args.cpu_smoke else [], None, ""),
        ("2B-lora", [f"model.path={lite}", "tune.llm=lora", *small_lite], None, "Lite-2B bf16 LoRA + LN + proj"),
    ]
    device = torch.cuda.get_device_name(0) if cuda else f"cpu-{platform.machine()}"
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = version(p)
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
            versions[p] = None
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"gpu_suite-{device.replace(' ', '_')}{'-cpu-smoke' if args.cpu_smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "cpu_smoke": args.cpu_smoke, "versions": versions, "cuda": torch.version.cuda,
              "rows": []}
    rows = result["rows"]
    for name, overrides, row_cap, note in plan:
        if args.rows is not None and name not in args.rows:
            continue
        if time.time() - t_start > args.budget_s:
            rows.append({"row": name, "skipped": f"time budget {args.budget_s:.0f} s spent"})
            continue
        t0 = time.time()
        if name == "main-job":
            rows.append(main_job(data, work, overrides, cuda, args.job_steps or (2 if args.cpu_smoke else 20),
                                 deadline=t_start + args.budget_s + 60))
        else:
            rows.append(measured_row(name, ["train.mixed_precision=bf16", *overrides], steps, row_cap, note))
        rows[-1]["seconds"] = round(time.time() - t0, 1)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        result["seconds"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(result, indent=2, default=str))  # after every row: a killed run keeps its rows
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nGPU suite on {device} ({'CPU smoke, tiny shapes' if args.cpu_smoke else 'real shapes'}), "
          f"{result['seconds']} s; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    print(table(rows))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    failed = [r["row"] for r in rows if r.get("train_rc") not in (None, 0) or r.get("predict_rc") not in (None, 0)]
    if failed:
        print(f"error: {', '.join(failed)} failed (see the JSON's log tails)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
