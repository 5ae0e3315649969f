"""The vision tower runs only the layers NVILA reads: `hidden_states[mm_vision_select_layer]` (-2), exactly.

`vision_features` stops after the selected SigLIP layer; the last layer and `post_layernorm` (whose output the
official model discards) are never called, yet stay in the model and its checkpoints.
"""

from __future__ import annotations

import pytest
import torch

from nvila_ft.demo.tiny import build_tiny_checkpoint
from nvila_ft.model.configuration import vision_layers_run
from nvila_ft.model.modeling import NvilaForConditionalGeneration

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("layers") / "tiny-nvila", variant="nvila", seed=0)
    return NvilaForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32)


def tiles(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 448, 448, generator=torch.Generator().manual_seed(0))


def test_layers_run_for_the_select_layer():
    assert vision_layers_run(27, -2) == 26  # SigLIP so400m, NVILA's -2
    assert vision_layers_run(27, -1) == 27 and vision_layers_run(27, 0) == 0 and vision_layers_run(4, 3) == 3
    with pytest.raises(ValueError, match="mm_vision_select_layer -29"):
        vision_layers_run(27, -29)


def test_features_equal_the_full_forward_and_skip_the_last_layer(model):
    tower = model.vision_tower
    layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
    post = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.vision_model.post_layernorm
    calls = {"last": 0, "post": 0}
    hooks = [layers[-1].register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1)),
             post.register_forward_hook(lambda *_: calls.__setitem__("post", calls["post"] + 1))]
    try:
        x = tiles()
        with torch.no_grad():
            feats = model.vision_features(x)
            assert calls == {"last": 0, "post": 0}
            full = tower(x, output_hidden_states=True).hidden_states[model.config.mm_vision_select_layer]
        assert calls == {"last": 1, "post": 1}  # the hooks do fire when the layer runs
    finally:
        for h in hooks:
            h.remove()
    assert feats.shape == full.shape and torch.equal(feats, full)
    names = set(model.state_dict())  # nothing was deleted: save, merge and checkpoints keep every layer
    assert any(f"encoder.layers.{len(layers) - 1}." in n for n in names) and any("post_layernorm" in n for n in names)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_gradient_checkpointing_still_applies_per_layer(model):
    """With the tower's gradient checkpointing on, the forward keeps far fewer tensors and gives the same grads."""
    x = tiles(1)
    grads, saved = {}, {}
    for gc in (False, True):
        model.train()
        model.vision_tower.requires_grad_(False)
        norms = [p for n, p in model.vision_tower.named_parameters() if "layer_norm" in n]
        for p in norms:
            p.requires_grad_(True)
            p.grad = None
        if gc:
            model.gradient_checkpointing_enable(parts=("vision_tower",))
        feats, saved[gc] = _saved_bytes(lambda: model.vision_features(x))
        feats.square().mean().backward()
        assert [p.grad is None for p in norms].count(True) == 4  # the skipped layer's two LayerNorms
        grads[gc] = [p.grad.clone() for p in norms if p.grad is not None]
    model.vision_tower.gradient_checkpointing_disable()
    model.eval().requires_grad_(False)
    assert saved[True] < saved[False] / 3 and grads[True]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
