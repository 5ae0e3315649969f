"""Load a checkpoint or a fine-tuned run and answer questions about images.

    from nvila_ft.inference import load_model, generate

    model, processor = load_model("runs/medical")        # run folder: base + peft adapter
    print(generate(model, processor, "scan.png", "Is there a fracture?"))

A *run folder* is what `nvila_ft.train` writes to `train.output_dir` (or one of its `checkpoint-<step>`
folders): `adapter_config.json` + `adapter_model.safetensors` (the peft adapter: LoRA weights and the copies of
the parts trained in full, projector and vision LayerNorms by default, as `modules_to_save`),
`processor_config.json`, `recipe.yaml` and `run_info.json` (which record the base checkpoint). Run folders of
earlier versions kept the parts trained in full in `non_lora_trainables.safetensors`; they still load.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from nvila_ft.demo import is_demo_path
from nvila_ft.model.checkpoint import DTYPES, nf4_config
from nvila_ft.model.media import MediaConfig
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import PROCESSOR_CONFIG, NvilaProcessor
from nvila_ft.train.recipe import Recipe
from nvila_ft.train.recipe_io import load_recipe
from nvila_ft.train.tuning import NON_LORA_FILE, load_non_lora

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RUN_FILES = (ADAPTER_CONFIG, NON_LORA_FILE)


class RunError(ValueError):
    """A run folder is incomplete or its base checkpoint cannot be found."""


def is_run(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding trained weights (a peft adapter, or the `non_lora_trainables.safetensors`
    of an official export or an earlier version's run)."""
    folder = Path(path)
    return folder.is_dir() and any((folder / f).is_file() for f in RUN_FILES)


def run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The recipe a run was trained with (`recipe.yaml` in the run or, for a `checkpoint-<step>`, its parent).

    Raises:
        RunError: no `recipe.yaml` next to the weights or one level up.
    """
    folder = Path(run_dir)
    for candidate in (folder / "recipe.yaml", folder.parent / "recipe.yaml"):
        if candidate.is_file():
            return load_recipe(candidate)
    raise RunError(f"{folder}: no recipe.yaml here or in {folder.parent}; is this a run folder from nvila_ft.train.trainer?")


def base_checkpoint(run_dir: str | os.PathLike) -> str:
    """The base checkpoint of a run: a local folder (absolute path recorded at training time, or the recipe's
    `model.path` if it exists from here), the recipe's hub id or its `demo:` checkpoint.

    Raises:
        RunError: the recipe names a local-looking path that does not exist from here.
    """
    folder = Path(run_dir)
    for info_path in (folder / "run_info.json", folder.parent / "run_info.json"):
        if info_path.is_file():
            resolved = json.loads(info_path.read_text()).get("base_model_path")
            if resolved and Path(resolved).is_dir():
                return resolved
            break
    path = run_recipe(folder).model.path
    if Path(path).is_dir() or is_demo_path(path):  # a demo checkpoint resolves (and builds) where it loads
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise RunError(f"{folder}: base checkpoint {path!r} from its recipe does not exist from {Path.cwd()}; "
                       "pass base=... to load_model")
    return path  # hub id


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device (None: cuda when available, else cpu), checked before any weight loads.

    Raises:
        RunError: an unknown device name, or a CUDA device on a machine where torch sees none (or fewer).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise RunError(f"--device {device}: not a torch device ({err}); use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {device}: torch finds no CUDA GPU on this machine "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RunError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return resolved


def load_processor(model: NvilaForConditionalGeneration, folder: str | os.PathLike | None = None,
                   **overrides: Any) -> NvilaProcessor:
    """Processor for `model`: the run's media config and system prompt saved in `folder/processor_config.json`
    (a run folder; see :meth:`NvilaProcessor.from_pretrained`) when present, else the checkpoint config's;
    keyword arguments (`NvilaProcessor` settings such as `max_length`, `num_video_frames`) override them.
    Uses `model.tokenizer`."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = Path(folder) / PROCESSOR_CONFIG if folder is not None else None
    if path is None or not path.is_file():
        return NvilaProcessor(model.tokenizer, model.config, **overrides)
    saved = json.loads(path.read_text())
    overrides.setdefault("system_prompt", saved.get("system_prompt"))
    return NvilaProcessor(model.tokenizer, model.config, media=MediaConfig.from_dict(saved), **overrides)


def load_model(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: bool | None = None,
    adapter_name: str = "default",
) -> tuple[torch.nn.Module, NvilaProcessor]:
    """Loads a checkpoint (folder or hub id) or a fine-tuned run folder for inference (eval mode).

    Args:
        path: an NVILA checkpoint (official layout, local or hub id) or a run folder / `checkpoint-<step>`.
        base: the base checkpoint of a run, when the one recorded in the run cannot be found from here.
        dtype: "bfloat16" | "float16" | "float32" or a torch dtype; default the recipe's `model.dtype` for a
            run, else float32 on a CPU and bfloat16 on a GPU.
        device: default CUDA when available, else CPU.
        quantize: load the LLM in 4-bit nf4 (bitsandbytes); default: as the run was trained (`tune.llm: qlora`).
        adapter_name: name of the run's LoRA adapter inside the returned `PeftModel`.

    Returns:
        (model, processor): `model` is an :class:`NvilaForConditionalGeneration` for a checkpoint, a
        `peft.PeftModel` around one for a run (its adapter active: LoRA and trained copies of the projector /
        vision LayerNorms; `with model.disable_adapter():` gives the base).

    Raises:
        RunError: a run folder without recipe or with a base that cannot be found.
        OSError: the checkpoint cannot be found or downloaded.
    """
    run = is_run(path)
    recipe = run_recipe(path) if run else None
    checkpoint = str(base) if base is not None else (base_checkpoint(path) if run else str(path))
    device = resolve_device(device)
    if dtype is None:
        dtype = recipe.model.dtype if recipe else ("bfloat16" if device.type == "cuda" else "float32")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if quantize is None:
        quantize = bool(recipe and recipe.tune.llm == "qlora")
    quant = nf4_config(torch_dtype) if quantize else None
    attn = recipe.model.attn_implementation if recipe else "sdpa"
    model = NvilaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch_dtype, attn_implementation=attn, llm_quantization_config=quant,
        device_map={"": device} if device.type == "cuda" else None,
        init=recipe.model.init if recipe else "pretrained")  # a model.init=random run: the same seeded weights
    if quant is None:
        model.to(device)
    else:  # the 4-bit LLM is placed by device_map (GPU) or stays on the CPU
        model.vision_tower.to(device)
        model.mm_projector.to(device)
    processor = load_processor(model, path if run else None)
    if run:
        model = attach_run(model, path, adapter_name)
    model.eval()
    return model, processor


def attach_run(model: torch.nn.Module, run_dir: str | os.PathLike, adapter_name: str = "default") -> torch.nn.Module:
    """Adds a run's peft adapter (LoRA + trained copies, as `adapter_name`) to `model` and makes it active.

    Returns the `PeftModel`. A folder with `non_lora_trainables.safetensors` (an official export, or a run of an
    earlier version) has those tensors copied into the base weights instead, which then hold for every adapter;
    :class:`AdapterBank` refuses such folders.
    """
    from peft import PeftModel

    folder = Path(run_dir)
    if (folder / ADAPTER_CONFIG).is_file():
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=False)
            model.set_adapter(adapter_name, inference_mode=True)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=False)
    legacy = load_non_lora(model, folder)
    if legacy:
        logger.warning("%s: %d tensors of %s copied into the base weights (earlier run layout or official export)",
                       folder, len(legacy), NON_LORA_FILE)
    return model


class AdapterBank:
    """Several fine-tuned runs on one base model, switched without reloading the base.

    Each run is a peft adapter on the one `PeftModel` (its LoRA weights and its own copies of the projector /
    vision LayerNorms, peft `modules_to_save`); :meth:`activate` is peft's `set_adapter`, and `None` disables
    every adapter (LoRA and copies), which gives the base model's outputs.

        bank = AdapterBank(base_model)              # an NvilaForConditionalGeneration
        bank.add("runs/medical", "medical"); bank.add("runs/pathology", "pathology")
        bank.activate("medical"); ...; bank.activate(None)   # None = the base model
    """

    def __init__(self, model: NvilaForConditionalGeneration):
        self.model: torch.nn.Module = model
        self.runs: dict[str, Path] = {}
        self.active: str | None = None

    def add(self, run_dir: str | os.PathLike, name: str | None = None) -> str:
        """Registers a run (its adapter is loaded into the PEFT model now). Returns its name.

        Raises:
            RunError: not a run folder; a folder with `non_lora_trainables.safetensors` (earlier layout: load it
                alone with :func:`load_model`); an adapter that does not fit this base model.
        """
        from peft import PeftModel

        folder = Path(run_dir)
        if not is_run(folder):
            raise RunError(f"{folder}: not a run folder (no {ADAPTER_CONFIG} or {NON_LORA_FILE})")
        if (folder / NON_LORA_FILE).is_file():
            raise RunError(f"{folder}: {NON_LORA_FILE} (an earlier run layout or an official export) changes the "
                           "base weights and cannot be switched; load this run alone with nvila_ft.load_model")
        name = name or folder.name
        if name in self.runs:
            return name
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as err:
            raise RunError(f"{folder}: its adapter does not fit this base model: {err}") from err
        self.runs[name] = folder
        self.activate(self.active)  # loading an adapter must not change which one answers
        self.model.eval()
        return name

    def activate(self, name: str | None) -> torch.nn.Module:
        """Makes run `name` (or the base model, for None) the one that answers. Returns the model to call."""
        from peft import PeftModel

        if name is not None and name not in self.runs:
            raise KeyError(f"unknown run {name!r}; added: {sorted(self.runs)}")
        if isinstance(self.model, PeftModel):
            if name is None:
                self.model.base_model.disable_adapter_layers()  # LoRA layers and modules_to_save copies alike
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(name, inference_mode=True)
        self.active = name
        return self.model


# ------------------------------------------------------------------------------------------ generation
def split_media(media) -> tuple[list, list]:
    """(images, videos) of `media`: None, one item or a list of items.

    An item is a video when it is bytes, a path that :func:`nvila_ft.model.video.is_video` recognises (a video file
    extension or a folder of frame images), or a list of PIL frames inside the list; everything else (a PIL
    image, an image path) is an image. Images come before videos in the prompt, as in training.
    """
    if media is None:
        return [], []
    items = [media] if isinstance(media, (str, os.PathLike, bytes, bytearray, Image.Image)) else list(media)
    images, videos = [], []
    for item in items:
        if isinstance(item, (bytes, bytearray)) or (isinstance(item, (list, tuple)) and item):
            videos.append(item)
        elif isinstance(item, (str, os.PathLike)) and _is_video_path(item):
            videos.append(os.fspath(item))
        else:
            images.append(item)
    return images, videos


def _is_video_path(path: str | os.PathLike) -> bool:
    try:
        from nvila_ft.model.video import is_video
    except ImportError:  # decord (the `video` extra) missing: only images
        return False
    return is_video(path)


def prepare_inputs(processor: NvilaProcessor, media, question: str, history: Sequence[dict] = ()) -> dict:
    """Encodes a question (after optional earlier turns) about images and videos as a generation prompt (B=1).

    Args:
        media: None, an image (path or PIL), a video (path, bytes or frames folder), or a list of them
            (see :func:`split_media`). Videos are sampled and pooled per the processor
            (`num_video_frames`, `video_fps`, `temporal_pool`: the run's or the checkpoint config's).
        question: the user's question (no placeholder needed: media go first, as in training).
        history: earlier LLaVA turns [{"from": "human"|"gpt", "value": ...}].

    Returns:
        The collated batch (`input_ids`, `attention_mask`, `pixel_values`, `block_sizes`, and for videos
        `pixel_values_videos`, `video_frames`, `pool_sizes`) plus `num_tokens`.

    Raises:
        SampleTooLongError: the prompt with its visual tokens exceeds the processor's `max_length`.
        nvila_ft.model.video.VideoError: a video cannot be read.
    """
    images, videos = split_media(media)
    turns = [*history, {"from": "human", "value": question}]
    encoded = processor(turns, images, add_generation_prompt=True, videos=videos)
    batch = processor.collate([encoded], padding_side="left")
    batch["num_tokens"] = encoded["num_tokens"]
    return batch


def _to_device(batch: dict, model: torch.nn.Module) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "num_tokens"}


def _generation_kwargs(max_new_tokens: int, temperature: float, top_p: float, kwargs: dict) -> dict:
    sample = temperature > 0
    out = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        out.update(temperature=temperature, top_p=top_p)
    out.update(kwargs)
    return out


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor: NvilaProcessor,
    media,
    question: str,
    *,
    history: Sequence[dict] = (),
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    **generate_kwargs: Any,
) -> str:
    """Answers `question` about `media` (greedy by default).

    Args:
        model: from :func:`load_model` (a PeftModel or an NvilaForConditionalGeneration).
        processor: the matching :class:`NvilaProcessor`.
        media: None, an image path / PIL image, a video path / bytes / frames folder, or a list of them
            (see :func:`split_media`).
        question: the user's question.
        history: earlier conversation turns, LLaVA style.
        max_new_tokens: generation budget (tokens).
        temperature: 0 = greedy; > 0 samples with `temperature` and `top_p`.
        **generate_kwargs: passed to `transformers` `generate` (e.g. `streamer`, `repetition_penalty`).

    Returns:
        The decoded answer, stripped.

    Raises:
        SampleTooLongError: the prompt with its visual tokens exceeds the processor's `max_length`.
    """
    batch = _to_device(prepare_inputs(processor, media, question, history), model)
    out = model.generate(**batch, **_generation_kwargs(max_new_tokens, temperature, top_p, generate_kwargs))
    return processor.decode(out[0])


class _Cancelled(StoppingCriteria):
    """Ends generation once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(
    model: torch.nn.Module,
    processor: NvilaProcessor,
    media,
    question: str,
    **kwargs: Any,
) -> Iterator[str]:
    """Like :func:`generate`, but yields the answer as it grows (the text so far, each time it changes).

    Generation runs in a background thread feeding a `transformers.TextIteratorStreamer`. When the caller
    stops iterating (closes the generator, e.g. a closed web page), generation is stopped and its thread
    joined before `close()` returns, so the model is free for the next request.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600)
    cancel = threading.Event()
    stopping = StoppingCriteriaList([_Cancelled(cancel), *kwargs.pop("stopping_criteria", [])])
    errors: list[BaseException] = []

    def work():
        try:
            generate(model, processor, media, question, streamer=streamer, stopping_criteria=stopping, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True, name="nvila-ft-generate")
    thread.start()
    text, shown = "", None
    try:
        for piece in streamer:
            text += piece
            if text.strip() != shown:  # pieces that decode to nothing (special tokens) add no update
                shown = text.strip()
                yield shown
    finally:
        cancel.set()
        thread.join()
    if shown is None and not errors:
        yield ""
    if errors:
        raise errors[0]
