"""nvila-ft: parameter-efficient fine-tuning of NVILA vision-language models.

    from nvila_ft import NvilaForConditionalGeneration, NvilaProcessor, load_recipe, TrainingRun

    model = NvilaForConditionalGeneration.from_pretrained("Efficient-Large-Model/NVILA-Lite-2B")
    processor = NvilaProcessor(model.tokenizer, model.config)
    TrainingRun(load_recipe("recipes/medical.yaml", ["train.max_steps=100"])).run()
"""

from .configuration import NvilaConfig
from .modeling import NvilaForConditionalGeneration, load_tokenizer
from .processing import NvilaProcessor, SampleTooLongError
from .recipe import Recipe, RecipeError, load_recipe

__all__ = [
    "NvilaConfig",
    "NvilaForConditionalGeneration",
    "NvilaProcessor",
    "Recipe",
    "RecipeError",
    "SampleTooLongError",
    "TrainingRun",
    "load_recipe",
    "load_tokenizer",
]


def __getattr__(name):
    # The training stack (Trainer, peft) loads only when asked for.
    if name == "TrainingRun":
        from .train import TrainingRun

        return TrainingRun
    raise AttributeError(name)
