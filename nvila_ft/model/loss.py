"""The training loss's optional GPU kernel: Liger's fused linear cross-entropy (extra `liger`).

    pip install nvila-ft[liger]     # CUDA machines; the label-only loss (`_label_only_loss`) runs elsewhere
"""

from __future__ import annotations

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
