"""More than one process on the CPU: two gloo ranks started as the README says (`accelerate launch --config_file
recipes/accelerate/multi_gpu.yaml --num_processes 2`, or `--multi_gpu --num_processes 2`: accelerate turns both
into torchrun; `--cpu` would start one process), FSDP through the same Trainer path (tests/fsdp_on_cpu.py), the
shipped accelerate configs, sharded evaluation and the planner's per-GPU prices.

Five 2-process launches (DDP, DDP resumed, FSDP, FSDP resumed, DeepSpeed ZeRO-3) of 3 steps on 6 quickstart rows, 15-30 s each
on the shared 2-core machine (most of it interpreter and import start-up), and one single-process reference run.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nvila_ft.plan.sharding import STRATEGIES, launch_layout, shard_terms
from nvila_ft.train.distributed import shard, unshard

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = 3
# lora.dropout=0: dropout draws differ between one and two processes. Weight decay 0.1: the optimizer groups
# (decay / no decay for norms and biases) must come out the same under FSDP's flattened parameters. Eval batches of 1: each answer and each
# eval loss is computed alone, so one process and a rank compute it with the same numbers (Trainer's eval loss
# is a mean of batch means, which depends on how rows are batched). 4 eval-loss rows: a multiple of the ranks
# (Trainer pads an uneven last round of eval batches with repeated rows, which then count twice in the loss).
OVERRIDES = [
    "model.image_aspect_ratio=resize", f"train.max_steps={STEPS}", "train.logging_steps=1", "train.save_steps=1",
    "train.report_to=[]", "train.lr=1e-2", "train.weight_decay=0.1", "train.seed=0", "train.gradient_accumulation_steps=1",
    "train.per_device_eval_batch_size=1", "lora.dropout=0", "data.max_train_samples=6", "data.max_eval_samples=4", "eval.max_samples=3",
    "eval.max_new_tokens=4", "eval.batch_size=1", "data.share_prefix=false",  # the same row order in both
]


def paths(assets, out) -> list[str]:
    return [f"model.path={assets.model}", f"data.path={assets.data}", f"train.output_dir={out}"]


def launch(args: list[str], overrides: list[str], program: tuple[str, ...] = ("-m", "nvila_ft.train"),
           recipe: str = "quickstart.yaml") -> str:
    """`accelerate launch ARGS --num_processes 2 PROGRAM recipes/RECIPE OVERRIDES`; stdout + stderr."""
    port = str(29500 + os.getpid() % 1000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [str(ACCELERATE), "launch", *args, "--num_processes", "2", "--main_process_port", port,
           *program, str(ROOT / "recipes" / recipe), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(folder: Path) -> list[float]:
    state = json.loads((folder / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def trainables(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_trainables(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def answers(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions_final.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_assets, tmp_path_factory, one_thread):
    """One process at per-device batch 2: the reference for two ranks at batch 1."""
    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

    out = tmp_path_factory.mktemp("single") / "out"
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                         [*paths(tiny_assets, out), *OVERRIDES, "train.per_device_train_batch_size=2"])
    TrainingRun(recipe).run()
    return out


@pytest.fixture(scope="module")
def ddp(tiny_assets, tmp_path_factory):
    """Two gloo ranks at per-device batch 1, launched with the shipped DDP config as the README says."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    log = launch(["--config_file", str(CONFIGS / "multi_gpu.yaml")],
                 [*paths(tiny_assets, out), *OVERRIDES, "train.per_device_train_batch_size=1"])
    return out, log


@pytest.fixture(scope="module")
def fsdp(tiny_assets, tmp_path_factory):
    """Two gloo ranks under recipes/accelerate/fsdp.yaml (FULL_SHARD, use_orig_params, FULL_STATE_DICT)."""
    out = tmp_path_factory.mktemp("fsdp") / "out"
    log = launch(["--config_file", str(CONFIGS / "fsdp.yaml")],
                 [*paths(tiny_assets, out), *OVERRIDES, "train.per_device_train_batch_size=1"],
                 program=(str(ROOT / "tests" / "fsdp_on_cpu.py"),))
    return out, log


# ---------------------------------------------------------------------------------------------- DDP
def test_two_ranks_at_batch_1_match_one_process_at_batch_2(single, ddp):
    out, _ = ddp
    assert len(losses(out)) == STEPS
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert_same_trainables(trainables(out), trainables(single))
    before = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(not torch.equal(before[k], v) for k, v in trainables(out).items())  # step 3 moved them


def test_two_ranks_log_one_line_per_step_and_print_tables_and_reports_once(ddp):
    _, log = ddp
    text = log.replace("\r", "\n")
    steps = re.findall(r"step (\d+)/\d+ \| loss", text)
    assert steps == [str(i) for i in range(1, STEPS + 1)]
    assert text.count("lr group ") == 1  # the trainable table
    assert len(re.findall(r"train split: preflight", text)) == 1
    assert text.count('"train_samples"') == 1  # metrics.json printed by rank 0 only
    assert text.count("memory check skipped") == 1


def test_sharded_evaluation_gives_the_metrics_of_one_process(single, ddp):
    out, log = ddp
    assert "evaluation: 3 rows over 2 ranks (2 on rank 0)" in log  # each rank generated its slice
    mine, theirs = (json.loads((f / "metrics.json").read_text())["eval"] for f in (out, single))
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value, rel=1e-5), key
    assert answers(out) == answers(single)


def test_resume_under_ddp_from_a_ddp_checkpoint_ends_where_the_uninterrupted_run_ends(ddp, tiny_assets, tmp_path):
    out, _ = ddp
    resumed = tmp_path / "out"
    log = launch(["--multi_gpu"], [*paths(tiny_assets, resumed), *OVERRIDES, "train.per_device_train_batch_size=1",
                                   "eval.enabled=false", f"train.resume_from_checkpoint={out / 'checkpoint-2'}"])
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert re.findall(r"step (\d+)/\d+ \| loss", log.replace("\r", "\n")) == [str(STEPS)]  # one step trained
    assert losses(resumed) == pytest.approx(losses(out), rel=1e-6)
    assert_same_trainables(trainables(resumed), trainables(out), atol=1e-6)


def test_shared_prefix_steps_under_ddp_synchronise_once_per_step(tiny_assets, tmp_path):
    # Each rank's step holds as many micro-batches as its groups fill (a different count per rank); gradients are
    # synchronised at the last one only (no_sync before), so the ranks never wait on an unmatched all-reduce.
    out = tmp_path / "out"
    log = launch(["--config_file", str(CONFIGS / "multi_gpu.yaml")],
                 [*paths(tiny_assets, out), *OVERRIDES, "train.per_device_train_batch_size=1",
                  "train.gradient_accumulation_steps=3", "data.share_prefix=true", "eval.enabled=false"])
    assert re.findall(r"step (\d+)/\d+ \| loss", log.replace("\r", "\n")) == [str(i) for i in range(1, STEPS + 1)]
    assert all(loss == loss and loss > 0 for loss in losses(out))  # finite: every step trained


def test_dpo_with_two_ranks_at_batch_1_matches_one_process_at_batch_2(tiny_assets, tmp_path, one_thread):
    # The policy and reference log-probs go through the wrapped model's forward (answer_logprob_fn), so DDP
    # synchronises the DPO gradients: two ranks at one pair each train what one process does with two pairs.
    from nvila_ft.demo.pairs import build_preference_dataset
    from nvila_ft.train.recipe_io import load_recipe
    from nvila_ft.train.trainer import TrainingRun

    pairs = build_preference_dataset(tmp_path / "pairs", source=tiny_assets.data)
    common = [f"model.path={tiny_assets.model}", f"data.path={pairs}", "model.image_aspect_ratio=resize",
              "lora.dropout=0", "train.lr=1e-2", "train.weight_decay=0.1", f"train.max_steps={STEPS}",
              f"train.save_steps={STEPS}", "train.logging_steps=1", "train.report_to=[]", "train.seed=0",
              "train.group_by_length=false", "data.max_train_samples=6", "eval.enabled=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    TrainingRun(load_recipe(ROOT / "recipes" / "preference.yaml",
                            [*common, f"train.output_dir={one}", "train.per_device_train_batch_size=2"])).run()
    launch(["--config_file", str(CONFIGS / "multi_gpu.yaml")],
           [*common, f"train.output_dir={two}", "train.per_device_train_batch_size=1"], recipe="preference.yaml")
    assert len(losses(two)) == STEPS
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_trainables(trainables(two), trainables(one))


def test_fit_check_runs_under_the_training_launcher_and_prints_once(tiny_assets):
    # `python -m nvila_ft.plan --measure` under the DDP launch: each rank measures its device with the model in
    # accelerate's DDP wrapper (a backward all-reduces), rank 0 prints one table, priced for one GPU of two.
    log = launch(["--config_file", str(CONFIGS / "multi_gpu.yaml")],
                 [f"model.path={tiny_assets.model}", "model.image_aspect_ratio=resize", "--measure", "--steps", "1"],
                 program=("-m", "nvila_ft.plan"))
    assert log.count("fit check:") == 1 and "rank 0 of 2 (DDP)" in log
    assert re.search(r"CPU: state \+ autograd-saved bytes +[\d.]+ [MG]iB", log)


def test_fit_check_refuses_a_sharded_launch_in_one_line(tiny_assets, monkeypatch, capsys):
    from nvila_ft.plan.report import main as plan_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert plan_main([str(ROOT / "recipes" / "quickstart.yaml"), f"model.path={tiny_assets.model}", "--measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --measure measures data-parallel launches; this one is fsdp")
    assert "--num-gpus 2 --strategy fsdp" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- FSDP
def test_fsdp_with_two_processes_trains_like_one_process(single, fsdp):
    out, log = fsdp
    assert log.count("fsdp_on_cpu: FSDP enabled on a CPU launch") == 2  # really FSDP, not DDP
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert_same_trainables(trainables(out), trainables(single))
    assert (out / f"checkpoint-{STEPS}" / "optimizer.bin").is_file()  # FSDP's gathered optimizer state
    mine, theirs = (json.loads((f / "metrics.json").read_text())["eval"] for f in (out, single))
    assert mine == pytest.approx(theirs, rel=1e-5)
    assert answers(out) == answers(single)


def test_fsdp_adapter_loads_into_one_process_with_the_logits_of_the_single_process_run(single, fsdp):
    from nvila_ft.data import load_split
    from nvila_ft.inference import load_model
    from nvila_ft.train.recipe_io import load_recipe

    out, _ = fsdp
    models = {}
    for name, folder in (("fsdp", out), ("single", single)):
        models[name], processor = load_model(folder, device="cpu")
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(models["fsdp"])
    saved = trainables(out)
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    recipe = load_recipe(out / "recipe.yaml")
    sample = load_split(recipe.data, recipe.data.eval_split, 1)[0]
    batch = processor.collate([processor(sample["conversations"][:-1], sample.get("images", []),
                                         add_generation_prompt=True)])
    with torch.no_grad():
        logits = {name: model(**batch).logits for name, model in models.items()}
    torch.testing.assert_close(logits["fsdp"], logits["single"], atol=1e-4, rtol=1e-4)


def test_resume_under_fsdp_from_an_fsdp_checkpoint_ends_where_the_uninterrupted_run_ends(fsdp, tiny_assets, tmp_path):
    out, _ = fsdp
    resumed = tmp_path / "out"
    launch(["--config_file", str(CONFIGS / "fsdp.yaml")],
           [*paths(tiny_assets, resumed), *OVERRIDES, "train.per_device_train_batch_size=1", "eval.enabled=false",
            f"train.resume_from_checkpoint={out / 'checkpoint-2'}"], program=(str(ROOT / "tests" / "fsdp_on_cpu.py"),))
    assert losses(resumed) == pytest.approx(losses(out), rel=1e-6)
    assert_same_trainables(trainables(resumed), trainables(out), atol=1e-6)  # AdamW moments restored too


# ---------------------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_zero3_with_two_processes_trains_and_evaluates_like_one_process(single, tiny_assets, tmp_path):
    """ZeRO-3 (weights, gradients and AdamW states partitioned) on two CPU processes: DeepSpeed's CPU
    accelerator with gloo; its shared-memory comm op is compiled on first use (g++, about a minute, cached)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    log = launch(["--config_file", str(CONFIGS / "zero3.yaml")],
                 [*paths(tiny_assets, out), *OVERRIDES, "train.per_device_train_batch_size=1"])
    assert (out / f"checkpoint-{STEPS}" / "latest").is_file()  # DeepSpeed's own checkpoint: really ZeRO
    assert "evaluation: 3 rows over 2 ranks" not in log  # ZeRO-3 forwards are collective: every rank, every row
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert_same_trainables(trainables(out), trainables(single))
    mine, theirs = (json.loads((f / "metrics.json").read_text())["eval"] for f in (out, single))
    assert mine == pytest.approx(theirs, rel=1e-5)
    assert answers(out) == answers(single)


# ---------------------------------------------------------------------------------------------- pieces
def test_shard_and_unshard_restore_the_order():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert unshard(parts) == items
    assert unshard([shard(items[:1], r, 2) for r in range(2)]) == [0]


@pytest.mark.parametrize("name", ["single_process", "multi_gpu", "fsdp", "zero2", "zero3", "multi_node"])
def test_shipped_accelerate_configs_are_valid_and_documented(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    header = text.split("\ncompute_environment")[0]
    assert header.startswith("# ") and f"accelerate launch --config_file recipes/accelerate/{name}.yaml" in header
    config = load_config_from_file(str(path))  # accelerate's own parser: unknown keys fail here
    raw = yaml.safe_load(text)
    assert config.mixed_precision == "no"  # precision belongs to the recipe
    if name == "fsdp":
        fsdp_config = raw["fsdp_config"]
        assert fsdp_config["fsdp_use_orig_params"] is True
        assert fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",") == ["Qwen2DecoderLayer",
                                                                               "SiglipEncoderLayer"]
        assert fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name.startswith("zero"):
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-1])
    if name == "multi_node":
        assert config.num_machines == 2 and config.main_process_ip


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_translate_to_deepspeed_launches(stage):
    """What accelerate's launcher makes of the ZeRO configs: the environment its DeepSpeed plugin reads."""
    pytest.importorskip("deepspeed")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"zero{stage}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"


def test_launch_layout_reads_the_launcher_environment(monkeypatch):
    for key in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    assert launch_layout() == (1, "ddp")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launch_layout() == (8, "ddp")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launch_layout() == (8, "zero3")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch_layout() == (8, "fsdp")


def test_shard_terms_divide_what_each_strategy_shards():
    from nvila_ft.plan.report import Term

    terms = [Term("weights", "llm bfloat16", 800), Term("gradients", "llm", 100), Term("optimizer", "llm", 200),
             Term("activations", "llm", 400)]
    by = {s: {(t.group, t.name): t.bytes for t in shard_terms(terms, 4, s, 4)} for s in STRATEGIES}
    assert [t.bytes for t in shard_terms(terms, 1, "zero3", 4)] == [800, 100, 200, 400]
    assert by["ddp"][("parallel", "DDP gradient buckets")] == 100 and by["ddp"][("weights", "llm bfloat16")] == 800
    assert sum(by["zero2"].values()) == 800 + 25 + 50 + 400
    assert sum(by["zero3"].values()) == 200 + 25 + 50 + 400 + 2 * 800 // 4
    assert by["fsdp"] == by["zero3"]
    with pytest.raises(ValueError, match="choose one of"):
        shard_terms(terms, 2, "tp", 4)
    with pytest.raises(ValueError, match="at least 1"):
        shard_terms(terms, 0, "ddp", 4)


def test_planner_prices_one_gpu_of_n(capsys):
    from nvila_ft.plan.report import main

    recipe = str(ROOT / "recipes" / "medical.yaml")
    totals = {}
    for strategy in ("ddp", "zero2", "zero3"):
        assert main([recipe, "tune.llm=full", "--num-gpus", "4", "--strategy", strategy, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["num_gpus"] == 4 and plan["strategy"] == strategy
        totals[strategy] = plan["total_bytes"]
    assert main([recipe, "tune.llm=full", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)["total_bytes"]
    assert totals["zero3"] < totals["zero2"] < one < totals["ddp"]
    assert main([recipe, "--num-gpus", "0"]) == 2  # a user error: one line, exit 2
    assert "at least 1" in capsys.readouterr().err
