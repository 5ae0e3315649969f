"""Data pruning: keep the top fraction of each subset of a training split by DeltaLoss (or a random fraction).

    python -m nvila_ft.prune recipes/medical.yaml --small SMALL --large LARGE --keep 0.5 --out scores.jsonl
    python -m nvila_ft.train recipes/medical.yaml data.prune.scores=scores.jsonl data.prune.keep=0.5

The scores come from :mod:`nvila_ft.prune` (one JSONL line per row: `id`, `subset`, `n_tokens`, `loss_small`,
`loss_large`, `score`). This module only selects rows: training applies it to its train split
(`data.prune` in a recipe), the pruning CLI to write the pruned split.

Selection (NVILA paper, arXiv 2412.04468, efficient training, "dataset pruning"): the split is divided into
subsets D_k (a grouping the user picks, e.g. `answer_type`); in each subset the top `ceil(keep * |D_k|)` rows
by score are kept, ties broken by row order in the split (the earlier row first), so a selection is the same on
every machine. `method: random` keeps the same number of rows per subset, drawn with a seeded RNG: the
baseline the paper compares against.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nvila_ft.data.rows import DataError

logger = logging.getLogger(__name__)

METHODS = ("deltaloss", "random")
ALL = "all"  # the subset name when the split is not divided


class PruneError(DataError):
    """A pruning setting or scores file that cannot be used; the message names it and the fix."""


def check_keep(keep: float, what: str = "keep") -> float:
    """`keep` as a fraction in (0, 1].

    Raises:
        PruneError: 0 (nothing would be kept), negative, above 1, or not a number.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or math.isnan(keep):
        raise PruneError(f"{what}={keep!r} is not a number; give the fraction of rows to keep, e.g. 0.5.")
    if keep == 0:
        raise PruneError(f"{what}=0 keeps no row: nothing would be left to train on. Use a fraction in (0, 1], "
                         "e.g. 0.5 (the NVILA paper's 50% pruning).")
    if not 0 < keep <= 1:
        raise PruneError(f"{what}={keep} is out of range: it is the fraction of each subset kept, in (0, 1] "
                         "(1 keeps every row), e.g. 0.5.")
    return float(keep)


def keep_count(keep: float, n: int) -> int:
    """Rows kept of a subset of `n`: ceil(keep * n), so that a non-empty subset keeps at least one row.
    The product is rounded to 9 decimals first, so that 0.3 * 10 keeps 3 rows, not 4."""
    return min(n, math.ceil(round(check_keep(keep) * n, 9)))


def row_keys(samples: Sequence[dict]) -> list[str]:
    """Keys that match samples and score lines: the sample ids, or `id#index` when ids repeat in the split.
    The same rule as `nvila_ft.predict` resumes by."""
    ids = [str(s.get("id")) for s in samples]
    if len(set(ids)) == len(ids):
        return ids
    return [f"{i}#{s.get('index')}" for i, s in zip(ids, samples)]


def subset_of(sample: dict, by: str | None) -> str:
    """The subset name of a sample: `str(sample[by])`, "none" when the sample has no value, "all" without `by`."""
    if by is None:
        return ALL
    value = sample.get(by)
    return "none" if value is None else str(value)


def check_by(samples: Sequence[dict], by: str | None) -> None:
    """Raises PruneError when no sample has the key `by` (a typo would silently make one subset)."""
    if by is None or any(by in s for s in samples):
        return
    keys = sorted({k for s in samples for k in s if k not in ("raw", "conversations", "images", "videos")})
    raise PruneError(f"by={by!r}: no row of the split has this key; group by one of {keys} (answer_type groups "
                     "closed and open questions), or leave it out to rank the whole split as one subset.")


@dataclass
class Selection:
    """Which rows a pruning keeps. `kept`: indices into the rows given, in their order; `per_subset`:
    subset -> (rows, kept)."""

    kept: list[int]
    per_subset: dict[str, tuple[int, int]]

    def table(self) -> str:
        """Rows and kept rows per subset, as aligned text."""
        width = max([6, *(len(s) for s in self.per_subset)])
        lines = [f"{'subset':<{width}}  {'rows':>7}  {'kept':>7}  {'share':>6}"]
        for name, (n, k) in sorted(self.per_subset.items()):
            lines.append(f"{name:<{width}}  {n:>7}  {k:>7}  {k / n:>6.1%}")
        n, k = sum(n for n, _ in self.per_subset.values()), len(self.kept)
        lines.append(f"{'total':<{width}}  {n:>7}  {k:>7}  {k / max(n, 1):>6.1%}")
        return "\n".join(lines)


def select(subsets: Sequence[str], scores: Sequence[float | None], keep: float, method: str = "deltaloss",
           seed: int = 0) -> Selection:
    """Keeps the top `keep` fraction of each subset.

    Args:
        subsets: subset name per row.
        scores: DeltaLoss per row (higher = more informative); unused by `random` (may be None there).
        keep: fraction in (0, 1] kept of every subset (:func:`keep_count` rows).
        method: "deltaloss" (highest scores, ties broken by row order) or "random" (seeded draw).
        seed: the random draw's seed (`train.seed` in training).

    Returns:
        :class:`Selection` with the kept row indices in row order.

    Raises:
        PruneError: `keep` out of range, an unknown method, or a missing score under deltaloss.
    """
    check_keep(keep)
    if method not in METHODS:
        raise PruneError(f"method={method!r}: choose one of {METHODS}.")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(subsets):
        groups.setdefault(name, []).append(i)
    kept: list[int] = []
    per_subset = {}
    for name in sorted(groups):
        rows = groups[name]
        k = keep_count(keep, len(rows))
        if method == "deltaloss":
            missing = [i for i in rows if scores[i] is None]
            if missing:
                raise PruneError(f"row {missing[0]} of subset {name!r} has no score; deltaloss needs every row scored.")
            chosen = sorted(rows, key=lambda i: (-scores[i], i))[:k]
        else:
            chosen = random.Random(f"{seed}:{name}").sample(rows, k)
        kept += chosen
        per_subset[name] = (len(rows), k)
    return Selection(sorted(kept), per_subset)


def read_scores(path: str | os.PathLike) -> dict[str, dict]:
    """The lines of a scores file (:mod:`nvila_ft.prune` output) by row key (`key`, else `id`).

    Raises:
        PruneError: the file is missing, a line is not JSON, or a line lacks `score`.
    """
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"data.prune.scores: {path} does not exist; write it with python -m nvila_ft.prune "
                         "RECIPE --small MODEL --large MODEL --out " + str(path))
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PruneError(f"{path}:{number} is not a JSON line; is it a scores file from nvila_ft.prune?") from None
        if "score" not in row:
            raise PruneError(f"{path}:{number} has no 'score'; is it a scores file from nvila_ft.prune?")
        out[str(row.get("key", row.get("id")))] = row
    return out


def prune_samples(samples: list[dict], prune, seed: int = 0, split: str = "train") -> tuple[list[dict], dict]:
    """Applies a recipe's `data.prune` section (:class:`nvila_ft.train.recipe.PruneConfig`) to loaded samples.

    Rows are matched to score lines by id (`id#index` when ids repeat). Subsets: `prune.by` read from the
    samples, else the `subset` recorded in the scores file. Rows without a score line (rows the scoring
    skipped as unusable) are dropped with a warning.

    Returns:
        (kept samples in split order, stats `{"method", "keep", "by", "scores", "rows_before", "rows_after",
        "unscored", "per_subset"}`).

    Raises:
        PruneError: no row of the split is in the scores file (scored from other data), or see :func:`select`.
    """
    before = len(samples)
    unscored = 0
    if prune.scores is not None:
        table = read_scores(prune.scores)
        keys = row_keys(samples)
        found = [(s, table[k]) for s, k in zip(samples, keys) if k in table]
        if not found:
            raise PruneError(f"data.prune.scores: none of the {before} rows of the {split} split (ids "
                             f"{keys[:3]}...) is in {prune.scores}; score this split with python -m nvila_ft.prune.")
        unscored = before - len(found)
        if unscored:
            missing = [k for k in keys if k not in table]
            logger.warning("%s split: %d rows have no score in %s (e.g. id %s); they are dropped", split, unscored,
                           prune.scores, ", ".join(missing[:3]))
        samples = [s for s, _ in found]
        subsets = [subset_of(s, prune.by) if prune.by else str(row.get("subset", ALL)) for s, row in found]
        scores = [float(row["score"]) for _, row in found]
    else:
        subsets = [subset_of(s, prune.by) for s in samples]
        scores = [None] * len(samples)
    check_by(samples, prune.by)
    selection = select(subsets, scores, prune.keep, prune.method, seed)
    kept = [samples[i] for i in selection.kept]
    stats = {"method": prune.method, "keep": prune.keep, "by": prune.by, "scores": prune.scores,
             "rows_before": before, "rows_after": len(kept), "unscored": unscored,
             "per_subset": {k: {"rows": n, "kept": m} for k, (n, m) in selection.per_subset.items()}}
    logger.info("%s split: data.prune (%s, keep %g%s): %d rows -> %d\n%s", split, prune.method, prune.keep,
                f", by {prune.by}" if prune.by else "", before, len(kept), selection.table())
    if prune.keep == 1:
        logger.info("%s split: data.prune.keep=1 keeps every scored row (nothing pruned)", split)
    return kept, stats
