"""Reading recipes: YAML -> `Recipe`, strictly, with `dotted.key=value` overrides, and back to YAML.

    recipe = load_recipe("recipes/medical.yaml", ["train.max_steps=20", "lora.r=16"])

A typo in a key is an error, never a silent default; all errors come out as one `RecipeError` naming
the file, each bad dotted key and what to do. Relative paths stay as typed: they are relative to the
current working directory, like paths on a command line, not to the YAML file's folder.
"""

from __future__ import annotations

import copy
import difflib
import logging
import platform
import subprocess
import sys
import time
import types
import typing
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError

from nvila_ft.train.recipe import Recipe, RecipeError

logger = logging.getLogger("nvila_ft.train.recipe")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class of a nested section field, or None for a leaf field."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_text(annotation: Any) -> bool:
    """Whether a field takes only text (`str` or `str | None`)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    return set(args) - {type(None)} == {str}


def _unknown_key(keys: Sequence[str]) -> str:
    """Message for an unknown dotted key: the closest valid key and all valid keys at that level."""
    cls: type[BaseModel] = Recipe
    for key in keys[:-1]:
        cls = _section_model(cls.model_fields[key].annotation)
    valid = list(cls.model_fields)
    close = difflib.get_close_matches(keys[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"under '{'.'.join(keys[:-1])}'" if len(keys) > 1 else "at the top level"
    return f"unknown key '{'.'.join(keys)}'{hint}. Valid keys {where}: {', '.join(valid)}"


def _field_for(keys: Sequence[str]) -> Any:
    """The pydantic FieldInfo at a dotted key path.

    Raises:
        ValueError: if a key is unknown or a leaf field is addressed like a section.
    """
    cls: type[BaseModel] | None = Recipe
    for depth, key in enumerate(keys):
        if cls is None:
            raise ValueError(f"'{'.'.join(keys[:depth])}' is a value, not a section: it has no key '{key}'")
        if key not in cls.model_fields:
            raise ValueError(_unknown_key(keys[: depth + 1]))
        field = cls.model_fields[key]
        cls = _section_model(field.annotation)
    return field


def _parse_value(raw: str, field: Any) -> Any:
    """An override value as YAML; text fields keep a value verbatim unless it is YAML text or null."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        if _is_text(field.annotation):
            return raw
        raise ValueError(f"cannot parse value {raw!r} as YAML: {err}") from None
    if _is_text(field.annotation) and value is not None and not isinstance(value, str):
        return raw  # e.g. data.train_split=2024 or a system prompt with a colon
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of a raw recipe dict with `dotted.key=value` overrides set.

    Values are parsed as YAML, so `train.max_steps=20` is an int, `lora.target_modules=[q_proj,v_proj]`
    a list and `data.eval_split=null` None; text fields (e.g. `data.system_prompt`) keep any other value
    verbatim. Sections that the dict lacks are created. Types are checked later, by the schema.

    Args:
        data: recipe as parsed from YAML (not modified).
        overrides: `dotted.key=value` strings, applied in order.

    Returns:
        The new dict.

    Raises:
        ValueError: for an override without `=`, an unknown key (with the closest valid one), or a
            non-text value that is not valid YAML.
    """
    data = copy.deepcopy(data)
    for override in overrides:
        dotted, sep, raw = override.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise ValueError(
                f"override {override!r} is not of the form dotted.key=value (e.g. train.max_steps=20)"
            )
        keys = dotted.split(".")
        try:
            value = _parse_value(raw.strip(), _field_for(keys))
        except ValueError as err:
            raise ValueError(f"override {override!r}: {err}") from None
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


def _fill_empty_sections(data: dict[str, Any], cls: type[BaseModel] = Recipe) -> None:
    """Turns sections written with no keys (`eval:` alone reads as null) into {} so they get defaults."""
    for name, field in cls.model_fields.items():
        section = _section_model(field.annotation)
        if section and name in data:
            if data[name] is None:
                data[name] = {}
            if isinstance(data[name], dict):
                _fill_empty_sections(data[name], section)


def _format_error(err: dict[str, Any], overrides: Sequence[str]) -> str:
    """One line per pydantic error: `dotted.key: reason (got value)`, plus the override that set it."""
    loc = tuple(str(part) for part in err["loc"])
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return _unknown_key(loc)
    if err["type"] == "missing":
        if _section_model(_field_for(loc).annotation):
            return f"{dotted}: required section missing (add a '{loc[-1]}:' section)"
        return f"{dotted}: required but missing (set it in the file or pass {dotted}=...)"
    if err["type"] == "value_error":  # our validators name their dotted keys themselves
        message = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
    else:
        message = f"{dotted}: {err['msg']} (got {err['input']!r})"
    set_by = [o for o in overrides if dotted and (dotted + ".").startswith(o.partition("=")[0].strip() + ".")]
    return message + (f" [set by override {set_by[-1]!r}]" if set_by else "")


def parse_recipe(data: Any, overrides: Sequence[str] = (), source: str = "<recipe>") -> Recipe:
    """Validates a raw recipe (a dict, as parsed from YAML) after applying overrides.

    Args:
        data: the recipe mapping; None counts as empty.
        overrides: `dotted.key=value` strings (see `apply_overrides`).
        source: name used in error messages, usually the YAML file's path.

    Returns:
        The validated `Recipe`.

    Raises:
        RecipeError: listing every problem, one `source: dotted.key: reason` line each.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: the recipe must be a mapping of sections (model, data, ...), "
            f"got {type(data).__name__}"
        )
    try:
        data = apply_overrides(data, overrides)
    except ValueError as err:
        raise RecipeError(f"{source}: {err}") from None
    _fill_empty_sections(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: {_format_error(e, overrides)}" for e in err.errors(include_url=False)]
        raise RecipeError("\n".join(lines)) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Loads a YAML recipe, applies `dotted.key=value` overrides and validates it.

    Args:
        path: the YAML file.
        overrides: e.g. `["train.max_steps=20", "lora.target_modules=[q_proj,v_proj]"]`.

    Returns:
        The validated `Recipe`. Relative paths inside it are kept as written (relative to the
        current working directory).

    Raises:
        RecipeError: if the file is missing or is not valid YAML (with the line), or for an unknown key,
            a bad override or an invalid value (naming the file and each dotted key).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark:
            problem += f" ({context} started on line {context_mark.line + 1})"
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    recipe = parse_recipe(data, overrides, source=str(path))
    logger.debug("loaded recipe %s with overrides %s", path, list(overrides))
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every field included, to save next to a run's outputs.

    `load_recipe` on this text gives back an equal `Recipe`.
    """
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def run_info(recipe: Recipe) -> dict:
    """What ran: package versions, git commit of this kit, platform."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    pkgs = ["nvila-ft", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"]
    versions = {}
    for p in pkgs:
        try:
            versions[p] = version(p)
        except Exception:  # noqa: BLE001 - optional packages
            versions[p] = None
    local = Path(recipe.model.path)
    return {"base_model": recipe.model.path, "base_model_path": str(local.resolve()) if local.is_dir() else None,
            "git_commit": commit, "versions": versions,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
