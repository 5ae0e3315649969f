"""Batch inference: answer every question of a dataset with a checkpoint or a fine-tuned run, resumably.

    python -m nvila_ft.predict runs/medical --data ../shared/data/vqa_rad --split test --out predictions.jsonl
    python -m nvila_ft.predict runs/medical --out predictions.jsonl --metric vqa_rad   # the run's eval split

Data is read with the training loaders (`nvila_ft.data.load_samples`: LLaVA JSON/JSONL, VQA-RAD folder, Hugging
Face dataset); for a run, the data settings default to its recipe's. Each output line is
`{"id", "index", "question", "prediction"}` plus `reference` (and `references`, `answer_type`) when the data has
answers. Lines are flushed after every batch; a restart with the same `--out` skips the rows already written.
`<out>.meta.json` records the model, data and split: predict resumes only its own files (a cut-off last line is
dropped) and refuses any other `--out`, changing nothing in it.
A row that cannot be used (missing image, too long) is reported and skipped, never fatal (`--on-bad-row error`
to stop instead); it is retried on the next restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from nvila_ft.cli_errors import user_errors
from nvila_ft.data import DataError
from nvila_ft.evaluate import generate_answers, prediction_row

logger = logging.getLogger("nvila_ft.predict")


def _keys(samples: Sequence[dict]) -> list[str]:
    """Resume keys: the sample ids, or `id#index` when ids repeat (LLaVA files may reuse ids)."""
    ids = [str(s.get("id")) for s in samples]
    if len(set(ids)) == len(ids):
        return ids
    logger.warning("sample ids repeat; resuming by id#index")
    return [f"{i}#{s.get('index')}" for i, s in zip(ids, samples)]


class OutputFileError(ValueError):
    """`--out` names a file that predict did not write (or wrote for another model or data); it is left as it is."""


def meta_path(out: str | os.PathLike) -> Path:
    """The sidecar that marks `out` as predict's own file: `<out>.meta.json` (model, data, split)."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def read_done(out: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The complete rows of a predictions file. A last line that is not JSON (cut off by a kill) is ignored;
    with `repair`, it is dropped from the file (atomically) so that appending continues on a clean line, and a
    complete last line without its newline gets one. Only :func:`open_output` repairs, and only predict's own
    files (those with a :func:`meta_path` sidecar).

    Raises:
        ValueError: a line other than the last is not JSON (the file is not a predictions file).
    """
    path = Path(out)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number} is not a JSON line; is --out a predictions file?") from None
            if repair:
                logger.warning("%s: dropping its cut-off last line", path)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(lines[:-1]), encoding="utf-8")
                os.replace(tmp, path)
        else:
            if repair and not line.endswith("\n"):  # complete JSON without newline: finish the line
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")
    return rows


def _is_prediction(line: str) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "prediction" in row


def open_output(out: str | os.PathLike, meta: dict | None = None) -> list[dict]:
    """Claims `out` for predict and returns the rows already there (resume).

    A missing or empty `out` is predict's from now on: its sidecar `<out>.meta.json` records `meta` (model,
    data, split). An existing `out` is resumed only when it is predict's: it has the sidecar, naming the same
    model, data and split as `meta` (a cut-off last line is then dropped), or, written before sidecars
    existed, every line of it is a complete prediction row. Any other file is never changed.

    Raises:
        OutputFileError: `out` is another file, or predictions of another model, data or split.
    """
    out = Path(out)
    sidecar = meta_path(out)
    meta = {"written_by": "nvila_ft.predict", **{k: str(v) for k, v in (meta or {}).items() if v is not None}}
    if not out.exists() or (out.is_file() and out.stat().st_size == 0):
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(sidecar, meta)
        return []
    if not out.is_file():
        raise OutputFileError(f"--out {out} is not a file; name a .jsonl file")
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            recorded = {}
        if recorded.get("written_by") != "nvila_ft.predict":
            raise OutputFileError(f"--out {out}: {sidecar.name} is not predict's record; choose another --out")
        changed = [k for k in ("model", "data", "split") if k in meta and k in recorded and meta[k] != recorded[k]]
        if changed:
            was = ", ".join(f"{k} {recorded[k]}" for k in changed)
            raise OutputFileError(f"--out {out} holds predictions of {was}, not {', '.join(meta[k] for k in changed)};"
                                  " choose another --out (or delete it and its .meta.json to start over)")
        return read_done(out, repair=True)
    lines = out.read_text(encoding="utf-8", errors="replace").splitlines()
    if not all(_is_prediction(line) for line in lines if line.strip()):
        raise OutputFileError(f"--out {out} exists and was not written by nvila_ft.predict (no {sidecar.name}); "
                              "it is left as it is: choose another --out")
    _write_json(sidecar, meta)  # complete rows of a predictions file written before sidecars: adopt it
    return read_done(out)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def predict(
    model,
    processor,
    samples: Sequence[dict],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    on_bad_row: str = "skip",
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Answers `samples` into the JSONL file `out`, skipping rows already there (resume).

    Args:
        model, processor: from :func:`nvila_ft.load_model`.
        samples: normalized samples (`nvila_ft.data.load_samples`); a final gpt turn is the reference.
        out: output `.jsonl`; created or appended to.
        batch_size: prompts per `generate` call.
        max_new_tokens: generation budget per answer (tokens).
        on_bad_row: "skip" reports unusable rows and goes on; "error" stops at the first.
        meta: what is answered ({"model", "data", "split"}), recorded in `<out>.meta.json`; a rerun into the
            same `out` must name the same (see :func:`open_output`).

    Returns:
        {"written": rows written now, "skipped_done": rows found in `out`, "bad": [(id, reason), ...]}.

    Raises:
        OutputFileError: `out` exists and is not predict's file for the same model and data.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {str(row.get("key", row.get("id"))) for row in open_output(out, meta)}
    keys = _keys(samples)
    todo = [(k, s) for k, s in zip(keys, samples) if k not in done]
    bad: list[tuple[str, str]] = []
    written = 0
    bar = tqdm(total=len(todo), desc="predict", unit="row", disable=not progress)
    with bar, open(out, "a", encoding="utf-8") as f:  # the bar ends its line even when a row stops the run
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            usable = []
            for key, s in chunk:
                if s.get("error"):  # a row the loader could not read
                    bad.append((key, s["error"]))
                    logger.error("skipping %s[%s] id=%s: %s", s.get("source"), s.get("index"), s.get("id"), s["error"])
                    if on_bad_row == "error":
                        raise DataError(f"{s.get('source')}[{s.get('index')}] id={s.get('id')}: {s['error']}")
                else:
                    usable.append((key, s))
            answers = generate_answers(model, processor, [s for _, s in usable], max_new_tokens,
                                       batch_size=len(usable) or 1, progress=False, on_bad_row=on_bad_row)
            for (key, s), answer in zip(usable, answers):
                if answer is None:
                    bad.append((key, "could not be encoded (see the log)"))
                    continue
                row = prediction_row(s, answer)
                if key != str(s.get("id")):
                    row["key"] = key  # the resume key, when ids repeat
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return {"written": written, "skipped_done": len(keys) - len(todo), "bad": bad}


def score_file(out: str | os.PathLike, metric: str | Callable) -> dict:
    """Scores every row of a predictions file that has a reference, with a metric name or callable."""
    from nvila_ft.metrics import compute_metric

    rows = [r for r in read_done(out) if "reference" in r]
    if not rows:
        raise ValueError(f"{out}: no row has a reference to score against")
    references = [r.get("references") or r["reference"] for r in rows]
    return compute_metric(metric, [r["prediction"] for r in rows], references, [r.get("answer_type") for r in rows])


@user_errors
def main(argv: list[str] | None = None) -> int:
    from nvila_ft.metrics import METRICS

    parser = argparse.ArgumentParser(
        prog="python -m nvila_ft.predict", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m nvila_ft.predict runs/medical --data ../shared/data/vqa_rad --split test --out preds.jsonl\n"
        "  python -m nvila_ft.predict Efficient-Large-Model/NVILA-Lite-2B --data my.jsonl --out preds.jsonl\n"
        "Rerun the same command after an interruption: rows already in --out are skipped.")
    parser.add_argument("model", help="a run folder (or its checkpoint-<step>) or an NVILA checkpoint (folder or hub id)")
    parser.add_argument("--data", help="dataset: LLaVA .json/.jsonl or folder, VQA-RAD folder, HF dataset id or "
                        "folder; default the run's data.path")
    parser.add_argument("--split", help="split to answer; default the run's eval split, else test")
    parser.add_argument("--out", default="predictions.jsonl", help="output JSONL (appended to; default %(default)s)")
    parser.add_argument("--format", choices=["auto", "llava", "hf", "vqa_rad"], help="data format (default auto)")
    parser.add_argument("--image-column", help="hf: image column")
    parser.add_argument("--question-column", help="hf: question column")
    parser.add_argument("--answer-column", help="hf: answer column (used as reference)")
    parser.add_argument("--question-template", help="hf: one question for every row ({choices} = class names)")
    parser.add_argument("--subset", help="hf: the dataset's configuration name")
    parser.add_argument("--max-samples", type=int, help="answer only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default %(default)s)")
    parser.add_argument("--metric", choices=sorted(METRICS), help="score the rows that have references")
    parser.add_argument("--on-bad-row", choices=["skip", "error"], default="skip",
                        help="skip (report, go on; default) or error (stop) on an unusable row")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the run's, else "
                        "bfloat16 on a GPU and float32 on a CPU")
    parser.add_argument("--device", help="cuda, cuda:1, cpu; default cuda when available")
    parser.add_argument("--base", help="base checkpoint of a run, when the recorded one is not found from here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from nvila_ft.data import load_split
    from nvila_ft.inference import is_run, load_model, run_recipe
    from nvila_ft.train.recipe import DataConfig

    d = run_recipe(args.model).data if is_run(args.model) else None
    path = args.data or (d.path if d else None)
    if path is None:
        parser.error("--data is required for a checkpoint (a run defaults to its recipe's data.path)")

    # The run's data settings when predicting on its own data, else the recipe defaults; flags override both.
    data = d if d and args.data in (None, d.path) else DataConfig(path=path)
    flags = {"format": args.format, "image_column": args.image_column, "question_column": args.question_column,
             "answer_column": args.answer_column, "question_template": args.question_template, "subset": args.subset}
    data = data.model_copy(update={k: v for k, v in flags.items() if v is not None})
    split = args.split or (d.eval_split if d and d.eval_split else "test")
    samples = load_split(data, split, args.max_samples)  # a DataError is a user error (cli_errors)
    meta = {k: str(Path(v).resolve()) if Path(v).exists() else v
            for k, v in {"model": args.model, "data": path, "split": split}.items()}
    open_output(args.out, meta)  # refuse a file predict did not write before the model loads
    model, processor = load_model(args.model, base=args.base, dtype=args.dtype, device=args.device)
    result = predict(model, processor, samples, args.out, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, on_bad_row=args.on_bad_row, meta=meta)
    print(f"{args.out}: {result['written']} rows written, {result['skipped_done']} already there, "
          f"{len(result['bad'])} bad rows skipped" + ("" if not result["bad"] else " (rerun to retry them)"))
    for key, reason in result["bad"][:20]:
        print(f"  bad row id={key}: {reason}")
    if args.metric:
        metrics = score_file(args.out, args.metric)
        path = Path(args.out).with_suffix(".metrics.json")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, path)
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
