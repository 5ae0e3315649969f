"""Memory planning: predicted peak GPU memory of a recipe before any weight loads.

    python -m nvila_ft.plan recipes/medical.yaml

- `memory`: the formulas (parameters by dtype, nf4, LoRA, activations per layer, the samples to price).
- `report`: `plan_recipe` -> `MemoryPlan`, the refusal message with fixes, the budget check, the CLI.
"""
