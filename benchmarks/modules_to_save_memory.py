"""Memory that peft `modules_to_save` adds per tuning mode: the frozen original kept beside each trained copy.

    python benchmarks/modules_to_save_memory.py [model.path=Efficient-Large-Model/NVILA-8B]

Parts trained in full (projector, vision LayerNorms, whole parts in `full` modes) are peft `modules_to_save`
(`nvila_ft.train.tuning.apply_tuning`): the trained copy takes the place the parameter had before (fp32 under
mixed precision), and the original stays, frozen, in `model.dtype` for `disable_adapter()` and other adapters.
Training empties the originals of whole parts in `full` modes (`tuning.release_full_originals`); a run loaded for
inference (`PeftModel.from_pretrained`, `AdapterBank`) keeps them all. Counted from the planner's parameter rows
of the model built on the meta device at real shapes with the training code's tuning (no weights are loaded):
"kept" = every original (one per trained parameter, in `model.dtype`), "training" = rows of kind
"<dtype> original" that training keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvila_ft.plan.memory import DTYPE_BYTES, GiB  # noqa: E402
from nvila_ft.plan.report import plan_recipe  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402

MODES = {
    "mm_projector=full only": ["tune.llm=frozen", "tune.vision_tower=frozen", "tune.mm_projector=full"],
    "vision_tower=layernorm only": ["tune.llm=frozen", "tune.vision_tower=layernorm", "tune.mm_projector=frozen"],
    "default (LoRA + layernorm + projector)": ["tune.llm=lora"],
    "vision_tower=full": ["tune.llm=lora", "tune.vision_tower=full"],
    "llm=full": ["tune.llm=full", "tune.vision_tower=frozen", "tune.mm_projector=frozen"],
    "all full": ["tune.llm=full", "tune.vision_tower=full", "tune.mm_projector=full"],
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    print(f"{'mode':<40}{'original params':>16}{'kept GiB':>10}{'training GiB':>14}{'peak GiB':>10}{'training/peak':>15}")
    for name, extra in MODES.items():
        recipe = load_recipe(ROOT / "recipes" / "medical.yaml", [*overrides, *extra])
        plan = plan_recipe(recipe)
        count = sum(p.trainable for p in plan.parameters if p.kind != "lora")
        kept = count * DTYPE_BYTES[recipe.model.dtype]
        training = sum(p.bytes for p in plan.parameters if p.kind.endswith(" original"))
        print(f"{name:<40}{count:>16,}{kept / GiB:>10.3f}{training / GiB:>14.3f}{plan.total / GiB:>10.2f}"
              f"{100 * training / plan.total:>14.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
