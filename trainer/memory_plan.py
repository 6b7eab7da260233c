"""`train.gradient_checkpointing: auto`: how many blocks to keep, offload and checkpoint, from memory measured on the
GPU the run trains on.

Keeping a block's activations is fastest, offloading a few blocks is as fast (their copies hide behind the compute
while the host link keeps up), and checkpointing costs a second forward of the block. What a kept block costs depends
on the model, the tokens, the LoRA targets, the compiler's partitioning and the card, so it is measured, not
estimated: two forward and backward passes on the largest batch of the data set, one with every block checkpointed
(peak `base`) and one with `PROBE_BLOCKS` blocks kept. The peak of a step is then close to

    base + (held - 1) * per_block        (or base, when no block's activations are held)

where `held` is the most blocks whose activations are on the GPU at once (`blocks_held`): the kept blocks whose
backward has not run yet, and the offloaded blocks brought back ahead of theirs. The "- 1": with every block
checkpointed, the peak already holds one block's activations, recomputed in the backward of the last block; a first
kept block takes that place, as the recomputation comes after its memory is freed. So the probe with k blocks kept
measures k - 1 blocks.

On the full-size LTX-2.3 at 6144 video tokens (docs/benchmarks.md) the probes measure 43.1 GiB with every block
checkpointed and 0.747 GiB for each kept block after the first (8 kept; with 4 kept the figure was 0.735 or 0.755 from
run to run). With 4 kept, the plans on the GPU predicted 78.6 GiB for all 48 blocks kept (measured 78.6), 69.5 for 36
kept and 12 offloaded (69.1), 59.7 for 23 kept, 24 offloaded and 1 checkpointed (59.1) on an H200, and 71.0 for 38
kept and 10 offloaded (70.7) on an H100. With 8 kept on an H200: 59.6 for 23 kept, 24 offloaded and 1 checkpointed
(59.1), and with fp8 base Linears (base 26.2 GiB) 59.8 for 46 kept and 2 offloaded (60.1: the one case below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.offload import LOOKAHEAD, offloaded_blocks
from trainer.performance import checkpoint_blocks

# Blocks kept in the second probe: the plan multiplies a block's cost by up to 47, so it is measured over seven blocks'
# worth (with four kept, the H200 measured 0.735 or 0.755 GiB a block from run to run); few enough to fit where
# checkpointing every block fits with 5.3 GiB of room (LTX-2.3 at 6144 tokens).
PROBE_BLOCKS = 8
# Offloaded blocks spread over the stack cost almost nothing up to half of them (H200: 12 of 48 offloaded 0.992 s, 24
# 0.996 s, against 0.978 s keeping all; checkpointing costs about 8 ms a block). Beyond that they come back too close
# together for the host link.
OFFLOAD_SHARE = 0.5
# Of the GPU's memory, the default budget for the allocated peak: the rest is the allocator's reserve (measured up to
# 4.6 GiB above the allocated peak), the CUDA context and the communication buffers.
DEFAULT_BUDGET_SHARE = 0.9
# At most this share of the host memory available when planning goes to pinned activations.
HOST_SHARE = 0.5


@dataclass(frozen=True)
class MemoryPlan:
    """The first `checkpointed` blocks are checkpointed; `offloaded` of the others, spread among them, are
    offloaded; the rest are kept (trainer.performance.checkpoint_blocks)."""

    checkpointed: int
    offloaded: int
    kept: int
    predicted_peak: int  # bytes allocated

    def describe(self) -> str:
        return (f"{self.kept} blocks kept, {self.offloaded} offloaded, {self.checkpointed} checkpointed "
                f"(predicted peak {self.predicted_peak / 2**30:.1f} GiB)")


def plan_blocks(blocks: int, base: int, per_block: int | None, budget: int, can_offload: bool = True,
                host_available: int | None = None) -> MemoryPlan:
    """The fastest split of `blocks` blocks whose predicted peak stays within `budget` bytes: as many kept as fit, of
    the rest up to `OFFLOAD_SHARE` of all blocks offloaded (when `can_offload`, within `HOST_SHARE` of
    `host_available` bytes of host memory, and as long as those brought back fit), the others checkpointed. `base` is
    the peak with every block checkpointed, `per_block` what each kept block after the first adds (None: unknown, as
    keeping blocks ran out of memory). When not even `base` fits, every block is checkpointed (the caller warns)."""
    if per_block is None or budget < base:
        return MemoryPlan(checkpointed=blocks, offloaded=0, kept=0, predicted_peak=base)
    slots = blocks if per_block <= 0 else (budget - base) // per_block + 1  # blocks' activations the peak can hold
    kept = min(blocks, slots)
    offloaded = 0
    if can_offload:
        offloaded = min(blocks - kept, math.floor(blocks * OFFLOAD_SHARE))
        if host_available is not None and per_block > 0:
            offloaded = min(offloaded, int(host_available * HOST_SHARE) // per_block)
    held = blocks_held(blocks, blocks - kept - offloaded, offloaded)
    while held > slots:  # the offloaded blocks brought back would not fit beside the kept ones
        offloaded -= 1
        held = blocks_held(blocks, blocks - kept - offloaded, offloaded)
    return MemoryPlan(checkpointed=blocks - kept - offloaded, offloaded=offloaded, kept=kept,
                      predicted_peak=base + max(0, held - 1) * per_block)


def blocks_held(blocks: int, checkpointed: int, offloaded: int) -> int:
    """The most blocks whose activations are on the GPU at once during a step split as `checkpoint_blocks` splits it:
    the peak comes in the backward (which runs from the last block to the first), when block i's backward runs with
    the kept blocks up to i still holding theirs, the offloaded blocks among the `LOOKAHEAD` before i already brought
    back (and i itself), or i's recomputed activations if it is checkpointed."""
    away = offloaded_blocks(checkpointed, offloaded, blocks)
    kept_up_to = 0
    held = 0
    for i in range(blocks):
        kept_up_to += checkpointed <= i and i not in away
        back = sum(1 for j in away if i - LOOKAHEAD <= j <= i)
        held = max(held, kept_up_to + back + (i < checkpointed))
    return held


def memory_budget(device: torch.device, limit_gib: float | None = None) -> int:
    """The bytes a plan may fill: `limit_gib` when given, else `DEFAULT_BUDGET_SHARE` of the GPU's memory."""
    if limit_gib:
        return int(limit_gib * 2**30)
    return int(torch.cuda.get_device_properties(device).total_memory * DEFAULT_BUDGET_SHARE)


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """AdamW's two fp32 moments of every trainable value (of this process's shards under FSDP): they appear at the
    first optimizer step, after the probes, and are added to what the probes measured."""
    return 2 * 4 * sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                       for p in model.parameters() if p.requires_grad)


def measure_block_memory(model: torch.nn.Module, probe_step: Callable[[], None],
                         device: torch.device) -> tuple[int, int | None]:
    """(peak bytes of `probe_step` with every block checkpointed, bytes each further kept block adds), from two runs
    of `probe_step`: a forward and backward that leaves no gradients behind, even when it fails. The second is None
    when keeping `PROBE_BLOCKS` blocks ran out of memory (then no block can be kept), or for a model of one block.
    Leaves every block checkpointed."""
    blocks = len(model.transformer_blocks)
    probed = min(PROBE_BLOCKS, blocks)
    checkpoint_blocks(model, blocks)
    torch.cuda.reset_peak_memory_stats(device)
    probe_step()
    base = torch.cuda.max_memory_allocated(device)
    if probed < 2:
        return base, None
    checkpoint_blocks(model, blocks - probed)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        probe_step()
        per_block = max(0, torch.cuda.max_memory_allocated(device) - base) // (probed - 1)
    except torch.cuda.OutOfMemoryError:
        per_block = None
        torch.cuda.empty_cache()
    checkpoint_blocks(model, blocks)
    return base, per_block
