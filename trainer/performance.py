"""The switches that make a training step fast, each one on or off so it can be compared with the plain model:
compiled transformer blocks, activation checkpointing of chosen blocks, activation offload of chosen blocks to host
memory, and the compiler's activation memory budget (recompute only the cheapest parts of a block instead of the whole
block).

Activation checkpointing trades memory for a second forward pass of every checkpointed block; on the full-size model
that is about a third of the step. Compiled blocks that are not checkpointed keep only what their backward cannot
recompute cheaply: the compiler's partitioner runs with aggressive recomputation, so norms, modulation, RoPE and
activation functions are recomputed inside the backward's fused kernels while matrix products and attention are
kept. On the full-size model that halves a block's kept activations (1.6 to 0.85 GiB at 6144 video tokens) at the
same step time (docs/benchmarks.md). Under a memory budget below 1 the partitioner recomputes more, cheapest first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from trainer.offload import ActivationOffload, offloaded_blocks


def checkpoint_blocks(model: torch.nn.Module, blocks: int, offloaded: int = 0) -> ActivationOffload | None:
    """Checkpoint the first `blocks` transformer blocks (all of them when `blocks` >= their number, none at 0), and
    keep the saved activations of `offloaded` of the blocks after them, spread among them, in pinned host memory
    (trainer/offload.py).

    The first blocks are checkpointed because a checkpointed block costs the same wherever it is, while the blocks
    after them are where offloaded copies have time to move. Returns the offload, if any (it counts what it moved)."""
    every = list(model.transformer_blocks)
    chosen = {id(block) for block in every[:blocks]}
    offload = None
    if offloaded > 0 and blocks < len(every):
        offload = ActivationOffload(every, offloaded_blocks(max(blocks, 0), offloaded, len(every)))
    if not chosen and offload is None:
        model.disable_gradient_checkpointing()
        return None

    def run(block, *args):
        if id(block) in chosen:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        if offload is not None:
            return offload.run(block, *args)
        return block(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=run)
    return offload


def recompute_feedforward(model: torch.nn.Module, blocks: int, after: int = 0) -> None:
    """The video feed-forward of `blocks` blocks, those after the first `after` (the ones checkpointed whole), keeps
    only its input: its [tokens, 4 x dim] hidden activation (the largest tensor a block keeps, a fifth of its
    activations) is recomputed in the backward from that input, at the cost of one more up-projection product.
    Cheaper per GiB saved than checkpointing whole blocks. The module tree, and so every LoRA key, stays the same:
    only the feed-forward's `forward` is wrapped."""
    for block in list(model.transformer_blocks)[after:after + blocks]:
        feedforward = block.ff
        forward = feedforward.forward
        feedforward.forward = lambda x, *args, forward=forward, **kwargs: checkpoint(
            forward, x, *args, use_reentrant=False, **kwargs)


def compile_blocks(model: torch.nn.Module, activation_memory_budget: float = 1.0, backend: str = "inductor",
                   aggressive_recomputation: bool = True, cuda_graphs: bool = False) -> None:
    """torch.compile each transformer block (one compiled graph serves all of them). With a budget under 1, the
    compiler keeps at most about that fraction of a block's activations for the backward and recomputes the rest.
    `aggressive_recomputation` lets the partitioner recompute every cheap elementwise op in the backward instead of
    keeping its output (matrix products and attention are still kept). `cuda_graphs` replays each block's kernels
    as a CUDA graph (inductor's "reduce-overhead" mode) instead of launching them one by one from Python: measured
    only (1% faster on the full-size model, more memory reserved, and it fails with checkpointed blocks).
    (`backend="aot_eager"` partitions forward and backward the same way without generating code: for tests.)"""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = activation_memory_budget
    functorch_config.aggressive_recomputation = aggressive_recomputation
    functorch_config.is_non_builtin_to_include = True  # never recompute our Triton attention (a custom op)
    _keep_attention_outputs()
    options = {"mode": "reduce-overhead"} if cuda_graphs else {}
    model.compile_repeated_blocks(fullgraph=True, backend=backend, **options)


def _keep_attention_outputs() -> None:
    """The partitioner never recomputes the "compute intensive" ops it lists, but its list (torch 2.11 to 2.14) lacks
    the cuDNN and CPU flash attention that SDPA dispatches to: under aggressive recomputation the backward would run
    each attention's forward a second time. Adds them to the list the partitioner builds."""
    from torch._functorch import partitioners

    if getattr(partitioners.get_default_op_list, "keeps_attention", False):
        return
    build = partitioners.get_default_op_list
    attention = [getattr(torch.ops.aten, name) for name in
                 ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")]

    def op_list():
        ops = build()
        ops.compute_intensive_ops.update(attention)
        return ops

    op_list.keeps_attention = True
    partitioners.get_default_op_list = op_list


@contextmanager
def eager_blocks(model: torch.nn.Module) -> Iterator[None]:
    """Runs compiled blocks eagerly inside the `with`: sampling calls them with inputs the training graph was not
    made for (a guidance batch, spatio-temporal guidance's data-dependent branch, which a full graph cannot hold).
    `Module.compile` keeps the compiled call in `_compiled_call_impl`; it is set aside and put back."""
    compiled = {block: block._compiled_call_impl for block in model.transformer_blocks
                if getattr(block, "_compiled_call_impl", None) is not None}
    for block in compiled:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, call in compiled.items():
            block._compiled_call_impl = call
