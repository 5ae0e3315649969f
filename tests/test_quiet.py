"""A user sees only what concerns them: no library noise on `--help`, on `accelerate launch` with the shipped
config, or in a training run (issue 12, item 9).

    pytest tests/test_quiet.py
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import train_tiny_run

from nvila_ft.train.tuning import base_model

ROOT = Path(__file__).resolve().parents[1]

# What used to show on every command or run; each line names where it came from.
NOISE = [
    "gemm_4bit_forward",  # bitsandbytes.backends.cpu.ops, at import on AVX512-BF16 CPUs
    "gradient_checkpointing_enable",  # transformers 5 FutureWarning: our own call
    "is_gradient_checkpointing",  # transformers 5 FutureWarning: peft reads the old name
    "Expected explicit VR",  # pydicom, reading its test files for demo:medical
    "Repo card metadata block was not found",  # huggingface_hub, a README without front matter
    "were not passed to `accelerate launch`",  # accelerate launch without a config
    "set `share=True`",  # gradio launch hint
]

COMMANDS = ["nvila_ft.train", "nvila_ft.plan", "nvila_ft.predict", "nvila_ft.merge", "nvila_ft.evaluate",
            "nvila_ft.prune", "nvila_ft.tiny", "app"]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "NVILA_FT_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_help_of_every_command_prints_nothing_on_stderr():
    # One interpreter runs each command's --help as `python -m <command> --help` would (runpy), with Python's
    # default warning filters, so that the imports (the slow part) are paid once; stderr is kept per command.
    driver = textwrap.dedent(f"""
        import contextlib, io, json, runpy, sys, warnings
        # runpy's own notice when a module was imported by an earlier command of this loop (not user-visible)
        warnings.filterwarnings("ignore", message=".*found in sys.modules after import", category=RuntimeWarning)
        errs = {{}}
        for name in {COMMANDS!r}:
            buffer = io.StringIO()
            sys.argv = [name, "--help"]
            with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(io.StringIO()):
                try:
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
                except SystemExit as stop:
                    buffer.write("" if stop.code in (0, None) else f"exit {{stop.code}}")
            errs[name] = buffer.getvalue()
        print(json.dumps(errs))
    """)
    done = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    errs = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errs) == set(COMMANDS)
    assert {name: err for name, err in errs.items() if err} == {}
    assert done.stderr == ""  # nothing at import time either


def test_accelerate_launch_with_the_shipped_config_prints_no_defaults_block():
    config = ROOT / "recipes" / "accelerate" / "single_process.yaml"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "-m", "nvila_ft.train", "--help"], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage: python -m nvila_ft.train" in done.stdout
    assert done.stderr == ""


def test_bitsandbytes_cpu_kernel_notice_is_silenced_before_bitsandbytes_loads():
    # The notice only fires on CPUs with AVX512-BF16 and no `kernels` package, so it may not reproduce here;
    # what nvila_ft sets is that this one logger shows errors only.
    import nvila_ft  # noqa: F401

    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not notices.isEnabledFor(logging.WARNING) and notices.isEnabledFor(logging.ERROR)


@pytest.mark.usefixtures("one_thread")
def test_a_short_training_run_shows_none_of_the_old_noise(tiny_assets, tmp_path, caplog):
    from nvila_ft.demo.medical import build_quickstart_dataset

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_quickstart_dataset(tmp_path / "medical")  # demo:medical reads pydicom's test files
        run = train_tiny_run(tiny_assets, tmp_path / "run", "train.max_steps=2", "train.save_steps=1",
                             "train.gradient_checkpointing.llm=true", "train.gradient_checkpointing.vision_tower=true")
    nvila = base_model(run.model)
    assert nvila.llm.is_activation_checkpointing and nvila.vision_tower.is_activation_checkpointing  # still on
    shown = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert [m for m in shown if any(noise in m for noise in NOISE)] == []
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_app_start_prints_its_address_and_no_share_hint(tiny_runs, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "app.log"
    env = {**_clean_env(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--runs-dir", str(tiny_runs.runs), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while f"app: http://127.0.0.1:{port}" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shown = log_path.read_text()
    assert [noise for noise in NOISE if noise in shown] == []
    assert "Warning" not in shown and "warn" not in shown.lower()
