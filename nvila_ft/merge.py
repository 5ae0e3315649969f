"""Merge a fine-tuned run into a full NVILA checkpoint (official hub layout), LoRA folded into the weights.

    python -m nvila_ft.merge runs/medical runs/medical-merged --dtype bf16
    python -m nvila_ft.merge runs/medical runs/medical-export --non-lora-trainables   # no merge: file export
    python -m nvila_ft.merge runs/medical runs/medical-hf --layout hf    # NVIDIA's -hf layout, for SGLang

The result is `config.json` + `llm/` (weights, tokenizer with NVILA's media tokens, chat template) +
`vision_tower/` (+ `preprocessor_config.json`) + `mm_projector/`, the layout of `Efficient-Large-Model/NVILA-8B`:
it loads with `nvila_ft.load_model(OUT_DIR)` / `NvilaForConditionalGeneration.from_pretrained` and no adapter.
`--layout hf` writes NVIDIA's single-folder -hf layout instead (`config.json` with `text_config` /
`vision_config`, `model.safetensors`, tokenizer; model_type `nvila` or `nvila_lite`), which SGLang serves
(`--layout hf-0626`: model_type `vila`); see `nvila_ft.model.hf_layout`.

QLoRA runs (`tune.llm: qlora`) were trained on 4-bit nf4 LLM weights; a checkpoint is never written in 4 bit.
By default (`--qlora-base dequantized`) the LoRA update is added to the nf4 weights dequantized to `--dtype`:
the merged model then computes what the trained and evaluated model computed (its logits match the adapter
model's), but its LLM weights are not the original bf16 ones (they carry the nf4 rounding, about 1e-2 relative).
`--qlora-base original` adds the update to the original unquantized weights instead: the base weights are exact,
but the adapter was learned against the rounded ones, so the merged model differs from the evaluated one;
re-evaluate it. The choice is printed.

`--non-lora-trainables` (:func:`export_non_lora`) merges nothing: it splits the run's peft adapter into a
LoRA-only adapter and `non_lora_trainables.safetensors`, the parts trained in full under their official NVILA
names (`mm_projector.layers.1.weight`, `vision_tower.encoder.layers.0.layer_norm1.weight`), the layout of
NVILA's own LoRA runs and of this kit's run folders before peft `modules_to_save`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from nvila_ft.cli_errors import user_errors
from nvila_ft.model.checkpoint import DTYPES
from nvila_ft.model.hf_layout import LAYOUTS, hf_model_type, save_hf
from nvila_ft.model.media import MediaConfig
from nvila_ft.train.tuning import NON_LORA_FILE

logger = logging.getLogger("nvila_ft.merge")

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", **{v: v for v in DTYPES}}
QLORA_BASES = ("dequantized", "original")


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message says why and what to do."""


def _check_paths(run_dir: Path, out_dir: Path, checkpoint: str) -> None:
    out = out_dir.resolve()
    for name, other in (("run folder", run_dir.resolve()), ("base checkpoint", Path(checkpoint).resolve())):
        if out == other or out in other.parents or other in out.parents:
            raise MergeError(f"output {out_dir} overlaps the {name} {other}: the merge replaces the output folder "
                             "as a whole; choose a separate folder, e.g. RUN_DIR-merged")


def merge(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    base: str | os.PathLike | None = None,
    device: str = "cpu",
    qlora_base: str = "dequantized",
    layout: str = "original",
) -> Path:
    """Folds a run's LoRA adapter into its base model, loads its non-LoRA trainables and saves the result.

    Args:
        run_dir: a run folder (or `checkpoint-<step>`) from `nvila_ft.train`.
        out_dir: the new checkpoint folder (written atomically; replaced if it exists; must not overlap the run
            or the base).
        dtype: "bf16" | "fp16" | "fp32" (or the torch names): dtype of the merge and of the saved weights.
        base: the base checkpoint, when the one recorded in the run is not found from here.
        device: where the merge runs ("cpu" needs RAM for the whole model in `dtype`; "cuda" is faster).
        qlora_base: for `tune.llm: qlora` runs, "dequantized" (merge into the dequantized nf4 weights: same
            outputs as the trained model) or "original" (merge into the original weights); see the module doc.
        layout: "original" (config.json + llm/ + vision_tower/ + mm_projector/), "hf" or "hf-0626" (NVIDIA's
            single-folder -hf layouts, `nvila_ft.model.hf_layout.save_hf`).

    Returns:
        The output folder.

    Raises:
        MergeError: not a run folder, an unknown dtype / qlora_base / layout, a projector the -hf layout cannot
            hold, or overlapping folders.
        RunError: the run's base checkpoint cannot be found (pass `base`).
    """
    from peft import PeftModel

    from nvila_ft.inference import (
        PROCESSOR_CONFIG,
        attach_run,
        base_checkpoint,
        is_run,
        load_model,
        run_recipe,
    )

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not is_run(run_dir):
        raise MergeError(f"{run_dir}: not a run folder (no adapter_config.json or {NON_LORA_FILE}); "
                         "a plain checkpoint has nothing to merge")
    if dtype not in DTYPE_NAMES:
        raise MergeError(f"dtype {dtype!r}: choose one of bf16, fp16, fp32")
    if qlora_base not in QLORA_BASES:
        raise MergeError(f"qlora_base {qlora_base!r}: choose one of {QLORA_BASES}")
    if layout not in LAYOUTS:
        raise MergeError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    torch_dtype = DTYPES[DTYPE_NAMES[dtype]]
    checkpoint = str(base) if base is not None else base_checkpoint(run_dir)
    if Path(checkpoint).exists():
        _check_paths(run_dir, out_dir, checkpoint)
    recipe = run_recipe(run_dir)

    quantized = recipe.tune.llm == "qlora" and qlora_base == "dequantized"
    model, _ = load_model(checkpoint, dtype=torch_dtype, device=device, quantize=quantized)
    if layout != "original":
        try:
            hf_model_type(model.config, layout)
        except ValueError as err:
            raise MergeError(str(err)) from err
    if recipe.tune.llm == "qlora":
        if quantized:
            model.llm.dequantize()  # transformers: bitsandbytes Linear4bit -> nn.Linear in the compute dtype
            note = ("QLoRA run: merging into the base's nf4 weights dequantized to {dtype} (what the run trained and "
                    "was evaluated with; they differ from the original weights by the 4-bit rounding). For the "
                    "original weights instead: --qlora-base original (then re-evaluate).")
        else:
            note = ("QLoRA run: merging into the original unquantized base weights; the adapter was trained against "
                    "their nf4 rounding, so outputs differ from the evaluated model: re-evaluate the merged one.")
        logger.warning(note.format(dtype=torch_dtype))
    model = attach_run(model, run_dir)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # LoRA folded in; each modules_to_save wrapper replaced by its trained copy
    model.to(torch_dtype)

    # The run's media config (tiling, video sampling and pooling) becomes the checkpoint's, so the merged model is
    # fed as it was trained.
    settings_path = run_dir / PROCESSOR_CONFIG
    if not settings_path.is_file():
        settings_path = run_dir.parent / PROCESSOR_CONFIG
    if settings_path.is_file():
        MediaConfig.from_dict(json.loads(settings_path.read_text())).write_to(model.config)
    model.config.model_dtype = f"torch.{DTYPE_NAMES[dtype]}"
    if layout == "original":
        model.save_pretrained(out_dir)
    else:
        from nvila_ft.model.checkpoint import resolve_checkpoint
        from nvila_ft.model.hf_layout import detect_layout

        base_folder = resolve_checkpoint(checkpoint)  # an -hf base lends its remote code (SGLang reads it)
        save_hf(model, out_dir, layout, code_from=base_folder if detect_layout(base_folder) != "original" else None)
    logger.info("merged %s into %s -> %s (%s)", run_dir, checkpoint, out_dir, torch_dtype)
    return out_dir


def export_non_lora(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes a run as a LoRA-only peft adapter + `non_lora_trainables.safetensors` (official names); no merge.

    Only files are read and written (no model is loaded): the adapter's `modules_to_save` tensors go to
    `non_lora_trainables.safetensors` under the checkpoint's names, its LoRA tensors stay in
    `adapter_model.safetensors` (left out when no part used LoRA), and `adapter_config.json` loses
    `modules_to_save`. The run's other files (recipe, processor settings, tokenizer) are copied, so
    `nvila_ft.load_model(out_dir)` loads it (the tensors then go into the base weights).

    Returns:
        The output folder.

    Raises:
        MergeError: not a run folder with a peft adapter, or `out_dir` overlaps it.
    """
    from safetensors.torch import load_file, save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_path, weights_path = run_dir / "adapter_config.json", run_dir / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise MergeError(f"{run_dir}: no adapter_config.json + adapter_model.safetensors to export")
    _check_paths(run_dir, out_dir, str(run_dir))
    config = json.loads(config_path.read_text())
    tensors = load_file(weights_path)
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    non_lora = {k.removeprefix("base_model.model."): v for k, v in tensors.items() if "lora_" not in k}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in run_dir.iterdir():
        if item.is_file() and item.name not in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(item, tmp / item.name)
    if lora:
        config["modules_to_save"] = None
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(lora, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    save_file(non_lora, tmp / NON_LORA_FILE, metadata={"format": "pt"})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    logger.info("exported %s -> %s: %d LoRA tensors, %d in %s", run_dir, out_dir, len(lora), len(non_lora),
                NON_LORA_FILE)
    return out_dir


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nvila_ft.merge", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python -m nvila_ft.merge runs/medical runs/medical-merged --dtype bf16\n"
        "  python -m nvila_ft.predict runs/medical-merged --data DATA --out preds.jsonl   # use it")
    parser.add_argument("run_dir", help="run folder from nvila_ft.train.trainer (or one of its checkpoint-<step>)")
    parser.add_argument("out_dir", help="new checkpoint folder (layout per --layout)")
    parser.add_argument("--layout", default="original", choices=list(LAYOUTS),
                        help="original (default: llm/ vision_tower/ mm_projector/) or NVIDIA's single-folder "
                        "-hf layout that SGLang serves (hf; hf-0626 = model_type vila)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="weights dtype of the merge and the output (default %(default)s)")
    parser.add_argument("--base", help="base checkpoint, when the one recorded in the run is not found from here")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")
    parser.add_argument("--qlora-base", default="dequantized", choices=QLORA_BASES,
                        help="QLoRA runs: merge into the dequantized nf4 weights (default: same outputs as the "
                        "trained model) or the original weights")
    parser.add_argument("--non-lora-trainables", action="store_true",
                        help=f"no merge: write a LoRA-only adapter + {NON_LORA_FILE} (official names) to OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # MergeError and RunError are user errors: one line, exit 2 (cli_errors.user_errors).
    if args.non_lora_trainables:
        out = export_non_lora(args.run_dir, args.out_dir)
        print(f"wrote {out} (adapter without modules_to_save, {NON_LORA_FILE})")
        return 0
    out = merge(args.run_dir, args.out_dir, dtype=args.dtype, base=args.base, device=args.device,
                qlora_base=args.qlora_base, layout=args.layout)
    parts = "config.json, llm/, vision_tower/, mm_projector/" if args.layout == "original" else (
        "config.json, model.safetensors, tokenizer; -hf layout")
    print(f"wrote {out} ({parts}); load it with "
          f"nvila_ft.load_model({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
