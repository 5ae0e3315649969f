"""Training work per answer token on VQA-RAD: baseline / shared prefix / + packing / + layer skip, side by side (CPU).

    python benchmarks/train_throughput.py --rows 6 [--llm-layers 1] [--vision-layers 3]
    python benchmarks/train_throughput.py --image-rows 10 --vision-layers 2     # one typical image's 10 questions

Real VQA-RAD rows and images (`../shared/data/vqa_rad`, train split). Two settings: `recipes/medical.yaml`
(NVILA-8B shapes, dynamic_s2, 12 tiles) and NVILA-Lite (NVILA-Lite-2B shapes, dynamic, 12 tiles + thumbnail).
The models have the real widths of the shipped configs (`nvila_ft/model/configs/`) at reduced depth, random
weights, fp32, the tiny demo tokenizer's vocabulary (a Qwen2 byte-level BPE built offline; text token counts
differ from Qwen's by a few per row) and the medical recipe's tuning (LoRA r 64 on every LLM Linear, LayerNorm-only
vision tower, full projector). Each row is one training step (forward + backward, batch 1, no optimizer step, so
every variant sees the same weights and its loss can be compared).

Measured per variant on the `--rows` rows: vision tiles encoded, vision layer-tiles run (forward hooks on the SigLIP
encoder layers), LLM positions processed (a hook on the decoder), answer tokens supervised, wall and process CPU
time (CPU time is the steadier figure on a shared machine), and the answer-token-weighted loss. Counted without running the model, for the whole split (an epoch): tiles and LLM
positions of the baseline and of shared image prefixes (every row of an image in one sequence: the prefix once).

Shared prefix and packing batches come from the trainer's own collator (`nvila_ft.data.grouping.GroupCollator`);
each variant's loss per answer token must equal the baseline's (fp32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvila_ft.data import load_samples  # noqa: E402
from nvila_ft.data.grouping import GroupCollator, media_key  # noqa: E402
from nvila_ft.demo.tiny import build_tiny_checkpoint  # noqa: E402
from nvila_ft.model.configuration import IGNORE_INDEX, NvilaConfig  # noqa: E402
from nvila_ft.model.modeling import NvilaForConditionalGeneration  # noqa: E402
from nvila_ft.model.processing import NvilaProcessor  # noqa: E402
from nvila_ft.train.dataset import expanded_tokens  # noqa: E402
from nvila_ft.train.tuning import apply_tuning, base_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "vqa_rad"
SETTINGS = OrderedDict([
    ("medical.yaml (NVILA-8B, dynamic_s2, 12 tiles)", ("NVILA-8B", "nvila", "dynamic_s2")),
    ("NVILA-Lite (NVILA-Lite-2B, dynamic, 12 tiles)", ("NVILA-Lite-2B", "nvila-lite", "dynamic")),
])
REAL_VISION_LAYERS = 27  # SigLIP so400m


def full_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """The baseline: the whole tower with every hidden state, then `hidden_states[select_layer]` (before #18)."""
    param = next(p for n, p in self.vision_tower.named_parameters() if "original_module." not in n)
    out = self.vision_tower(pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
    feats = out.hidden_states[self.config.mm_vision_select_layer]
    return feats[:, 1:] if self.config.mm_vision_select_feature == "patch" else feats


def build(name: str, tiny: NvilaForConditionalGeneration, llm_layers: int, vision_layers: int) -> torch.nn.Module:
    """Real widths of `name` at reduced depth, the tiny checkpoint's vocabulary and media token ids, tuned."""
    config = NvilaConfig.from_json_file(str(ROOT / "nvila_ft" / "model" / "configs" / name / "config.json"))
    config.llm_cfg = {**config.llm_cfg, "num_hidden_layers": llm_layers, "max_window_layers": llm_layers,
                      "vocab_size": len(tiny.tokenizer), "bos_token_id": None, "eos_token_id": None}
    config.vision_tower_cfg = {**config.vision_tower_cfg, "num_hidden_layers": vision_layers}
    config.image_token_id, config.video_token_id = tiny.config.image_token_id, tiny.config.video_token_id
    config.end_token_ids = tiny.config.end_token_ids
    torch.manual_seed(0)
    model = NvilaForConditionalGeneration(config).float()
    model.tokenizer = tiny.tokenizer
    tune = SimpleNamespace(llm="lora", vision_tower="layernorm", mm_projector="full")
    lora = SimpleNamespace(r=64, alpha=16, dropout=0.0, target_modules="all-linear", use_dora=False)
    torch.manual_seed(0)
    return apply_tuning(model, tune, lora).train()


def pick_rows(samples: list[dict], n: int, image_rows: int | None = None) -> list[dict]:
    """Whole images first: the rows of the first images (file order) until `n` rows; with `image_rows`, all the
    rows of the first image asked exactly that many questions (the split's mean is 9.76: one typical image)."""
    by_image: dict[str, list[dict]] = OrderedDict()
    for s in samples:
        by_image.setdefault(str(s["images"][0]), []).append(s)
    if image_rows:
        return next(group for group in by_image.values() if len(group) == image_rows)
    rows = [s for group in by_image.values() for s in group]
    return rows[:n]


class Counter:
    """Forward hooks that count the work actually done: layer-tiles in SigLIP, positions into the LLM decoder."""

    def __init__(self, nvila):
        tower = getattr(nvila.vision_tower, "vision_model", nvila.vision_tower)
        self.layer_tiles = self.positions = 0
        self.hooks = [layer.register_forward_pre_hook(self._layer) for layer in tower.encoder.layers]
        self.hooks.append(nvila.llm.get_decoder().register_forward_pre_hook(self._llm, with_kwargs=True))

    def _layer(self, _module, args):
        self.layer_tiles += args[0].shape[0]

    def _llm(self, _module, _args, kwargs):
        embeds = kwargs["inputs_embeds"]
        self.positions += embeds.shape[0] * embeds.shape[1]

    def remove(self):
        for h in self.hooks:
            h.remove()


def run_rows(model, batches: list[dict], skip_layer: bool) -> dict:
    """One training step per batch; work counted by hooks, wall time of forward + backward."""
    nvila = base_model(model)
    if skip_layer:
        nvila.__dict__.pop("vision_features", None)
    else:
        nvila.vision_features = types.MethodType(full_tower_features, nvila)
    counter = Counter(nvila)
    stats = {"tiles": 0, "answer_tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0, "loss_sum": 0.0}
    try:
        for batch in batches:
            n_answer = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            model.zero_grad(set_to_none=True)
            start, cpu = time.perf_counter(), time.process_time()
            loss = model(**batch).loss
            loss.backward()
            stats["seconds"] += time.perf_counter() - start
            stats["cpu_seconds"] += time.process_time() - cpu
            stats["tiles"] += batch["pixel_values"].shape[0]
            stats["answer_tokens"] += n_answer
            stats["loss_sum"] += float(loss.detach()) * n_answer
    finally:
        counter.remove()
        nvila.__dict__.pop("vision_features", None)
    stats.update(layer_tiles=counter.layer_tiles, positions=counter.positions)
    return stats


def shared_prefix_variants(model, processor, rows: list[dict]) -> dict[str, dict]:
    """Shared prefix (`data.share_prefix`: the rows of one image in one sequence, the prefix once), + packing
    (`data.packing`: all groups of the rows in sequences of up to `max_length`), + layer skip: the trainer's own
    collator (`nvila_ft.data.grouping.GroupCollator`) on the same encoded rows as the baseline."""
    encoded = [processor(r["conversations"], r["images"]) | {"media_key": media_key(r)} for r in rows]
    by_image: dict = OrderedDict()
    for row in encoded:
        by_image.setdefault(row["media_key"], []).append(row)
    grouped = [GroupCollator(processor, share_prefix=True)(group) for group in by_image.values()]
    packed = [GroupCollator(processor, share_prefix=True, packing=True)(encoded)]
    return {"shared prefix": run_rows(model, grouped, skip_layer=False),
            "shared prefix + packing": run_rows(model, packed, skip_layer=False),
            "shared prefix + packing + layer skip": run_rows(model, packed, skip_layer=True)}


def epoch_counts(processor: NvilaProcessor, samples: list[dict]) -> dict:
    """Tiles and LLM positions of one epoch over `samples`, per row (baseline) and with shared image prefixes.

    A row's prefix is everything up to and including its image's embeddings (system turn, user-turn opening,
    media tokens); its branch is the rest (question, assistant header, answer, end token). Shared: per image the
    prefix once plus every branch. Counted from image sizes and tokenization (nothing is encoded).
    """
    media_ids = {processor.image_token_id, processor.video_token_id}
    tiles_per_image, prefix, rows_tiles, rows_pos, shared_pos = {}, {}, 0, 0, 0
    for s in samples:
        image = str(s["images"][0])
        length = s.get("num_tokens") or expanded_tokens(processor, s)
        ids, _ = processor.tokenize_messages(processor.to_messages(s["conversations"], processor.image_token),
                                             with_labels=False)
        last_media = max(i for i, t in enumerate(ids) if t in media_ids)
        branch = len(ids) - last_media - 1
        prefix.setdefault(image, length - branch)
        if image not in tiles_per_image:
            tiles_per_image[image] = _tiles(processor, image)
        rows_tiles += tiles_per_image[image]
        rows_pos += length
        shared_pos += branch
    shared_pos += sum(prefix.values())
    return {"rows": len(samples), "images": len(tiles_per_image), "tiles_rows": rows_tiles,
            "tiles_shared": sum(tiles_per_image.values()), "positions_rows": rows_pos, "positions_shared": shared_pos}


def _tiles(processor: NvilaProcessor, image: str) -> int:
    from PIL import Image

    from nvila_ft.model.image_processing import num_tiles

    with Image.open(image) as im:
        return num_tiles(*im.size, processor.tiling)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6, help="training rows run per variant (whole images first)")
    parser.add_argument("--image-rows", type=int, default=None,
                        help="instead of --rows: the rows of the first image with this many questions (10: typical)")
    parser.add_argument("--llm-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=3, help="features come from the second-to-last")
    parser.add_argument("--settings", default="medical,lite", help="comma list: medical, lite")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    samples = load_samples(str(DATA), "train")
    rows = pick_rows(samples, args.rows, args.image_rows)
    print(f"VQA-RAD train: {len(samples)} rows; running {len(rows)} rows on "
          f"{len({str(r['images'][0]) for r in rows})} images; LLM {args.llm_layers} layer(s), "
          f"SigLIP {args.vision_layers} layers (NVILA reads layer -2); torch threads {torch.get_num_threads()}")
    wanted = {"medical": 0, "lite": 1}
    chosen = [list(SETTINGS.items())[wanted[k.strip()]] for k in args.settings.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for title, (config_name, variant, mode) in chosen:
            ckpt = build_tiny_checkpoint(Path(tmp) / variant, variant=variant, seed=0)
            tiny = NvilaForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32)
            model = build(config_name, tiny, args.llm_layers, args.vision_layers)
            processor = NvilaProcessor(tiny.tokenizer, base_model(model).config, image_aspect_ratio=mode,
                                       max_tiles=12, max_length=4096)
            batches = [processor.collate([processor(r["conversations"], r["images"])]) for r in rows]
            results: dict[str, dict | str] = OrderedDict()
            results["baseline"] = run_rows(model, batches, skip_layer=False)
            results.update(shared_prefix_variants(model, processor, rows))
            results["layer skip"] = run_rows(model, batches, skip_layer=True)
            report(title, results, args.vision_layers)
            counts = epoch_counts(processor, samples)
            print(f"  one epoch, counted ({counts['rows']} rows, {counts['images']} images): vision tiles "
                  f"{counts['tiles_rows']} -> {counts['tiles_shared']} shared "
                  f"({counts['tiles_rows'] / counts['tiles_shared']:.2f}x less), LLM positions "
                  f"{counts['positions_rows']} -> {counts['positions_shared']} shared "
                  f"({counts['positions_rows'] / counts['positions_shared']:.2f}x less); layer skip at "
                  f"{REAL_VISION_LAYERS} SigLIP layers: {REAL_VISION_LAYERS - 1}/{REAL_VISION_LAYERS} of the "
                  f"vision layer work ({1 / REAL_VISION_LAYERS:.1%} less)")
            del model, tiny
    return 0


def report(title: str, results: dict, vision_layers: int) -> None:
    base = results["baseline"]
    print(f"\n{title}")
    print(f"  {'variant':<38} {'tiles':>6} {'layer-tiles':>11} {'LLM pos':>8} {'answer tok':>10} {'wall s':>8} {'cpu s':>8} "
          f"{'work/ans vs base':>22} {'cpu vs base':>11} {'loss/ans tok':>12}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"  {name:<38} {r}")
            continue
        per = r["answer_tokens"] or 1
        ratio_work = (base["layer_tiles"] / base["answer_tokens"]) / (r["layer_tiles"] / per)
        ratio_pos = (base["positions"] / base["answer_tokens"]) / (r["positions"] / per)
        print(f"  {name:<38} {r['tiles']:>6} {r['layer_tiles']:>11} {r['positions']:>8} {r['answer_tokens']:>10} "
              f"{r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {f'{ratio_work:.2f}x vis {ratio_pos:.2f}x llm':>22} "
              f"{base['cpu_seconds'] / r['cpu_seconds']:>10.2f}x {r['loss_sum'] / per:>12.6f}")
    done = [r for r in results.values() if isinstance(r, dict)]
    worst = max(abs(r["loss_sum"] / r["answer_tokens"] - base["loss_sum"] / base["answer_tokens"]) for r in done)
    print(f"  loss per answer token, largest difference to the baseline: {worst:.2e} (fp32)")


if __name__ == "__main__":
    sys.exit(main())
