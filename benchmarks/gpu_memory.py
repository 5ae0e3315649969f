"""Benchmark 3: measured peak memory and samples/s of training steps next to the planner's prediction.

    python benchmarks/gpu_memory.py                      # CUDA: NVILA-Lite-2B and NVILA-8B, bf16 LoRA and QLoRA
    python benchmarks/gpu_memory.py --tiny --steps 2     # CPU: the tiny model (what tests/test_plan.py runs)
    HF_HUB_OFFLINE=1 python benchmarks/gpu_memory.py --models Efficient-Large-Model/NVILA-Lite-2B --modes lora \
        --depth 2 2 --steps 1 model.max_tiles=2          # CPU: real widths, 2 + 2 layers, the hub-id path

Each run is `nvila_ft.plan.measure.measure_recipe` (the fit check of `python -m nvila_ft.plan --measure`) on
recipes/medical.yaml with `model.path` and `tune.llm` overridden: the model loaded as training loads it with
`model.init=random` (the shipped config's real shapes, seeded random weights built on the device: no
download), the plan's worst-case sample, one warm-up step then `--steps` timed steps (forward under bf16
autocast, backward, AdamW). On CUDA the peak is `torch.cuda.max_memory_allocated`; on CPU it is the bytes of
parameters + gradients + AdamW states + the tensors autograd saves (no allocator to ask). The planner's
prediction for the same sample is printed next to each measurement, with the error in %. Raw JSON goes to
benchmarks/results/gpu_memory-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvila_ft.demo.tiny import build_tiny_checkpoint  # noqa: E402
from nvila_ft.model.random_init import reduced_depth  # noqa: E402
from nvila_ft.plan.measure import measure_recipe  # noqa: E402
from nvila_ft.plan.memory import GiB  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["Efficient-Large-Model/NVILA-Lite-2B",
                                                        "Efficient-Large-Model/NVILA-8B"])
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"], help="tune.llm values to compare")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--tiny", action="store_true", help="CPU check: the tiny checkpoint instead of --models")
    parser.add_argument("--depth", type=int, nargs=2, metavar=("LLM", "VISION"), default=None,
                        help="random models with this many LLM and vision layers (real widths): CPU checks")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. model.max_tiles=9")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    models = args.models
    base = ["train.mixed_precision=bf16"]
    if args.tiny:
        models = [str(build_tiny_checkpoint(Path(tmp.name) / "tiny-nvila", variant="nvila", seed=0))]
    rows = []
    for path in models:
        for mode in args.modes:
            recipe = load_recipe(ROOT / "recipes" / "medical.yaml",
                                 [f"model.path={path}", f"tune.llm={mode}", *base, *args.overrides])
            with reduced_depth(*args.depth) if args.depth else contextlib.nullcontext():
                rows.append(measure_recipe(recipe, args.steps))
            r = rows[-1]
            print(f"{Path(path).name:<16}{mode:<7}measured {r['measured_bytes'] / GiB:7.2f} GiB  predicted "
                  f"{r['predicted_bytes'] / GiB:7.2f} GiB  error {r['error_pct']:+6.1f}%  "
                  f"{r['samples_per_s']:.3f} samples/s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    depth_note = f"-depth{args.depth[0]}x{args.depth[1]}" if args.depth else ""
    out = Path(args.out) / f"gpu_memory-{device.replace(' ', '_')}{'-tiny' if args.tiny else ''}{depth_note}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "runs": rows}, indent=2))
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"{Path(a['model']).name}: {b['tune']['llm']}/{a['tune']['llm']} peak ratio "
              f"{b['measured_bytes'] / a['measured_bytes']:.2f}, speed ratio {b['samples_per_s'] / a['samples_per_s']:.2f}")
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
