"""Benchmark 2: memory of full fine-tuning vs. this kit's default recipe at real NVILA-8B shapes (meta device).

    python benchmarks/finetune_memory.py [model.path=Efficient-Large-Model/NVILA-8B]

Bytes of weights + gradients + AdamW states, from the planner's parameter terms (nvila_ft.plan: the model
is built on the meta device from the shipped config, tuning applied by the training code). The NVILA paper
(arXiv 2412.04468, efficient fine-tuning) reports 3.4x lower fine-tuning memory for its PEFT recipe. Full
fine-tuning here = every part trained, fp32 master weights under bf16 autocast (as train.py keeps
trainables), so 16 bytes per parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvila_ft.plan.memory import GiB  # noqa: E402
from nvila_ft.plan.report import plan_recipe  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402

STATIC = ("weights", "gradients", "optimizer")
RUNS = {
    "full fine-tuning": ["tune.llm=full", "tune.vision_tower=full", "tune.mm_projector=full"],
    "default: LoRA LLM + LayerNorm vision": ["tune.llm=lora"],
    "medical.yaml: QLoRA LLM + LayerNorm vision": [],
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    static, totals = {}, {}
    for name, extra in RUNS.items():
        plan = plan_recipe(load_recipe(ROOT / "recipes" / "medical.yaml", [*overrides, *extra]))
        static[name] = sum(t.bytes for t in plan.terms if t.group in STATIC)
        totals[name] = plan.total
        print(f"{name:<44} weights+grads+AdamW {static[name] / GiB:7.2f} GiB   predicted peak {plan.total / GiB:7.2f} GiB")
    full = static["full fine-tuning"]
    for name in list(RUNS)[1:]:
        print(f"full / {name}: {full / static[name]:.2f}x (weights+grads+optimizer), "
              f"{totals['full fine-tuning'] / totals[name]:.2f}x (predicted peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
