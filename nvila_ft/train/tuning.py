"""Per-part trainability (`tune.llm`, `tune.vision_tower`, `tune.mm_projector`) and learning-rate groups.

The default is the NVILA paper's PEFT recipe (arXiv 2412.04468, "Efficient fine-tuning"): LoRA on the
LLM, LayerNorm-only tuning of the vision tower with a 5-50x lower learning rate, the projector fully
trained. LoRA itself is `peft`'s; this module only decides which modules get what. Parts trained in full
are peft `modules_to_save` (trained copies in the adapter file), so one peft adapter holds everything a run
trains; `non_lora_trainables.safetensors` is only read (official export, run folders of earlier versions).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import DUMMY_TARGET_MODULES
from safetensors.torch import load_file
from torch import nn

from nvila_ft.model.configuration import vision_layers_run

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.safetensors"
PARTS = ("llm", "vision_tower", "mm_projector")


def base_model(model: nn.Module) -> nn.Module:
    """The NVILA model under a `PeftModel` wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def used_vision_layers(model: nn.Module) -> int:
    """Number of SigLIP encoder layers whose output reaches the projector.

    Features are `hidden_states[mm_vision_select_layer]` (-2: output of the second-to-last layer), so
    with L layers the first L + 1 + select_layer layers are used; the rest and `post_layernorm` do not run
    and get no gradient (`modeling.vision_layers_run`; architecture note, "Vision tower").
    """
    tower = model.vision_tower
    n = len(getattr(tower, "vision_model", tower).encoder.layers)
    return vision_layers_run(n, model.config.mm_vision_select_layer)


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


def trainable_modules(model: nn.Module, tune) -> list[str]:
    """Full names of the modules trained in full (not through LoRA): peft's `modules_to_save`.

    The fewest modules whose parameters are exactly those :func:`_extra_trainable` selects: `mm_projector`
    for `tune.mm_projector: full`; `layer_norm1` / `layer_norm2` of each used SigLIP layer for
    `tune.vision_tower: layernorm` (never `post_layernorm`, the last layer or any LLM norm: they get no
    gradient or are not the vision tower's); the embeddings and used layers for `vision_tower: full`;
    `llm` for `llm: full`. Names are full paths: peft matches a module whose name *ends* with an entry.

    Raises:
        RuntimeError: a selected parameter would not be covered (a module holding both selected and
            unselected parameters directly); a bug in the selection, not a user error.
    """
    wanted = {n for n, _ in _extra_trainable(model, tune)}
    names: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = [prefix + n for n, _ in module.named_parameters()]
        if not params or not any(p in wanted for p in params):
            return
        if all(p in wanted for p in params):
            names.append(prefix.rstrip("."))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)

    for child_name, child in model.named_children():
        visit(f"{child_name}.", child)
    covered = {f"{m}.{n}" for m in names for n, _ in model.get_submodule(m).named_parameters()}
    if covered != wanted:
        raise RuntimeError(f"modules_to_save cannot express the trainables exactly: {sorted(wanted - covered)[:5]}")
    return names


def apply_tuning(model: nn.Module, tune, lora) -> nn.Module:
    """Freezes/unfreezes parts and adds LoRA adapters and trained copies per the recipe, all through peft.

    LoRA goes on the Linear layers :func:`lora_target_names` picks; the parts trained in full (projector,
    vision LayerNorms, whole parts in `full` modes) become peft `modules_to_save` (:func:`trainable_modules`):
    peft keeps a trainable copy of each beside the frozen original, saves the copies in the adapter file,
    restores them with `PeftModel.from_pretrained` / `load_adapter`, switches them with `set_adapter` and
    bypasses them under `disable_adapter()`. The result is always a `PeftModel`, also when no part uses
    LoRA (peft's dummy `target_modules`): save, resume and loading then have a single path.

    Args:
        model: a loaded :class:`~nvila_ft.model.modeling.NvilaForConditionalGeneration`.
        tune: recipe `tune` section (`llm`, `vision_tower`, `mm_projector` modes).
        lora: recipe `lora` section (`r`, `alpha`, `dropout`, `target_modules`, `use_dora`).

    Returns:
        A `peft.PeftModel` (adapter "default"); requires_grad is True exactly on the LoRA weights and the
        copies of the modules trained in full. The model itself when nothing is trained.
    """
    model.requires_grad_(False)
    targets = []
    if tune.llm in ("lora", "qlora"):
        targets += lora_target_names(model, "llm", lora.target_modules)
    if tune.vision_tower == "lora":
        targets += lora_target_names(model, "vision_tower", lora.target_modules)
    modules = trainable_modules(model, tune)
    if not targets and not modules:
        return model
    return get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora, bias="none",
            target_modules=targets or DUMMY_TARGET_MODULES, modules_to_save=modules or None,
        ),
    )


def release_full_originals(model: nn.Module, tune) -> int:
    """Empties the frozen originals peft keeps beside the trained copies of whole parts (`tune.llm: full`,
    `tune.vision_tower: full`), for training only.

    Training never runs the base of a part it trains in full, and peft's save and resume touch only the copies;
    the originals would cost `model.dtype` bytes per parameter of the part: 14.2 GiB for `llm: full` and
    0.86 GiB for `vision_tower: full` at NVILA-8B in bf16 (`benchmarks/modules_to_save_memory.py`). The
    small originals of the projector and vision LayerNorms stay, so `disable_adapter()` gives the base model
    in the default recipes. After this, `disable_adapter()` on a full-mode model fails; runs loaded for
    inference (`PeftModel.from_pretrained`) keep every original.

    Returns:
        Bytes freed.
    """
    parts = {p for p in ("llm", "vision_tower") if getattr(tune, p) == "full"}
    freed = 0
    for name, module in base_model(model).named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.split(".")[0] in parts:
            for p in module.original_module.parameters():
                freed += p.numel() * p.element_size()
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return freed


def official_name(name: str) -> str:
    """A parameter's name in the NVILA checkpoint: without peft's `base_model.model.` prefix, the
    `modules_to_save.<adapter>.` / `original_module.` level of a trained copy and the `base_layer.` of a
    LoRA layer (`base_model.model.mm_projector.modules_to_save.default.layers.1.weight` ->
    `mm_projector.layers.1.weight`)."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.modules_to_save\.[^.]+\.|\.original_module\.|\.base_layer\.", ".", name)
    return name


def is_original(name: str) -> bool:
    """True for the frozen original of a module peft trains as a copy (`modules_to_save`)."""
    return ".original_module." in name


def part_of(name: str) -> str:
    """`llm` | `vision_tower` | `mm_projector` for a (possibly PEFT-prefixed) parameter name."""
    return official_name(name).split(".")[0]


def _no_decay(name: str, ndim: int) -> bool:
    return ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, train, ndims: dict[str, int] | None = None) -> list[dict]:
    """Optimizer groups: (part x decay/no-decay), each with its learning rate.

    LLM: `train.lr`; vision tower: `train.lr / train.vision_lr_ratio` (paper: 5-50x lower than the LLM);
    projector: `train.mm_projector_lr` (default `train.lr`). Norms and biases get no weight decay.
    Each group carries `name` for the start-up table. `ndims`: {name: dimensions} recorded before FSDP
    flattened the parameters (its views are 1-D), for the norm/bias rule; None: the parameters' own.
    """
    lrs = train.lr_per_part
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, nd = part_of(name), _no_decay(name, p.ndim if ndims is None else ndims.get(name, p.ndim))
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
        total = sum(numel(p) for n, p in model.named_parameters()
                    if part_of(n) == part and "lora_" not in n and ".modules_to_save." not in n)
        trainable = sum(p.numel() for n, p in model.named_parameters() if part_of(n) == part and p.requires_grad)
        rows.append(f"{part:<14}{trainable:>10,} {total:>12,}  {100 * trainable / max(total, 1):6.2f}%")
    rows.append("lr group                     params        lr   weight_decay")
    for g in groups:
        rows.append(f"{g['name']:<26}{sum(p.numel() for p in g['params']):>10,}  {g['lr']:.2e}   {g['weight_decay']}")
    return "\n".join(rows)


def non_lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter trains in full (its `modules_to_save` copies), under the official NVILA names
    (`mm_projector.layers.1.weight`, `vision_tower.encoder.layers.0.layer_norm1.weight`, ...), on the CPU.

    Args:
        model: a `PeftModel` from :func:`apply_tuning` or `PeftModel.from_pretrained`; {} for a plain model.
        adapter_name: default the active adapter.
    """
    if not isinstance(model, PeftModel):
        return {}
    state = get_peft_model_state_dict(model, adapter_name=adapter_name or model.active_adapter)
    return {k.removeprefix("base_model.model."): v.detach().to("cpu").contiguous()
            for k, v in state.items() if "lora_" not in k}


def read_non_lora(model: nn.Module, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of `folder/non_lora_trainables.safetensors` (on the CPU), checked against `model`; {} if absent.

    That file is the official export (:func:`nvila_ft.merge.export_official`) and what run folders of
    nvila_ft before peft `modules_to_save` held; new run folders keep these tensors in the adapter file.

    Raises:
        KeyError: a tensor the model does not have (named).
        ValueError: a tensor whose shape differs from the model's parameter.
    """
    path = Path(folder) / NON_LORA_FILE
    if not path.is_file():
        return {}
    state = load_file(path)
    params = _base_params(model)
    missing = [k for k in state if k not in params]
    if missing:
        raise KeyError(f"{path}: tensors not in the model: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(params[k].shape)}" for k, v in state.items() if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from the model's: {wrong[:5]}")
    return state


def load_non_lora(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copies `folder/non_lora_trainables.safetensors` (official export or an older run folder) into the
    model's base weights, if the file is there; they then hold for every adapter and for the base.

    Returns the names loaded. Raises as :func:`read_non_lora`.
    """
    state = read_non_lora(model, folder)
    params = _base_params(model)
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    return list(state)


def _base_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Base weights by official name (the originals of `modules_to_save` copies, never the copies)."""
    return {official_name(n): p for n, p in base_model(model).named_parameters() if ".modules_to_save." not in n}


def undo_kbit_upcast(llm: nn.Module, dtype: torch.dtype) -> None:
    """Casts the frozen LLM weights that `prepare_model_for_kbit_training` upcast to fp32 back to `dtype`.

    peft upcasts every parameter that is not 4-bit to fp32 (and freezes it). All of them are frozen
    here; the largest are the vocabulary matrices (NVILA-8B: embed_tokens + lm_head = 2 x 151,651 x
    3,584 = 1.09B params, 4.05 GiB in fp32 vs 2.03 GiB in bf16), the rest are norms and biases. All go
    back, not only the vocabulary matrices: an fp32 final norm feeding a bf16 `lm_head` would fail
    without autocast. The model is then in `dtype` as loaded, like a LoRA run; the trainables are made
    later (fp32 under mixed precision, see :meth:`TrainingRun.load_model`). No-op for fp32 recipes.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return
    for param in llm.parameters():
        if param.dtype == torch.float32 and not param.requires_grad:
            param.data = param.data.to(dtype)
