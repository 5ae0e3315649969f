"""Recipe schema, strict YAML loading, overrides and error messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel

from nvila_ft.train.recipe import Recipe, RecipeError
from nvila_ft.train.recipe_io import load_recipe, recipe_to_yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MINIMAL = "model:\n  path: some/model\ndata:\n  path: some/data\n"


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    path = tmp_path / "minimal.yaml"
    path.write_text(MINIMAL)
    return path


def _error(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize("name", ["medical", "quickstart"])
def test_shipped_recipes_load(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.tune.vision_tower == "layernorm" and recipe.tune.mm_projector == "full"
    assert recipe.data.max_length == 4096 and recipe.data.eval_split == "test"


def test_shipped_recipe_values() -> None:
    medical = load_recipe(RECIPES / "medical.yaml")
    assert medical.data.path == "flaviagiammarino/vqa-rad" and medical.data.format == "auto"
    assert medical.train.num_train_epochs == 3 and medical.train.gradient_checkpointing.llm
    quick = load_recipe(RECIPES / "quickstart.yaml")
    assert (quick.model.path, quick.data.path) == ("demo:tiny-nvila", "demo:medical")  # built on first use
    relative = load_recipe(RECIPES / "quickstart.yaml", ["model.path=runs/quickstart/tiny-nvila"])
    assert relative.model.path == "runs/quickstart/tiny-nvila"  # relative paths are kept as typed
    assert quick.train.mixed_precision == "no" and quick.train.max_steps > 0
    assert not quick.train.gradient_checkpointing.llm and quick.model.dtype == "float32"


def test_defaults_are_the_paper_recipe(minimal: Path) -> None:
    recipe = load_recipe(minimal)
    tune = recipe.tune
    assert (tune.llm, tune.vision_tower, tune.mm_projector) == ("lora", "layernorm", "full")
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (64, 16, 0.05)
    assert recipe.lora.target_modules == "all-linear"
    lrs = recipe.train.lr_per_part
    assert lrs == pytest.approx({"llm": 2e-4, "vision_tower": 2e-5, "mm_projector": 2e-4})


def test_every_field_is_documented() -> None:
    def check(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                check(field.annotation)

    check(Recipe)
    assert "vision_lr_ratio" in str(Recipe.model_json_schema())


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + "trian:\n  lr: 1.0e-4\n")
    assert "unknown key 'trian'" in message and "did you mean 'train'" in message


def test_unknown_nested_key_suggests(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + "train:\n  lrr: 1.0e-4\n")
    assert "unknown key 'train.lrr' (did you mean 'lr'?)" in message
    assert "vision_lr_ratio" in message  # lists the valid keys at that level


def test_wrong_type_and_bad_enum(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + "train:\n  lr: -1\n  max_steps: many\ntune:\n  llm: lorra\n")
    assert "train.lr: Input should be greater than 0 (got -1)" in message
    assert "train.max_steps:" in message and "'many'" in message
    assert "tune.llm:" in message and "'qlora'" in message and "'lorra'" in message


def test_missing_required_key(tmp_path: Path) -> None:
    assert "model.path: required" in _error(tmp_path, "model:\n  # path: x\ndata:\n  path: x\n")
    assert "data: required section missing" in _error(tmp_path, "model:\n  path: x\n")


def test_empty_section_gets_defaults(minimal: Path) -> None:
    minimal.write_text(MINIMAL + "eval:\n  # enabled: false\n")
    assert load_recipe(minimal).eval.enabled is True


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + "train:\n\tlr: 1\n")
    assert "bad.yaml:6:" in message and "invalid YAML" in message
    message = _error(tmp_path, MINIMAL + "train:\n  lr: [1\n")
    assert "started on line 6" in message


def test_overrides_parse_yaml_values(minimal: Path) -> None:
    recipe = load_recipe(
        minimal,
        [
            "train.max_steps=20",
            "train.lr=5e-5",
            "lora.target_modules=[q_proj,v_proj]",
            "data.eval_split=null",
            "eval.enabled=false",
            "train.gradient_checkpointing.llm=false",
            "data.system_prompt=Answer briefly: yes or no.",
            "data.train_split=2024",
            "train.mixed_precision=no",
        ],
    )
    assert recipe.train.max_steps == 20 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.lr == 5e-5
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.eval_split is None and recipe.eval.enabled is False
    checkpointing = recipe.train.gradient_checkpointing
    assert checkpointing.llm is False and checkpointing.vision_tower is True
    assert recipe.data.system_prompt == "Answer briefly: yes or no."  # text kept verbatim, not a mapping
    assert recipe.data.train_split == "2024"
    assert recipe.train.mixed_precision == "no"


def test_bad_overrides(minimal: Path) -> None:
    with pytest.raises(RecipeError, match="not of the form dotted.key=value"):
        load_recipe(minimal, ["train.max_steps"])
    with pytest.raises(RecipeError, match=r"unknown key 'train.lrr' \(did you mean 'lr'\?\)") as info:
        load_recipe(minimal, ["train.lrr=1"])
    assert str(minimal) in str(info.value)
    with pytest.raises(RecipeError, match="'train.lr' is a value, not a section"):
        load_recipe(minimal, ["train.lr.x=1"])
    with pytest.raises(RecipeError, match=r"train.lr: Input should be greater than 0.*override 'train.lr=0'"):
        load_recipe(minimal, ["train.lr=0"])


def test_vision_lr_ratio(minimal: Path) -> None:
    with pytest.raises(RecipeError, match=r"train.vision_lr_ratio must be > 0 \(got 0\)"):
        load_recipe(minimal, ["train.vision_lr_ratio=0"])
    with pytest.warns(UserWarning, match="5-50x lower"):
        assert load_recipe(minimal, ["train.vision_lr_ratio=100"]).train.vision_lr_ratio == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_recipe(minimal, ["train.vision_lr_ratio=10"]).train.lr_per_part["vision_tower"] == 2e-5


def test_cross_field_rules(minimal: Path) -> None:
    frozen = ["tune.llm=frozen", "tune.vision_tower=frozen", "tune.mm_projector=frozen"]
    with pytest.raises(RecipeError, match="nothing to train"):
        load_recipe(minimal, frozen)
    assert load_recipe(minimal, frozen[1:]).tune.llm == "lora"
    with pytest.raises(RecipeError, match="data.eval_split is null"):
        load_recipe(minimal, ["data.eval_split=null"])
    with pytest.raises(RecipeError, match="model.max_tiles must be >= 9"):
        load_recipe(minimal, ["model.image_aspect_ratio=dynamic_s2", "model.max_tiles=4"])
    assert load_recipe(minimal, ["tune.llm=qlora", "model.dtype=float32"]).tune.uses_lora


@pytest.mark.parametrize("name", ["medical", "quickstart"])
def test_recipe_to_yaml_round_trips(tmp_path: Path, name: str) -> None:
    overrides = ["lora.target_modules=[q_proj]", "train.mm_projector_lr=1e-5"]
    recipe = load_recipe(RECIPES / f"{name}.yaml", overrides)
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe
