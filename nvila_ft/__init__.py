"""nvila-ft: parameter-efficient fine-tuning of NVILA vision-language models.

    from nvila_ft.api import evaluate, generate, load_model, load_recipe, merge, train

    run = train("recipes/medical.yaml", train_data=my_samples, metric="exact_match")
    model, processor = load_model(run.output_dir)
    print(generate(model, processor, "scan.png", "Is there a fracture?"))
    merge(run.output_dir, "runs/medical-merged")

The API is `nvila_ft.api` (`train`, `evaluate` and `merge` live there only: as attributes of the package they
would be shadowed by the modules of the same names); `load_model`, `generate`, `stream_generate`,
`AdapterBank` and `load_recipe` are also importable from `nvila_ft` itself.
"""

from nvila_ft.model.checkpoint import load_tokenizer
from nvila_ft.model.configuration import NvilaConfig
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import NvilaProcessor, SampleTooLongError
from nvila_ft.train.recipe import Recipe, RecipeError
from nvila_ft.train.recipe_io import load_recipe

__all__ = [
    "AdapterBank",
    "NvilaConfig",
    "NvilaForConditionalGeneration",
    "NvilaProcessor",
    "Recipe",
    "RecipeError",
    "SampleTooLongError",
    "TrainingRun",
    "generate",
    "load_model",
    "load_recipe",
    "load_tokenizer",
    "stream_generate",
]

# The training and inference stack (Trainer, peft) loads only when asked for.
_LAZY = {"TrainingRun": "train", **{name: "inference" for name in (
    "AdapterBank", "generate", "load_model", "stream_generate")}}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
