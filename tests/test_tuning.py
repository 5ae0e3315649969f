"""Per-part trainability, learning-rate groups and the non-LoRA trainables file (nvila_ft.train.tuning).

    /work/venv/bin/pytest tests/test_tuning.py -q

Expected sets are derived from `../shared/docs/nvila-architecture.md` ("Vision tower", "Fine-tuning facts"),
not from the code under test: features are `hidden_states[-2]`, so of L SigLIP layers the first L - 1 feed the
projector; the last layer and `post_layernorm` get no gradient and must not be trainable. Tiny seeded
checkpoints of both variants are built once for the module, in float32.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from nvila_ft.demo.medical import build_quickstart_dataset
from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.modeling import NvilaForConditionalGeneration, _compute_param
from nvila_ft.model.processing import NvilaProcessor
from nvila_ft.train.recipe import LoraConfig, TrainConfig, TuneConfig
from nvila_ft.train.tuning import (
    NON_LORA_FILE,
    apply_tuning,
    base_model,
    load_non_lora,
    non_lora_state_dict,
    param_groups,
    release_full_originals,
    trainable_modules,
    trainable_table,
)

VARIANTS = ["nvila", "nvila-lite"]
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
_LAYER = re.compile(r"^vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tuning")
    return {v: build_tiny_checkpoint(root / v, variant=v, seed=0) for v in VARIANTS}


@pytest.fixture(scope="module")
def batches(checkpoints, tmp_path_factory) -> dict:
    """One real encoded training sample per variant: a quickstart DICOM image and its question/answer.

    `resize` (one 448 px tile) keeps a forward+backward well under a second; the tiling mode does not change
    which parameters the loss reaches.
    """
    data = build_quickstart_dataset(tmp_path_factory.mktemp("data") / "quickstart")
    row = json.loads((data / "train.json").read_text())[0]
    out = {}
    for variant, path in checkpoints.items():
        model = load(path)
        processor = NvilaProcessor(model.tokenizer, model.config, image_aspect_ratio="resize")
        out[variant] = processor.collate([processor(row["conversations"], [data / row["image"]])])
        assert (out[variant]["labels"] != -100).any()
    return out


def load(path) -> NvilaForConditionalGeneration:
    return NvilaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def clean(name: str) -> str:
    """A parameter name without peft's `modules_to_save.default.` level (the trained copy of a module)."""
    return name.replace(".modules_to_save.default.", ".")


def trainable(model: nn.Module) -> set[str]:
    """Names (without the PEFT prefix) of the parameters with requires_grad."""
    return {clean(n) for n, p in base_model(model).named_parameters() if p.requires_grad}


def vision_layer(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def used_layers(model: nn.Module) -> int:
    """Encoder layers that feed the features: all but the last (`hidden_states[-2]`)."""
    n_layers = 1 + max(vision_layer(n) for n, _ in model.named_parameters() if vision_layer(n) is not None)
    return n_layers - 1


def vision_layernorms(model: nn.Module) -> set[str]:
    used = used_layers(model)
    return {
        n
        for n, _ in model.named_parameters()
        if vision_layer(n) is not None and vision_layer(n) < used and re.search(r"\.layer_norm[12]\.", n)
    }


def lora_names(modules: list[str]) -> set[str]:
    return {f"{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}


def linear_modules(model: nn.Module, part: str) -> list[str]:
    return [n for n, m in model.named_modules() if n.startswith(part + ".") and isinstance(m, nn.Linear)]


def part_params(model: nn.Module, part: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(part + ".")}


def expected_vision(fresh: nn.Module, mode: str) -> set[str]:
    """The vision-tower parameters each mode must train, from the architecture note alone."""
    used = used_layers(fresh)
    if mode == "layernorm":
        return vision_layernorms(fresh)
    if mode == "full":  # embeddings + every weight of the used layers; never post_layernorm or the last layer
        return {
            n
            for n in part_params(fresh, "vision_tower")
            if (vision_layer(n) is None and "post_layernorm" not in n)
            or (vision_layer(n) is not None and vision_layer(n) < used)
        }
    assert mode == "lora"
    return lora_names([m for m in linear_modules(fresh, "vision_tower") if vision_layer(m + ".") < used])


# ---------------------------------------------------------------------------------------------- trainable sets
@pytest.mark.parametrize("variant", VARIANTS)
def test_default_mode_trains_llm_lora_vision_layernorms_and_projector(checkpoints, variant):
    fresh = load(checkpoints[variant])
    llm_linears = [m for m in linear_modules(fresh, "llm") if not m.endswith("lm_head")]
    expected = lora_names(llm_linears) | vision_layernorms(fresh) | part_params(fresh, "mm_projector")

    model = apply_tuning(load(checkpoints[variant]), TuneConfig(), LORA)

    assert isinstance(model, PeftModel)
    assert trainable(model) == expected
    # Spelled out, the facts the set equality encodes:
    last = used_layers(fresh)
    names = trainable(model)
    assert not any("lm_head" in n for n in names)
    assert not any(vision_layer(n) == last for n in names), "the last SigLIP layer gets no gradient"
    assert not any(re.search(r"embeddings|self_attn|mlp|post_layernorm", n) for n in names if "vision" in n)
    assert len(vision_layernorms(fresh)) == 4 * last  # layer_norm1/2 x weight/bias per used layer


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["layernorm", "full", "lora"])
def test_vision_tower_trains_exactly_the_params_that_get_gradient(checkpoints, batches, variant, mode):
    fresh = load(checkpoints[variant])
    model = apply_tuning(load(checkpoints[variant]), TuneConfig(vision_tower=mode), LORA)
    if mode == "lora":
        # peft starts lora_B at zero, which zeroes lora_A's gradient; give B values so both must get one.
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0.0, 0.1)

    model(**batches[variant]).loss.backward()

    vision = {clean(n): p for n, p in base_model(model).named_parameters()
              if n.startswith("vision_tower.") and ".original_module." not in n}
    with_grad = {n for n, p in vision.items() if p.grad is not None and p.grad.abs().sum() > 0}
    trained = {n for n, p in vision.items() if p.requires_grad}
    assert trained == expected_vision(fresh, mode)
    assert with_grad == trained, (
        f"trainable but no gradient: {sorted(trained - with_grad)}; gradient but frozen: {sorted(with_grad - trained)}"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_frozen_llm_and_vision_trains_only_the_projector(checkpoints, variant):
    fresh = load(checkpoints[variant])
    tune = TuneConfig(llm="frozen", vision_tower="frozen", mm_projector="full")

    model = apply_tuning(load(checkpoints[variant]), tune, LORA)

    # No part uses LoRA: still a PeftModel (peft's dummy target), the projector a modules_to_save copy.
    assert isinstance(model, PeftModel) and model.peft_config["default"].modules_to_save == ["mm_projector"]
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert trainable(model) == part_params(fresh, "mm_projector")


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_llm_trains_every_llm_param(checkpoints, variant):
    fresh = load(checkpoints[variant])
    tune = TuneConfig(llm="full", vision_tower="frozen", mm_projector="frozen")

    model = apply_tuning(load(checkpoints[variant]), tune, LORA)

    assert isinstance(model, PeftModel) and model.peft_config["default"].modules_to_save == ["llm"]
    assert trainable(model) == part_params(fresh, "llm")
    assert model.llm.get_output_embeddings().weight.requires_grad  # tied or not, the head trains too


def test_lora_target_list_adapts_only_the_named_projections(checkpoints):
    fresh = load(checkpoints["nvila"])
    tune = TuneConfig(vision_tower="frozen", mm_projector="frozen")

    model = apply_tuning(
        load(checkpoints["nvila"]), tune, LORA.model_copy(update={"target_modules": ["q_proj", "v_proj"]})
    )

    targets = [m for m in linear_modules(fresh, "llm") if m.endswith((".q_proj", ".v_proj"))]
    assert len(targets) == 2 * 2  # q_proj and v_proj of the tiny LLM's 2 layers
    assert trainable(model) == lora_names(targets)


# ---------------------------------------------------------------------------------------------- lr groups
def _expects_no_decay(model: nn.Module, name: str) -> bool:
    """Norm scales and biases, by the type of the module that owns them (not by the name rule under test)."""
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    return name.endswith(".bias") or isinstance(owner, nn.LayerNorm) or "RMSNorm" in type(owner).__name__


@pytest.mark.parametrize(
    "variant, tune",
    [
        ("nvila", TuneConfig()),
        ("nvila", TuneConfig(llm="full", vision_tower="full")),
        ("nvila", TuneConfig(llm="frozen", vision_tower="lora")),
        ("nvila-lite", TuneConfig(llm="full", vision_tower="layernorm")),
    ],
    ids=["default", "all-full", "vision-lora", "lite-full-llm"],
)
@pytest.mark.parametrize("ratio, projector_lr", [(10.0, None), (25.0, 5e-4)])
def test_param_groups_set_lr_per_part_and_no_decay_on_norms_and_biases(
    checkpoints, variant, tune, ratio, projector_lr
):
    train = TrainConfig(lr=1e-3, vision_lr_ratio=ratio, mm_projector_lr=projector_lr, weight_decay=0.1)
    model = apply_tuning(load(checkpoints[variant]), tune, LORA)
    base = base_model(model)
    name_of = {id(p): n for n, p in base.named_parameters()}
    expected_lr = {"llm": 1e-3, "vision_tower": 1e-3 / ratio, "mm_projector": projector_lr or 1e-3}

    groups = param_groups(model, train)

    seen = Counter(id(p) for g in groups for p in g["params"])
    assert set(seen) == {id(p) for p in base.parameters() if p.requires_grad}  # frozen params in no group
    assert set(seen.values()) == {1}  # every trainable param in exactly one group
    parts = set()
    for g in groups:
        for p in g["params"]:
            name = name_of[id(p)]
            part = name.split(".")[0]
            parts.add(part)
            assert g["lr"] == pytest.approx(expected_lr[part]), name
            assert g["weight_decay"] == (0.0 if _expects_no_decay(base, name) else 0.1), name
    assert parts == {"llm", "vision_tower", "mm_projector"} - ({"llm"} if tune.llm == "frozen" else set())


def test_trainable_table_counts_each_part(checkpoints):
    fresh = load(checkpoints["nvila"])
    model = apply_tuning(load(checkpoints["nvila"]), TuneConfig(), LORA)
    params = dict(fresh.named_parameters())

    table = trainable_table(base_model(model), param_groups(model, TrainConfig()))

    lines = table.splitlines()
    rows = {
        line.split()[0]: line.split()
        for line in lines[1 : lines.index(next(x for x in lines if x.startswith("lr group")))]
    }
    vision_trainable = sum(params[n].numel() for n in vision_layernorms(fresh))
    vision_total = sum(p.numel() for n, p in params.items() if n.startswith("vision_tower."))
    projector_total = sum(p.numel() for n, p in params.items() if n.startswith("mm_projector."))
    assert rows["vision_tower"][1:3] == [f"{vision_trainable:,}", f"{vision_total:,}"]
    assert rows["mm_projector"][1:4] == [f"{projector_total:,}", f"{projector_total:,}", "100.00%"]


# ---------------------------------------------------------------------------------------------- modules_to_save
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "tune",
    [TuneConfig(), TuneConfig(llm="frozen", vision_tower="layernorm", mm_projector="frozen"),
     TuneConfig(vision_tower="full"), TuneConfig(llm="full", vision_tower="lora", mm_projector="frozen"),
     TuneConfig(llm="frozen", vision_tower="frozen")],
    ids=["default", "layernorm-only", "vision-full", "llm-full", "projector-only"],
)
def test_modules_to_save_are_exactly_the_modules_trained_in_full(checkpoints, variant, tune):
    fresh = load(checkpoints[variant])
    used = used_layers(fresh)
    expected = ["mm_projector"] if tune.mm_projector == "full" else []
    if tune.llm == "full":
        expected.append("llm")
    if tune.vision_tower == "layernorm":
        expected += [n for n, _ in fresh.named_modules() if re.search(r"\.layer_norm[12]$", n)
                     and n.startswith("vision_tower.") and vision_layer(n + ".") < used]
    if tune.vision_tower == "full":
        expected += [n for n, _ in fresh.named_modules() if n.startswith("vision_tower.") and (
            n.endswith(".embeddings") or (re.search(r"\.layers\.\d+$", n) and vision_layer(n + ".") < used))]

    model = apply_tuning(load(checkpoints[variant]), tune, LORA)

    assert sorted(model.peft_config["default"].modules_to_save) == sorted(expected) == sorted(
        trainable_modules(fresh, tune))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if type(m).__name__ == "ModulesToSaveWrapper"}
    assert wrapped == set(expected)
    # Never an LLM norm (RMSNorm) unless the whole LLM trains; never post_layernorm.
    assert not any("post_layernorm" in n or (n.startswith("llm.") and "norm" in n) for n in wrapped)


def test_inputs_take_the_dtype_of_the_trained_copy_not_of_the_frozen_original(checkpoints):
    """Under mixed precision training keeps trainables in fp32 beside bf16 frozen weights: the projector's (and a
    fully trained vision tower's) input must be cast to the dtype of the copy that runs, as before wrapping."""
    base = NvilaForConditionalGeneration.from_pretrained(checkpoints["nvila"], dtype=torch.bfloat16)
    model = apply_tuning(base, TuneConfig(vision_tower="full"), LORA)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as TrainingRun.load_model does under mixed precision
    inner = model.get_base_model()
    assert inner._projector_dtype == torch.float32
    assert _compute_param(inner.vision_tower).dtype == torch.float32  # the embeddings' trained copy
    assert _compute_param(inner.vision_tower) is inner.vision_tower.embeddings.patch_embedding.weight


def _perturb_copies(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training: move every trained copy
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))


def test_adapter_file_holds_the_projector_and_layernorm_copies_and_loads_them_back(checkpoints, tmp_path):
    fresh = load(checkpoints["nvila"])
    model = apply_tuning(load(checkpoints["nvila"]), TuneConfig(), LORA)
    _perturb_copies(model, 0)
    trained = non_lora_state_dict(model)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    other = PeftModel.from_pretrained(load(checkpoints["nvila"]), tmp_path)

    official = vision_layernorms(fresh) | part_params(fresh, "mm_projector")
    assert {k.removeprefix("base_model.model.") for k in saved if "lora_" not in k} == official == set(trained)
    assert set(non_lora_state_dict(other)) == official
    base = dict(fresh.named_parameters())
    for name, value in non_lora_state_dict(other).items():
        assert torch.equal(value, trained[name]), name
        assert not torch.equal(value, base[name]), name
    with other.disable_adapter():  # the base's own values answer with the adapter disabled
        originals = {clean(n).replace(".original_module.", "."): p
                     for n, p in base_model(other).named_parameters() if ".original_module." in n}
        assert set(originals) == official
        assert all(torch.equal(p, base[n]) for n, p in originals.items())


def test_set_adapter_switches_the_trained_copies(checkpoints, tmp_path, batches):
    runs = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = apply_tuning(load(checkpoints["nvila"]), TuneConfig(llm="frozen"), LORA)
        _perturb_copies(model, seed)
        model.save_pretrained(tmp_path / name)
        runs[name] = model.eval()
    batch = batches["nvila"]
    with torch.no_grad():
        expected = {k: m(**batch).logits for k, m in runs.items()}
        base_logits = load(checkpoints["nvila"]).eval()(**batch).logits
        bank = PeftModel.from_pretrained(load(checkpoints["nvila"]), tmp_path / "a", adapter_name="a")
        bank.load_adapter(tmp_path / "b", adapter_name="b")
        bank.eval()
        assert (expected["a"] - expected["b"]).abs().max() > 1e-3
        for name in ("b", "a", "b"):
            bank.set_adapter(name)
            torch.testing.assert_close(bank(**batch).logits, expected[name], rtol=0, atol=0, msg=name)
        with bank.disable_adapter():
            torch.testing.assert_close(bank(**batch).logits, base_logits, rtol=0, atol=0)


def test_training_releases_the_originals_of_full_parts_only(checkpoints, tmp_path, batches):
    tune = TuneConfig(llm="full", vision_tower="full")
    model = apply_tuning(load(checkpoints["nvila"]), tune, LORA)
    originals = {n: p.numel() * p.element_size() for n, p in base_model(model).named_parameters()
                 if ".original_module." in n}

    freed = release_full_originals(model, tune)

    full = {n for n in originals if n.startswith(("llm.", "vision_tower."))}
    assert freed == sum(originals[n] for n in full) > 0
    left = {n: p.numel() for n, p in base_model(model).named_parameters() if ".original_module." in n}
    assert {n for n, k in left.items() if k} == set(originals) - full != set()  # the projector's original stays
    loss = model(**batches["nvila"]).loss
    loss.backward()  # training runs on the copies alone
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(load(checkpoints["nvila"]), tmp_path).eval()
        torch.testing.assert_close(loaded(**batches["nvila"]).loss, loss.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- non-LoRA file
def test_legacy_non_lora_file_loads_into_the_base_weights(checkpoints, tmp_path):
    """Run folders of earlier versions (and `nvila_ft.merge --non-lora-trainables`) hold the parts trained in
    full in `non_lora_trainables.safetensors` under official names."""
    fresh = load(checkpoints["nvila"])
    source = apply_tuning(load(checkpoints["nvila"]), TuneConfig(), LORA)
    _perturb_copies(source, 0)
    modified = non_lora_state_dict(source)
    save_file(modified, tmp_path / NON_LORA_FILE)

    other = load(checkpoints["nvila"])
    loaded = load_non_lora(other, tmp_path)

    # Official names (no PEFT prefix), projector + used vision LayerNorms only, no LoRA weights.
    assert set(loaded) == set(modified) == vision_layernorms(fresh) | part_params(fresh, "mm_projector")
    restored = dict(other.named_parameters())
    for name, value in modified.items():
        assert torch.equal(restored[name], value), name
        assert not torch.equal(restored[name], dict(fresh.named_parameters())[name]), name


def test_load_non_lora_names_a_tensor_the_model_lacks_and_changes_nothing(checkpoints, tmp_path):
    # Trainables of a full-vision-tower run (embeddings, layers 0-1 of 3) loaded onto another base whose SigLIP
    # has a single layer: the layer-1 tensors have nowhere to go, while the embeddings would fit.
    source = apply_tuning(load(checkpoints["nvila"]), TuneConfig(llm="frozen", vision_tower="full"), LORA)
    (tmp_path / "run").mkdir()
    save_file(non_lora_state_dict(source), tmp_path / "run" / NON_LORA_FILE)
    target = load(
        build_tiny_checkpoint(tmp_path / "one-layer", variant="nvila", seed=1, vision_num_hidden_layers=1)
    )
    before = {n: p.clone() for n, p in target.named_parameters()}

    with pytest.raises(KeyError, match=r"vision_tower\.encoder\.layers\.1\."):
        load_non_lora(target, tmp_path / "run")

    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters()), "partially loaded"


def test_load_non_lora_without_the_file_loads_nothing(checkpoints, tmp_path):
    model = load(checkpoints["nvila"])
    assert load_non_lora(model, tmp_path) == []
