"""Preference tuning (DPO, `train.objective: dpo`): loss, reference, a short run, lr groups, preflight, recipe, planner.

    timeout 900 pytest -q tests/test_dpo.py

Expected values come from the DPO formula (arXiv 2305.18290 eq. 7: -log sigmoid(beta ((pi_c - ref_c) - (pi_r -
ref_r))) with sequence log-probs summed over the answer tokens) computed here from full-vocabulary logits of
single-sample forwards, not from `nvila_ft.train.preference`'s batched label-only path. A tiny seeded NVILA and the
quickstart's pairs (`demo:medical-pairs` built in a temporary folder) keep the module under a minute or two.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import RECIPES, InterruptAfter, Interrupted

from nvila_ft.data import DataError
from nvila_ft.data.pairs import answer_sample, load_pairs, preflight_pairs
from nvila_ft.demo.medical import build_quickstart_dataset
from nvila_ft.demo.pairs import build_preference_dataset
from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.train.dataset import expanded_tokens
from nvila_ft.train.preference import NvilaDPOTrainer, PreferenceDataset, sequence_logps
from nvila_ft.train.recipe import DPOConfig, RecipeError
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun
from nvila_ft.train.tuning import base_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.image_aspect_ratio=resize", "lora.dropout=0.0", "train.lr=1e-2", "train.max_steps=8",
         "train.per_device_train_batch_size=4", "train.save_steps=8", "train.logging_steps=2", "train.report_to=[]",
         "data.max_train_samples=8", "data.max_eval_samples=4", "eval.eval_steps=null", "train.seed=0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("dpo")
    data = build_quickstart_dataset(root / "data")
    return SimpleNamespace(root=root, model=build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0),
                           data=data, pairs=build_preference_dataset(root / "pairs", source=data))


def recipe(assets, out, *overrides: str):
    paths = [f"model.path={assets.model}", f"data.path={assets.pairs}", f"train.output_dir={out}"]
    return load_recipe(RECIPES / "preference.yaml", [*paths, *SMALL, *overrides])


def pair_margins(run: TrainingRun, pairs: list[dict]) -> torch.Tensor:
    """beta-free margins (pi_c - ref_c) - (pi_r - ref_r) of `pairs` under the run's model, in eval mode."""
    dataset = PreferenceDataset(pairs, run.processor)
    batch = dataset.collate([dataset[i] for i in range(len(pairs))])
    run.model.eval()
    with torch.no_grad():
        logps, _ = sequence_logps(run.model, batch)
        with run.model.disable_adapter():
            ref, _ = sequence_logps(run.model, batch)
    chosen, rejected = (logps - ref).chunk(2)
    return chosen - rejected


class MeasuredRun(TrainingRun):
    """A run that records the margins of its training pairs just before training (the adapter as initialised)."""

    def build_trainer(self):
        trainer = super().build_trainer()
        self.margins_before = pair_margins(self, self.train_samples)
        return trainer


@pytest.fixture(scope="module")
def trained(assets) -> SimpleNamespace:
    """An 8-step DPO run on 8 training pairs (batch 4: 8 sequences a step), final eval on 4 pairs."""
    run = MeasuredRun(recipe(assets, assets.root / "run"))
    metrics = run.run()
    margins = {"before": run.margins_before, "after": pair_margins(run, run.train_samples)}
    return SimpleNamespace(run=run, metrics=metrics, margins=margins, out=assets.root / "run")


# ---------------------------------------------------------------------------------------------- the loss
def reference_logp(nvila, processor, sample: dict) -> torch.Tensor:
    """Sum of log p(answer token) over one sample's labelled positions, from full-vocabulary logits."""
    enc = processor.collate([processor(sample["conversations"], sample["images"])])
    embeds, mask, labels = nvila.embed(enc["input_ids"], enc["attention_mask"], enc["pixel_values"],
                                       enc["block_sizes"], enc["labels"])
    logits = nvila.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, :-1].float()
    targets = labels[0, 1:]
    keep = targets != IGNORE_INDEX
    return logits.log_softmax(-1)[keep].gather(-1, targets[keep, None]).sum(), keep.sum()


def test_loss_on_a_hand_built_pair_is_the_dpo_formula(trained):
    run, trainer = trained.run, trained.run.trainer
    pair = {**run.train_samples[0], "chosen": "yes, a CT of the head", "rejected": "no"}
    dataset = PreferenceDataset([pair], run.processor)
    batch = dataset.collate([dataset[0]])
    nvila = base_model(run.model)
    run.model.eval()
    with torch.no_grad():
        pi = {k: reference_logp(nvila, run.processor, answer_sample(pair, k)) for k in ("chosen", "rejected")}
        with run.model.disable_adapter():
            ref = {k: reference_logp(nvila, run.processor, answer_sample(pair, k)) for k in ("chosen", "rejected")}
        n = {k: pi[k][1] for k in pi}  # answer tokens + <|im_end|>
        assert n["chosen"] > n["rejected"] > 0
        pi, ref = {k: v[0] for k, v in pi.items()}, {k: v[0] for k, v in ref.items()}
        delta = (pi["chosen"] - ref["chosen"]) - (pi["rejected"] - ref["rejected"])
        assert abs(delta) > 1e-3  # the trained adapter moved the policy away from the reference
        per_token = (pi["chosen"] - ref["chosen"]) / n["chosen"] - (pi["rejected"] - ref["rejected"]) / n["rejected"]
        for beta, loss_type, expected in [(0.1, "sigmoid", lambda b: -F.logsigmoid(b * delta)),
                                          (0.5, "hinge", lambda b: torch.relu(1 - b * delta)),
                                          (0.5, "ipo", lambda b: (per_token - 1 / (2 * b)) ** 2)]:
            trainer.dpo_config = DPOConfig(beta=beta, loss_type=loss_type)
            loss = trainer.compute_loss(run.model, dict(batch))
            torch.testing.assert_close(loss, expected(beta), rtol=1e-4, atol=1e-5)
        kept = trainer._dpo_metrics["eval"]
        assert kept["rewards/margins"][-1] == pytest.approx(0.5 * float(delta), rel=1e-4, abs=1e-6)
        assert kept["rewards/chosen"][-1] == pytest.approx(0.5 * float(pi["chosen"] - ref["chosen"]), rel=1e-4, abs=1e-6)
    trainer.dpo_config = run.recipe.dpo
    kept.clear()


def test_the_reference_is_the_untuned_base_model(trained, assets):
    run = trained.run
    dataset = PreferenceDataset(run.train_samples[:2], run.processor)
    batch = dataset.collate([dataset[0], dataset[1]])
    base = NvilaForConditionalGeneration.from_pretrained(str(assets.model), dtype=torch.float32).eval()
    run.model.eval()
    with torch.no_grad():
        untuned, _ = sequence_logps(base, batch)
        with run.model.disable_adapter():
            reference, _ = sequence_logps(run.model, batch)
        policy, _ = sequence_logps(run.model, batch)
    torch.testing.assert_close(reference, untuned, rtol=1e-5, atol=1e-4)
    assert (policy - untuned).abs().max() > 1e-3  # the adapter (LoRA + projector + LayerNorm copies) is on


# ---------------------------------------------------------------------------------------------- the run
def test_a_short_run_raises_the_margin_on_its_training_pairs(trained):
    before, after = trained.margins["before"], trained.margins["after"]
    assert before.abs().max() < 1e-4  # at init the policy is the reference (LoRA B = 0, copies = originals)
    assert after.mean() > 0.5 and (after > 0).float().mean() >= 0.75, after
    logged = [h for h in trained.run.trainer.state.log_history if "rewards/margins" in h]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(logged[0])
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


def test_run_folder_is_an_sft_run_folder_with_reward_metrics(trained):
    out = trained.out
    for name in ("adapter_model.safetensors", "recipe.yaml", "metrics.json", "loss_curve.png", "README.md",
                 "processor_config.json", "checkpoint-8/trainer_state.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(metrics["eval"])
    assert metrics["train_samples"] == 8
    card = (out / "README.md").read_text()
    assert "Objective: DPO preference tuning (loss sigmoid, beta 0.1" in card and "| rewards/margins |" in card
    from nvila_ft.train.curves import read_series

    assert "eval rewards/accuracies" in read_series(out / "loss_curve.png")  # the curve's 0-1 number


def test_app_previews_a_dpo_run(trained, assets):
    from app.previewer import Previewer

    previewer = Previewer(runs_dir=None, runs=[trained.out])
    assert previewer.bases() == [str(assets.model)] and previewer.runs_for(str(assets.model)) == ["run"]
    label = "run"
    summary = previewer.run_summary(label)
    assert "DPO (beta 0.1, sigmoid)" in summary and "| eval.rewards/margins |" in summary
    rows, note = previewer.examples(label, n=2)
    test_pairs = json.loads((assets.pairs / "test.json").read_text())
    expected = {(p["prompt"].replace("<image>", "").strip(), p["chosen"]) for p in test_pairs}
    assert note is None and len(rows) == 2 and all((q, ref) in expected for _, q, ref in rows), rows
    assert previewer.loss_curve(label) is not None


class InterruptedRun(TrainingRun):
    def build_trainer(self):
        trainer = super().build_trainer()
        trainer.add_callback(InterruptAfter(3))
        return trainer


def test_a_killed_dpo_run_resumes_to_the_uninterrupted_result(assets, tmp_path):
    from safetensors.torch import load_file

    short = ["train.max_steps=4", "train.save_steps=2", "train.per_device_train_batch_size=2", "eval.enabled=false"]
    with pytest.raises(Interrupted):
        InterruptedRun(recipe(assets, tmp_path / "resumed", *short)).run()
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir() and not (tmp_path / "resumed" / "checkpoint-4").exists()
    resumed = TrainingRun(recipe(assets, tmp_path / "resumed", *short)).run()
    whole = TrainingRun(recipe(assets, tmp_path / "whole", *short)).run()
    assert resumed["train"]["global_step"] == whole["train"]["global_step"] == 4
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("resumed", "whole"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_lr_groups_are_the_sft_groups(trained):
    trainer, t = trained.run.trainer, trained.run.recipe.train
    assert isinstance(trainer, NvilaDPOTrainer)
    lrs = {g["initial_lr"] for g in trainer.optimizer.param_groups}  # before the schedule
    assert lrs == {t.lr, t.lr / t.vision_lr_ratio}  # llm, projector (mm_projector_lr null = lr), vision tower / 10
    in_groups = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in trained.run.model.parameters() if p.requires_grad}
    assert in_groups == trainable
    vision = [g for g in trainer.optimizer.param_groups if g["initial_lr"] == t.lr / t.vision_lr_ratio]
    names = {n for n, p in trained.run.model.named_parameters() if any(p is q for g in vision for q in g["params"])}
    assert names and all("vision_tower" in n and "layer_norm" in n for n in names)


# ---------------------------------------------------------------------------------------------- data
def test_preflight_reports_every_bad_pair_with_file_and_index(assets, trained, tmp_path):
    image = str(next((assets.pairs / "images").glob("*.png")))
    rows = [
        {"id": "good", "image": image, "prompt": "Is this a CT?", "chosen": "yes", "rejected": "no"},
        {"id": "empty", "image": image, "prompt": "Is this a CT?", "chosen": "yes", "rejected": "  "},
        {"id": "same", "image": image, "prompt": "Is this a CT?", "chosen": "yes", "rejected": "yes"},
        {"id": "no-image", "image": str(tmp_path / "gone.png"), "prompt": "Is this a CT?", "chosen": "yes",
         "rejected": "no"},
        {"id": "no-rejected", "image": image, "prompt": "Is this a CT?", "chosen": "yes"},
        {"id": "long", "image": image, "prompt": "Is this a CT?", "chosen": "yes", "rejected": "no " * 6000},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(str(path), "train")
    processor = trained.run.processor
    with pytest.raises(DataError) as err:
        preflight_pairs(pairs, length_fn=lambda s: expanded_tokens(processor, s), max_length=processor.max_length,
                        progress=False)
    message = str(err.value)
    assert "6 rows checked, 1 ok, 5 bad" in message
    for index, reason in [(1, "empty rejected answer"), (2, "same answer"), (3, "image file not found"),
                          (4, "'rejected'"), (5, f"> max_length {processor.max_length}")]:
        line = next(line for line in message.splitlines() if f"{path}[{index}]" in line)
        assert reason in line, line
    assert f"{path}[0]" not in message
    report = preflight_pairs(pairs[:1], length_fn=lambda s: expanded_tokens(processor, s),
                             max_length=processor.max_length, progress=False)
    text_only = expanded_tokens(processor, {"conversations": [{"from": "human", "value": "Is this a CT?"},
                                                               {"from": "gpt", "value": "yes"}], "images": []})
    assert report.ok[0]["num_tokens"] - text_only >= processor.tokens_per_tile  # counted with the image's tokens


def test_hugging_face_preference_layouts(tmp_path, assets):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    image = Image.open(next((assets.pairs / "images").glob("*.png"))).convert("RGB")
    rlaif = datasets.Dataset.from_dict({"image": [image], "question": ["What is shown?"], "chosen": ["a CT"],
                                        "rejected": ["an MRI"]}).cast_column("image", datasets.Image())
    rlaif.save_to_disk(str(tmp_path / "rlaif"))
    (pair,) = load_pairs(str(tmp_path / "rlaif"), "train")
    assert pair["conversations"] == [{"from": "human", "value": "<image>\nWhat is shown?"}]
    assert (pair["chosen"], pair["rejected"], len(pair["images"])) == ("a CT", "an MRI", 1)

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    vlf = datasets.Dataset.from_dict({
        "images": [[image]], "prompt": [prompt],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "a CT"}]}]],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "an MRI"}]}]],
    }).cast_column("images", datasets.Sequence(datasets.Image()))
    vlf.save_to_disk(str(tmp_path / "vlf"))
    (pair,) = load_pairs(str(tmp_path / "vlf"), "train")
    assert pair["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert (pair["chosen"], pair["rejected"], len(pair["images"])) == ("a CT", "an MRI", 1)

    rlaif.remove_columns("rejected").save_to_disk(str(tmp_path / "unpaired"))
    with pytest.raises(DataError, match=r"no column\(s\) \['rejected'\]"):
        load_pairs(str(tmp_path / "unpaired"), "train")


def test_python_api_trains_dpo_on_preference_rows(assets, tmp_path):
    from nvila_ft.api import train

    image = str(next((assets.pairs / "images").glob("*.png")))
    rows = [{"images": [image], "prompt": "Is this a CT?", "chosen": "yes", "rejected": "no"},
            {"images": [image], "prompt": "Which body part?", "chosen": "head", "rejected": "neck"}]
    run = train(recipe(assets, tmp_path / "api", "train.max_steps=2", "train.per_device_train_batch_size=2"),
                train_data=rows)
    assert [s["chosen"] for s in run.train_samples] == ["yes", "head"]
    assert run.metrics["train"]["global_step"] == 2 and "eval" not in run.metrics
    assert any("rewards/margins" in h for h in run.trainer.state.log_history)


# ---------------------------------------------------------------------------------------------- recipe, planner
@pytest.mark.parametrize("part", ["llm", "vision_tower"])
def test_recipe_refuses_a_full_part_with_dpo(assets, tmp_path, part):
    with pytest.raises(RecipeError) as err:
        recipe(assets, tmp_path, f"tune.{part}=full")
    assert f"tune.{part}=full" in str(err.value) and "train.objective=dpo" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    recipe(assets, tmp_path, f"tune.{part}=full", "train.objective=sft")  # SFT keeps the full modes


def test_recipe_refuses_pruning_with_dpo(assets, tmp_path):
    with pytest.raises(RecipeError, match="data.prune with train.objective=dpo"):
        recipe(assets, tmp_path, "data.prune.method=random")


def test_planner_prices_two_sequences_per_row(assets, tmp_path):
    from nvila_ft.plan.report import plan_recipe

    dpo = plan_recipe(recipe(assets, tmp_path), text_tokens=64)
    sft = plan_recipe(recipe(assets, tmp_path, "train.objective=sft"), text_tokens=64)
    term = {(t.group, t.name): t.bytes for t in dpo.terms}
    sft_term = {(t.group, t.name): t.bytes for t in sft.terms}
    assert term[("activations", "llm")] == 2 * sft_term[("activations", "llm")]
    assert term[("activations", "vision_tower")] == sft_term[("activations", "vision_tower")]  # media encoded once
    weights = [t.bytes for t in dpo.terms if t.group == "weights"]
    assert weights == [t.bytes for t in sft.terms if t.group == "weights"]  # no second model for the reference
    assert dpo.total > sft.total
