"""Fine-tune NVILA with a recipe: LoRA on the LLM, LayerNorm-only vision tower, full projector (paper default).

    accelerate launch --config_file recipes/accelerate/single_process.yaml \
        -m nvila_ft.train recipes/medical.yaml [key=value ...]
    python -m nvila_ft.train recipes/quickstart.yaml train.max_steps=10

Steps: recipe -> checkpoint (a `demo:` one is built on first use) -> data + preflight -> per-part tuning ->
`transformers.Trainer` (resumable checkpoints, TensorBoard) -> adapter + non-LoRA trainables ->
VQA evaluation -> `metrics.json`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nvila_ft.cli_errors import user_errors
from nvila_ft.plan.report import MemoryBudgetError
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nvila_ft.train", description=__doc__.split("\n\n")[0],
        epilog="Example: accelerate launch --config_file recipes/accelerate/single_process.yaml -m nvila_ft.train "
               "recipes/medical.yaml train.max_steps=100 lora.r=16\n(recipes/accelerate/: multi_gpu.yaml every GPU, DDP; "
               "fsdp.yaml, zero2.yaml, zero3.yaml sharded; multi_node.yaml)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    parser.add_argument("--force", action="store_true",
                        help="train even if the memory plan predicts more than train.gpu_memory_gb")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        TrainingRun(recipe, force=args.force).run()
    except MemoryBudgetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
