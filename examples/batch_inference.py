"""Answer questions about many images with a checkpoint or a fine-tuned run: a loop for a few images, the
resumable `predict` for a dataset.

    python examples/batch_inference.py runs/medical --data ../shared/data/vqa_rad --split test
    python examples/batch_inference.py --tiny --out runs/example            # offline: tiny model, seconds
"""

import argparse
from pathlib import Path

from nvila_ft.api import generate, load_model
from nvila_ft.data import load_samples
from nvila_ft.predict import predict


def main(model_path, data, split, out, max_new_tokens=64, max_samples=None):
    model, processor = load_model(model_path)
    samples = load_samples(data, split, max_samples=max_samples)
    # A few images: one call each.
    for sample in samples[:2]:
        question = sample["conversations"][0]["value"].replace("<image>\n", "")
        print(f"{sample['id']}: {question} -> {generate(model, processor, sample['images'][0], question, max_new_tokens=max_new_tokens)!r}")
    # A dataset: batched, flushed per batch, skips rows already in the file when run again.
    result = predict(model, processor, samples, Path(out) / "predictions.jsonl", batch_size=8,
                     max_new_tokens=max_new_tokens)
    print(f"{result['written']} written, {result['skipped_done']} already done, {len(result['bad'])} bad")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="run folder or NVILA checkpoint (folder or hub id)")
    parser.add_argument("--data", help="dataset (LLaVA json/jsonl, VQA-RAD folder, HF dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tiny", action="store_true", help="tiny random model and the quickstart set, offline")
    parser.add_argument("--out", default="runs/example", help="where predictions.jsonl goes (and --tiny builds)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-samples", type=int, help="answer only the first N questions")
    args = parser.parse_args()
    if args.tiny:  # a tiny 3-step run answering with a few tokens
        import _tiny

        args.model, args.data = _tiny.run(args.out), _tiny.checkpoint_and_data()[1]
        args.max_new_tokens, args.max_samples = 4, args.max_samples or 8
    main(args.model, args.data, args.split, args.out, args.max_new_tokens, args.max_samples)
