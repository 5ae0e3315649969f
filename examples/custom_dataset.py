"""Fine-tune NVILA on your own dataset object, scored with your own metric.

    python examples/custom_dataset.py --train my_train.csv --eval my_eval.csv   # CSV: image,question,answer
    python examples/custom_dataset.py --tiny --out runs/example                 # offline: tiny model, seconds

Any `torch.utils.data.Dataset` (or list, or Hugging Face dataset) whose items are
{"images": [...], "conversations": [human question, gpt answer]} can be trained on; the metric is any callable
(predictions, references) -> dict. Everything else comes from the recipe (here NVILA-8B QLoRA, fits 24 GB).
"""

import argparse
import csv

import torch

from nvila_ft.api import load_recipe, train


class CsvVQA(torch.utils.data.Dataset):
    """Rows of a CSV with columns image (path), question, answer."""

    def __init__(self, path):
        with open(path, newline="") as f:
            self.rows = list(csv.DictReader(f))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"images": [row["image"]], "conversations": [
            {"from": "human", "value": row["question"]}, {"from": "gpt", "value": row["answer"]}]}


def first_word_accuracy(predictions, references):
    """Share of answers whose first word is the reference's first word (case-insensitive)."""
    hits = [p.lower().split()[:1] == r.lower().split()[:1] for p, r in zip(predictions, references)]
    return {"first_word_accuracy": sum(hits) / max(len(hits), 1)}


def main(train_csv, eval_csv, overrides=()):
    recipe = load_recipe("recipes/medical.yaml", ["train.output_dir=runs/custom", *overrides])
    run = train(recipe, train_data=CsvVQA(train_csv), eval_data=CsvVQA(eval_csv), metric=first_word_accuracy)
    print(run.metrics["eval"], "->", run.output_dir)
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", help="training CSV (image,question,answer)")
    parser.add_argument("--eval", help="evaluation CSV")
    parser.add_argument("--tiny", action="store_true", help="tiny random model and the quickstart set, offline")
    parser.add_argument("--out", default="runs/example", help="--tiny: where to build everything")
    args = parser.parse_args()
    if args.tiny:  # demo data as CSV files + a tiny model; recipe keys set for the CPU
        import _tiny

        args.train, args.eval = _tiny.csv_of_quickstart(args.out, "train"), _tiny.csv_of_quickstart(args.out, "test")
        main(args.train, args.eval, [*_tiny.recipe_overrides(args.out, "custom"), "tune.llm=lora",
                                     "model.dtype=float32", 'train.mixed_precision="no"'])
    else:
        main(args.train, args.eval)
