"""DeltaLoss pruning (nvila_ft.prune, nvila_ft.data.prune): scores, subset-wise selection, resume, training on it."""

import json
import math
from pathlib import Path

import pytest
import torch

from nvila_ft.data.prune import PruneError, check_keep, keep_count, prune_samples, select
from nvila_ft.train.recipe import RecipeError
from nvila_ft.train.recipe_io import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
pytestmark = pytest.mark.usefixtures("one_thread")
N_ROWS = 6


@pytest.fixture(scope="module")
def two_models(tiny_assets, tmp_path_factory):
    """The session's tiny NVILA (small) and a wider, deeper one with another seed (large); same tokenizer."""
    from nvila_ft.demo.tiny import build_tiny_checkpoint

    large = build_tiny_checkpoint(tmp_path_factory.mktemp("large") / "tiny-large", seed=1, hidden_size=128,
                                  num_hidden_layers=3, intermediate_size=256)
    return tiny_assets.model, large


def _recipe(tiny_assets, *extra):
    return load_recipe(RECIPES / "quickstart.yaml", [
        f"model.path={tiny_assets.model}", f"data.path={tiny_assets.data}", "model.image_aspect_ratio=resize",
        f"data.max_train_samples={N_ROWS}", *extra])


@pytest.fixture(scope="module")
def scored(tiny_assets, two_models, tmp_path_factory):
    from nvila_ft.prune import score_and_prune

    out = tmp_path_factory.mktemp("prune") / "scores.jsonl"
    small, large = two_models
    result = score_and_prune(_recipe(tiny_assets), str(small), str(large), out, keep=0.5, by="answer_type",
                             batch_size=4, progress=False)
    return result


def _mean_answer_ce(model, processor, sample) -> float:
    """The model's own loss on one sample: transformers' mean cross-entropy over its label tokens."""
    batch = processor.collate([processor(sample["conversations"], sample["images"])])
    with torch.no_grad():
        return model(**batch).loss.item()


def test_score_is_small_minus_large_answer_cross_entropy(scored, two_models, tiny_assets):
    from nvila_ft.data import load_split
    from nvila_ft.prune import load_scorer

    recipe = _recipe(tiny_assets)
    samples = {s["id"]: s for s in load_split(recipe.data, "train", N_ROWS)}
    rows = scored["rows"]
    assert len(rows) == N_ROWS and {r["subset"] for r in rows} == {"OPEN", "CLOSED"}
    losses = {}
    for side, path in zip(("small", "large"), two_models):
        model, processor = load_scorer(str(path), recipe, "float32", "cpu")
        losses[side] = {i: _mean_answer_ce(model, processor, s) for i, s in samples.items()}
        if side == "small":
            enc = processor(samples[rows[0]["id"]]["conversations"], samples[rows[0]["id"]]["images"])
            assert rows[0]["n_tokens"] == int((enc["labels"] != -100).sum())
    for r in rows:
        assert r["loss_small"] == pytest.approx(losses["small"][r["id"]], abs=1e-5)
        assert r["loss_large"] == pytest.approx(losses["large"][r["id"]], abs=1e-5)
        assert r["score"] == pytest.approx(losses["small"][r["id"]] - losses["large"][r["id"]], abs=1e-5)
    assert len({round(r["score"], 6) for r in rows}) == N_ROWS  # two different models: scores differ per row


def test_outputs_pruned_split_loads_and_keeps_the_top_half_of_each_subset(scored):
    from nvila_ft.data import load_samples

    rows, paths = scored["rows"], scored["paths"]
    assert [json.loads(line) for line in paths["scores"].read_text().splitlines()] == rows
    pruned = load_samples(paths["pruned"], "train")
    kept_ids = {s["id"] for s in pruned}
    for subset in ("OPEN", "CLOSED"):
        group = sorted((r for r in rows if r["subset"] == subset), key=lambda r: -r["score"])
        k = math.ceil(len(group) / 2)
        assert {r["id"] for r in group[:k]} <= kept_ids and not {r["id"] for r in group[k:]} & kept_ids
    assert all(Path(s["images"][0]).is_file() and not s.get("error") for s in pruned)
    pytest.importorskip("matplotlib")
    assert paths["hist"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_is_subset_wise_top_k_with_ties_by_row_order():
    subsets = ["a", "a", "b", "a", "b", "a", "b"]
    scores = [2.0, 3.0, 0.5, 2.0, 0.5, -1.0, 0.5]
    sel = select(subsets, scores, keep=0.5)
    # a: rows 0,1,3,5 -> 2 kept: 1 (3.0), then the tie 0/3 at 2.0 goes to the earlier row 0.
    # b: rows 2,4,6 all 0.5 -> ceil(1.5) = 2 kept: the two earliest.
    assert sel.kept == [0, 1, 2, 4]
    assert sel.per_subset == {"a": (4, 2), "b": (3, 2)}
    assert select(subsets, scores, keep=0.5).kept == sel.kept  # deterministic
    assert select(subsets, scores, keep=1).kept == list(range(7))
    random_sel = select(subsets, [None] * 7, keep=0.5, method="random", seed=3)
    assert random_sel.per_subset == sel.per_subset
    assert random_sel.kept == select(subsets, [None] * 7, keep=0.5, method="random", seed=3).kept
    assert keep_count(0.3, 10) == 3 and keep_count(0.01, 5) == 1


@pytest.mark.parametrize("keep, message", [(0, "keeps no row"), (-0.5, "out of range"), (1.5, "out of range"),
                                           (float("nan"), "not a number")])
def test_keep_zero_or_out_of_range_is_a_clear_error(keep, message, capsys):
    with pytest.raises(PruneError, match=message):
        check_keep(keep)
    with pytest.raises(PruneError, match=message):
        select(["a"], [1.0], keep=keep)
    with pytest.raises(RecipeError, match=f"data.prune.keep.*{message}"):
        load_recipe(RECIPES / "quickstart.yaml", [f"data.prune.keep={keep}", "data.prune.method=random"])
    from nvila_ft.prune import main

    assert main([str(RECIPES / "quickstart.yaml"), "--small", "s", "--large", "l", "--keep", str(keep)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prune_settings_errors_name_the_fix(tiny_assets, tmp_path):
    from nvila_ft.data import load_split

    samples = load_split(_recipe(tiny_assets).data, "train", N_ROWS)
    recipe = _recipe(tiny_assets, "data.prune.method=random", "data.prune.by=organ")
    with pytest.raises(PruneError, match="by='organ'.*answer_type"):
        prune_samples(samples, recipe.data.prune)
    missing = _recipe(tiny_assets, f"data.prune.scores={tmp_path / 'none.jsonl'}")
    with pytest.raises(PruneError, match="does not exist.*nvila_ft.prune"):
        prune_samples(samples, missing.data.prune)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "not-a-row", "subset": "all", "score": 1.0}) + "\n")
    with pytest.raises(PruneError, match="none of the 6 rows"):
        prune_samples(samples, _recipe(tiny_assets, f"data.prune.scores={other}").data.prune)
    assert not _recipe(tiny_assets).data.prune.enabled


def test_resume_after_interruption_writes_no_duplicates(scored, tiny_assets, two_models, tmp_path, monkeypatch):
    import nvila_ft.prune as prune

    small, large = two_models
    out = tmp_path / "scores.jsonl"
    real, calls = prune.answer_logprobs, {"n": 0}

    def dies_on_second_batch(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(prune, "answer_logprobs", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prune.score_and_prune(_recipe(tiny_assets), str(small), str(large), out, keep=0.5, by="answer_type",
                              batch_size=4, progress=False)
    part = prune.outputs(out)["small"]
    assert len(part.read_text().splitlines()) == 4 and not out.exists()
    with open(part, "a") as f:  # a line cut off by the kill
        f.write('{"key": "half')
    monkeypatch.setattr(prune, "answer_logprobs", real)
    result = prune.score_and_prune(_recipe(tiny_assets), str(small), str(large), out, keep=0.5, by="answer_type",
                                   batch_size=4, progress=False)
    for side in ("small", "large"):
        keys = [json.loads(line)["key"] for line in prune.outputs(out)[side].read_text().splitlines()]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == N_ROWS
    assert [r["score"] for r in result["rows"]] == pytest.approx([r["score"] for r in scored["rows"]], abs=1e-6)
    with pytest.raises(PruneError, match="scored with"):  # another model on the same --out
        prune.score_pass(None, None, [], prune.outputs(out)["small"], model_name="other", subsets=[])


def test_pruned_split_trains_and_the_card_records_it(scored, tiny_assets, tmp_path):
    from conftest import TINY_RUN_OVERRIDES

    from nvila_ft.train.trainer import TrainingRun

    overrides = [o for o in TINY_RUN_OVERRIDES if not o.startswith("data.max_train_samples")]
    recipe = _recipe(tiny_assets, *overrides, "train.max_steps=2", "eval.enabled=false", "data.eval_split=null",
                     f"train.output_dir={tmp_path / 'run'}", f"data.prune.scores={scored['paths']['scores']}")
    metrics = TrainingRun(recipe).run()
    kept = len(scored["selection"].kept)
    assert metrics["train_samples"] == kept < N_ROWS and metrics["prune"]["rows_before"] == N_ROWS
    assert metrics["prune"]["per_subset"] == {k: {"rows": n, "kept": m}
                                              for k, (n, m) in scored["selection"].per_subset.items()}
    assert metrics["train"]["train_loss"] > 0 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Pruning: DeltaLoss (NVILA paper), top 0.5 of each subset" in card and f"6 -> {kept} train rows" in card


def test_scoring_plan_prices_the_larger_model_for_inference_only(tiny_assets, two_models):
    from nvila_ft.plan.scoring import plan_scoring, plan_scoring_pair

    recipe = _recipe(tiny_assets)
    small, large = (plan_scoring(recipe, str(p), batch_size=2, dtype="float32") for p in two_models)
    assert plan_scoring_pair(recipe, *map(str, two_models), batch_size=2, dtype="float32").model == str(two_models[1])
    assert large.total > small.total
    from nvila_ft.model.modeling import NvilaForConditionalGeneration

    real = NvilaForConditionalGeneration.from_pretrained(str(two_models[1]), dtype=torch.float32)
    weights = sum(t.bytes for t in large.terms if t.group == "weights")
    assert weights == 4 * sum(p.numel() for p in real.parameters())
    assert {t.group for t in large.terms} == {"weights", "activations", "transient", "cuda"}  # no grads, no AdamW
    eight_b = plan_scoring(load_recipe(RECIPES / "medical.yaml"), "Efficient-Large-Model/NVILA-8B", batch_size=1,
                           label_tokens=32)
    assert 15 < sum(t.bytes for t in eight_b.terms if t.group == "weights") / 2**30 < 16.5
