"""Every speed switch keeps the results: checkpointed and compiled blocks (with an activation memory budget) give the
tiny model the same loss and LoRA gradients as the plain one."""

import gc
import weakref

import pytest
import torch
import torch._functorch.config

from tiny_training import lora_model, step_inputs, train_step
from trainer.modes import compute_loss
from trainer.offload import _Offloaded
from trainer.performance import checkpoint_blocks, compile_blocks, recompute_feedforward


@pytest.fixture(scope="module")
def plain():
    return train_step(lora_model())


def _same(result, plain, tolerance):
    loss, grads = result
    torch.testing.assert_close(loss, plain[0], rtol=tolerance, atol=0)
    assert len(grads) == len(plain[1])
    for got, want in zip(grads, plain[1]):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_checkpointing_the_first_blocks_recomputes_exactly_those(plain):
    model = lora_model()
    checkpoint_blocks(model, 1)
    calls = [0] * len(model.transformer_blocks)
    for index, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    _same(train_step(model), plain, 1e-6)
    assert calls == [2, 1]  # block 0 ran again in the backward, block 1 kept its activations


def test_a_recomputed_feedforward_gives_the_same_loss_and_gradients(plain):
    model = lora_model()
    recompute_feedforward(model, 2)
    calls = []
    for block in model.transformer_blocks:
        block.ff.net[0].register_forward_pre_hook(lambda *_: calls.append(1))
    _same(train_step(model), plain, 1e-6)
    assert len(calls) == 4  # each block's up-projection ran again in the backward
    later = lora_model()
    recompute_feedforward(later, 5, after=1)  # only the blocks that exist after the first
    assert ["forward" in vars(block.ff) for block in later.transformer_blocks] == [False, True]
    assert {name for name, _ in model.named_parameters()} == {name for name, _ in lora_model().named_parameters()}


def _count_offloads(offload):
    """Records, per saved tensor, whether it went to host memory, and per unpack whether it was back already."""
    moved, early = [], []
    pack, unpack = offload._pack, offload._unpack

    def counting_pack(tensor, index):
        saved = pack(tensor, index)
        if saved is not tensor:
            moved.append(weakref.ref(tensor))
        return saved

    def counting_unpack(saved):
        if isinstance(saved, _Offloaded):
            early.append(saved.on_device is not None)
        return unpack(saved)

    offload._pack, offload._unpack = counting_pack, counting_unpack
    offload.min_bytes = 0  # the tiny model's tensors are all small
    return moved, early


def test_offloaded_blocks_free_their_saved_tensors_and_get_them_back_ahead_of_their_backward(plain):
    model = lora_model()
    offload = checkpoint_blocks(model, 0, offloaded=1)
    assert offload.offloaded == {0}
    moved, early = _count_offloads(offload)
    loss, grads = train_step(model)
    _same((loss, grads), plain, 0)  # the same tensors come back
    assert moved and offload.offloaded_bytes > 0
    assert early and all(early)  # block 1's backward brought block 0's tensors back before they were needed
    assert offload.pending == {}
    first = offload.offloaded_bytes
    train_step(model)
    assert offload.offloaded_bytes == first  # counted per forward


def test_offloaded_tensors_leave_the_device_memory_during_the_forward():
    model = lora_model()
    offload = checkpoint_blocks(model, 0, offloaded=1)
    moved, _ = _count_offloads(offload)
    loss, _ = compute_loss(model, step_inputs(batch_size=1))
    gc.collect()
    assert moved and not [ref for ref in moved if ref() is not None]  # only the host copies are left
    loss.backward()


def test_offload_counts_only_blocks_that_exist_after_the_checkpointed_ones():
    model = lora_model()
    assert checkpoint_blocks(model, 1, offloaded=5).offloaded == {1}
    assert checkpoint_blocks(model, 2, offloaded=5) is None and model.gradient_checkpointing
    assert checkpoint_blocks(model, 0, offloaded=0) is None and not model.gradient_checkpointing


@pytest.mark.parametrize("checkpointed, budget, aggressive, feedforward, offloaded", [
    (0, 1.0, True, 0, 0), (0, 1.0, False, 0, 0), (0, 0.3, True, 0, 0), (2, 1.0, True, 0, 0), (0, 1.0, True, 2, 0),
    (0, 1.0, True, 0, 1), (1, 1.0, True, 1, 1)])
def test_compiled_blocks_give_the_same_loss_and_gradients(plain, checkpointed, budget, aggressive, feedforward,
                                                          offloaded):
    torch._dynamo.reset()
    model = lora_model()
    offload = checkpoint_blocks(model, checkpointed, offloaded)
    if offload:
        moved, early = _count_offloads(offload)
    recompute_feedforward(model, feedforward, after=checkpointed)
    compile_blocks(model, budget, backend="aot_eager", aggressive_recomputation=aggressive)
    try:
        _same(train_step(model), plain, 1e-5)
        if offload:
            assert moved and early
    finally:
        torch._functorch.config.activation_memory_budget = 1.0  # a global of the compiler


def _partition(aggressive=True, feedforward=False):
    """The forward and backward graphs the compiler makes of a block."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, gm)
            return gm
        return compiler

    torch._dynamo.reset()
    model = lora_model()
    if feedforward:
        recompute_feedforward(model, len(model.transformer_blocks))
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    compile_blocks(model, backend=backend, aggressive_recomputation=aggressive)
    train_step(model)
    return graphs


def _ops(graph):
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


def _products(graph):
    return sum(op in ("aten.mm.default", "aten.addmm.default") for op in _ops(graph))


def _saved_bytes(graph):
    outputs = next(node for node in graph.graph.nodes if node.op == "output").args[0]
    values = [node.meta["val"] for node in outputs if isinstance(node, torch.fx.Node) and "val" in node.meta]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def test_aggressive_recomputation_keeps_attention_and_matmul_outputs_for_the_backward():
    """The backward recomputes elementwise work only: no attention forward and no matrix product of the forward runs
    again (the partitioner's own list of ops it never recomputes lacks the attention SDPA runs on the CPU and cuDNN),
    and it keeps fewer activations than the default partition."""
    aggressive, default = _partition(True), _partition(False)
    attention = [op for op in _ops(aggressive["backward"]) if "scaled_dot_product" in op]
    assert attention and all("backward" in op for op in attention)
    assert _products(aggressive["backward"]) == _products(default["backward"]) and _products(aggressive["forward"])
    assert _saved_bytes(aggressive["forward"]) < _saved_bytes(default["forward"])


def test_a_recomputed_feedforward_keeps_less_for_one_more_up_projection():
    """Only the feed-forward's up-projection (its base product and the two rank-r LoRA products beside it, and the
    down-projection's rank-r LoRA input product) runs again: the down-projection's base product does not."""
    plain, recomputed = _partition(), _partition(feedforward=True)
    assert _products(recomputed["backward"]) - _products(plain["backward"]) == 4
    assert _saved_bytes(recomputed["forward"]) < _saved_bytes(plain["forward"])


def test_compiled_blocks_render_eagerly_for_sampling(tmp_path):
    """Sampling's spatio-temporal guidance branches on data, which a compiled full graph refuses: validation runs the
    blocks eagerly, and the compiled call is back afterwards."""
    from trainer.config import resolve
    from trainer.performance import eager_blocks
    from trainer.sample import Renderer

    cfg = resolve({"output_dir": str(tmp_path / "run"), "model": {"target": "tiny-ltx-2.3"},
                   "mode": "text-to-audio-video", "data": {"cache_dir": str(tmp_path / "cache")},
                   "validation": {"prompts": ["a red square"], "width": 64, "height": 64, "frames": 9,
                                  "num_inference_steps": 2}})
    renderer = Renderer(cfg, cfg.validation, torch.device("cpu"))
    plain = renderer.render(lora_model().eval(), 0)
    torch._dynamo.reset()
    model = lora_model().eval()
    compile_blocks(model, backend="aot_eager")
    with pytest.raises(Exception, match="all_perturbed|data-dependent|Data-dependent"):
        renderer.render(model, 0)
    with eager_blocks(model):
        assert all(block._compiled_call_impl is None for block in model.transformer_blocks)
        rendered = renderer.render(model, 0)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    assert (rendered.frames == plain.frames).all()
