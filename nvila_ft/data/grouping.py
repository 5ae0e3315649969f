"""Shared image prefixes and padding-free packing: encoded samples -> groups (units) -> packs -> one batch.

    from nvila_ft.data.grouping import media_key, plan_micro_batches, make_units, pack_units, collate_units
    batches = plan_micro_batches(samples, batch_size=4, seed=0)           # row indices, 4 answers each
    rows = [processor(...) | {"media_key": media_key(samples[i])} for i in batches[0]]
    units = make_units(rows, max_length=processor.max_length)          # rows sharing media -> one unit
    batch = collate_units(processor, pack_units(units, processor.max_length, packing=True))
    loss = model(**batch).loss                                         # == the separate samples' loss

A *unit* is one or more encoded samples that share their media and the token prefix before it ends (system
turn, user-turn opening, media placeholders): the prefix is written once, then each sample's remainder
(question, assistant header, answer, `<|im_end|>`) follows as a *branch*. A *pack* is several units in one row.
`segment_ids` (B, L, 2) tells the model which pack (column 0, -1 = padding) and which branch (column 1, 0 =
the shared prefix or a unit of one sample) every token belongs to; `NvilaForConditionalGeneration` turns it
into a 4D attention mask (each branch sees its pack's prefix and itself, causally) and `position_ids` (each
branch continues from the prefix length, each pack restarts at 0). So every labelled token has exactly the
context and position it has in its own single sample: loss and gradients equal the separate samples', while
each image goes through the vision tower once and its LLM positions are filled once.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from nvila_ft.model.configuration import IGNORE_INDEX


def media_key(sample: dict) -> tuple | None:
    """What two samples must have in common to share a prefix: their media and their system turns.

    Images and videos given as paths compare by path, in-memory ones (PIL images, frame lists) by identity.
    Returns None for a sample without media (it never shares).
    """
    def ident(item) -> str:
        return str(item) if isinstance(item, (str, Path, bytes)) else f"obj:{id(item)}"

    images, videos = sample.get("images") or [], sample.get("videos") or []
    if not images and not videos:
        return None
    system = tuple(t.get("value") for t in sample.get("conversations", []) if t.get("from") == "system")
    return tuple(ident(i) for i in images), tuple(ident(v) for v in videos), system


def media_groups(keys: Sequence) -> dict:
    """Indices of `keys` (one `media_key` per row) grouped by key, in order of first appearance; a row whose key
    is None is a group of its own (it shares nothing)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key if key is not None else ("row", i), []).append(i)
    return groups


def plan_micro_batches(samples: Sequence[dict], batch_size: int, seed: int = 0,
                       share_prefix: bool = True) -> list[list[int]]:
    """Row indices per micro-batch, `batch_size` rows each (the last may be shorter), rows with one media key
    next to each other so that they can share a prefix.

    The number of answers (rows) per micro-batch, and so per optimizer step, is what the recipe says
    (`per_device_train_batch_size` x `gradient_accumulation_steps`): large groups are split across
    micro-batches, small ones combined. Groups and rows within a group are shuffled with `seed`; without
    `share_prefix` all rows are shuffled independently (the usual random batches).
    """
    rng = random.Random(seed)
    if not share_prefix:
        order = list(range(len(samples)))
        rng.shuffle(order)
    else:
        chunks = list(media_groups(map(media_key, samples)).values())
        rng.shuffle(chunks)
        order = []
        for chunk in chunks:
            rng.shuffle(chunk)
            order += chunk
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclasses.dataclass
class Unit:
    """Encoded samples sharing one prefix (a single sample: `prefix` 0).

    Attributes:
        rows: encoded samples (:class:`~nvila_ft.model.processing.NvilaProcessor` outputs).
        prefix: shared input_ids tokens (0 when `rows` has one sample).
        num_tokens: expanded length of the unit's sequence (prefix once + every branch), LLM positions.
    """

    rows: list[dict]
    prefix: int = 0
    num_tokens: int = 0

    @property
    def branches(self) -> int:
        return len(self.rows)


def _first_label(row: dict) -> int:
    labelled = (row["labels"] != IGNORE_INDEX).nonzero()
    return int(labelled[0]) if len(labelled) else row["input_ids"].shape[0]


def shared_prefix(rows: Sequence[dict], media_token_ids: Sequence[int], skip_token_ids: Sequence[int] = ()) -> int:
    """Tokens the rows can share: their common input_ids prefix, ending before every row's first label (so
    that each branch opens with an unlabelled token) and after the last media placeholder; a branch that opens
    right after the placeholder must not open with a token the model drops there (`skip_token_ids`, pad/eos,
    see `NvilaForConditionalGeneration.embed`). 0 when no such prefix exists.
    """
    ids = [r["input_ids"] for r in rows]
    n = min(len(x) for x in ids)
    same = torch.stack([x[:n] for x in ids]).eq(ids[0][:n]).all(0)
    lcp = int(same.long().cumprod(0).sum())
    limit = min(lcp, min(_first_label(r) for r in rows) - 1)
    media = torch.isin(ids[0], torch.tensor(list(media_token_ids), dtype=torch.long)).nonzero()
    last_media = int(media[-1]) if len(media) else -1
    if limit <= last_media:
        return 0
    if limit == last_media + 1 and any(int(x[limit]) in set(skip_token_ids) for x in ids):
        return 0
    return limit


def _same_media(a: dict, b: dict) -> bool:
    for key in ("pixel_values", "pixel_values_videos"):
        x, y = a.get(key), b.get(key)
        if x is y:
            continue
        if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or not torch.equal(x, y))):
            return False
    return list(a.get("block_sizes") or []) == list(b.get("block_sizes") or []) and \
        list(a.get("video_frames") or []) == list(b.get("video_frames") or [])


def make_units(rows: Sequence[dict], max_length: int, media_token_ids: Sequence[int] = (),
               share_prefix: bool = True, skip_token_ids: Sequence[int] = ()) -> list[Unit]:
    """Groups encoded samples with the same `media_key` (and the same pixels) into units of at most `max_length`.

    Args:
        rows: encoded samples, each with `input_ids`, `labels`, `num_tokens` and optionally `media_key`
            (rows without one, or with None, stay alone).
        max_length: most expanded tokens per unit (`data.max_length`); a group that would be longer is split
            into several units, never truncated.
        media_token_ids: `<image>` / `<vila/video>` token ids; skip_token_ids: see :func:`shared_prefix`
            (:func:`processor_token_ids` gives both).
        share_prefix: False = one unit per row.

    Returns:
        units in order of their first row.
    """
    units = []
    keys = [row.get("media_key") if share_prefix else None for row in rows]
    for members in ([rows[i] for i in group] for group in media_groups(keys).values()):
        first = members[0]
        same = [r for r in members if _same_media(first, r)]
        for r in members:
            if not any(r is s for s in same):
                units.append(Unit([r], 0, int(r["num_tokens"])))
        prefix = shared_prefix(same, media_token_ids, skip_token_ids) if len(same) > 1 else 0
        if not prefix:
            units += [Unit([r], 0, int(r["num_tokens"])) for r in same]
            continue
        current = None
        for r in same:
            branch = r["input_ids"].shape[0] - prefix
            if current is not None and current.num_tokens + branch <= max_length:
                current.rows.append(r)
                current.num_tokens += branch
                continue
            current = Unit([r], prefix, int(r["num_tokens"]))
            units.append(current)
        for unit in units:
            if len(unit.rows) == 1:
                unit.prefix = 0
    return units


def processor_token_ids(processor) -> dict:
    """`make_units` keyword arguments of a :class:`~nvila_ft.model.processing.NvilaProcessor`."""
    from nvila_ft.model.media import segment_skip_ids

    media = [t for t in (processor.image_token_id, processor.video_token_id) if t is not None]
    return {"media_token_ids": media, "skip_token_ids": segment_skip_ids(processor.tokenizer)}


def pack_units(units: Sequence[Unit], max_length: int, packing: bool = True) -> list[list[Unit]]:
    """Rows of the batch: each a list of units. With `packing`, first-fit decreasing by length into rows of at
    most `max_length` expanded tokens (media and groups are never split); without, one unit per row."""
    if not packing:
        return [[u] for u in units]
    rows: list[list[Unit]] = []
    sizes: list[int] = []
    for unit in sorted(units, key=lambda u: -u.num_tokens):
        for k, size in enumerate(sizes):
            if size + unit.num_tokens <= max_length:
                rows[k].append(unit)
                sizes[k] += unit.num_tokens
                break
        else:
            rows.append([unit])
            sizes.append(unit.num_tokens)
    return rows


def _row_feature(units: Sequence[Unit]) -> tuple[dict, torch.Tensor]:
    """One batch row: the processor-style feature of the concatenated units and its (L, 2) segment ids."""
    ids, labels, segments, pixels, blocks, frames, videos = [], [], [], [], [], [], []
    pools = None
    for pack, unit in enumerate(units):
        first = unit.rows[0]
        if unit.prefix:
            ids.append(first["input_ids"][: unit.prefix])
            labels.append(first["labels"][: unit.prefix])
            segments.append(torch.tensor([[pack, 0]]).expand(unit.prefix, 2))
        for branch, row in enumerate(unit.rows, start=1 if unit.prefix else 0):
            ids.append(row["input_ids"][unit.prefix :])
            labels.append(row["labels"][unit.prefix :])
            segments.append(torch.tensor([[pack, branch]]).expand(ids[-1].shape[0], 2))
        if first.get("pixel_values") is not None:
            pixels.append(first["pixel_values"])
        blocks += list(first.get("block_sizes") or [])
        if first.get("pixel_values_videos") is not None:
            videos.append(first["pixel_values_videos"])
            frames += list(first.get("video_frames") or [])
            pools = first.get("pool_sizes")
    feature = {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "block_sizes": blocks,
               "pixel_values": torch.cat(pixels) if pixels else None}
    if videos:
        feature.update(pixel_values_videos=torch.cat(videos), video_frames=frames, pool_sizes=pools)
    return feature, torch.cat(segments)


def collate_units(processor, rows: Sequence[Sequence[Unit]]) -> dict:
    """The model batch of :func:`pack_units` rows (right padding).

    Returns:
        what :meth:`NvilaProcessor.collate` returns (`input_ids`, `attention_mask`, `labels` (B, L),
        `pixel_values` (T, 3, 448, 448) with each unit's media once, `block_sizes`, video fields) plus
        `segment_ids` (B, L, 2) int64: pack index (-1 on padding) and branch index (0 = shared prefix or a
        whole sample, k >= 1 = k-th sample of a shared-prefix unit), for the model's 4D mask and position_ids.
    """
    features, segments = zip(*(_row_feature(units) for units in rows))
    batch = processor.collate(list(features))
    length = batch["input_ids"].shape[1]
    seg = torch.full((len(rows), length, 2), -1, dtype=torch.long)
    seg[..., 1] = 0
    for b, s in enumerate(segments):
        seg[b, : s.shape[0]] = s
    batch["segment_ids"] = seg
    return batch


def sharing_summary(samples: Sequence[dict], lengths: Sequence[int], media_tokens: Sequence[int]) -> dict:
    """Expected effect of shared prefixes on a split (preflight report).

    Args:
        samples: the rows; lengths: each row's expanded length (LLM positions); media_tokens: each row's
            visual positions (shared within a group).

    Returns:
        dict with `rows`, `groups` (units if no group were split by max_length), `vision_encodes` before/after
        (images through the vision tower) and `llm_positions` before/after (a lower bound on the saving: only
        the visual positions are counted as shared, not the system turn).
    """
    groups = media_groups(map(media_key, samples))
    images = [len(s.get("images") or []) + len(s.get("videos") or []) for s in samples]
    after_pos = sum(lengths[m[0]] + sum(lengths[i] - media_tokens[i] for i in m[1:]) for m in groups.values())
    return {"rows": len(samples), "groups": len(groups),
            "vision_encodes": (sum(images), sum(images[m[0]] for m in groups.values())),
            "llm_positions": (sum(lengths), after_pos)}


def repeats_media(samples: Sequence[dict]) -> bool:
    """Whether two rows have the same `media_key` (what `data.share_prefix: auto` turns sharing on for)."""
    keys = [k for k in map(media_key, samples) if k is not None]
    return len(set(keys)) < len(keys)


class GroupCollator:
    """Data collator of the trainer (and the benchmark): encoded rows -> units -> packs -> batch(es).

    Args:
        processor: the run's :class:`~nvila_ft.model.processing.NvilaProcessor` (its `max_length` bounds every
            unit and pack, in expanded tokens).
        share_prefix: group rows with the same `media_key` (rows need a `media_key` entry).
        packing: pack units into rows of at most `max_length` instead of padding one unit per row.
        micro_batch_size: None = one batch of everything; n = split the sequences (units or packs) into
            micro-batches of at most n (`per_device_train_batch_size`: the memory the planner prices) and return
            `{"micro_batches": [batch, ...]}`, what :class:`~nvila_ft.train.trainer.NvilaTrainer` runs as one
            optimizer step.

    Called with a list of encoded rows, or a list of lists of them (what
    :class:`~nvila_ft.train.trainer.GroupedDataset` yields per optimizer step); returns :func:`collate_units`'s
    batch.
    """

    def __init__(self, processor, share_prefix: bool = True, packing: bool = False,
                 micro_batch_size: int | None = None):
        self.processor, self.share_prefix, self.packing = processor, share_prefix, packing
        self.micro_batch_size = micro_batch_size

    def units(self, rows: Sequence[dict]) -> list[Unit]:
        return make_units(rows, self.processor.max_length, share_prefix=self.share_prefix,
                          **processor_token_ids(self.processor))

    def __call__(self, items: Sequence[dict] | Sequence[Sequence[dict]]) -> dict:
        rows = [r for item in items for r in ([item] if isinstance(item, Mapping) else item)]
        sequences = pack_units(self.units(rows), self.processor.max_length, self.packing)
        if self.micro_batch_size is None:
            return collate_units(self.processor, sequences)
        n = self.micro_batch_size
        return {"micro_batches": [collate_units(self.processor, sequences[i : i + n])
                                  for i in range(0, len(sequences), n)]}
