"""Graph substitution passes on torch.fx graphs (view chains, permute chains, redundant contiguous, reshape after
permute), each proved on the graph's own symbols, never on the sizes of one example."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from fx_graph import (
    PERMUTE_OPS,
    VIEW_OPS,
    Prod,
    Size,
    alive,
    chain_goes_on,
    chain_of,
    escapes,
    graph_shape,
    key,
    module,
    mutation_free,
    op_params,
    permutation,
    replace,
    shape_of,
    shape_op,
)
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dsnas.errors import TrialError

# Why torch.fx.symbolic_trace and not torch.export: fx keeps every engine layer (EngineLinear and its inference
# forms) as one call to the live module, so the layer's Python state (fallbacks, converted backends) stays in charge
# at run time; its nodes are the Tensor methods the model wrote (x.view, x.transpose), and sizes stay graph values
# (x.shape[0] is a node), so a rewrite that keeps them is right for every batch size. torch.export gives a
# functionalized aten graph that inlines those layers with their state frozen at export time, and specializes every
# size not declared dynamic. The result here is a GraphModule that runs in eager mode and under torch.compile.

# Ops whose output is a freshly allocated contiguous tensor whatever the layout of their input.
_FRESH_FUNCTIONS = {F.layer_norm, F.embedding, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                    torch.rand, torch.randn, torch.randint, torch.tensor}
_FRESH_MODULES = (nn.LayerNorm, nn.Embedding)
# Consumers that make their input contiguous themselves (layer_norm's CPU and CUDA kernels start with
# X = input.expect_contiguous()), so a contiguous() just before them changes no bit and is seen by no one else.
_NORMALIZING_FUNCTIONS = {F.layer_norm}
_NORMALIZING_MODULES = (nn.LayerNorm,)


@runtime_checkable
class Pass(Protocol):
    """A graph rewrite: ``run`` changes ``gm.graph`` in place and returns how many rewrites it made."""

    name: str

    def run(self, gm: fx.GraphModule) -> int: ...


class Optimized(NamedTuple):
    """The optimized GraphModule (sharing the model's parameters) and the rewrites each pass made."""

    module: fx.GraphModule
    counts: dict[str, int]


# ---- the passes -------------------------------------------------------------------------------------------------


class ViewChains:
    """(1) view/reshape/flatten/unflatten chains whose intermediates have no other users -> one reshape."""

    name = "view_chains"

    def __init__(self) -> None:
        self.notes: list[str] = []

    def run(self, gm: fx.GraphModule) -> int:
        ok, why = mutation_free(gm)
        count = 0
        for node in list(gm.graph.nodes):
            if not alive(node) or shape_op(node) not in VIEW_OPS or chain_goes_on(node, VIEW_OPS):
                continue
            chain = chain_of(node, VIEW_OPS)
            if len(chain) < 2:
                continue
            # reshape/flatten may copy where one merged reshape views: exact only if nobody writes or sees it.
            may_copy = any(shape_op(c) in ("reshape", "flatten") for c in chain)
            if not ok or (may_copy and escapes(gm, node)):
                self.notes.append(f"view chain ending at {node.name} kept: {why or 'it reaches the output'}")
                continue
            shape = self._final_shape(chain)
            if shape is None:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_method("reshape", graph_shape(gm.graph, shape, chain[0].args[0]))
            replace(node, new)
            count += 1
        return count

    @staticmethod
    def _final_shape(chain: list[fx.Node]) -> Any:
        last = chain[-1]
        if shape_op(last) in ("view", "reshape"):
            return op_params(last, shape_op(last))["shape"]  # numel is the chain's, so a -1 infers the same size
        shape = shape_of(last)
        if shape is None or any(isinstance(e, Size) and e.node in chain for e in _flat(shape)):
            return None  # only the removed intermediates know this shape
        return shape


def _flat(entries: list[Any]) -> list[Any]:
    return [f for e in entries for f in (_flat(list(e.factors)) if isinstance(e, Prod) else [e])]


class PermuteChains:
    """(2) transpose/permute chains -> one permute; a chain that composes to the identity (transpose(a, b) twice,
    a permute and its inverse) is dropped."""

    name = "permute_chains"

    def __init__(self) -> None:
        self.notes: list[str] = []

    def run(self, gm: fx.GraphModule) -> int:
        ok, why = mutation_free(gm)
        count = 0
        for node in list(gm.graph.nodes):
            if not alive(node) or shape_op(node) not in PERMUTE_OPS or chain_goes_on(node, PERMUTE_OPS):
                continue
            chain = chain_of(node, PERMUTE_OPS)
            src = chain[0].args[0]
            perm = self._compose(chain, src)
            if perm is None:
                continue
            if perm == list(range(len(perm))):
                # Returning the input instead of a view of it differs only to code that changes it in place.
                if not ok:
                    self.notes.append(f"identity permute at {node.name} kept: {why}")
                    continue
                replace(node, src)
            elif len(chain) > 1:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_method("permute", (src, *perm))
                replace(node, new)
            else:
                continue
            count += 1
        return count

    def _compose(self, chain: list[fx.Node], src: fx.Node) -> list[int] | None:
        """The chain's permutation; the rank comes from a permute's dims, else from the input's known rank."""
        dims = [len(op_params(c, "permute")["dims"]) for c in chain if shape_op(c) == "permute"]
        shape = shape_of(src)
        rank = dims[0] if dims else len(shape) if shape is not None else None
        if rank is None:
            self.notes.append(f"permute chain ending at {chain[-1].name} kept: rank unknown (pass example_inputs)")
            return None
        perm = list(range(rank))
        for node in chain:
            step = permutation(node, rank)
            if step is None:
                return None
            perm = [perm[i] for i in step]
        return perm


class RedundantContiguous:
    """(3) ``.contiguous()`` calls that provably change nothing.

    "Provably" means one of, read off the graph alone: (a) the input is contiguous for every input, because it
    comes from an op that returns a fresh contiguous tensor (another contiguous(), layer_norm, embedding, a
    factory) or a view/reshape of one, so contiguous() returns it unchanged; (b) every user makes its input
    contiguous itself (layer_norm), so the same bits come out and nobody else sees the copy; (c) the only user is a
    view/reshape: ``x.contiguous().view(s)`` is ``x.reshape(s)`` by definition of reshape (it copies exactly when a
    view is impossible), which is exact when no op writes in place and the result cannot reach the output.
    Contiguity seen on an example proves nothing: a transpose of a size-1 dim is contiguous only at that size.
    """

    name = "contiguous"

    def __init__(self) -> None:
        self.notes: list[str] = []

    def run(self, gm: fx.GraphModule) -> int:
        ok, why = mutation_free(gm)
        count = 0
        for node in list(gm.graph.nodes):
            if not alive(node) or shape_op(node) != "contiguous":
                continue
            src, users = node.args[0], list(node.users)
            if _known_contiguous(gm, src) or (users and all(_normalizes(gm, u, node) for u in users)):
                replace(node, src)
                count += 1
            elif len(users) == 1 and shape_op(users[0]) in ("view", "reshape") and users[0].args[0] is node and \
                    node not in users[0].args[1:]:
                view = users[0]
                if not ok or escapes(gm, view):
                    self.notes.append(f"contiguous at {node.name} kept: {why or 'its view reaches the output'}")
                    continue
                with gm.graph.inserting_before(view):
                    new = gm.graph.call_method("reshape", graph_shape(
                        gm.graph, op_params(view, shape_op(view))["shape"], src))
                replace(view, new)
                count += 1
        return count


def _known_contiguous(gm: fx.GraphModule, node: Any) -> bool:
    op = shape_op(node)
    if op == "contiguous":
        return True
    if op in VIEW_OPS:  # a view or reshape of a contiguous tensor is a contiguous view of it
        return _known_contiguous(gm, node.args[0])
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS and "memory_format" not in node.kwargs
    return node.op == "call_module" and type(module(gm, node)) in _FRESH_MODULES  # exact types: subclasses vary


def _normalizes(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads ``node`` only as the input it makes contiguous itself."""
    others = [*user.args[1:], *user.kwargs.values()]
    if user.args[:1] != (node,) or any(a is node for a in others):
        return False
    if user.op == "call_function":
        return user.target in _NORMALIZING_FUNCTIONS
    return user.op == "call_module" and type(module(gm, user)) in _NORMALIZING_MODULES and len(user.args) == 1


class ReshapeToPermute:
    """(4) a view/reshape after a transpose/permute whose target is, symbolically, the permuted shape itself: the
    reshape is then a no-op view and the pair is the permute alone. A target that only equals that shape for the
    example's sizes (two equal dims) is not rewritten: x.transpose(1, 2).reshape(x.shape) reorders data in general."""

    name = "reshape_to_permute"

    def __init__(self) -> None:
        self.notes: list[str] = []

    def run(self, gm: fx.GraphModule) -> int:
        ok, why = mutation_free(gm)
        count = 0
        for node in list(gm.graph.nodes):
            if not alive(node) or shape_op(node) not in ("view", "reshape") or \
                    shape_op(node.args[0]) not in PERMUTE_OPS:
                continue
            target, have = op_params(node, shape_op(node))["shape"], shape_of(node.args[0])
            if isinstance(target, tuple) and have is not None and len(target) == len(have) and all(
                    key(a) == key(b) for a, b in zip(target, have)):
                if not ok:  # users would get the permute itself, not a view of it: the same to all but writers
                    self.notes.append(f"no-op reshape at {node.name} kept: {why}")
                    continue
                replace(node, node.args[0])
                count += 1
        return count


def default_passes() -> list[Pass]:
    """Fresh instances, in an order where each pass can clean up after the one before it."""
    return [RedundantContiguous(), ReshapeToPermute(), PermuteChains(), ViewChains()]


# ---- tracing and running --------------------------------------------------------------------------------------

_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)
_MAX_ROUNDS = 4  # a rewrite can expose another (a dropped reshape joins two permutes); stop at a quiet round


class _Tracer(fx.Tracer):
    """fx's tracer with two changes: any subclass of a torch.nn layer (EngineLinear) stays a leaf like the layer
    itself, and questions about the device (``x.is_cuda``) are answered for the device the module will run on."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        layer = any(issubclass(base, nn.Module) and base not in _CONTAINERS and
                    base.__module__.startswith(("torch.nn", "torch.ao.nn")) for base in type(m).__mro__)
        return layer or super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        fact = _device_fact(obj.node, self.device)
        return bool(fact) if fact is not None else super().to_bool(obj)


def _device_fact(node: Any, device: torch.device) -> Any:
    """The value of a device question about an activation (all of which live on ``device``), or None."""
    if not isinstance(node, fx.Node):
        return node
    if node.op != "call_function":
        return None
    if node.target is getattr:
        obj, attr = node.args
        facts = {"is_cuda": device.type == "cuda", "is_cpu": device.type == "cpu", "device": device}
        if attr == "type":
            inner = _device_fact(obj, device)
            return inner.type if isinstance(inner, torch.device) else None
        return facts.get(attr)
    if node.target in (operator.eq, operator.ne, operator.not_):
        values = [_device_fact(a, device) for a in node.args]
        return None if None in values else node.target(*values)
    return None


def trace(model: nn.Module, device: torch.device | str | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its parameters and leaf modules (not a copy).

    The graph is specialized to ``device`` (default: where the model's parameters are) and to the model's current
    Python state (``training``, flags), as the model's own branches would be on each call.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tracer = _Tracer(torch.device(device))
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... depending on what the model does to a Proxy
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrialError(f"graph passes need a model torch.fx can trace symbolically, but tracing "
                         f"{type(model).__name__} failed: {first}. Fix: move data-dependent branches into a leaf "
                         f"module, or skip the passes for this model") from err
    for node in reversed(list(graph.nodes)):  # the device questions answered while tracing
        if not node.users and node.op == "call_function" and node.target in (getattr, operator.eq, operator.ne,
                                                                              operator.not_):
            graph.erase_node(node)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["dsnas.device"] = str(device)
    return gm


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass] | None = None,
               example_inputs: Sequence[Any] | None = None) -> dict[str, int]:
    """Apply ``passes`` (default: ``default_passes()``) until none rewrites anything; lint and recompile.

    ``example_inputs`` only give the passes each tensor's rank (a size is never trusted: it changes with the batch).
    Returns the rewrites per pass; ``gm.meta["dsnas.passes"]`` also keeps node counts and why rewrites were skipped.
    """
    passes = list(passes) if passes is not None else default_passes()
    if example_inputs is not None:
        _record_ranks(gm, example_inputs)
    counts = dict.fromkeys((p.name for p in passes), 0)
    before = len(gm.graph.nodes)
    for _ in range(_MAX_ROUNDS):
        changed = 0
        for p in passes:
            n = p.run(gm)
            gm.graph.lint()
            counts[p.name] += n
            changed += n
        if not changed:
            break
    gm.recompile()
    notes = list(dict.fromkeys(note for p in passes for note in getattr(p, "notes", [])))
    gm.meta["dsnas.passes"] = {"counts": dict(counts), "nodes_before": before, "nodes_after": len(gm.graph.nodes),
                               "notes": notes}
    return counts


def _record_ranks(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Shape propagation on the examples without side effects: eval mode (no dropout draws, no BatchNorm statistics
    updates), no autograd, and the random number generators restored afterwards."""
    modes = {m: m.training for m in gm.modules()}
    cuda = sorted({t.device.index or 0 for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training


def optimize(model: nn.Module, example_inputs: Sequence[Any], passes: Sequence[Pass] | None = None) -> Optimized:
    """Trace ``model`` on the device of ``example_inputs`` and apply the passes; the module shares its parameters.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (2, 3)))
        >>> out = optimize(m, (torch.ones(4, 6),))
        >>> out.counts["view_chains"], out.module(torch.ones(4, 6)).shape
        (0, torch.Size([4, 2, 3]))
    """
    example_inputs = tuple(example_inputs)
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), None)
    gm = trace(model, device)
    return Optimized(gm, run_passes(gm, passes, example_inputs))
