"""The figures the README and the recipe comments quote, from a count or a timed run on this machine.

    python benchmarks/recipe_figures.py counts                 # rows and optimizer steps of recipes/medical.yaml
    python benchmarks/recipe_figures.py quickstart video_qa_tiny   # time the two offline quickstarts

counts: the local VQA-RAD release (`--vqa-rad`, default ../shared/data/vqa_rad) read with the training loader
(`nvila_ft.data.load_split`, as `data.path=<release>` would), and the optimizer steps `recipes/medical.yaml`
runs on it: transformers' Trainer does ceil(rows / per_device_train_batch_size) batches per epoch and
ceil(batches / gradient_accumulation_steps) optimizer steps per epoch, times num_train_epochs (one process).

quickstart, video_qa_tiny: runs `python -m nvila_ft.train recipes/<name>.yaml` in a fresh process into a
temporary output_dir and prints its wall time (start-up, demo build if not cached, preflight, training,
evaluation), its CPU time (user + system, all threads) and the trainer's own `train_runtime` / steps from
metrics.json, with the machine and its load average. On a machine whose cores are shared with other jobs, wall
times are upper bounds of what the recipe needs alone; the CPU time depends much less on the other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model, core count and 1-minute load average (how busy the cores were)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} cores ({cpu}){load}"


def counts(vqa_rad: Path) -> dict:
    """Rows of the local VQA-RAD release and the optimizer steps recipes/medical.yaml takes on its train split."""
    from nvila_ft.data import load_split
    from nvila_ft.train.recipe_io import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "medical.yaml", [f"data.path={vqa_rad}"])
    train = load_split(recipe.data, recipe.data.train_split)
    test = load_split(recipe.data, recipe.data.eval_split)
    t = recipe.train
    batches = math.ceil(len(train) / t.per_device_train_batch_size)
    per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    return {"data": str(vqa_rad), "train_rows": len(train), "test_rows": len(test),
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "num_train_epochs": t.num_train_epochs,
            "steps_per_epoch": per_epoch, "optimizer_steps": math.ceil(per_epoch * t.num_train_epochs)}


def demo_cached() -> list[str]:
    """The demo resources built already (a run that needs another one includes building it in its time)."""
    from nvila_ft.demo import demo_dir

    return sorted(p.name for p in demo_dir().iterdir() if p.is_dir()) if demo_dir().is_dir() else []


def timed_run(name: str, threads: int | None) -> dict:
    """Wall and CPU time of `python -m nvila_ft.train recipes/<name>.yaml` and the trainer's figures."""
    env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cached = demo_cached()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nvila_ft.train", str(ROOT / "recipes" / f"{name}.yaml"),
               f"train.output_dir={tmp}/output", "train.report_to=[]"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        metrics = json.loads((Path(tmp) / "output" / "metrics.json").read_text())["train"]
    steps = round(metrics["train_runtime"] * metrics["train_steps_per_second"])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"recipe": f"recipes/{name}.yaml", "threads": threads or "torch default", "demo_cached": cached,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "train_runtime_s": metrics["train_runtime"],
            "steps": steps, "s_per_step": round(metrics["train_runtime"] / steps, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="+", choices=["counts", "quickstart", "video_qa_tiny"])
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the run (default: torch's, all cores); "
                        "1 on a machine whose cores are busy with other jobs")
    parser.add_argument("--vqa-rad", type=Path, default=Path("../shared/data/vqa_rad"),
                        help="the local VQA-RAD release (default, as in the README: %(default)s)")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    for what in args.what:
        result = counts(args.vqa_rad) if what == "counts" else timed_run(what, args.threads)
        print(json.dumps(result), flush=True)
    print(f"machine after: {machine()}")


if __name__ == "__main__":
    main()
