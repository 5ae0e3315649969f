"""Losses at the labelled positions only: the SFT cross-entropy (with Liger's fused linear cross-entropy as
the optional GPU kernel, extra `liger`) and the per-row answer log-probabilities preference tuning needs.

    pip install nvila-ft[liger]     # CUDA machines; the label-only loss (`_label_only_loss`) runs elsewhere
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.loss.loss_utils import fixed_cross_entropy


def label_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               num_items_in_batch: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of `head(hidden)` against `targets`, as transformers' `ForCausalLMLoss` reduces it.

    Args:
        head: `lm_head`; hidden: (N, H) hidden states at the labelled positions; targets: (N,) int64.
        num_items_in_batch: labelled tokens over all accumulated micro-batches (sum / this), or None (mean).

    Returns:
        (fp32 scalar loss, (N, vocab) logits), or (loss, None) on the fused path (:func:`fused_linear_cross_entropy`:
        CUDA with liger-kernel, the logits never held whole).
    """
    fused = fused_linear_cross_entropy(head, hidden)
    if fused is None:
        logits = head(hidden)
        return fixed_cross_entropy(logits.float(), targets, num_items_in_batch), logits
    loss = fused(hidden, head.weight, targets, head.bias, reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss, None


def answer_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                 logprob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, with `head` applied only at those positions.

    Args:
        head: `lm_head`; hidden: (B, L', H) the decoder's last hidden states; labels: (B, L') int64 (-100: none),
            position p + 1's label scored from position p (causal shift).
        logprob_fn: (logits (N, vocab) fp32, targets (N,) int64) -> (N,) log-probabilities of the targets, e.g.
            trl's `selective_log_softmax` (what preference tuning passes).

    Returns:
        logps (B,) fp32, the sum over each row's labelled tokens, and tokens (B,) int64, their count.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    token = logprob_fn(head(hidden[:, :-1][keep]).float(), targets[keep])
    logps = torch.zeros(labels.shape[0], device=token.device).index_add(0, keep.nonzero()[:, 0], token)
    return logps, keep.sum(dim=1)


def fused_linear_cross_entropy(head: nn.Module, hidden: torch.Tensor):
    """Liger's fused linear cross-entropy (`liger_fused_linear_cross_entropy`) when it can replace `head` + loss.

    It needs CUDA (Triton kernels), `liger-kernel` installed (`pip install nvila-ft[liger]`), a plain
    `nn.Linear` head (not a LoRA or `modules_to_save` wrapper) in the dtype of `hidden` (no autocast cast to
    mirror). Anywhere else the label-only path runs (`_label_only_loss`), the default.

    Args:
        head: the LLM's output embedding (`lm_head`).
        hidden: (N, H) last hidden states at the labelled positions.

    Returns:
        The function `(input, weight, target, bias, reduction=...) -> loss`, or None.
    """
    if hidden.device.type != "cuda" or type(head) is not nn.Linear or head.weight.dtype != hidden.dtype:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:  # not installed, or no Triton
        return None
    return liger_fused_linear_cross_entropy
