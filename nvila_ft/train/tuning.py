"""Per-part trainability (`tune.llm`, `tune.vision_tower`, `tune.mm_projector`) and learning-rate groups.

The default is the NVILA paper's PEFT recipe (arXiv 2412.04468, "Efficient fine-tuning"): LoRA on the
LLM, LayerNorm-only tuning of the vision tower with a 5-50x lower learning rate, the projector fully
trained. LoRA itself is `peft`'s; this module only decides which modules get what.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.safetensors"
PARTS = ("llm", "vision_tower", "mm_projector")


def base_model(model: nn.Module) -> nn.Module:
    """The NVILA model under a `PeftModel` wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def used_vision_layers(model: nn.Module) -> int:
    """Number of SigLIP encoder layers whose output reaches the projector.

    Features are `hidden_states[mm_vision_select_layer]` (-2: output of the second-to-last layer), so
    with L layers the first L + 1 + select_layer layers are used; the rest and `post_layernorm` get no
    gradient (architecture note, "Vision tower").
    """
    tower = model.vision_tower
    n = len(getattr(tower, "vision_model", tower).encoder.layers)
    select = model.config.mm_vision_select_layer
    return n + 1 + select if select < 0 else select


def _vision_layer_index(name: str) -> int | None:
    m = re.search(r"vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def lora_target_names(model: nn.Module, part: str, target_modules: list[str] | str) -> list[str]:
    """Full names of the Linear layers of `part` that get LoRA.

    `all-linear` means every Linear of the part except the LLM's `lm_head` and, in the vision tower,
    layers that receive no gradient; a list keeps the Linear layers whose name ends with one of its
    entries (e.g. `q_proj`).
    """
    used = used_vision_layers(model) if part == "vision_tower" else None
    names = []
    for name, module in model.named_modules():
        if not name.startswith(part + ".") or not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        if used is not None and (_vision_layer_index(name) is None or _vision_layer_index(name) >= used):
            continue
        if target_modules == "all-linear" or any(name.split(".")[-1] == t for t in target_modules):
            names.append(name)
    return names


def _extra_trainable(model: nn.Module, tune) -> Iterable[tuple[str, nn.Parameter]]:
    """Parameters trained in full (not through LoRA) under the recipe's `tune` modes."""
    used = used_vision_layers(model)
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if part == "mm_projector" and tune.mm_projector == "full":
            yield name, p
        elif part == "llm" and tune.llm == "full":
            yield name, p
        elif part == "vision_tower" and tune.vision_tower in ("layernorm", "full"):
            idx = _vision_layer_index(name)
            if "post_layernorm" in name or "head" in name.split("."):
                continue  # never reached by the loss
            if idx is not None and idx >= used:
                continue
            if tune.vision_tower == "full" or (idx is not None and re.search(r"\.layer_norm[12]\.", name)):
                yield name, p


def apply_tuning(model: nn.Module, tune, lora) -> nn.Module:
    """Freezes/unfreezes parts and adds LoRA adapters per the recipe.

    Args:
        model: a loaded :class:`~nvila_ft.model.modeling.NvilaForConditionalGeneration`.
        tune: recipe `tune` section (`llm`, `vision_tower`, `mm_projector` modes).
        lora: recipe `lora` section (`r`, `alpha`, `dropout`, `target_modules`, `use_dora`).

    Returns:
        A `peft.PeftModel` when any part uses LoRA, else the model; requires_grad is True exactly on
        the LoRA weights and the parameters trained in full.
    """
    model.requires_grad_(False)
    targets = []
    if tune.llm in ("lora", "qlora"):
        targets += lora_target_names(model, "llm", lora.target_modules)
    if tune.vision_tower == "lora":
        targets += lora_target_names(model, "vision_tower", lora.target_modules)
    extra = [p for _, p in _extra_trainable(model, tune)]
    if targets:
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                use_dora=lora.use_dora, bias="none",
            ),
        )
    for p in extra:
        p.requires_grad_(True)
    return model


def part_of(name: str) -> str:
    """`llm` | `vision_tower` | `mm_projector` for a (possibly PEFT-prefixed) parameter name."""
    name = re.sub(r"^(base_model\.model\.)", "", name)
    return name.split(".")[0]


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, train) -> list[dict]:
    """Optimizer groups: (part x decay/no-decay), each with its learning rate.

    LLM: `train.lr`; vision tower: `train.lr / train.vision_lr_ratio` (paper: 5-50x lower than the LLM);
    projector: `train.mm_projector_lr` (default `train.lr`). Norms and biases get no weight decay.
    Each group carries `name` for the start-up table.
    """
    lrs = train.lr_per_part
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, nd = part_of(name), _no_decay(name, p)
        g = groups.setdefault((part, nd), {
            "params": [], "names": [], "lr": lrs[part], "weight_decay": 0.0 if nd else train.weight_decay,
            "name": f"{part}{' (no decay)' if nd else ''}",
        })
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def numel(p: torch.Tensor) -> int:
    """Logical parameter count (a bitsandbytes 4-bit tensor stores two values per byte)."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def trainable_table(model: nn.Module, groups: list[dict]) -> str:
    """Start-up table: trainable / total parameters per part, then each learning-rate group."""
    rows = ["part           trainable        total   share"]
    for part in PARTS:
        total = sum(numel(p) for n, p in model.named_parameters() if part_of(n) == part and "lora_" not in n)
        trainable = sum(p.numel() for n, p in model.named_parameters() if part_of(n) == part and p.requires_grad)
        rows.append(f"{part:<14}{trainable:>10,} {total:>12,}  {100 * trainable / max(total, 1):6.2f}%")
    rows.append("lr group                     params        lr   weight_decay")
    for g in groups:
        rows.append(f"{g['name']:<26}{sum(p.numel() for p in g['params']):>10,}  {g['lr']:.2e}   {g['weight_decay']}")
    return "\n".join(rows)


def non_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters that are not LoRA weights, under the official names (`mm_projector.layers.1.weight`,
    `vision_tower.encoder.layers.0.layer_norm1.weight`, ...), on CPU."""
    base = base_model(model)
    return {
        n: p.detach().to("cpu").contiguous()
        for n, p in base.named_parameters()
        if p.requires_grad and "lora_" not in n
    }


def save_non_lora(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Writes :func:`non_lora_state_dict` to `folder/non_lora_trainables.safetensors` atomically."""
    path = Path(folder) / NON_LORA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(non_lora_state_dict(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def read_non_lora(model: nn.Module, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of `folder/non_lora_trainables.safetensors` (on the CPU), checked against `model`; {} if absent.

    Raises:
        KeyError: a tensor the model does not have (named).
        ValueError: a tensor whose shape differs from the model's parameter.
    """
    path = Path(folder) / NON_LORA_FILE
    if not path.is_file():
        return {}
    state = load_file(path)
    params = dict(base_model(model).named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise KeyError(f"{path}: tensors not in the model: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(params[k].shape)}" for k, v in state.items() if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from the model's: {wrong[:5]}")
    return state


def load_non_lora(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Loads `non_lora_trainables.safetensors` from `folder` into the model (if present).

    Returns the names loaded. Raises as :func:`read_non_lora`.
    """
    state = read_non_lora(model, folder)
    params = dict(base_model(model).named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    return list(state)
