"""The model card (README.md) a run folder gets: ours, not PEFT's template, with what it promises.

    pytest tests/test_model_card.py
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_folder_readme_is_our_model_card(tiny_run, tiny_assets):
    card = (tiny_run.output_dir / "README.md").read_text()
    metrics = json.loads((tiny_run.output_dir / "metrics.json").read_text())

    assert "More Information Needed" not in card  # PEFT's adapter card was replaced
    assert card.startswith("---\n") and "\n---\n\n# run: tiny-nvila fine-tuned with nvila-ft\n" in card  # metadata, title
    assert str(tiny_assets.model) in card  # base model
    assert "| `llm` | lora | LoRA r 8, alpha 16, dropout 0.05, all-linear | 1.00e-02 |" in card  # recipe summary
    assert "| `vision_tower` | layernorm |  | 1.00e-03 |" in card
    assert "Optimizer steps: 3 " in card
    assert f"`{tiny_assets.data}` (format llava)" in card and "samples used: 4 train, 4 eval" in card  # data
    assert f"| overall_accuracy | {metrics['eval']['overall_accuracy']:.4f} |" in card  # metrics
    typed = tiny_run.recipe.train.output_dir  # the output_dir as the recipe gave it
    assert f"python -m nvila_ft.predict {typed} --data DATA" in card
    assert f"python -m nvila_ft.merge {typed} {typed}-merged" in card


def test_model_card_snippet_runs_as_written(tiny_run, capsys):
    card = (tiny_run.output_dir / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    image = tiny_run.eval_samples[0]["images"][0]
    exec(snippet.replace('"image.png"', repr(image)), {})  # the only placeholder is the image
    assert capsys.readouterr().out.strip() != ""
