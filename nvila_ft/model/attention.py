"""Attention over packed, shared-prefix sequences: the 4D mask and position_ids that make one sequence of
several rows (`nvila_ft.data.grouping`) compute exactly what the separate single-turn samples compute.

Transformers' sdpa and eager attention take a custom 4D mask as it is; flash-attention cannot express it.
"""

from __future__ import annotations

import torch


def segment_attention(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """4D additive attention mask and position_ids of packed, shared-prefix rows.

    Query i sees key j when j <= i, both are in the same pack (`segment_ids[..., 0]`, -1 = padding), and j is
    in the shared prefix (branch 0) or in i's own branch (`segment_ids[..., 1]`). A token's position is the
    number of tokens it sees minus one: packs restart at 0, a branch continues from its prefix's length,
    exactly the positions of the separate single sample. Padding sees only itself (position 0).

    Args:
        segment_ids: (B, L, 2) int64 (expanded coordinates, see :meth:`NvilaForConditionalGeneration.embed`).
        dtype: a float dtype (the attention compute dtype) for an additive mask, 0 where attended and the
            dtype's minimum elsewhere (what transformers' sdpa and eager attention add to the scores; one tensor
            shared by all layers); None = a bool mask, True where attended.

    Returns:
        mask (B, 1, L, L), passed by transformers as a custom 4D mask as it is; position_ids (B, L) int64.
    """
    pack, branch = segment_ids[..., 0], segment_ids[..., 1]
    length = pack.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=pack.device).tril()
    same_pack = (pack[:, :, None] == pack[:, None, :]) & (pack[:, :, None] >= 0)
    same_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=pack.device)
    visible = (causal & same_pack & same_branch) | eye
    position_ids = visible.sum(-1) - 1
    if dtype is None:
        return visible[:, None], position_ids
    # Storage rows padded to a multiple of 16 columns: sdpa's memory-efficient kernel then takes the mask as it
    # is; an unaligned one is padded into a new tensor in every layer, and each copy is kept for backward.
    b = visible.shape[0]
    store = torch.zeros(b, 1, length, -(-length // 16) * 16, dtype=dtype, device=pack.device)
    mask = store[..., :length]
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return mask, position_ids


def compute_dtype(inputs_embeds: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: the autocast dtype when autocast is on, else the embeddings'."""
    device = inputs_embeds.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return inputs_embeds.dtype
