"""The switches that make a training step fast, each one on or off so it can be compared with the plain model:
compiled transformer blocks, activation checkpointing of chosen blocks, and the compiler's activation memory budget
(recompute only the cheapest parts of a block instead of the whole block).

Activation checkpointing trades memory for a second forward pass of every checkpointed block; on the full-size model
that is about a third of the step. Compiled blocks that are not checkpointed keep what their backward needs, and under
a memory budget the compiler's partitioner chooses what to recompute, cheapest first (norms, modulation, activations)
before any matrix product, so a budget between the two costs much less than checkpointing a whole block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model: torch.nn.Module, blocks: int) -> None:
    """Checkpoint the first `blocks` transformer blocks (all of them when `blocks` >= their number, none at 0).

    The first blocks are chosen because their activations live longest (until the end of the backward pass)."""
    if blocks <= 0:
        model.disable_gradient_checkpointing()
        return
    chosen = {id(block) for block in list(model.transformer_blocks)[:blocks]}

    def run(block, *args):
        if id(block) in chosen:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=run)


def compile_blocks(model: torch.nn.Module, activation_memory_budget: float = 1.0, backend: str = "inductor") -> None:
    """torch.compile each transformer block (one compiled graph serves all of them). With a budget under 1, the
    compiler keeps at most about that fraction of a block's activations for the backward and recomputes the rest.
    (`backend="aot_eager"` partitions forward and backward the same way without generating code: for tests.)"""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = activation_memory_budget
    model.compile_repeated_blocks(fullgraph=True, backend=backend)


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
