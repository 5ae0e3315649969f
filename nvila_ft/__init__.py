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

import logging as _logging

# bitsandbytes (0.50, backends/cpu/ops.py), imported by peft on every command (`--help` included), tries on a
# CPU with AVX512-BF16 to fetch an optional 4-bit matmul kernel from the Hub ("kernels-community", needs the
# `kernels` package and network) and logs "Failed to load CPU gemm_4bit_forward ..." when it cannot. It then
# uses its own kernel, the one QLoRA on CPU was always going to use, so there is nothing for the user to do:
# only errors of that one logger show. Set here, before anything imports bitsandbytes.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from nvila_ft.model.checkpoint import load_tokenizer  # noqa: E402 - after the logger setting above
from nvila_ft.model.configuration import NvilaConfig  # noqa: E402
from nvila_ft.model.modeling import NvilaForConditionalGeneration  # noqa: E402
from nvila_ft.model.processing import NvilaProcessor, SampleTooLongError  # noqa: E402
from nvila_ft.train.recipe import Recipe, RecipeError  # noqa: E402
from nvila_ft.train.recipe_io import load_recipe  # noqa: E402

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
