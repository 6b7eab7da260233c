"""Activation offload: chosen transformer blocks keep their saved activations in pinned host memory, not on the GPU.

A block that is neither checkpointed nor offloaded keeps about 0.76 GiB on the GPU from its forward until its backward
(full-size LTX-2.3, 6144 video tokens, compiled). Checkpointing a block frees that for a second forward of the block
(about 8 ms); offloading frees it for two copies over the host link, which run on a side stream beside the compute and
cost no GPU time while the link keeps up.

Forward: each large tensor an offloaded block saves for its backward is copied to pinned host memory on the side
stream; its GPU memory is released once that copy has run. Backward: when the backward reaches block j (the gradient of
its output exists), the offloaded blocks among the `LOOKAHEAD` blocks before it are copied back, so their tensors are
on the GPU when their backward starts. The offloaded blocks are spread evenly over the stack (`offloaded_blocks`), not
taken in a row: each copy back then has the backward of the blocks kept between two offloaded ones to hide behind.
Twelve offloaded blocks in a row had to come back during the last 16 blocks' backward, about 9 GiB in 0.2 s, as much
as the host link carries (55 GB/s measured): the step took 1.013 s against 0.978 s keeping everything on an H200.
Spread, 12 offloaded blocks take 0.991 s and 24 take 0.996 s (docs/benchmarks.md).

On the CPU (tests) the same path runs with plain copies and no streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

# Blocks whose offloaded activations are brought back ahead of their backward: 4 blocks of backward (about 50 ms on
# the full-size model) cover the copy of one block even on a slower link.
LOOKAHEAD = 4


def offloaded_blocks(first: int, count: int, total: int) -> set[int]:
    """The indexes of `count` offloaded blocks among blocks `first` to `total - 1`: evenly spaced, and where there is
    room none of the last `LOOKAHEAD` blocks, whose backward comes first and leaves no time to bring anything back."""
    count = max(0, min(count, total - first))
    span = max(total - LOOKAHEAD - first, count)
    return {first + i * span // count for i in range(count)}


@dataclass
class _Offloaded:
    """One saved tensor, now in host memory; `on_device` holds it again once it has been brought back."""

    host: torch.Tensor
    device: torch.device
    on_device: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


class ActivationOffload:
    """Runs the model's transformer blocks, offloading the saved activations of `offloaded` (a set of block indexes).

    `min_bytes`: smaller tensors stay where they are (a copy's fixed cost outweighs what it frees)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], offloaded: set[int], min_bytes: int = 1 << 20):
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.offloaded = offloaded
        self.min_bytes = min_bytes
        self.pending: dict[int, list[_Offloaded]] = {}  # per block: tensors in host memory, not yet brought back
        self.offloaded_bytes = 0  # in the last forward (for tests)
        self._stream: torch.cuda.Stream | None = None

    def run(self, block: torch.nn.Module, *args):
        """Runs one block of the forward (with gradients): with its saved tensors offloaded if it was chosen, and
        with a hook that brings earlier offloaded blocks back when the backward reaches it."""
        index = self.index[id(block)]
        if index == min(self.offloaded):  # a new forward
            self.offloaded_bytes = 0
        if index in self.offloaded:
            self.pending[index] = []
            hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, index), self._unpack)
        else:
            hooks = nullcontext()
        with hooks:
            outputs = block(*args)
        if any(i in self.offloaded for i in range(index - LOOKAHEAD, index)) and outputs[0].requires_grad:
            outputs[0].register_hook(self._prefetch_before(index))
        return outputs

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor, index: int):
        if isinstance(tensor, torch.nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        if tensor.device.type == "cuda":
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is reused only after the copy has run
        else:
            host = tensor.clone()
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        saved = _Offloaded(host, tensor.device)
        self.pending[index].append(saved)
        return saved

    def _unpack(self, saved):
        if not isinstance(saved, _Offloaded):
            return saved
        if saved.on_device is None:  # not brought back ahead of time (the last blocks' backward comes first)
            self._bring_back(saved)
        tensor, saved.on_device = saved.on_device, None
        if saved.ready is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        return tensor

    def _bring_back(self, saved: _Offloaded) -> None:
        if saved.device.type != "cuda":
            saved.on_device = saved.host.clone()
            return
        on_device = torch.empty_like(saved.host, device=saved.device)
        stream = self._side_stream(saved.device)
        stream.wait_stream(torch.cuda.current_stream(saved.device))  # its memory is free on the compute stream
        with torch.cuda.stream(stream):
            on_device.copy_(saved.host, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(stream)
        saved.on_device = on_device

    def _prefetch_before(self, index: int) -> Callable[[torch.Tensor], None]:
        def prefetch(grad: torch.Tensor) -> None:
            for earlier in range(index - 1, index - 1 - LOOKAHEAD, -1):
                for saved in self.pending.pop(earlier, []):
                    if saved.on_device is None:
                        self._bring_back(saved)

        return prefetch
