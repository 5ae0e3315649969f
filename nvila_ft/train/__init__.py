"""Fine-tuning: the recipe schema, per-part trainability, the Trainer wiring and the command line.

    accelerate launch --config_file recipes/accelerate/single_process.yaml \
        -m nvila_ft.train recipes/medical.yaml

- `recipe`: the typed recipe (one pydantic schema) and its YAML/override parsing.
- `tuning`: `llm` / `vision_tower` / `mm_projector` modes through peft, learning-rate groups.
- `trainer`: `TrainingRun`, which wires recipe, data, processor and model into `transformers.Trainer`.
- `preference`: DPO (`train.objective: dpo`): pair batches, policy / reference log-probs, the loss and its metrics.
- `checkpoints`: the run folder's state: complete checkpoints, resume or finished, whole-run loss, bad rows.
- `cli`: `python -m nvila_ft.train RECIPE [key=value ...]`.
"""


def __getattr__(name):  # the Trainer stack loads only when asked for (the recipe schema is imported widely)
    if name in ("TrainingRun", "main"):
        from nvila_ft.train import cli, trainer

        return {"TrainingRun": trainer.TrainingRun, "main": cli.main}[name]
    raise AttributeError(name)
