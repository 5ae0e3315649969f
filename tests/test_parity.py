"""Parity with NVIDIA's own NVILA implementation on the two tiny official-layout checkpoints.

Run: pytest tests/test_parity.py

The references in `../shared/parity/golden/<variant>` were produced by NVlabs/VILA's remote code (fp32, CPU)
for exactly the checkpoints in `../shared/parity/checkpoints/<variant>`; `nvila_ft` loads those folders with
its normal loader and must reproduce them: integers (ids, labels, tile counts, block sizes, greedy tokens)
and pixels exactly, floats within rtol 1e-5 / atol 5e-5 (`../shared/parity/README.md`, "Tolerances").
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.model.image_processing import tile_image, tiles_to_uint8
from nvila_ft.model.modeling import NvilaForConditionalGeneration
from nvila_ft.model.processing import NvilaProcessor

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARITY = SHARED / "parity"
VARIANTS = ("nvila", "nvila-lite")
IMAGES = ("astronaut", "coffee")
RTOL, ATOL = 1e-5, 5e-5

pytestmark = pytest.mark.skipif(
    not (PARITY / "golden" / "nvila" / "meta.json").is_file(),
    reason=f"shared parity data not found at {PARITY}",
)


def assert_close(got: torch.Tensor, ref: torch.Tensor, atol: float = ATOL, what: str = ""):
    got, ref = got.detach().float(), ref.float()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    diff = (got - ref).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got, ref, rtol=RTOL, atol=atol), f"{what}: max abs diff {diff:.3g}"


def sum_atol(n_terms: int) -> float:
    """Tolerance of a sum of `n_terms` compared values: ATOL per term, errors adding up like independent noise."""
    return ATOL * math.sqrt(n_terms)


@pytest.fixture(scope="module", params=VARIANTS)
def ref(request):
    """One variant: the model loaded once with the normal loader, its processor and the golden references."""
    variant = request.param
    golden = PARITY / "golden" / variant
    model = NvilaForConditionalGeneration.from_pretrained(
        PARITY / "checkpoints" / variant, dtype=torch.float32
    )
    processor = NvilaProcessor(model.tokenizer, model.config)
    prompts = json.loads((PARITY / "inputs" / "prompts.json").read_text())
    images = {
        name: Image.open(PARITY / "inputs" / path).convert("RGB")
        for name, path in prompts["image_files"].items()
    }
    return SimpleNamespace(
        variant=variant,
        model=model,
        processor=processor,
        meta=json.loads((golden / "meta.json").read_text()),
        g=load_file(golden / "tensors.safetensors"),
        golden=golden,
        prompts=prompts,
        images=images,
        layouts={name: processor.layout_media([image]) for name, image in images.items()},
    )


@pytest.fixture(scope="module")
def one_turn(ref):
    """The one-turn prompt with the coffee image, embedded and run through the LLM once."""
    meta = ref.meta["one_turn"]
    conversation = [{"from": "human", "value": "<image>\n" + meta["prompt"]}]
    enc = ref.processor(conversation, [ref.images[meta["image"]]], add_generation_prompt=True)
    batch = ref.processor.collate([enc])
    with torch.no_grad():
        embeds, mask, _ = ref.model.embed(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["block_sizes"]
        )
        out = ref.model.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    return SimpleNamespace(enc=enc, batch=batch, embeds=embeds, mask=mask, out=out)


@pytest.fixture(scope="module")
def conv_fwd(ref):
    """The two-turn text conversation (default system prompt) through `model.forward` with labels."""
    enc = ref.processor(ref.prompts["conv_text"])
    batch = ref.processor.collate([enc])
    with torch.no_grad():
        embeds, mask, labels = ref.model.embed(
            batch["input_ids"], batch["attention_mask"], labels=batch["labels"]
        )
        out = ref.model(**batch, output_hidden_states=True)
    return SimpleNamespace(enc=enc, labels=labels, out=out)


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("image", IMAGES)
def test_pixels_match_reference_exactly(ref, image):
    tiles, _ = tile_image(ref.images[image], ref.model.config.tiling())
    got = tiles_to_uint8(tiles)
    png = np.asarray(Image.open(ref.golden / f"pixels_{image}.png").convert("RGB"))
    expected = png.reshape(-1, *got.shape[1:])
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} uint8 values differ"
    # Float pixels are exactly (u8 / 255 - 0.5) / 0.5 (README), and that is what the processor hands the model.
    layout = ref.layouts[image]
    u8 = torch.from_numpy(expected.copy()).permute(0, 3, 1, 2).float()
    assert torch.equal(layout.pixel_values, (u8 / 255 - 0.5) / 0.5)


@pytest.mark.parametrize("image", IMAGES)
def test_tile_counts_block_sizes_and_tile_sums(ref, image):
    meta = ref.meta["images"][image]
    layout = ref.layouts[image]
    assert list(layout.pixel_values.shape) == meta["pixel_shape"]
    assert layout.pixel_values.shape[0] == meta["n_tiles"]
    if meta["block_size_hw"] is None:
        # NVILA-Lite: every tile is an image of its own, without a block size.
        assert layout.block_sizes == [None] * meta["n_tiles"]
    else:
        assert layout.block_sizes == [tuple(meta["block_size_hw"])]
    sums = layout.pixel_values.double().sum(dim=(1, 2, 3))
    assert torch.allclose(sums, ref.g[f"image.{image}.pixel_tile_sums"], rtol=1e-12, atol=1e-6)


def test_raw_vision_features_of_stored_tiles(ref):
    tiles = ref.g["image.coffee.vision_tower_features_tiles"]
    assert tiles.tolist() == ref.meta["images"]["coffee"]["vision_tower_features_stored_tiles"]
    pixels = ref.layouts["coffee"].pixel_values
    with torch.no_grad():
        feats = ref.model.vision_features(pixels[tiles])
    assert_close(feats, ref.g["image.coffee.vision_tower_features"], what="vision_tower_features")


@pytest.mark.parametrize("image", IMAGES)
def test_encoder_output_per_image(ref, image):
    layout = ref.layouts[image]
    with torch.no_grad():
        media = ref.model.media_embeddings(layout.pixel_values, layout.block_sizes)
    expected = ref.g[f"image.{image}.encoder_output"]
    assert list(expected.shape) == ref.meta["images"][image]["encoder_output_shape"]
    got = media[0] if expected.dim() == 2 else torch.stack(media)
    assert_close(got, expected, what=f"{image} encoder_output")
    # Every media item ends with the embedding of "\n" (the end token).
    newline = ref.model.get_input_embeddings().weight[ref.meta["tokenizer"]["newline_ids"]]
    for item in media:
        assert torch.equal(item[-len(newline) :], newline)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_resized_embedding_rows(ref):
    emb = ref.model.get_input_embeddings().weight
    assert emb.shape[0] == ref.meta["embedding_rows_after_resize"] == len(ref.model.tokenizer)
    assert_close(
        emb[ref.meta["llm_vocab_size_in_checkpoint"] :], ref.g["resized.embed_rows"], what="embed rows"
    )
    head = ref.model.llm.get_output_embeddings().weight
    assert head.shape[0] == ref.meta["embedding_rows_after_resize"]
    assert_close(
        head[ref.meta["llm_vocab_size_in_checkpoint"] :], ref.g["resized.lm_head_rows"], what="lm_head rows"
    )


def test_tokenizer_facts(ref):
    tok, meta = ref.model.tokenizer, ref.meta["tokenizer"]
    assert len(tok) == meta["len"] == 8195
    assert tok.media_token_ids == meta["media_token_ids"]
    assert tok.sentinel_token_id == meta["sentinel_token_id"]
    assert ref.model.config.image_token_id == meta["media_token_ids"]["image"]
    assert ref.model.config.video_token_id == meta["media_token_ids"]["video"]
    assert ref.model.config.end_token_ids == meta["newline_ids"]
    assert ref.processor.end_token_ids == meta["newline_ids"]
    assert tok.convert_tokens_to_ids(meta["stop_tokens"]) == meta["stop_token_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (meta["bos"], meta["eos"], meta["pad"])


# ---------------------------------------------------------------------------------------------- one turn


def test_one_turn_input_ids_and_text(ref, one_turn):
    meta = ref.meta["one_turn"]
    ids = one_turn.enc["input_ids"]
    assert ids.tolist() == meta["input_ids"] == ref.g["one_turn.input_ids"][0].tolist()
    assert ref.model.tokenizer.decode(ids) == meta["chat_text"]
    # The reference lists dynamic_s2 block sizes only; (0, 0) rows are this kit's "no block size" (Lite tiles).
    assert [b for b in one_turn.batch["block_sizes"].tolist() if b != [0, 0]] == meta["block_sizes"]
    assert one_turn.batch["pixel_values"].shape[0] == meta["n_media_items"]


def test_one_turn_inputs_embeds(ref, one_turn):
    assert one_turn.embeds.shape[1] == ref.meta["one_turn"]["seq_len_embeds"] == one_turn.enc["num_tokens"]
    assert torch.equal(one_turn.mask, ref.g["one_turn.attention_mask"])
    assert_close(one_turn.embeds, ref.g["one_turn.inputs_embeds"], what="inputs_embeds")
    assert_close(
        one_turn.embeds.sum(-1), ref.g["one_turn.inputs_embeds_sum"], atol=sum_atol(64), what="embeds sum"
    )


def test_one_turn_media_segments(ref, one_turn):
    """Each image's embeddings start where the reference puts them; text rows are the token embeddings."""
    meta = ref.meta["one_turn"]
    ids = one_turn.enc["input_ids"]
    embeds = one_turn.embeds[0]
    table = ref.model.get_input_embeddings().weight
    encoder_output = ref.g[f"image.{meta['image']}.encoder_output"]
    encoder_output = encoder_output.unsqueeze(0) if encoder_output.dim() == 2 else encoder_output
    images = [s for s in meta["segments"] if s["kind"] == "image"]
    assert [s["length"] for s in images] == meta["media_embed_lengths"]["image"]
    assert [s["index"] for s in images] == list(range(len(encoder_output)))
    end = 0
    for seg in meta["segments"]:
        assert seg["out_start"] == end, "segments must tile the expanded sequence"
        rows = embeds[seg["out_start"] : seg["out_start"] + seg["length"]]
        if seg["kind"] == "image":
            assert ids[seg["in_pos"]] == ref.model.config.image_token_id
            assert_close(rows[0], encoder_output[seg["index"]][0], what=f"first row of image {seg['index']}")
            assert_close(rows, encoder_output[seg["index"]], what=f"image segment {seg['index']}")
        else:
            assert torch.equal(rows, table[ids[seg["in_start"] : seg["in_end"]]])
        end = seg["out_start"] + seg["length"]
    assert end == embeds.shape[0]


def test_one_turn_llm_outputs(ref, one_turn):
    out = one_turn.out
    vocab = ref.meta["one_turn"]["logits_vocab"]
    assert out.logits.shape[-1] == vocab
    assert_close(out.hidden_states[-1], ref.g["one_turn.last_hidden_state"], what="last_hidden_state")
    assert_close(out.logits[:, -8:], ref.g["one_turn.logits_last8"], what="logits_last8")
    assert torch.equal(out.logits.argmax(-1), ref.g["one_turn.logits_argmax"])
    assert_close(out.logits.logsumexp(-1), ref.g["one_turn.logits_logsumexp"], what="logsumexp")
    assert_close(out.logits.sum(-1), ref.g["one_turn.logits_sum"], atol=sum_atol(vocab), what="logits sum")
    top2 = out.logits[0, -1].topk(2).values
    assert (top2[0] - top2[1]).item() == pytest.approx(
        ref.meta["one_turn"]["last_pos_top1_minus_top2"], abs=ATOL
    )


def test_one_turn_greedy_tokens(ref, one_turn):
    new = ref.model.generate(**one_turn.batch, max_new_tokens=8, do_sample=False)
    assert (
        new[0].tolist()
        == ref.g["one_turn.greedy_new_tokens"].tolist()
        == ref.meta["one_turn"]["greedy_new_tokens"]
    )
    assert ref.model.tokenizer.decode(new[0]) == ref.meta["one_turn"]["greedy_text"]


# ---------------------------------------------------------------------------------------------- text conversation


@pytest.mark.parametrize("key, system_prompt", [("conv_text", None), ("conv_text_nosys", "")])
def test_conversation_ids_and_labels(ref, key, system_prompt):
    processor = NvilaProcessor(ref.model.tokenizer, ref.model.config, system_prompt=system_prompt)
    enc = processor(ref.prompts["conv_text"])
    meta = ref.meta[key]
    assert meta["no_system_prompt"] == (system_prompt == "")
    assert enc["input_ids"].tolist() == meta["input_ids"] == ref.g[f"{key}.input_ids"].tolist()
    assert enc["labels"].tolist() == meta["labels"] == ref.g[f"{key}.labels"].tolist()
    tok = ref.model.tokenizer
    assert tok.decode(enc["input_ids"]) == meta["text"]
    assert tok.decode(enc["labels"][enc["labels"] != IGNORE_INDEX]) == meta["label_text"]


def test_conversation_forward_and_loss(ref, conv_fwd):
    meta, g, out = ref.meta["conv_text_fwd"], ref.g, conv_fwd.out
    assert conv_fwd.enc["input_ids"].tolist() == g["conv_text_fwd.input_ids"][0].tolist()
    assert torch.equal(conv_fwd.labels, g["conv_text_fwd.labels_expanded"])
    assert out.logits.shape[1] == meta["seq_len_embeds"]
    assert out.loss.item() == pytest.approx(meta["loss"], rel=RTOL, abs=ATOL)
    assert_close(out.loss.reshape(1), g["conv_text_fwd.loss"], what="loss")
    # Loss positions: logits at p predict the labelled token p + 1.
    positions = g["conv_text_fwd.loss_positions"]
    assert len(positions) == meta["n_loss_tokens"]
    assert torch.equal((conv_fwd.labels[0, 1:] != IGNORE_INDEX).nonzero().flatten(), positions)
    assert_close(out.hidden_states[-1], g["conv_text_fwd.last_hidden_state"], what="last_hidden_state")
    assert_close(
        out.logits[0, positions], g["conv_text_fwd.logits_at_loss_positions"], what="loss-position logits"
    )
    assert torch.equal(out.logits.argmax(-1), g["conv_text_fwd.logits_argmax"])
    assert_close(out.logits.logsumexp(-1), g["conv_text_fwd.logits_logsumexp"], what="logsumexp")
    assert_close(
        out.logits.sum(-1),
        g["conv_text_fwd.logits_sum"],
        atol=sum_atol(meta["logits_vocab"]),
        what="logits sum",
    )
