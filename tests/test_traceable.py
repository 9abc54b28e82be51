"""DualCopy under tracers: torch.export, torch.compile(fullgraph=True) and torch.jit.trace give eager's results.

Export and jit.trace run in eval mode (what an ONNX or TorchScript file serves); compile runs a training step
(forward, cross-entropy, backward) with S running and with gates from the mask cache. Compile checks use the
"aot_eager" backend: it traces forward and backward exactly as inductor does, without inductor's minutes of
C++ compilation on a small CPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomise_bn
from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.runtime import maskcache
from fedsq_app.runtime.models import build_model

CASES = {  # name -> (build kwargs, one sample's shape); AlexNet needs at least 63 px
    "smallcnn": ({"in_channels": 1}, (1, 28, 28)),
    "resnet18": ({"small_stem": True}, (3, 32, 32)),
    "alexnet": ({}, (3, 64, 64)),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs or recompile limits carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dual_and_batch(name: str) -> tuple[DualCopy, torch.Tensor, torch.Tensor]:
    kwargs, shape = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, 10, **kwargs)
    randomise_bn(model)  # eval BN is then not a no-op, so S's masks depend on its statistics
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=generator)
    y = torch.randint(0, 10, (2,), generator=generator)
    return DualCopy(model), x, y


def _cache_gates(dual: DualCopy, x: torch.Tensor) -> list[torch.Tensor]:
    """Gates as the training loop gets them once the mask cache is filled: 0/1 float masks unpacked into
    the cache's own buffers."""
    cache = maskcache.MaskCache(len(x), max_bytes=2**30)
    indices = torch.arange(len(x))
    cache.gates(dual, x, indices)  # first epoch: S runs, its masks are packed
    gates = cache.gates(dual, x, indices)
    assert cache.hits == 1 and all(g.dtype == torch.float32 for g in gates)
    return gates


def _loss(dual: DualCopy):
    return lambda x, y, gates=None: F.cross_entropy(dual(x, gates=gates), y)


@pytest.mark.parametrize("name", CASES)
def test_export_equals_eager_with_s_and_q_in_one_graph(name):
    dual, x, _ = _dual_and_batch(name)
    dual.eval()
    program = torch.export.export(dual, (x,))
    with torch.no_grad():
        assert (program.module()(x) - dual(x)).abs().max() <= 1e-5
    gates = len(dual.structural_activations(x))
    # One gate op per ReLU call, computed inside the program from S's weights (inputs of the same graph).
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.aten.threshold_backward.default) == gates
    assert {p.split(".")[0] for p in program.graph_signature.parameters} == {"structural", "quantitative"}
    # What ONNX export translates: one flat graph, S's ReLUs inlined next to Q's gates.
    flat = program.run_decompositions()
    assert not list(flat.graph_module.named_children())
    assert [n.target for n in flat.graph.nodes].count(torch.ops.aten.relu.default) == gates


@pytest.mark.parametrize("name", CASES)
def test_forward_and_loss_trace_into_one_graph(name):
    dual, x, y = _dual_and_batch(name)
    dual.train()
    for gates in (None, _cache_gates(dual, x)):
        explained = torch._dynamo.explain(_loss(dual))(x, y, gates)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_every_kind_of_gate_traces_into_one_graph():
    dual, x, y = _dual_and_batch("smallcnn")
    dual.train()
    for gates in (dual.masks(x), dual.structural_activations(x)):  # bool masks; S's own activations
        explained = torch._dynamo.explain(_loss(dual))(x, y, gates)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("cached", [False, True], ids=["s-runs", "mask-cache"])
def test_compiled_training_step_equals_eager(cached):
    dual, x, y = _dual_and_batch("smallcnn")
    twin = copy.deepcopy(dual)
    gates = _cache_gates(dual, x) if cached else None
    compiled = torch.compile(_loss(twin), fullgraph=True, backend="aot_eager")
    losses, grads = [], []
    for model, loss_fn in ((dual, _loss(dual)), (twin, compiled)):
        model.train()
        loss = loss_fn(x, y, gates)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.quantitative.parameters()])
    assert (losses[0] - losses[1]).abs() <= 1e-5
    assert all(g is not None and (g - h).abs().max() <= 1e-5 for g, h in zip(*grads))
    assert all(p.grad is None for p in twin.structural.parameters())  # S stays frozen when compiled
    # Q's BN statistics moved the same way; S's did not move.
    for a, b in zip(dual.quantitative.buffers(), twin.quantitative.buffers()):
        assert (a.float() - b.float()).abs().max() <= 1e-5
    for a, b in zip(dual.structural.buffers(), twin.structural.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["smallcnn", "alexnet"])
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # deprecated; shape check
def test_jit_trace_equals_eager(name):
    """On a DualCopy that never ran: the trace must not record the fast graph's first build."""
    dual, x, _ = _dual_and_batch(name)
    dual.eval()
    with torch.no_grad():
        traced = torch.jit.trace(dual, (x,))
        assert (traced(x) - dual(x)).abs().max() <= 1e-5
