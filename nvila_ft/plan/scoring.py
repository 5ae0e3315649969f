"""Memory of DeltaLoss scoring (`python -m nvila_ft.prune`): inference only, one model at a time.

    python -m nvila_ft.prune recipes/medical.yaml --small Efficient-Large-Model/NVILA-Lite-2B \\
        --large Efficient-Large-Model/NVILA-8B --plan          # prints this plan, loads no weight

Scoring runs the small model over the split, then the large one, so its peak is the larger model's: weights in
the scoring dtype (no gradients, no optimizer, no LoRA) plus one forward's working set for the recipe's worst-case
sample (`nvila_ft.plan.memory`'s samples) times the batch. All sizes are bytes.
"""

from __future__ import annotations

from types import SimpleNamespace

from nvila_ft.model.checkpoint import DTYPES
from nvila_ft.model.media import MediaConfig
from nvila_ft.plan.memory import (
    CUDA_ALLOWANCE,
    DTYPE_BYTES,
    Sample,
    checkpoint_config,
    image_samples,
    meta_model,
    parameter_rows,
    text_sample,
    video_sample,
)
from nvila_ft.plan.report import MemoryPlan, Term
from nvila_ft.train.tuning import used_vision_layers


def plan_scoring(recipe, model_path: str, batch_size: int = 8, dtype: str = "bfloat16",
                 gpu_memory_gb: float | None = None, label_tokens: int | None = None) -> MemoryPlan:
    """Predicted peak GPU memory of scoring the recipe's data with one model (forward only, no_grad).

    Terms: weights (every parameter in `dtype`); vision tower: the running hidden state, one layer's output and
    one layer's working set (q, k, v, MLP): `vision_features` runs the layers up to NVILA's layer -2 one by one
    and keeps no list of hidden states; the LLM: the
    residual stream plus one decoder layer's working set, `(2h + 3f)` values per token (Qwen2 MLP: gate, up,
    act); the answer logits: only answer positions go through `lm_head` (`nvila_ft.prune.answer_logprobs`),
    kept in `dtype`, upcast to fp32 and log-softmaxed in fp32 (`dtype + 8` bytes per entry); the CUDA
    allowance. The worst sample is the recipe's (every tile count, text only, the video sample).

    Args:
        recipe: a :class:`~nvila_ft.train.recipe.Recipe` (data.max_length, tiling, video settings).
        model_path: checkpoint folder or hub id (shipped configs need no network); for a tuned run, its base.
        batch_size: samples per forward pass (`--batch-size`).
        dtype: weights and activations dtype.
        gpu_memory_gb: budget in GiB to judge against (None: no verdict).
        label_tokens: answer tokens per sample; None = every text token of the sample (the bound).

    Raises:
        FileNotFoundError: the checkpoint config cannot be found.
    """
    config, tok_len, source = checkpoint_config(model_path)
    model = meta_model(config, tok_len, DTYPES[dtype])
    model.requires_grad_(False)
    like = SimpleNamespace(model=SimpleNamespace(dtype=dtype), tune=SimpleNamespace(llm="frozen"))
    rows = parameter_rows(model, like, "no")
    act = DTYPE_BYTES[dtype]
    d = recipe.data
    n_end = len(config.end_token_ids or [198])
    media = MediaConfig.from_recipe(config, recipe)  # the run's one media config, as training resolves it
    samples = [*image_samples(media, n_end), text_sample(d.max_length)]
    if media.num_video_frames:
        samples.append(video_sample(media, n_end))
    tc, vc = model.llm.config, model.vision_tower.config
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    v_layers = used_vision_layers(model)

    def sample_terms(s: Sample) -> list[Term]:
        n_vis = batch_size * s.vision_tiles * (vc.image_size // vc.patch_size) ** 2
        n_llm = batch_size * s.llm_tokens
        text = s.llm_tokens - s.media_tokens
        n_label = batch_size * (text if label_tokens is None else min(label_tokens, text))
        vision = act * n_vis * (2 * vc.hidden_size + 4 * vc.hidden_size + vc.intermediate_size)
        llm = act * n_llm * (tc.hidden_size + 2 * tc.hidden_size + 3 * tc.intermediate_size)
        logits = (act + 8) * n_label * vocab
        return [Term("activations", "vision_tower", vision, f"1 of {v_layers} layers at a time x {n_vis} tokens"),
                Term("activations", "llm", llm, f"residual + 1 layer working set x {n_llm} tokens"),
                Term("transient", "answer logits", logits, f"{n_label} answer tokens ({'all the text' if label_tokens is None else 'given'}) x {vocab} vocab")]

    sample, worst = max(((s, sample_terms(s)) for s in samples), key=lambda x: sum(t.bytes for t in x[1]))
    terms = [Term("weights", f"{p.part} {p.kind}", p.bytes, f"{p.count / 1e9:.3f}B params") for p in rows]
    terms += worst
    terms.append(Term("cuda", "context + allocator allowance", CUDA_ALLOWANCE, "fixed"))
    budget = None if gpu_memory_gb is None else int(gpu_memory_gb * 2**30)
    return MemoryPlan(model=model_path, source=source, tune={"scoring": "inference only", "dtype": dtype},
                      sample=sample, batch_size=batch_size, parameters=rows, terms=terms, budget_bytes=budget)


def plan_scoring_pair(recipe, small: str, large: str, batch_size: int = 8, dtype: str = "bfloat16",
                      gpu_memory_gb: float | None = None, label_tokens: int | None = None) -> MemoryPlan:
    """The plan of the model with the larger peak: scoring's peak, as the two models never share the GPU."""
    plans = [plan_scoring(recipe, p, batch_size, dtype, gpu_memory_gb, label_tokens) for p in (small, large)]
    return max(plans, key=lambda p: p.total)
