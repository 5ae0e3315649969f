"""What the preview app does, without the UI: find runs, load models once, answer with base and tuned, show tiles.

    from app.previewer import Previewer
    previewer = Previewer(runs_dir="runs")
    base = previewer.default_base()
    for answers in previewer.answer("scan.png", "Is there a fracture?", base, previewer.runs_for(base)[:1]):
        print(answers)      # {"base": "...", "<run>": "..."}, growing token by token

Everything the page can choose is a *label* from lists built here at start-up (bases, runs found under
`runs_dir` or passed with `--run`); a label is never used as a path, so the page cannot make the server
read an arbitrary file. One base model is loaded per base checkpoint and kept; the runs on it are
switched with :class:`nvila_ft.inference.AdapterBank` (peft adapters: LoRA + trained projector/LayerNorm copies), never by
reloading the base. All generation goes through one lock: the base and tuned answers come from the same
model object with different runs activated, so two generations must never overlap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from app.media import TilePreview, check_upload, load_media, tile_preview
from nvila_ft.demo import is_demo_path
from nvila_ft.inference import (
    AdapterBank,
    RunError,
    base_checkpoint,
    is_run,
    load_model,
    load_processor,
    run_recipe,
    stream_generate,
)
from nvila_ft.model.image_processing import to_rgb
from nvila_ft.model.processing import NvilaProcessor
from nvila_ft.model.video import natural_key
from nvila_ft.train.recipe import Recipe
from nvila_ft.train.tuning import base_model

logger = logging.getLogger(__name__)

MAX_COMPARED_RUNS = 3  # tuned answers shown next to the base answer (answer slots on the page)
BASE = "base"  # key of the base model's answer in :meth:`Previewer.answer`
RUN_SKIP_DIRS = {"logs", "runs", "__pycache__"}  # TensorBoard folders, not run folders


# ------------------------------------------------------------------------------------------------- runs
@dataclass
class RunEntry:
    """A run folder the app offers. `base` is the label of its base checkpoint, None when not found."""

    label: str
    path: Path
    base: str | None
    problem: str | None = None


def find_runs(runs_dir: str | os.PathLike | None, max_depth: int = 4) -> list[Path]:
    """Run folders (see :func:`nvila_ft.inference.is_run`) under `runs_dir`, `checkpoint-<step>` folders
    included, sorted by path; [] when `runs_dir` is None or missing."""
    if runs_dir is None or not Path(runs_dir).is_dir():
        return []
    root = Path(runs_dir)
    found = []
    for folder, subdirs, _ in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in RUN_SKIP_DIRS
                            and depth < max_depth)
        if is_run(folder):
            found.append(Path(folder))
    return sorted(found, key=lambda p: [natural_key(part) for part in p.parts])  # checkpoint-40 before -400


def _base_label(path_or_id: str) -> str:
    """A base checkpoint as shown on the page: local folders as absolute paths, hub ids unchanged."""
    return str(Path(path_or_id).expanduser().resolve()) if Path(path_or_id).expanduser().is_dir() else path_or_id


def _adapter_name(label: str, taken: set[str]) -> str:
    # PEFT adapter names become module keys: no dots.
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_") or "run"
    candidate, i = name, 1
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


@dataclass
class LoadedBase:
    """One base model in memory and the runs added to it."""

    label: str
    bank: AdapterBank
    processor: NvilaProcessor
    processors: dict[str, NvilaProcessor] = field(default_factory=dict)  # run label -> its processor
    adapters: dict[str, str] = field(default_factory=dict)  # run label -> adapter name in the bank
    load_seconds: float = 0.0


class Previewer:
    """Loads and caches models, and answers questions with a base model and its fine-tuned runs.

    Args:
        runs_dir: folder searched for run folders (see :func:`find_runs`); may be missing.
        base: a base checkpoint (hub id or folder) to offer even without runs; runs whose recorded base
            cannot be found from here are attached to it.
        runs: extra run folders (outside `runs_dir`).
        device: torch device; default CUDA when available, else CPU.
        dtype: "bfloat16" | "float16" | "float32"; default the first run's `model.dtype`, or float32 on a
            CPU and bfloat16 on a GPU (see :func:`nvila_ft.inference.load_model`).
        quantize: 4-bit LLM; default as the base's runs were trained (any `tune.llm: qlora`).
        max_upload_mb: largest upload accepted (MB).

    Raises:
        RunError: a path in `runs` is not a run folder.
    """

    def __init__(
        self,
        runs_dir: str | os.PathLike | None = "runs",
        base: str | None = None,
        runs: Sequence[str | os.PathLike] = (),
        device: str | None = None,
        dtype: str | None = None,
        quantize: bool | None = None,
        max_upload_mb: float = 20.0,
    ):
        self.device, self.dtype, self.quantize, self.max_upload_mb = device, dtype, quantize, max_upload_mb
        self.cli_base = _base_label(base) if base else None
        self.runs: dict[str, RunEntry] = {}
        root = Path(runs_dir) if runs_dir is not None else None
        for path in find_runs(root):
            label = str(path.relative_to(root)) if path != root else path.name
            self._add_run(label, path)
        for path in runs:
            path = Path(path)
            if not is_run(path):
                raise RunError(f"{path}: not a run folder (no adapter_config.json or non_lora_trainables.safetensors)")
            if any(entry.path.resolve() == path.resolve() for entry in self.runs.values()):
                continue
            label = path.name
            while label in self.runs:
                label = f"{path.parent.name}/{label}"
            self._add_run(label, path)
        self._loaded: dict[str, LoadedBase] = {}
        self._lock = threading.RLock()  # one generation (or load) at a time: see the module docstring
        self.media_dir = Path(tempfile.mkdtemp(prefix="nvila-ft-app-"))  # example images we serve
        weakref.finalize(self, shutil.rmtree, self.media_dir, True)

    def _add_run(self, label: str, path: Path) -> None:
        try:
            base, problem = _base_label(base_checkpoint(path)), None
        except RunError as err:
            base, problem = self.cli_base, None if self.cli_base else f"{err} (start the app with --base)"
        self.runs[label] = RunEntry(label, path, base, problem)

    # -- what the page offers
    def bases(self) -> list[str]:
        """Base checkpoint labels: `--base` first, then the bases recorded by runs, in run order."""
        labels = [self.cli_base] if self.cli_base else []
        for entry in self.runs.values():
            if entry.base and entry.base not in labels:
                labels.append(entry.base)
        return labels

    def default_base(self) -> str | None:
        bases = self.bases()
        return bases[0] if bases else None

    def runs_for(self, base: str | None) -> list[str]:
        """Labels of the runs trained on `base` (the runs the page can compare with it)."""
        return [label for label, e in self.runs.items() if base is not None and e.base == base]

    def problems(self) -> list[str]:
        """Runs that cannot be offered, with why."""
        return [f"{e.label}: {e.problem}" for e in self.runs.values() if e.problem]

    def entry(self, run: str) -> RunEntry:
        """Raises KeyError for a label that is not one of :attr:`runs`."""
        if run not in self.runs:
            raise KeyError(f"unknown run {run!r}; the app offers {sorted(self.runs)}")
        return self.runs[run]

    # -- loading
    def _load_settings(self, base: str) -> tuple[str | None, bool | None]:
        recipes = [run_recipe(self.runs[r].path) for r in self.runs_for(base)]
        dtype = self.dtype or (recipes[0].model.dtype if recipes else None)
        quantize = self.quantize
        if quantize is None:
            quantize = any(r.tune.llm == "qlora" for r in recipes)
        return dtype, quantize

    def load(self, base: str, runs: Sequence[str] = ()) -> LoadedBase:
        """The base model for `base` (loaded on first use, then cached) with `runs` added to its bank.

        Raises:
            KeyError: `base` is not offered, or a run is not one of its runs.
            OSError, RunError: the checkpoint or a run cannot be loaded.
        """
        if base not in self.bases():
            raise KeyError(f"unknown base {base!r}; the app offers {self.bases()}")
        wrong = [r for r in runs if r not in self.runs_for(base)]
        if wrong:
            raise KeyError(f"runs {wrong} are not runs of base {base!r}")
        with self._lock:
            loaded = self._loaded.get(base)
            if loaded is None:
                start = time.perf_counter()
                dtype, quantize = self._load_settings(base)
                model, processor = load_model(base, dtype=dtype, device=self.device, quantize=quantize)
                loaded = LoadedBase(base, AdapterBank(model), processor)
                loaded.load_seconds = time.perf_counter() - start
                self._loaded[base] = loaded
                logger.info("loaded base %s in %.1f s", base, loaded.load_seconds)
            for run in runs:
                if run not in loaded.adapters:
                    path = self.runs[run].path
                    name = _adapter_name(run, set(loaded.adapters.values()))
                    loaded.bank.add(path, name)
                    loaded.adapters[run] = name
                    loaded.processors[run] = load_processor(base_model(loaded.bank.model), path)
                    logger.info("added run %s to base %s as adapter %s", run, base, name)
            return loaded

    def processor(self, base: str, run: str | None = None) -> NvilaProcessor:
        """The processor `run` (its saved tiling and prompt) or, for None, the base checkpoint uses."""
        loaded = self.load(base, [run] if run else [])
        return loaded.processors[run] if run else loaded.processor

    # -- answering
    def tiles(self, media_path: str | os.PathLike, base: str, run: str | None = None) -> TilePreview:
        """Tiles (or frames) and visual token count of an upload, as `run` (or the base) sees it.

        Raises:
            UploadError: see :func:`check_upload`.
        """
        kind = check_upload(media_path, self.max_upload_mb)
        processor = self.processor(base, run)
        return tile_preview(processor, load_media(media_path, kind), kind)

    def answer(
        self,
        media_path: str | os.PathLike | None,
        question: str,
        base: str,
        runs: Sequence[str] = (),
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[dict[str, str]]:
        """Streams the base model's answer, then each run's, token by token (greedy unless temperature > 0).

        Yields:
            {"base": text, run: text, ...}: all answers so far, the one being generated growing; answers
            not started yet are absent.

        Raises:
            UploadError: a bad upload. ValueError: an empty question or more than MAX_COMPARED_RUNS runs.
            KeyError: an unknown base or run. SampleTooLongError: the prompt exceeds `max_length`.
        """
        if not question or not question.strip():
            raise ValueError("type a question first")
        if len(runs) > MAX_COMPARED_RUNS:
            raise ValueError(f"compare at most {MAX_COMPARED_RUNS} runs at once (got {len(runs)})")
        media: list = []
        if media_path is not None:
            kind = check_upload(media_path, self.max_upload_mb)
            media = load_media(media_path, kind)
        settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}
        answers: dict[str, str] = {}
        with self._lock:
            loaded = self.load(base, runs)
            for key in [BASE, *runs]:
                model = loaded.bank.activate(None if key == BASE else loaded.adapters[key])
                processor = loaded.processor if key == BASE else loaded.processors[key]
                answers[key] = ""
                with closing(stream_answer(model, processor, media, question.strip(), **settings)) as stream:
                    for text in stream:  # closing: a closed page stops this generation before the lock is freed
                        answers[key] = text
                        yield dict(answers)
                yield dict(answers)

    # -- run details
    def run_summary(self, run: str) -> str:
        """Markdown: the recipe's main settings, when and on what it trained, and its metrics.json."""
        entry = self.entry(run)
        try:
            recipe = run_recipe(entry.path)
        except RunError as err:
            return f"**{run}**: {err}"
        lines = [f"### {run}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in recipe_rows(recipe))]
        info = _read_json(entry.path / "run_info.json") or _read_json(entry.path.parent / "run_info.json") or {}
        if info.get("time"):
            lines.append(f"| trained | {info['time']} (git {str(info.get('git_commit') or '?')[:8]}) |")
        metrics = _read_json(entry.path / "metrics.json")
        if metrics is None:
            lines += ["", "No `metrics.json` in this folder (a checkpoint, or a run that did not finish)."]
        else:
            lines += ["", "`metrics.json`", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in _flatten(metrics)]
        return "\n".join(lines)

    def loss_curve(self, run: str) -> Image.Image | None:
        """The run's `loss_curve.png` (train loss, eval loss, task metric against steps), or None; for a
        checkpoint folder, its run's curve. Returned decoded, so the page needs no access to the run folder."""
        path = self.entry(run).path
        for folder in (path, path.parent):
            if (folder / "loss_curve.png").is_file():
                with Image.open(folder / "loss_curve.png") as image:
                    return image.convert("RGB")
        return None

    def examples(self, run: str, n: int = 4) -> tuple[list[tuple[str, str, str]], str | None]:
        """Up to `n` rows of the run's eval split when its data is on this machine.

        Returns:
            (rows, note): rows of (image path, question, reference answer), images copied into
            :attr:`media_dir` as PNG (the only folder the page may read examples from); `note` says why
            there are none, else None.
        """
        from nvila_ft.data import DataError, load_split
        from nvila_ft.evaluate import split_prompt

        recipe = run_recipe(self.entry(run).path)
        d = recipe.data
        if not d.eval_split:
            return [], "the run has no eval split (data.eval_split: null)"
        if not Path(d.path).exists() and not is_demo_path(d.path):  # a demo set is built where it loads
            return [], f"its data ({d.path}) is not a local path from here"
        try:
            if recipe.train.objective == "dpo":  # preference pairs: the prompt, the chosen answer as reference
                from nvila_ft.data.pairs import answer_sample, load_pair_split

                samples = [answer_sample(p, "chosen") for p in load_pair_split(d, d.eval_split, max(n * 4, n))]
            else:
                samples = load_split(d, d.eval_split, max_samples=max(n * 4, n))
        except (DataError, OSError) as err:
            return [], f"cannot read its eval split: {err}"
        rows, repeats = [], []  # rows on images not seen yet come first
        for sample in samples:
            if "error" in sample or len(sample.get("images", [])) != 1:
                continue
            try:
                turns, reference = split_prompt(sample)
                image = self._example_image(sample["images"][0])
            except (ValueError, OSError):
                continue
            question = re.sub(r"<image>\s*", "", turns[-1]["value"]).strip()
            seen = any(image == row[0] for row in rows)
            (repeats if seen else rows).append((image, question, reference))
        rows = (rows + repeats)[:n]
        return rows, None if rows else "no single-image rows in its eval split"

    def _example_image(self, image: str | Image.Image) -> str:
        if isinstance(image, Image.Image):
            key = hashlib.sha1(image.tobytes()).hexdigest()[:16]
        else:
            stat = Path(image).stat()
            key = hashlib.sha1(f"{Path(image).resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
        out = self.media_dir / f"example-{key}.png"
        if not out.is_file():
            im = image if isinstance(image, Image.Image) else Image.open(image)
            with im:
                to_rgb(im).save(out)
        return str(out)


def recipe_rows(recipe: Recipe) -> list[tuple[str, str]]:
    """(setting, value) rows summarizing a recipe."""
    m, t, lo, d, tr = recipe.model, recipe.tune, recipe.lora, recipe.data, recipe.train
    tuned = f"llm {t.llm}, vision_tower {t.vision_tower}, mm_projector {t.mm_projector}"
    rows = [("base model", f"`{m.path}` ({m.dtype})"), ("tuning", tuned)]
    if t.uses_lora:
        targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
        rows.append(("LoRA", f"r {lo.r}, alpha {lo.alpha}, dropout {lo.dropout}, {targets}"
                     + (", DoRA" if lo.use_dora else "")))
    rows += [("data", f"`{d.path}` ({d.format}), train `{d.train_split}`, eval `{d.eval_split}`"),
             ("training", f"lr {tr.lr:g} (vision / {tr.vision_lr_ratio:g}), "
                          f"batch {tr.per_device_train_batch_size} x {tr.gradient_accumulation_steps}, "
                          + (f"{tr.max_steps} steps" if tr.max_steps > 0 else f"{tr.num_train_epochs:g} epochs")
                          + (f", DPO (beta {recipe.dpo.beta:g}, {recipe.dpo.loss_type})" if tr.objective == "dpo" else "")),
             ("image tiling", f"{m.image_aspect_ratio or 'checkpoint default'}, max_tiles {m.max_tiles or 'default'}")]
    return rows


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"eval": {"n": 2}} -> [("eval.n", 2)]."""
    rows = []
    for key, value in tree.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- streaming
def stream_answer(
    model: torch.nn.Module,
    processor: NvilaProcessor,
    media,
    question: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[str]:
    """Yields the answer as it grows (:func:`nvila_ft.inference.stream_generate`): closing this generator (a
    closed page) stops generation and joins its thread, so the next request never overlaps an abandoned one."""
    yield from stream_generate(model, processor, media, question, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p)
