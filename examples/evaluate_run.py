"""Evaluate a fine-tuned run (or any checkpoint) on a labelled split with a metric chosen by name.

    python examples/evaluate_run.py runs/medical --data ../shared/data/vqa_rad --split test --metric vqa_rad
    python examples/evaluate_run.py --tiny --out runs/example               # offline: tiny 3-step run, seconds
"""

import argparse
import json

from nvila_ft.api import evaluate
from nvila_ft.data import load_samples
from nvila_ft.metrics import METRICS


def main(run_dir, data, split, metric, max_samples=None):
    samples = load_samples(data, split, max_samples=max_samples)
    metrics, rows = evaluate(run_dir, None, samples, metric=metric, max_new_tokens=16)
    for row in rows[:3]:
        print(f"{row['question']!r}: {row['prediction']!r} (reference {row['reference']!r})")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="run folder or checkpoint")
    parser.add_argument("--data", help="labelled dataset (LLaVA json/jsonl, VQA-RAD folder, HF dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--metric", default="vqa_rad", choices=sorted(METRICS))
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--tiny", action="store_true", help="tiny 3-step run on the quickstart set, offline")
    parser.add_argument("--out", default="runs/example", help="--tiny: where to build everything")
    args = parser.parse_args()
    if args.tiny:
        import _tiny

        args.run_dir, args.data = _tiny.run(args.out), _tiny.checkpoint_and_data()[1]
        args.max_samples = args.max_samples or 8
    main(args.run_dir, args.data, args.split, args.metric, args.max_samples)
