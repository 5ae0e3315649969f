"""Shared image prefixes and packing (`nvila_ft.data.grouping`): the same loss and gradients as the separate
single-turn samples, with each image encoded once; groups split to fit max_length; answers per micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_tuned, noise_image

from nvila_ft.data.grouping import (
    collate_units,
    make_units,
    media_key,
    pack_units,
    plan_micro_batches,
    processor_token_ids,
    sharing_summary,
)
from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.attention import segment_attention
from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.trainer import TrainingRun
from nvila_ft.train.tuning import base_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping")
    return root, build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0)



def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}



def vqa_rows() -> list[dict]:
    """Three single-turn questions on one image, one on another (VQA-RAD's shape)."""
    a, b = noise_image(0), noise_image(1)
    qa = [("Is there a fracture?", "No.", a), ("Which organ is shown?", "The left lung.", a),
          ("Is this an MRI?", "No, a chest X-ray.", a), ("Is there a fracture?", "Yes, of the left rib.", b)]
    return [{"conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": ans}],
             "images": [img]} for q, ans, img in qa]


def encode(processor, rows: list[dict]) -> list[dict]:
    return [processor(r["conversations"], r["images"]) | {"media_key": media_key(r)} for r in rows]


def media_ids(processor) -> list[int]:
    return processor_token_ids(processor)["media_token_ids"]


@pytest.mark.parametrize("packing", [False, True], ids=["shared", "shared+packed"])
def test_shared_prefix_loss_and_gradients_equal_the_separate_single_turn_samples(assets, packing):
    model, processor = load_tuned(assets, "tune.llm=lora", "tune.vision_tower=layernorm")
    encoded = encode(processor, vqa_rows())
    separate = processor.collate(encoded)
    units = make_units(encoded, processor.max_length, **processor_token_ids(processor))
    assert [u.branches for u in units] == [3, 1] and units[0].prefix > 0
    grouped = collate_units(processor, pack_units(units, processor.max_length, packing=packing))
    assert grouped["input_ids"].shape[0] == (1 if packing else 2)
    assert grouped["pixel_values"].shape[0] * 2 == separate["pixel_values"].shape[0]  # each image once
    assert grouped["attention_mask"].sum() < separate["attention_mask"].sum()
    assert (grouped["labels"] != IGNORE_INDEX).sum() == (separate["labels"] != IGNORE_INDEX).sum()

    ref, ref_grads = loss_and_grads(model, lambda: model(**separate).loss)
    got, got_grads = loss_and_grads(model, lambda: model(**grouped).loss)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert any("vision_tower" in n for n in got_grads) and any("lora_A" in n for n in got_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_plain_samples_equals_the_padded_batch(assets):
    model, processor = load_tuned(assets, "tune.llm=lora")
    encoded = encode(processor, vqa_rows())
    units = make_units(encoded, processor.max_length, share_prefix=False, **processor_token_ids(processor))
    assert [u.branches for u in units] == [1, 1, 1, 1]
    packed = collate_units(processor, pack_units(units, processor.max_length, packing=True))
    assert packed["input_ids"].shape[0] == 1
    ref, ref_grads = loss_and_grads(model, lambda: model(**processor.collate(encoded)).loss)
    got, got_grads = loss_and_grads(model, lambda: model(**packed).loss)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_groups_are_split_to_fit_max_length_never_truncated(assets):
    model, processor = load_tuned(assets, "tune.llm=lora")
    nvila = base_model(model)
    encoded = encode(processor, vqa_rows())
    whole = make_units(encoded, 10**6, **processor_token_ids(processor))[0]
    limit = whole.num_tokens - (whole.rows[2]["input_ids"].shape[0] - whole.prefix)  # one branch short
    units = make_units(encoded, limit, **processor_token_ids(processor))
    assert sorted(u.branches for u in units) == [1, 1, 2]
    assert sorted(id(r) for u in units for r in u.rows) == sorted(id(r) for r in encoded)  # every row once
    for packing in (False, True):
        rows = pack_units(units, limit, packing=packing)
        batch = collate_units(processor, rows)
        _, mask, labels, _ = nvila.embed(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                         batch["block_sizes"], batch["labels"], segment_ids=batch["segment_ids"])
        lengths = mask.sum(1).tolist()
        assert max(lengths) <= limit  # the expanded rows fit
        assert lengths == [sum(u.num_tokens for u in row) for row in rows]  # the planned length is exact
        assert (labels != IGNORE_INDEX).sum() == sum((r["labels"] != IGNORE_INDEX).sum() for r in encoded)


def test_segment_attention_sees_prefix_and_own_branch_with_single_sample_positions():
    # pack 0: prefix of 2, branches of 2 and 1; pack 1: one plain sample of 2; then padding.
    seg = torch.tensor([[[0, 0], [0, 0], [0, 1], [0, 1], [0, 2], [1, 0], [1, 0], [-1, 0]]])
    mask, pos = segment_attention(seg)
    assert pos.tolist() == [[0, 1, 2, 3, 2, 0, 1, 0]]
    seen = {i: mask[0, 0, i].nonzero().flatten().tolist() for i in range(8)}
    assert seen[3] == [0, 1, 2, 3] and seen[4] == [0, 1, 4] and seen[6] == [5, 6] and seen[7] == [7]
    additive, _ = segment_attention(seg, torch.float32)
    assert torch.equal(additive == 0, mask)


def test_micro_batches_keep_the_configured_answers_and_put_shared_media_together():
    rows = vqa_rows() * 3  # 12 rows, 2 images (same objects): groups of 9 and 3
    batches = plan_micro_batches(rows, batch_size=4, seed=1)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(i for b in batches for i in b) == list(range(12))
    keys = [media_key(rows[i]) for b in batches for i in b]
    assert sum(k1 != k2 for k1, k2 in zip(keys, keys[1:])) == 1  # one group after the other
    plain = plan_micro_batches(rows, batch_size=5, seed=1, share_prefix=False)
    assert [len(b) for b in plain] == [5, 5, 2]


def test_sharing_summary_counts_vision_encodes_and_positions():
    rows = vqa_rows()
    summary = sharing_summary(rows, [100, 102, 101, 100], [80] * 4)
    assert summary["rows"] == 4 and summary["groups"] == 2
    assert summary["vision_encodes"] == (4, 2)
    assert summary["llm_positions"] == (403, 100 + 22 + 21 + 100)


def _answers(batch: dict) -> int:
    """Labelled branches (answers) in a batch: distinct (row, pack, branch) with a label."""
    seg, labelled = batch["segment_ids"], batch["labels"] != IGNORE_INDEX
    return len({(b, *seg[b, t].tolist()) for b, t in labelled.nonzero().tolist()})


@pytest.mark.parametrize("packing", [False, True], ids=["shared", "shared+packed"])
def test_training_run_shares_prefixes_and_keeps_answers_per_step(tiny_assets, tmp_path, caplog, packing):
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    recipe = load_recipe(recipe_path, [
        f"model.path={tiny_assets.model}", f"data.path={tiny_assets.data}", f"train.output_dir={tmp_path / 'run'}",
        "model.image_aspect_ratio=resize", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=3", "train.max_steps=2", "train.report_to=[]", "eval.enabled=false",
        "data.max_train_samples=12", "data.share_prefix=auto", f"data.packing={str(packing).lower()}",
        "lora.dropout=0"])
    run = TrainingRun(recipe)
    caplog.set_level("INFO", logger="nvila_ft.train")
    run.load_model()
    run.load_data()
    assert run.grouping() == (True, packing)
    assert any("shared prefixes" in r.getMessage() and "12 rows ->" in r.getMessage() for r in caplog.records)
    trainer = run.build_trainer()
    steps = list(trainer.get_train_dataloader())
    assert len(steps) == 2  # 12 rows, 2 x 3 answers per optimizer step
    for step in steps:
        parts = step["micro_batches"]
        assert sum(_answers(b) for b in parts) == 6
        assert 1 <= len(parts) <= 3 and all(b["input_ids"].shape[0] <= 2 for b in parts)  # planned memory
    images = sum(len(s["images"]) for s in run.train_samples)
    assert sum(b["pixel_values"].shape[0] for s in steps for b in s["micro_batches"]) < images  # encoded once

    # One optimizer step's loss is the mean over its answers, as for the same rows unshared.
    step_rows = trainer.train_dataset[0]
    separate = run.processor.collate(step_rows)
    with torch.no_grad():
        expected = run.model.train()(**separate).loss
    got = trainer.training_step(run.model, trainer.data_collator([step_rows]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    run.model.zero_grad(set_to_none=True)
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
