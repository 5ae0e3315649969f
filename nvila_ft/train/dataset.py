"""Training data as the Trainer sees it: encoded lazily by the processor (`SupervisedDataset`), after the
recipe's preflight (`check_samples`); rows that fail at train time are left out of their batch and recorded."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch.utils.data import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from nvila_ft.data import VideoCheck, load_split, preflight
from nvila_ft.data.grouping import GroupCollator, media_key, repeats_media, sharing_summary
from nvila_ft.model.media import expanded_length
from nvila_ft.model.processing import NvilaProcessor
from nvila_ft.plan.sharding import launch_layout
from nvila_ft.train.distributed import is_main_process
from nvila_ft.train.recipe import Recipe

logger = logging.getLogger("nvila_ft.train")


class SupervisedDataset(Dataset):
    """Encodes samples lazily; a row that fails at training time is dropped from its batch, never replaced.

    Preflight (`data.preflight`) refuses bad rows before training; this guards against rows it did not check
    (`data.preflight: false`) and files that change during a long run: a bad row must not kill a run after
    an hour of training, nor be silently swapped for another row. `__getitem__` returns `{"bad_row": {...}}`
    (source file, row index, id, error) for it; :meth:`collate` leaves it out of the batch and passes the
    record on as `batch["bad_rows"]`, which :class:`NvilaTrainer` counts (metrics.json `bad_rows_in_training`).
    Both run in the DataLoader workers, so the record travels with the batch to the main process.
    """

    def __init__(self, samples: list[dict], processor: NvilaProcessor, max_failures: int = 100):
        self.samples, self.processor, self.max_failures = samples, processor, max_failures
        self.failed: set[int] = set()

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample after media expansion: the preflight's count (`num_tokens`), else computed the same
        way from image sizes (headers only, nothing is tiled or encoded)."""
        return [s["num_tokens"] if "num_tokens" in s else self.count_tokens(s) for s in self.samples]

    def count_tokens(self, sample: dict) -> int:
        """A sample's length when preflight did not count it (see :attr:`lengths`)."""
        return expanded_tokens(self.processor, sample)

    def encode(self, sample: dict, media_layout=None) -> dict:
        """One sample through the processor (`NvilaProcessor.__call__`) with its `media_key` (shared prefixes);
        raises on a bad row. `media_layout`: see :meth:`encode_row`."""
        encoded = self.processor(sample["conversations"], sample.get("images", []), sample_id=sample.get("id"),
                                 videos=sample.get("videos", []), media_layout=media_layout)
        return encoded | {"media_key": media_key(sample)}

    def collate_encoded(self, features: list[dict]) -> dict:
        """A batch of encoded samples (`NvilaProcessor.collate`)."""
        return self.processor.collate(features)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.encode_row(index)

    def encode_row(self, index: int, media_layout=None) -> dict:
        """Row `index` encoded (:meth:`encode`), or `{"bad_row": ...}` if it fails. `media_layout`:
        `processor.layout_media` of the row's media, computed once for rows that share it."""
        sample = self.samples[index]
        try:
            return self.encode(sample, media_layout)
        except Exception as err:  # noqa: BLE001 - any failure of one row is reported, not fatal
            where = {"source": str(sample.get("source")), "index": sample.get("index"), "id": sample.get("id")}
            if index not in self.failed:
                self.failed.add(index)
                logger.error("skipping row %s[%s] id=%s at train time (not replaced): %s", where["source"],
                             where["index"], where["id"], err)
            if len(self.failed) > self.max_failures:
                raise RuntimeError(f"more than {self.max_failures} rows failed at train time; the last: "
                                   f"{where['source']}[{where['index']}]: {err}") from err
            return {"bad_row": {**where, "error": str(err).splitlines()[0] if str(err) else type(err).__name__}}

    def collate(self, features: list[dict]) -> dict:
        """`processor.collate` of the rows that encoded; `bad_rows` lists the others. A batch of bad rows only
        is empty (`input_ids` (0, 1)), which the trainer skips."""
        good = [{k: v for k, v in f.items() if k != "media_key"} for f in features if "bad_row" not in f]
        return self._with_bad_rows(features, self.collate_encoded(good) if good else None)

    @staticmethod
    def _with_bad_rows(features: list[dict], batch: dict | None) -> dict:
        bad = [f["bad_row"] for f in features if "bad_row" in f]
        if batch is None:
            empty = torch.zeros(0, 1, dtype=torch.long)
            batch = {"input_ids": empty, "attention_mask": empty, "labels": empty}
        if bad:
            batch["bad_rows"] = bad
        return batch


class GroupedDataset(SupervisedDataset):
    """One item per optimizer step (shared prefixes, packing): the encoded rows of `steps[i]`
    (:func:`nvila_ft.data.grouping.plan_micro_batches`, `per_device_train_batch_size x
    gradient_accumulation_steps` rows each); rows with the same media reuse one image layout (tiles cut once).

    :meth:`collate` (one item per batch) groups and packs them with `collator` and returns
    `{"micro_batches": [batch, ...]}`, which :class:`~nvila_ft.train.trainer.NvilaTrainer` runs as one step. A row
    that fails is left out and recorded as in :class:`SupervisedDataset`, never replaced.
    """

    def __init__(self, samples: list[dict], processor: NvilaProcessor, steps: list[list[int]],
                 collator: GroupCollator):
        super().__init__(samples, processor)
        self.steps, self.collator = steps, collator

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> list[dict]:
        rows = self.steps[index]
        keys = [media_key(self.samples[i]) for i in rows]
        layouts = {}
        for i, key in zip(rows, keys):
            if key is not None and key not in layouts:
                sample = self.samples[i]
                try:
                    layouts[key] = self.processor.layout_media(sample.get("images", []), sample.get("videos", []))
                except Exception:  # noqa: BLE001 - None: each row lays its media out again and encode_row reports it
                    layouts[key] = None
        return [self.encode_row(i, layouts.get(key)) for i, key in zip(rows, keys)]

    def collate(self, items: list[list[dict]] | list[dict]) -> dict:
        """A training item (a step's rows) -> micro-batches; eval rows (the Trainer has one `data_collator`, and
        the eval set stays a :class:`SupervisedDataset`) -> :meth:`SupervisedDataset.collate`."""
        if items and isinstance(items[0], Mapping):
            return super().collate(items)
        features = [row for item in items for row in item]
        good = [f for f in features if "bad_row" not in f]
        return self._with_bad_rows(features, self.collator(good) if good else None)


def resolve_grouping(recipe: Recipe, samples: list[dict], attn_implementation: str) -> tuple[bool, bool]:
    """(share_prefix, packing) as a run trains them. `data.share_prefix: auto` is on when the train rows repeat
    their media and an optimizer step has more than one answer; both need a custom 4D attention mask, which
    flash-attention cannot take (then off, with a notice). Preference pairs (`train.objective: dpo`) are never
    grouped: chosen and rejected already share their media in one forward."""
    d, t = recipe.data, recipe.train
    if t.objective != "sft":
        return False, False
    several = t.per_device_train_batch_size * t.gradient_accumulation_steps > 1  # else nothing to share
    share = several and repeats_media(samples) if d.share_prefix == "auto" else bool(d.share_prefix)
    if (share or d.packing) and attn_implementation not in ("sdpa", "eager"):
        logger.warning("data.share_prefix / data.packing need sdpa or eager attention (%s cannot take their "
                       "attention mask): training one row per sequence", attn_implementation)
        return False, False
    if (share or d.packing) and launch_layout()[1] in ("zero2", "zero3"):
        # DeepSpeed reduces gradients at every backward it is not told to accumulate, and a grouped step runs as
        # many backwards as its groups fill (a different count per rank): ranks would wait on each other.
        logger.warning("data.share_prefix / data.packing are not used under DeepSpeed: training one row per sequence")
        return False, False
    if (share or d.packing) and t.group_by_length:
        logger.info("train.group_by_length is not used: shared prefixes / packing group each step's rows")
    return share, d.packing


def prepare_data(recipe: Recipe, processor: NvilaProcessor, split: str, max_samples: int | None) -> list[dict]:
    """Loads one split and runs the preflight (all rows checked, bad rows reported with file and index)."""
    return check_samples(recipe, processor, load_split(recipe.data, split, max_samples), split)


def check_samples(recipe: Recipe, processor: NvilaProcessor, samples: list[dict], split: str) -> list[dict]:
    """Preflight of loaded samples per the recipe (`data.preflight`, `data.on_bad_row`); returns the good ones."""
    d = recipe.data
    if not d.preflight:
        return samples

    sizes: dict[int, list[tuple[int, int]]] = {}  # id(sample) -> image sizes, read once (length and media tokens)

    def length_fn(sample: dict) -> int:
        sizes[id(sample)] = [_image_size(im) for im in sample.get("images", [])]
        return expanded_tokens(processor, sample, sizes[id(sample)])

    report = preflight(samples, on_bad_row=d.on_bad_row, length_fn=length_fn, max_length=processor.max_length,
                       video_check=video_check(recipe, processor), progress=is_main_process())
    lines = report.summary().splitlines()
    logger.info("%s split: %s", split, lines[0])
    video_lines = [line for line in lines if line.startswith("video rows:")]
    if video_lines:
        pool = [list(p) for p in processor.pool_sizes] or "none"
        logger.info("%s split: %s; %d frames per video, %d tokens per frame, temporal pool %s -> %d visual tokens "
                    "per video", split, video_lines[0], processor.num_video_frames, processor.tokens_per_tile, pool,
                    processor.count_video_tokens())
    if split == "train" and d.share_prefix and repeats_media(report.ok):
        media_tokens = [expanded_length(processor.media, len(processor.end_token_ids), 0, sizes[id(s)],
                                        s.get("video_frames", ())) for s in report.ok]
        info = sharing_summary(report.ok, [s["num_tokens"] for s in report.ok], media_tokens)
        (v0, v1), (p0, p1) = info["vision_encodes"], info["llm_positions"]
        logger.info("%s split: shared prefixes (data.share_prefix): %d rows -> %d groups; media through the vision "
                    "tower %d -> %d (%.1fx fewer); LLM positions %d -> at most %d (%.1fx fewer)", split,
                    info["rows"], info["groups"], v0, v1, v0 / max(v1, 1), p0, p1, p0 / max(p1, 1))
    return report.ok


def video_check(recipe: Recipe, processor: NvilaProcessor) -> VideoCheck:
    """The preflight's video check as the recipe configures it (`data.short_videos`, `data.preflight_video_sample`,
    `data.video_cache_dir`), counting visual tokens with the run's processor; SFT rows and preference pairs."""
    d = recipe.data
    return VideoCheck.for_media(processor.media, short_videos=d.short_videos, sample=d.preflight_video_sample,
                                seed=recipe.train.seed, cache_dir=d.video_cache_dir,
                                tokens_fn=processor.count_video_tokens)


def expanded_tokens(processor: NvilaProcessor, sample: dict, image_sizes: list[tuple[int, int]] | None = None) -> int:
    """A sample's token count after media expansion (`NvilaProcessor.num_tokens`; images: only their sizes, read
    from the files unless `image_sizes` gives them, (width, height) per image)."""
    sizes = [_image_size(im) for im in sample.get("images", [])] if image_sizes is None else image_sizes
    return processor.num_tokens(sample["conversations"], sizes, sample.get("video_frames", ()))


def _image_size(image) -> tuple[int, int]:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as im:
        return im.size


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Trainer's `LengthGroupedSampler` with its order drawn from (seed, epoch), not the global RNG: a resumed run
    skips into exactly the batches of the uninterrupted one (Trainer calls `set_epoch` through accelerate)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()
