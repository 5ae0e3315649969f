"""DeltaLoss scoring throughput (rows/s) and the share of time it adds to a training run, side by side (CPU).

    python benchmarks/prune_scoring.py [--rows 48] [--batch-size 8] [--threads 1]

Two tiny seeded checkpoints (`nvila_ft.demo.tiny`): small = the default tiny NVILA (LLM 64 wide, 2 layers),
large = 128 wide, 3 layers, MLP 256, another seed; the offline quickstart set (real DICOM images), `resize`
tiling (one 448 px tile per image), fp32. Measured in one process, one after the other:

1. scoring: `nvila_ft.prune.score_pass` of the first `--rows` training rows with the small, then the large model
   (rows/s of each pass, model loading timed apart);
2. training: `python -m nvila_ft.train recipes/quickstart.yaml` on the large model for one epoch over the same
   rows (LoRA LLM, LayerNorm vision tower, projector; batch 2, no accumulation, no eval), the Trainer's
   `train_runtime`.

Then: scoring time / one full-data epoch, and one epoch on the kept half plus scoring vs. the full epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvila_ft.data import load_split  # noqa: E402
from nvila_ft.demo.medical import build_quickstart_dataset  # noqa: E402
from nvila_ft.demo.tiny import build_tiny_checkpoint  # noqa: E402
from nvila_ft.prune import load_scorer, score_pass  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402
from nvila_ft.train.trainer import TrainingRun  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48, help="training rows scored and trained on")
    parser.add_argument("--batch-size", type=int, default=8, help="scoring batch")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    small = build_tiny_checkpoint(root / "small", seed=0)
    large = build_tiny_checkpoint(root / "large", seed=1, hidden_size=128, num_hidden_layers=3, intermediate_size=256)
    data = build_quickstart_dataset(root / "data")
    common = [f"data.path={data}", "model.image_aspect_ratio=resize", "model.dtype=float32",
              f"data.max_train_samples={args.rows}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"model.path={large}", *common])
    samples = load_split(recipe.data, "train", args.rows)
    subsets = [str(s.get("answer_type")) for s in samples]

    passes = {}
    for side, path in (("small", small), ("large", large)):
        start = time.perf_counter()
        model, processor = load_scorer(str(path), recipe, "float32", "cpu")
        loaded = time.perf_counter()
        result = score_pass(model, processor, samples, root / f"{side}.jsonl", model_name=str(path),
                            subsets=subsets, batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - loaded
        passes[side] = {"load_s": loaded - start, "score_s": seconds, "rows": result["written"],
                        "rows_per_s": result["written"] / seconds}
        del model

    train_recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        f"model.path={large}", *common, "train.num_train_epochs=1", "train.max_steps=-1",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.report_to=[]",
        "train.save_steps=100000", "eval.enabled=false", "data.eval_split=null", "train.logging_steps=1000",
        f"train.output_dir={root / 'run'}"])
    start = time.perf_counter()
    metrics = TrainingRun(train_recipe).run()
    train = {"wall_s": time.perf_counter() - start, "train_runtime_s": metrics["train"]["train_runtime"],
             "rows": metrics["train_samples"],
             "rows_per_s": metrics["train_samples"] / metrics["train"]["train_runtime"]}

    scoring_s = sum(p["load_s"] + p["score_s"] for p in passes.values())
    epoch_s = train["train_runtime_s"]
    pruned_epoch_s = args.keep * epoch_s
    results = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), shared 2-core host",
        "torch": torch.__version__, "rows": args.rows, "batch_size": args.batch_size, "passes": passes,
        "train": train, "scoring_s": scoring_s, "scoring_share_of_full_epoch": scoring_s / epoch_s,
        "pruned_epoch_plus_scoring_vs_full_epoch": (pruned_epoch_s + scoring_s) / epoch_s,
    }
    print(f"machine: {results['machine']}; {args.rows} rows, scoring batch {args.batch_size}")
    print("| step | rows/s | seconds |\n|---|---:|---:|")
    for side, p in passes.items():
        print(f"| score, {side} model | {p['rows_per_s']:.2f} | {p['score_s']:.1f} (+{p['load_s']:.1f} load) |")
    print(f"| score, both (with loading) | {args.rows / scoring_s:.2f} | {scoring_s:.1f} |")
    print(f"| train large model, 1 epoch | {train['rows_per_s']:.2f} | {epoch_s:.1f} |")
    print(f"scoring = {100 * results['scoring_share_of_full_epoch']:.1f}% of one full-data epoch; "
          f"keep {args.keep:g} + scoring = {100 * results['pruned_epoch_plus_scoring_vs_full_epoch']:.1f}% of it")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
