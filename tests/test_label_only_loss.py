"""Training-mode forward with labels: `lm_head` only at labelled positions, same loss and gradients as the full head.

`NvilaForConditionalGeneration.forward` in training mode skips the (B, L', vocab) logits of the whole
sequence; the reference here is the LLM's own head and loss (`llm(inputs_embeds=..., labels=...)`,
transformers' `ForCausalLMLoss`) on the same spliced embeddings.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_tuned, noise_image

from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.configuration import IGNORE_INDEX
from nvila_ft.train.tuning import base_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_only")
    return root, build_tiny_checkpoint(root / "tiny-nvila", variant="nvila", seed=0)




def batch_of(processor) -> dict:
    """Three samples of different lengths (right padding): one and two images, two turns, a text-only one."""
    samples = [
        ([{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A chest film."}],
         [noise_image(0)]),
        ([{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Left is larger."},
          {"from": "human", "value": "Any fracture?"}, {"from": "gpt", "value": "No fracture is seen here."}],
         [noise_image(1), noise_image(2)]),
        ([{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}], []),
    ]
    return processor.collate([processor(conv, images) for conv, images in samples])


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def reference(nvila, batch, **kwargs):
    """The full-logits loss: transformers' head and ForCausalLMLoss on the spliced embeddings."""
    embeds, mask, labels = nvila.embed(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                       batch["block_sizes"], batch["labels"])
    return nvila.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs).loss


@pytest.mark.parametrize("overrides", [("tune.llm=full",), ("tune.llm=lora",)], ids=["full", "peft-lora"])
def test_label_only_loss_and_gradients_match_the_full_head(assets, overrides):
    model, processor = load_tuned(assets, *overrides)
    nvila = base_model(model)
    batch = batch_of(processor)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # three lengths: padding in the batch
    out = model(**batch)
    _, _, labels = nvila.embed(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               batch["block_sizes"], batch["labels"])
    n_label = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (n_label, nvila.llm.config.vocab_size)
    assert n_label < labels.numel() // 4  # the point: far fewer rows than the sequence

    fast, fast_grads = loss_and_grads(model, lambda: model(**batch).loss)
    ref, ref_grads = loss_and_grads(model, lambda: reference(nvila, batch))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys()
    if overrides == ("tune.llm=full",):
        assert any("lm_head" in n for n in fast_grads)
    else:
        assert any("lora_A" in n for n in fast_grads) and not any("lm_head" in n for n in fast_grads)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_divides_the_summed_loss_as_transformers_does(assets):
    model, processor = load_tuned(assets, "tune.llm=lora")
    batch = batch_of(processor)
    n = torch.tensor(57)  # the Trainer's count over all accumulated micro-batches
    with torch.no_grad():
        fast = model(**batch, num_items_in_batch=n).loss
        ref = reference(base_model(model), batch, num_items_in_batch=n)
        mean = model(**batch).loss
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fast, mean)


def test_eval_mode_keeps_the_full_logits(assets):
    model, processor = load_tuned(assets, "tune.llm=lora")
    batch = batch_of(processor)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        ref = reference(base_model(model), batch)
    assert out.logits.dim() == 3 and out.logits.shape[0] == 3
    assert torch.equal(out.loss, ref)



@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_qlora_keeps_the_frozen_llm_weights_in_the_compute_dtype(assets, mixed_precision):
    """peft's kbit preparation upcasts every non-4-bit LLM weight to fp32; the frozen ones go back to bf16."""
    model, processor = load_tuned(assets, "tune.llm=qlora", "model.dtype=bfloat16",
                            f"train.mixed_precision={mixed_precision}")
    llm = base_model(model).llm
    frozen = {n: p.dtype for n, p in llm.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert "model.embed_tokens.weight" in frozen and "lm_head.weight" in frozen and "model.norm.weight" in frozen
    assert set(frozen.values()) == {torch.bfloat16}
    assert llm.get_input_embeddings().weight.dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    if mixed_precision == "bf16":
        assert all(p.dtype == torch.float32 for p in trainable.values())  # fp32 for AdamW, as before
    batch = batch_of(processor)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        loss = model(**batch).loss  # without autocast too: the LLM runs in bf16 throughout
    loss.backward()
    assert torch.isfinite(loss)
    learning = [p for n, p in trainable.items() if "lora_B" in n or "mm_projector" in n]  # lora_A: 0 while B = 0
    assert learning and all(p.grad is not None and p.grad.abs().sum() > 0 for p in learning)


def test_only_label_rows_of_vocab_width_are_kept_for_backward(assets):
    """What the planner's logits/loss term prices: autograd keeps fp32 log-probs for the label rows only."""
    model, processor = load_tuned(assets, "tune.llm=lora")
    batch = batch_of(processor)
    vocab = base_model(model).llm.config.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # lm_head's (transposed) weight
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.dim() >= 1 and t.shape[-1] == vocab and t.is_floating_point() and ptr not in weights:
            saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    n_label = out.logits.shape[0]
    assert n_label > 0 and sum(n for _, n in saved.values()) == 4 * n_label * vocab
    assert {d for d, _ in saved.values()} == {torch.float32}


# ---------------------------------------------------------------------------------------------- fused loss (GPU)
def _fake_liger(monkeypatch, fn):
    """Installs `liger_kernel.transformers.functional.liger_fused_linear_cross_entropy = fn` (no Triton here)."""
    import sys
    import types

    module = types.ModuleType("liger_kernel.transformers.functional")
    module.liger_fused_linear_cross_entropy = fn
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", module)


def torch_flce(input, weight, target, bias=None, reduction="mean"):
    """Pure-torch stand-in with Liger's signature and semantics (ignore_index -100, mean or sum)."""
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(input, weight, bias).float(), target,
                                             ignore_index=IGNORE_INDEX, reduction=reduction)


def test_fused_loss_is_chosen_only_on_cuda_with_liger_and_a_plain_head(monkeypatch):
    from types import SimpleNamespace

    from nvila_ft.model.loss import fused_linear_cross_entropy

    head = torch.nn.Linear(8, 16, bias=False)
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # stands in for a CUDA tensor
    monkeypatch.setitem(__import__("sys").modules, "liger_kernel", None)  # not installed: ImportError
    assert fused_linear_cross_entropy(head, cuda) is None
    _fake_liger(monkeypatch, torch_flce)
    assert fused_linear_cross_entropy(head, cuda) is torch_flce
    assert fused_linear_cross_entropy(head, torch.zeros(2, 8)) is None  # CPU: the label-only path
    assert fused_linear_cross_entropy(head, SimpleNamespace(device=cuda.device, dtype=torch.bfloat16)) is None
    wrapped = type("LoraLinear", (torch.nn.Linear,), {})(8, 16)  # a LoRA / modules_to_save wrapper is not plain
    assert fused_linear_cross_entropy(wrapped, cuda) is None


@pytest.mark.parametrize("num_items", [None, 57])
def test_fused_path_gives_the_label_only_loss_and_gradients(assets, monkeypatch, num_items):
    """The wiring of the fused path (targets, reduction, num_items_in_batch) with a pure-torch fused function."""
    import nvila_ft.model.loss as modeling

    model, processor = load_tuned(assets, "tune.llm=full")
    batch = batch_of(processor)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    plain, plain_grads = loss_and_grads(model, lambda: model(**batch, **kwargs).loss)
    assert model(**batch).logits is not None  # CPU: the label-only path, logits kept
    monkeypatch.setattr(modeling, "fused_linear_cross_entropy", lambda head, hidden: torch_flce)
    out = model(**batch, **kwargs)
    assert out.logits is None
    fused, fused_grads = loss_and_grads(model, lambda: model(**batch, **kwargs).loss)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need CUDA (Triton)")
def test_liger_kernel_matches_the_label_only_loss_on_gpu(assets):
    pytest.importorskip("liger_kernel.transformers.functional")
    from nvila_ft.model.loss import fused_linear_cross_entropy

    head = torch.nn.Linear(64, 1000, bias=False).cuda()
    hidden = torch.randn(37, 64, device="cuda")
    target = torch.randint(0, 1000, (37,), device="cuda")
    target[::5] = IGNORE_INDEX
    fused = fused_linear_cross_entropy(head, hidden)
    assert fused is not None
    torch.testing.assert_close(fused(hidden, head.weight, target, None, reduction="mean"),
                               torch_flce(hidden, head.weight, target), rtol=1e-5, atol=1e-6)
