"""DeltaLoss data pruning: score a recipe's training split with a small and a large model, keep the informative part.

    python -m nvila_ft.prune recipes/medical.yaml --small Efficient-Large-Model/NVILA-Lite-2B \\
        --large Efficient-Large-Model/NVILA-8B --keep 0.5 --by answer_type --out runs/prune/scores.jsonl
    python -m nvila_ft.train recipes/medical.yaml data.prune.scores=runs/prune/scores.jsonl   # train on the top half

The score (NVILA paper, arXiv 2412.04468, "Efficient training" -> "Dataset pruning", DeltaLoss): for a sample
with answer tokens x_1..x_n, teacher-forced on the same prompt and media for both models,

    DeltaLoss(x) = (1/n) * sum_i [ log p_large(x_i | x_<i) - log p_small(x_i | x_<i) ]
                 = CE_small(x) - CE_large(x)        (mean answer-token cross-entropies, nats)

Rows both models find easy, or both get wrong, score near zero; rows the large model has learnt and the small one
has not score high and are kept (top `--keep` of each subset, :mod:`nvila_ft.data.prune`). The answer tokens are
the tokens training takes its loss on (labels != -100: every assistant turn's text and its end token).

The models are run one after the other (the planner's `nvila_ft.plan.scoring` prices the larger one, inference
only); each pass appends to `<out>.small.jsonl` / `<out>.large.jsonl` after every batch, and a restart skips the
rows already there (no duplicate lines). Then `--out` is written (one line per row: `id`, `index`, `subset`,
`n_tokens`, `loss_small`, `loss_large`, `score`), with a summary table, `<out>.hist.png` (scores per subset,
matplotlib) and `<out>.pruned.json`, the kept rows as a LLaVA JSON file any recipe can train on (`data.path`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nvila_ft.cli_errors import user_errors
from nvila_ft.data.prune import PruneError, check_by, check_keep, row_keys, select, subset_of
from nvila_ft.data.rows import DataError
from nvila_ft.predict import read_done

logger = logging.getLogger("nvila_ft.prune")

IGNORE_INDEX = -100
SIDES = ("small", "large")


# ---------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def answer_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Teacher-forced log-probabilities of each sample's answer tokens.

    Only the positions whose next token is a label go through `lm_head` (as in training's label-only loss), so
    the logits cost (answer tokens, vocab), not (B, L', vocab).

    Args:
        model: an NVILA model or a `PeftModel` around one (adapters active), in eval mode.
        batch: `NvilaProcessor.collate` of encoded samples with `labels` (-100 outside the answers).

    Returns:
        (sum of log p over each sample's answer tokens (B,) float64 on the CPU, answer tokens per sample (B,)
        int64, the answer token ids per sample).
    """
    from nvila_ft.train.tuning import base_model

    core = base_model(model)
    device = next(core.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    embeds, mask, labels = core.embed(
        batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("block_sizes"),
        batch["labels"], pixel_values_videos=batch.get("pixel_values_videos"),
        video_frames=batch.get("video_frames"), pool_sizes=batch.get("pool_sizes"))
    hidden = core.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = core.llm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[keep][:, None]).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=device).index_add_(0, rows, token_logp.double())
    ids = [targets[b][keep[b]].tolist() for b in range(labels.shape[0])]
    return sums.cpu(), keep.sum(1).cpu(), ids


def _ids_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:16]


def score_pass(model, processor, samples: Sequence[dict], part: str | os.PathLike, *, model_name: str,
               subsets: Sequence[str], batch_size: int = 8, progress: bool = True, desc: str = "score") -> dict:
    """One model's answer-token losses of `samples`, appended to the JSONL file `part`; rows already there are
    skipped (resume). Lines: `{"key", "id", "index", "subset", "model", "n_tokens", "loss", "ids_hash"}`, `loss`
    the mean answer-token cross-entropy in nats.

    Returns:
        {"written": rows written now, "skipped_done": rows already in `part`, "bad": [(key, reason), ...]}.

    Raises:
        PruneError: `part` holds rows scored by another model (`model_name` differs).
    """
    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    done_rows = read_done(part, repair=True)  # its own part file: a cut-off last line is dropped
    other = {r.get("model") for r in done_rows} - {model_name}
    if other:
        raise PruneError(f"{part} holds rows scored with {sorted(other)[0]}, not {model_name}; delete it or use "
                         "another --out.")
    done = {str(r["key"]) for r in done_rows}
    keys = row_keys(samples)
    todo = [(k, s, sub) for k, s, sub in zip(keys, samples, subsets) if k not in done]
    bad: list[tuple[str, str]] = []
    written = 0
    bar = tqdm(total=len(todo), desc=desc, unit="row", disable=not progress)
    with open(part, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk, encoded = [], []
            for key, s, sub in todo[start : start + batch_size]:
                try:
                    if s.get("error"):
                        raise DataError(s["error"])
                    encoded.append(processor(s["conversations"], s.get("images", []), sample_id=s.get("id"),
                                             videos=s.get("videos", [])))
                    chunk.append((key, s, sub))
                except Exception as err:  # noqa: BLE001 - one unusable row is reported, never fatal
                    bad.append((key, str(err)))
                    logger.error("skipping %s[%s] id=%s: %s", s.get("source"), s.get("index"), s.get("id"), err)
            if encoded:
                sums, counts, ids = answer_logprobs(model, processor.collate(encoded))
                for (key, s, sub), total, n, row_ids in zip(chunk, sums.tolist(), counts.tolist(), ids):
                    if n == 0:
                        bad.append((key, "no answer tokens (no assistant turn)"))
                        continue
                    f.write(json.dumps({"key": key, "id": s.get("id"), "index": s.get("index"), "subset": sub,
                                        "model": model_name, "n_tokens": n, "loss": -total / n,
                                        "ids_hash": _ids_hash(row_ids)}) + "\n")
                    written += 1
                f.flush()
            bar.update(len(todo[start : start + batch_size]))
    bar.close()
    return {"written": written, "skipped_done": len(keys) - len(todo), "bad": bad}


def merge_passes(small_part: str | os.PathLike, large_part: str | os.PathLike, keys: Sequence[str]) -> list[dict]:
    """Rows scored by both models, in split order: `{"id", "index", "subset", "n_tokens", "loss_small",
    "loss_large", "score"}` (+ `key` when it is not the id), score = loss_small - loss_large.

    Raises:
        PruneError: a row's answer tokens differ between the two models (different tokenizers: DeltaLoss
            compares the same tokens, so both models need the same LLM tokenizer).
    """
    small = {str(r["key"]): r for r in read_done(small_part)}
    large = {str(r["key"]): r for r in read_done(large_part)}
    out = []
    for key in keys:
        if key not in small or key not in large:
            continue
        a, b = small[key], large[key]
        if a["ids_hash"] != b["ids_hash"]:
            raise PruneError(f"row id={a['id']}: the small and the large model tokenize its answer differently "
                             f"({a['n_tokens']} vs {b['n_tokens']} tokens); DeltaLoss needs one tokenizer (models "
                             "of one LLM family, e.g. NVILA-Lite-2B and NVILA-8B).")
        row = {"id": a["id"], "index": a["index"], "subset": a["subset"], "n_tokens": a["n_tokens"],
               "loss_small": a["loss"], "loss_large": b["loss"], "score": a["loss"] - b["loss"]}
        if key != str(a["id"]):
            row["key"] = key
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- outputs
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_histogram(rows: Sequence[dict], kept: set[int], path: str | os.PathLike) -> Path:
    """A PNG with one histogram of the scores per subset (kept rows and pruned rows stacked).

    Raises:
        ImportError: matplotlib is missing (`pip install matplotlib`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the score histogram needs matplotlib: pip install matplotlib (or nvila-ft[prune])") from err
    names = sorted({r["subset"] for r in rows})
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        idx = [i for i, r in enumerate(rows) if r["subset"] == name]
        data = [[rows[i]["score"] for i in idx if i in kept], [rows[i]["score"] for i in idx if i not in kept]]
        ax.hist(data, bins=30, stacked=True, label=["kept", "pruned"], color=["tab:green", "tab:gray"])
        ax.set_title(f"{name}: {len(idx)} rows, {len(data[0])} kept", fontsize=9)
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("DeltaLoss = CE_small - CE_large (nats per answer token)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(path.with_name(path.name + ".tmp.png"), path)
    return path


def _portable(item, folder: Path, stem: str, index: int, kind: str):
    """A media item as a path that resolves from anywhere: absolute paths for files, PIL images and video bytes
    written next to the pruned file."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        return os.path.abspath(item)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(item, Image.Image):
        path = folder / f"{stem}-{index}.png"
        item.convert("RGB").save(path)
    else:
        path = folder / f"{stem}-{index}.{kind}"
        path.write_bytes(item)
    return str(path.resolve())


def write_pruned_split(samples: Sequence[dict], rows: Sequence[dict], kept: Sequence[int],
                       path: str | os.PathLike) -> Path:
    """The kept samples as a LLaVA JSON list (`id`, `image(s)`, `video(s)`, `conversations`, `answer_type`,
    `references`, plus `subset` and `deltaloss`), media paths absolute so that the file loads from anywhere.
    `samples[i]` must be the sample of `rows[i]`."""
    path = Path(path)
    media = path.with_name(path.stem + "_media")
    out = []
    for i in kept:
        s, r = samples[i], rows[i]
        entry = {"id": s["id"]}
        images = [_portable(im, media, f"{s['id']}-image", j, "png") for j, im in enumerate(s.get("images", []))]
        videos = [_portable(v, media, f"{s['id']}-video", j, "mp4") for j, v in enumerate(s.get("videos", []))]
        if images:
            entry["images" if len(images) > 1 else "image"] = images if len(images) > 1 else images[0]
        if videos:
            entry["videos" if len(videos) > 1 else "video"] = videos if len(videos) > 1 else videos[0]
        entry["conversations"] = s["conversations"]
        for key in ("answer_type", "references"):
            if s.get(key):
                entry[key] = s[key]
        entry.update(subset=r["subset"], deltaloss=r["score"])
        out.append(entry)
    _atomic_write(path, json.dumps(out, ensure_ascii=False, indent=1))
    return path


def outputs(out: str | os.PathLike) -> dict[str, Path]:
    """Where a scoring run with `--out OUT` writes: both passes, the scores, the histogram, the pruned split."""
    out = Path(out)
    stem = out.with_suffix("")
    return {"small": Path(f"{stem}.small.jsonl"), "large": Path(f"{stem}.large.jsonl"), "scores": out,
            "hist": Path(f"{stem}.hist.png"), "pruned": Path(f"{stem}.pruned.json")}


# ---------------------------------------------------------------------------------------------- pipeline
def load_scorer(path: str, recipe, dtype: str | None, device: str | None):
    """A model (checkpoint, hub id or tuned run, via :func:`nvila_ft.inference.load_model`) and a processor that
    encodes samples as the recipe's training does (tiling, max_length, system prompt, video sampling)."""
    from nvila_ft.inference import load_model, load_processor
    from nvila_ft.train.tuning import base_model

    model, _ = load_model(path, dtype=dtype, device=device)
    m, d = recipe.model, recipe.data
    processor = load_processor(base_model(model), None, image_aspect_ratio=m.image_aspect_ratio,
                               max_tiles=m.max_tiles, max_length=d.max_length, system_prompt=d.system_prompt,
                               num_video_frames=m.num_video_frames, video_fps=m.video_fps,
                               temporal_pool=m.temporal_pool)
    return model, processor


def score_and_prune(recipe, small: str, large: str, out: str | os.PathLike, *, keep: float = 0.5,
                    by: str | None = None, method: str = "deltaloss", batch_size: int = 8, dtype: str | None = None,
                    device: str | None = None, max_samples: int | None = None, progress: bool = True) -> dict:
    """Scores the recipe's train split with both models, then writes the scores, histogram and pruned split.

    Returns:
        {"rows": scored rows, "selection": :class:`~nvila_ft.data.prune.Selection`, "bad": [(key, reason)],
        "paths": :func:`outputs`}.

    Raises:
        PruneError: bad `keep`/`by`, or the models tokenize answers differently. DataError: the split cannot be
        loaded.
    """
    from nvila_ft.data import load_split

    check_keep(keep, "--keep")
    d = recipe.data
    samples = load_split(d, d.train_split, max_samples or d.max_train_samples)
    check_by(samples, by)
    subsets = [subset_of(s, by) for s in samples]
    paths = outputs(out)
    bad: dict[str, str] = {}
    for side, path in (("small", small), ("large", large)):
        model, processor = load_scorer(path, recipe, dtype, device)
        result = score_pass(model, processor, samples, paths[side], model_name=str(path), subsets=subsets,
                            batch_size=batch_size, progress=progress, desc=f"{side} {Path(path).name}")
        logger.info("%s pass (%s): %d rows scored now, %d already there, %d bad", side, path, result["written"],
                    result["skipped_done"], len(result["bad"]))
        bad.update(result["bad"])
        del model
    keys = row_keys(samples)
    rows = merge_passes(paths["small"], paths["large"], keys)
    if not rows:
        raise PruneError(f"no row of {d.path} could be scored by both models (see the errors above).")
    by_key = dict(zip(keys, samples))
    scored = [by_key[str(r.get("key", r["id"]))] for r in rows]
    selection = select([r["subset"] for r in rows], [r["score"] for r in rows], keep, method, recipe.train.seed)
    _atomic_write(paths["scores"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_pruned_split(scored, rows, selection.kept, paths["pruned"])
    try:
        write_histogram(rows, set(selection.kept), paths["hist"])
    except ImportError as err:
        logger.warning("%s; no histogram written", err)
    return {"rows": rows, "selection": selection, "bad": sorted(bad.items()), "paths": paths}


def _print_plan(recipe, args) -> int:
    from nvila_ft.inference import base_checkpoint, is_run
    from nvila_ft.plan.scoring import plan_scoring_pair

    paths = [base_checkpoint(p) if is_run(p) else p for p in (args.small, args.large)]
    dtype = args.dtype or "bfloat16"
    try:
        plan = plan_scoring_pair(recipe, *paths, batch_size=args.batch_size, dtype=dtype,
                                 label_tokens=args.label_tokens)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nvila_ft.prune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m nvila_ft.prune recipes/medical.yaml --small Efficient-Large-Model/NVILA-Lite-2B "
        "--large Efficient-Large-Model/NVILA-8B --by answer_type --out runs/prune/scores.jsonl\n"
        "  python -m nvila_ft.train recipes/medical.yaml data.prune.scores=runs/prune/scores.jsonl\n"
        "Rerun the same command after an interruption: rows already scored are skipped.")
    parser.add_argument("recipe", help="recipe YAML whose train split is scored (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.max_train_samples=200")
    parser.add_argument("--small", required=True, help="the small model: checkpoint folder, hub id or tuned run")
    parser.add_argument("--large", required=True, help="the large model (same LLM tokenizer as --small)")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of each subset kept, in (0, 1] "
                        "(default %(default)s, the paper's 50%% pruning)")
    parser.add_argument("--by", help="sample key that groups rows into subsets ranked apart, e.g. answer_type "
                        "(default: one subset)")
    parser.add_argument("--method", choices=["deltaloss", "random"], default="deltaloss",
                        help="which rows the pruned split keeps (random: the paper's baseline, train.seed)")
    parser.add_argument("--out", default="scores.jsonl", help="scores JSONL (default %(default)s); next to it: "
                        "<stem>.small/.large.jsonl (passes), .hist.png, .pruned.json")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default %(default)s)")
    parser.add_argument("--max-samples", type=int, help="score only the first N rows of the split")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default bfloat16 on a GPU, float32 on a CPU (a run: its recipe's)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu; default cuda when available")
    parser.add_argument("--plan", action="store_true", help="print the scoring memory plan (the larger model, "
                        "inference only) and exit without loading weights")
    parser.add_argument("--label-tokens", type=int, help="--plan: answer tokens per sample (default: all its text)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from nvila_ft.train.recipe_io import load_recipe

    # RecipeError and DataError (PruneError is one) are user errors: one line, exit 2 (cli_errors.user_errors).
    check_keep(args.keep, "--keep")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.plan:
        return _print_plan(recipe, args)
    result = score_and_prune(recipe, args.small, args.large, args.out, keep=args.keep, by=args.by,
                             method=args.method, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, max_samples=args.max_samples)
    paths = result["paths"]
    print(result["selection"].table())
    for key, reason in result["bad"][:20]:
        print(f"  bad row id={key}: {reason} (not scored; rerun to retry)")
    print(f"scores: {paths['scores']}\nhistogram: {paths['hist']}\npruned split (LLaVA JSON): {paths['pruned']}")
    print(f"train on it: python -m nvila_ft.train {args.recipe} data.prune.scores={paths['scores']} "
          f"data.prune.keep={args.keep:g}" + (f" data.prune.by={args.by}" if args.by else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
