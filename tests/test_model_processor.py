"""Unit tests of the projector, image tiling, splicing, labels, batching and checkpoint round-trip.

Run: pytest tests/test_model_processor.py

Expected values are derived by hand from `../shared/docs/nvila-architecture.md` ("Projector", "Image tiling",
"Tokens, template, labels"); anything needing weights or a tokenizer uses the tiny official-layout checkpoints
in `../shared/parity/checkpoints` (float32).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn

from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.model.image_processing import TilingConfig, num_tiles, tile_image, tiles_to_uint8
from nvila_ft.model.modeling import NvilaForConditionalGeneration, merge_tiles, split_blocks
from nvila_ft.model.processing import NvilaProcessor, SampleTooLongError
from nvila_ft.model.projector import MultimodalProjector, spatial_to_channel

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = SHARED / "parity" / "checkpoints"
needs_checkpoints = pytest.mark.skipif(
    not (CHECKPOINTS / "nvila" / "config.json").is_file(),
    reason=f"shared parity checkpoints not found at {CHECKPOINTS}",
)

S2 = TilingConfig(image_aspect_ratio="dynamic_s2")
DYNAMIC = TilingConfig(image_aspect_ratio="dynamic")
RTOL, ATOL = 1e-5, 5e-5


def load(variant: str) -> NvilaForConditionalGeneration:
    return NvilaForConditionalGeneration.from_pretrained(CHECKPOINTS / variant, dtype=torch.float32)


@pytest.fixture(scope="module")
def nvila():
    if not (CHECKPOINTS / "nvila" / "config.json").is_file():
        pytest.skip(f"shared parity checkpoints not found at {CHECKPOINTS}")
    return load("nvila")


@pytest.fixture(scope="module")
def lite():
    if not (CHECKPOINTS / "nvila-lite" / "config.json").is_file():
        pytest.skip(f"shared parity checkpoints not found at {CHECKPOINTS}")
    return load("nvila-lite")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def qa(question="<image>\nWhat is in the picture?", answer="A cat on a mat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A cat on a mat."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "It is black."},
]


# ---------------------------------------------------------------------------------------------- projector


def stc_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Naive loop version of the STC rule in the architecture doc ("Projector")."""
    b, n, c = x.shape
    f = math.isqrt(n)
    g = -(-f // k)
    out = torch.zeros(b, g * g, k * k * c, dtype=x.dtype)
    for i in range(g):
        for j in range(g):
            for a in range(k):
                for w in range(k):
                    row, col = i * k + a, j * k + w
                    if row < f and col < f:
                        out[:, i * g + j, (a * k + w) * c : (a * k + w + 1) * c] = x[:, row * f + col]
    return out


@pytest.mark.parametrize("f, k", [(4, 2), (5, 2), (32, 2), (32, 3), (7, 3)])
def test_spatial_to_channel_matches_naive_loop(f, k):
    x = torch.randn(2, f * f, 3, generator=torch.Generator().manual_seed(f * 10 + k))
    got = spatial_to_channel(x, k)
    assert got.shape == (2, math.ceil(f / k) ** 2, k * k * 3)
    assert torch.equal(got, stc_reference(x, k))


@pytest.mark.parametrize("f, k", [(5, 2), (7, 3), (32, 3)])
def test_spatial_to_channel_pads_bottom_rows_and_right_cols_with_zeros(f, k):
    c = 2
    x = torch.rand(1, f * f, c) + 1.0  # strictly positive: zeros can only come from padding
    out = spatial_to_channel(x, k)[0]
    g = -(-f // k)
    for i in range(g):
        for j in range(g):
            for a in range(k):
                for w in range(k):
                    window = out[i * g + j, (a * k + w) * c : (a * k + w + 1) * c]
                    padded = i * k + a >= f or j * k + w >= f
                    assert bool((window == 0).all()) == padded, (i, j, a, w)


def test_spatial_to_channel_token_counts_per_tile():
    x = torch.zeros(1, 32 * 32, 1)
    assert spatial_to_channel(x, 2).shape[1] == 256
    assert spatial_to_channel(x, 3).shape[1] == 121
    with pytest.raises(ValueError, match="square"):
        spatial_to_channel(torch.zeros(1, 30, 1), 2)


def test_projector_layouts_follow_official_keys():
    c, h = 8, 16
    p3 = MultimodalProjector("mlp_downsample_3x3_fix", c, h)
    shapes = {k: tuple(v.shape) for k, v in p3.state_dict().items()}
    assert shapes == {
        "layers.1.weight": (9 * c,),
        "layers.1.bias": (9 * c,),
        "layers.2.weight": (3 * c, 9 * c),
        "layers.2.bias": (3 * c,),
        "layers.4.weight": (3 * c,),
        "layers.4.bias": (3 * c,),
        "layers.5.weight": (h, 3 * c),
        "layers.5.bias": (h,),
        "layers.7.weight": (h, h),
        "layers.7.bias": (h,),
    }
    p2 = MultimodalProjector("mlp_downsample", c, h)
    assert sorted(p2.state_dict()) == sorted(f"layers.{i}.{n}" for i in (1, 2, 4) for n in ("weight", "bias"))
    # GELU is exact, not tanh (architecture doc).
    assert all(m.approximate == "none" for m in [*p2.modules(), *p3.modules()] if isinstance(m, nn.GELU))
    assert p3(torch.randn(2, 1024, c)).shape == (2, 121, h)
    assert p2(torch.randn(2, 1024, c)).shape == (2, 256, h)


# ---------------------------------------------------------------------------------------------- tiling

# (width, height) -> expected (block size (rows, cols), tiles), derived by hand from the doc's rules:
# dynamic_s2 grids have 9..12 tiles; the closest cols/rows to width/height wins; on an exact tie the later
# (larger) grid wins only if the image area exceeds half the grid's pixel area. Tiles = 1 + 4 + rows*cols.
S2_CASES = {
    (512, 512): ((3, 3), 14),  # ratio 1: only 3x3 in 9..12
    (600, 400): ((3, 4), 17),  # 1.5: 4/3 (diff 1/6) beats 5/2 and 3/3
    (400, 600): ((4, 3), 17),  # 0.667: 3/4 (diff 1/12)
    (2000, 300): ((1, 9), 14),  # 6.67: 9/1 (diff 2.33) beats 10/1 and 6/2
    (300, 2000): ((9, 1), 14),  # 0.15: 1/9 (diff 0.039)
    (10, 10): ((3, 3), 14),  # tiny: same grid as any square
    (2750, 1000): ((2, 6), 17),  # 2.75: tie 5/2 vs 6/2; area 2.75e6 > 0.5*448^2*12 -> later (6, 2)
    (11, 4): ((2, 5), 15),  # 2.75 tie again; area 44 is small -> keeps (5, 2)
}
# dynamic (NVILA-Lite): grids with 1..12 tiles, same rule; a thumbnail is appended when there is > 1 tile.
DYNAMIC_CASES = {
    (512, 512): 1,  # 1x1; 2x2 ties but 512^2 < 0.5*448^2*4
    (600, 400): 7,  # 3x2 exact ratio -> 6 + thumbnail
    (400, 600): 7,  # 2x3
    (2000, 300): 8,  # 6.67: 7x1 (diff 0.33) -> 7 + thumbnail
    (300, 2000): 8,  # 1x7
    (10, 10): 1,
    (700, 700): 5,  # 2x2 wins its tie (490000 > 401408) but 3x3 does not (< 903168) -> 4 + thumbnail
    (1000, 1000): 10,  # wins both ties -> 3x3 + thumbnail
}


@pytest.mark.parametrize("size", list(S2_CASES))
def test_dynamic_s2_grid_and_block_size(size):
    block, n = S2_CASES[size]
    tiles, block_size = tile_image(noise_image(*size), S2)
    assert block_size == block
    assert len(tiles) == n == 1 + 4 + block[0] * block[1]
    assert all(t.size == (448, 448) for t in tiles)
    assert num_tiles(*size, S2) == (n, block)


@pytest.mark.parametrize("size", list(DYNAMIC_CASES))
def test_dynamic_grid_and_thumbnail(size):
    tiles, block_size = tile_image(noise_image(*size), DYNAMIC)
    assert block_size is None
    assert len(tiles) == DYNAMIC_CASES[size]
    assert all(t.size == (448, 448) for t in tiles)
    assert num_tiles(*size, DYNAMIC) == (DYNAMIC_CASES[size], None)


@pytest.mark.parametrize(
    "cfg", [S2, DYNAMIC, TilingConfig(image_aspect_ratio="resize")], ids=lambda c: c.image_aspect_ratio
)
def test_single_and_resize_give_one_tile(cfg):
    image = noise_image(600, 400)
    single = cfg.image_aspect_ratio != "resize"
    tiles, block_size = tile_image(image, cfg, single=single)
    assert len(tiles) == 1 and block_size is None
    assert num_tiles(600, 400, cfg, single=single) == (1, None)


def test_dynamic_tiles_are_cut_row_major():
    # Left half black, right half white: a 2x1 grid (896x448 has ratio 2, 4x2 loses its tie).
    half = np.zeros((448, 896, 3), dtype=np.uint8)
    half[:, 448:] = 255
    tiles = tiles_to_uint8(tile_image(Image.fromarray(half), DYNAMIC)[0]).astype(float)
    assert len(tiles) == 3  # 2 tiles + thumbnail
    assert tiles[0].mean() < 5 and tiles[1].mean() > 250
    assert 120 < tiles[2].mean() < 135  # the thumbnail is the whole image
    # Four coloured quadrants on a 2x2 grid: tiles come out TL, TR, BL, BR.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    quad = np.zeros((700, 700, 3), dtype=np.uint8)
    for q, colour in enumerate(colours):
        quad[(q // 2) * 350 : (q // 2 + 1) * 350, (q % 2) * 350 : (q % 2 + 1) * 350] = colour
    tiles = tiles_to_uint8(tile_image(Image.fromarray(quad), DYNAMIC)[0]).astype(float)
    assert len(tiles) == 5
    for tile, colour in zip(tiles[:4], colours):
        assert np.abs(tile[16:-16, 16:-16].mean(axis=(0, 1)) - colour).max() < 3


def test_dynamic_s2_tiles_are_cut_row_major():
    # Red grows left to right, green top to bottom; 600x400 -> 1 + 2x2 + (3 rows x 4 cols) tiles.
    w, h = 600, 400
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, w)[None, :]
    pixels[..., 1] = np.linspace(0, 255, h)[:, None]
    tiles, (rows, cols) = tile_image(Image.fromarray(pixels), S2)
    means = tiles_to_uint8(tiles).astype(float).mean(axis=(1, 2))  # (tiles, 3)
    red, green = means[:, 0], means[:, 1]
    # Scale 896: 2x2 row-major.
    assert red[1] < red[2] and red[3] < red[4] and green[1] < green[3] and green[2] < green[4]
    assert abs(red[1] - red[3]) < 2 and abs(green[1] - green[2]) < 2
    # Last scale: tile 5 + r*cols + c.
    grid_r = red[5:].reshape(rows, cols)
    grid_g = green[5:].reshape(rows, cols)
    assert (np.diff(grid_r, axis=1) > 20).all() and (np.abs(np.diff(grid_r, axis=0)) < 2).all()
    assert (np.diff(grid_g, axis=0) > 20).all() and (np.abs(np.diff(grid_g, axis=1)) < 2).all()


def test_merge_tiles_and_split_blocks_are_row_major_inverses():
    rows, cols, f, c = 2, 3, 4, 5
    feats = torch.randn(rows * cols, f * f, c)
    fmap = merge_tiles(feats, rows, cols)
    assert fmap.shape == (1, c, rows * f, cols * f)
    for r in range(rows):
        for col in range(cols):
            for y in range(f):
                for x in range(f):
                    assert torch.equal(fmap[0, :, r * f + y, col * f + x], feats[r * cols + col, y * f + x])
    assert torch.equal(split_blocks(fmap, rows, cols), feats)
    other = torch.randn(1, c, 6, 9)
    assert torch.equal(merge_tiles(split_blocks(other, 2, 3), 2, 3), other)


# ---------------------------------------------------------------------------------------------- labels


def label_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of positions whose label is not -100."""
    runs, start = [], None
    for k, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = k
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


@needs_checkpoints
def test_labels_cover_assistant_content_and_im_end_only(nvila):
    tok = nvila.tokenizer
    processor = NvilaProcessor(tok, nvila.config)
    enc = processor(TWO_TURNS, [noise_image(64, 48)])
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    runs = label_runs(labels)
    assert [tok.decode(ids[s:e]) for s, e in runs] == ["A cat on a mat.<|im_end|>", "It is black.<|im_end|>"]
    header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    newline = tok("\n", add_special_tokens=False).input_ids
    for s, e in runs:
        assert ids[e - 1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert ids[s - len(header) : s] == header  # header before the answer, unlabelled (runs are maximal)
        assert ids[e : e + len(newline)] == newline and labels[e] == IGNORE_INDEX
    image_pos = ids.index(tok.media_token_ids["image"])
    assert labels[image_pos] == IGNORE_INDEX
    assert ids.count(tok.media_token_ids["image"]) == 1


@needs_checkpoints
def test_embed_masks_media_rows_and_keeps_text_labels_aligned(nvila):
    processor = NvilaProcessor(nvila.tokenizer, nvila.config)
    with_image = processor(TWO_TURNS, [noise_image(64, 48)])
    text_only = processor(qa("Hello?", "Hi."))
    batch = processor.collate([with_image, text_only])
    with torch.no_grad():
        embeds, mask, labels = nvila.embed(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["block_sizes"],
            batch["labels"],
        )
        media = nvila.media_embeddings(with_image["pixel_values"], with_image["block_sizes"])[0]
    ids, lab = with_image["input_ids"], with_image["labels"]
    pos = int((ids == nvila.config.image_token_id).nonzero())
    n_media = media.shape[0]
    assert n_media == 3 * 4 * 256 + 1  # 64x48 -> block (3, 4), 256 tokens per block, + "\n"
    length = with_image["num_tokens"]
    assert length == len(ids) - 1 + n_media
    assert embeds.shape[1] == length and mask[0].sum() == length
    assert torch.equal(labels[0, :pos], lab[:pos])
    assert (labels[0, pos : pos + n_media] == IGNORE_INDEX).all()
    assert torch.equal(labels[0, pos + n_media : length], lab[pos + 1 :])
    assert torch.allclose(embeds[0, pos : pos + n_media], media)
    # The text-only sample is right-padded with mask 0 and -100 labels.
    n = len(text_only["input_ids"])
    assert torch.equal(labels[1, :n], text_only["labels"]) and (labels[1, n:] == IGNORE_INDEX).all()
    assert mask[1, :n].all() and not mask[1, n:].any()


@needs_checkpoints
@pytest.mark.parametrize("variant", ["nvila", "lite"])
def test_image_only_turn_drops_im_end_after_the_image_as_official_embed(request, variant):
    """NVIDIA's `_embed` skips pad / eos tokens that open a text segment (`pad_token_list`): in an NVILA image-only
    user turn the `<|im_end|>` right after `<image>` is not embedded (one row fewer). NVILA-Lite writes "\n" after
    each tile's `<image>`, so nothing is dropped there."""
    model = request.getfixturevalue(variant)
    tok = model.tokenizer
    processor = NvilaProcessor(tok, model.config)
    sample = processor(qa("<image>", "A cat."), [noise_image(64, 48)])
    ids, lab = sample["input_ids"].tolist(), sample["labels"]
    pos = len(ids) - 1 - ids[::-1].index(tok.media_token_ids["image"])  # the last tile's (Lite: one per tile)
    dropped = 1 if variant == "nvila" else 0
    assert (ids[pos + 1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id) == bool(dropped)
    batch = processor.collate([sample])
    with torch.no_grad():
        embeds, mask, labels = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                           batch.get("block_sizes"), batch["labels"])
        media = model.media_embeddings(sample["pixel_values"], sample.get("block_sizes"))
    n_media, n_images = sum(m.shape[0] for m in media), len(media)
    assert embeds.shape[1] == len(ids) - n_images + n_media - dropped
    assert sample["num_tokens"] == embeds.shape[1]  # the processor's count (max_length checks) agrees
    after = pos - (n_images - 1) + n_media  # the first row after the media
    text = model.get_input_embeddings()(torch.tensor([ids[pos + 1 + dropped]]))[0]
    assert torch.equal(embeds[0, after], text)
    assert torch.equal(labels[0, after:], lab[pos + 1 + dropped :])


# ---------------------------------------------------------------------------------------------- placeholders


@needs_checkpoints
@pytest.mark.parametrize(
    "conversation",
    [
        qa("What is this?\n<image>", "A cat."),
        qa("What is<image> this?", "A cat."),
        [*qa("What is this?", "A cat."), *qa("<image>\nSure?", "Yes.")],
    ],
    ids=["end", "middle", "second-turn"],
)
def test_image_placeholder_moves_to_start_of_first_user_turn(nvila, conversation):
    processor = NvilaProcessor(nvila.tokenizer, nvila.config)
    enc = processor(conversation, [noise_image(32, 32)])
    text = nvila.tokenizer.decode(enc["input_ids"])
    assert "<|im_start|>user\n<image>What is this?<|im_end|>" in text
    assert text.count("<image>") == 1
    canonical = [dict(t) for t in conversation]
    for turn in canonical:
        turn["value"] = turn["value"].replace("<image>", "").strip()
    canonical[0]["value"] = "<image>" + canonical[0]["value"]
    assert torch.equal(enc["input_ids"], processor(canonical, [noise_image(32, 32)])["input_ids"])


@needs_checkpoints
def test_lite_writes_one_placeholder_line_per_tile(lite):
    processor = NvilaProcessor(lite.tokenizer, lite.config)
    enc = processor(qa("<image>\nWhat is this?", "A cat."), [noise_image(600, 400)])
    assert "<|im_start|>user\n" + "<image>\n" * 7 + "What is this?<|im_end|>" in lite.tokenizer.decode(
        enc["input_ids"]
    )
    assert enc["pixel_values"].shape == (7, 3, 448, 448)
    assert enc["block_sizes"] == [None] * 7
    text_tokens = len(enc["input_ids"]) - 7
    assert enc["num_tokens"] == text_tokens + 7 * (121 + 1)


@needs_checkpoints
def test_two_images_in_dynamic_s2_get_one_tile_each(nvila):
    processor = NvilaProcessor(nvila.tokenizer, nvila.config)
    enc = processor(
        qa("<image>\n<image>\nCompare them.", "Same."), [noise_image(600, 400), noise_image(64, 64, 1)]
    )
    assert enc["block_sizes"] == [None, None]
    assert enc["pixel_values"].shape == (2, 3, 448, 448)
    assert "<|im_start|>user\n<image><image>Compare them.<|im_end|>" in nvila.tokenizer.decode(
        enc["input_ids"]
    )
    assert enc["num_tokens"] == len(enc["input_ids"]) - 2 + 2 * (256 + 1)
    batch = processor.collate([enc])
    assert batch["block_sizes"].tolist() == [[0, 0], [0, 0]]
    with torch.no_grad():
        media = nvila.encode_images(batch["pixel_values"], batch["block_sizes"])
    assert [m.shape for m in media] == [(256, nvila.config.hidden_size)] * 2


# ---------------------------------------------------------------------------------------------- lengths


@needs_checkpoints
def test_sample_too_long_error_names_sample_and_counts(nvila):
    conversation, image = TWO_TURNS, noise_image(64, 48)
    n = NvilaProcessor(nvila.tokenizer, nvila.config)(conversation, [image])["num_tokens"]
    visual = 3 * 4 * 256 + 1
    exact = NvilaProcessor(nvila.tokenizer, nvila.config, max_length=n)
    assert exact(conversation, [image])["num_tokens"] == n  # the limit is inclusive
    short = NvilaProcessor(nvila.tokenizer, nvila.config, max_length=n - 1)
    with pytest.raises(SampleTooLongError) as err:
        short(conversation, [image], sample_id="row-17")
    message = str(err.value)
    assert "row-17" in message
    assert f"{n} tokens ({n - visual} text + {visual} visual)" in message
    assert f"max_length {n - 1}" in message


@needs_checkpoints
@pytest.mark.parametrize("variant", ["nvila", "lite"])
@pytest.mark.parametrize(
    "sizes", [[], [(600, 400)], [(512, 512)], [(2000, 300)], [(600, 400), (300, 500)]], ids=str
)
def test_num_tokens_from_sizes_matches_encoding(request, variant, sizes):
    model = request.getfixturevalue(variant)
    processor = NvilaProcessor(model.tokenizer, model.config)
    question = "<image>\n" * len(sizes) + "What is this?"
    images = [noise_image(w, h, k) for k, (w, h) in enumerate(sizes)]
    enc = processor(qa(question, "A cat."), images)
    assert processor.num_tokens(qa(question, "A cat."), sizes) == enc["num_tokens"]


# ---------------------------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def two_samples(nvila):
    """Two samples of different lengths: a 2-turn chat with one square image (block (3, 3), 2305 media rows)
    and a question about two images (no block size, 257 rows each), so one batch mixes both kinds."""
    processor = NvilaProcessor(nvila.tokenizer, nvila.config)
    images_a, images_b = [noise_image(48, 48)], [noise_image(300, 200, 1), noise_image(100, 100, 2)]
    conv_b = qa("<image>\n<image>\nWhat differs?", "The colour.")
    return processor, (TWO_TURNS, images_a), (conv_b, images_b)


@needs_checkpoints
def test_batched_forward_matches_each_sample_alone(nvila, two_samples):
    processor, *samples = two_samples
    encs = [processor(conv, images) for conv, images in samples]
    assert encs[0]["num_tokens"] != encs[1]["num_tokens"]
    batch = processor.collate(encs)
    assert batch["block_sizes"].tolist() == [[3, 3], [0, 0], [0, 0]]
    with torch.no_grad():
        embeds, mask, labels = nvila.embed(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["block_sizes"],
            batch["labels"],
        )
        batched = nvila(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        total, count = 0.0, 0
        for b, enc in enumerate(encs):
            alone = nvila(**processor.collate([enc]))
            n = enc["num_tokens"]
            assert mask[b].sum() == n and mask[b, :n].all()  # right padding
            assert torch.allclose(batched.logits[b, :n], alone.logits[0], rtol=RTOL, atol=ATOL)
            loss = F.cross_entropy(batched.logits[b, : n - 1], labels[b, 1:n], ignore_index=IGNORE_INDEX)
            assert loss.item() == pytest.approx(alone.loss.item(), rel=RTOL, abs=ATOL)
            k = int((labels[b, 1:] != IGNORE_INDEX).sum())
            total, count = total + loss.item() * k, count + k
    # The batch loss is the mean over all labelled tokens of both samples.
    assert batched.loss.item() == pytest.approx(total / count, rel=RTOL, abs=ATOL)


@needs_checkpoints
def test_batched_generate_matches_unbatched(nvila, two_samples):
    processor, *samples = two_samples
    prompts = [processor(conv[:1], images, add_generation_prompt=True) for conv, images in samples]
    assert prompts[0]["num_tokens"] != prompts[1]["num_tokens"]
    batched = nvila.generate(**processor.collate(prompts), max_new_tokens=8, do_sample=False)
    for b, prompt in enumerate(prompts):
        alone = nvila.generate(**processor.collate([prompt]), max_new_tokens=8, do_sample=False)
        assert batched[b].tolist() == alone[0].tolist()


# ---------------------------------------------------------------------------------------------- checkpoints


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@needs_checkpoints
@pytest.mark.parametrize("variant", ["nvila", "nvila-lite"])
def test_save_and_reload_round_trip_in_official_layout(tmp_path, variant):
    model = load(variant)
    processor = NvilaProcessor(model.tokenizer, model.config)
    # Two images: one tile each in both modes, which keeps this test fast.
    images = [noise_image(64, 48), noise_image(40, 40, 1)]
    batch = processor.collate([processor(qa("<image>\n<image>\nSame?"), images)])
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    reloaded = NvilaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert len(reloaded.tokenizer) == len(model.tokenizer) == 8195
    assert reloaded.tokenizer.media_token_ids == model.tokenizer.media_token_ids
    assert reloaded.config.image_token_id == model.config.image_token_id

    config = json.loads((out / "config.json").read_text())
    original = json.loads((CHECKPOINTS / variant / "config.json").read_text())
    assert {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg"} <= set(config)
    assert config["architectures"] == ["LlavaLlamaModel"] and config["model_type"] == "llava_llama"
    for key in ("image_aspect_ratio", "mm_hidden_size", "hidden_size", "mm_vision_select_layer"):
        assert config[key] == original[key], key
    assert (
        config["mm_projector_cfg"]["mm_projector_type"] == original["mm_projector_cfg"]["mm_projector_type"]
    )
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        assert (out / "llm" / name).is_file(), name
    preprocessor = json.loads((out / "vision_tower" / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == preprocessor["image_std"] == [0.5, 0.5, 0.5]
    assert preprocessor["size"] == {"height": 448, "width": 448}
    projector_cfg = json.loads((out / "mm_projector" / "config.json").read_text())
    assert projector_cfg["model_type"] == "v2l_projector"
    # Same weight names as NVIDIA's files, part by part (the LLM also gains its 3 resized rows).
    for part in ("llm", "vision_tower", "mm_projector"):
        assert safetensors_keys(out / part / "model.safetensors") == safetensors_keys(
            CHECKPOINTS / variant / part / "model.safetensors"
        ), part
    keys = safetensors_keys(out / "mm_projector" / "model.safetensors")
    assert keys and all(k.split(".")[0] == "layers" and k.split(".")[1].isdigit() for k in keys)
    with safe_open(str(out / "llm" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == 8195
