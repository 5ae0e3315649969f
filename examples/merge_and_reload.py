"""Merge a fine-tuned run into a full checkpoint (official NVILA layout), reload it and check that it answers
like the run with its adapter.

    python examples/merge_and_reload.py runs/medical runs/medical-merged
    python examples/merge_and_reload.py --tiny --out runs/example           # offline: tiny 3-step run, seconds
"""

import argparse

import torch

from nvila_ft.api import load_model, merge
from nvila_ft.data import load_samples


def main(run_dir, merged_dir, image, question):
    merge(run_dir, merged_dir, dtype="fp32")  # bf16 for a smaller checkpoint to ship
    adapter_model, processor = load_model(run_dir, dtype="float32")
    merged_model, _ = load_model(merged_dir, dtype="float32")  # a plain checkpoint now: no peft involved
    batch = processor.collate([processor([{"from": "human", "value": question}], [image],
                                         add_generation_prompt=True)], padding_side="left")
    batch = {k: v.to(merged_model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        gap = (adapter_model(**batch).logits - merged_model(**batch).logits).abs().max().item()
    print(f"merged into {merged_dir}; largest logit difference to the adapter model: {gap:.2e}")
    return gap


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("merged_dir", nargs="?")
    parser.add_argument("--image", help="an image to compare the two models on")
    parser.add_argument("--question", default="What is shown in this image?")
    parser.add_argument("--tiny", action="store_true", help="tiny 3-step run on the quickstart set, offline")
    parser.add_argument("--out", default="runs/example", help="--tiny: where to build everything")
    args = parser.parse_args()
    if args.tiny:
        import _tiny

        args.run_dir, args.merged_dir = _tiny.run(args.out), f"{args.out}/merged"
        args.image = load_samples(_tiny.checkpoint_and_data()[1], "test")[0]["images"][0]
    main(args.run_dir, args.merged_dir, args.image, args.question)
