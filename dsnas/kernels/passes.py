"""Graph substitution passes on torch.fx graphs (view chains, permute chains, redundant contiguous, reshape after
permute), each proved on the graph's own symbols, never on the sizes of one example."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dsnas.errors import TrialError

# Why torch.fx.symbolic_trace and not torch.export: fx keeps every engine layer (EngineLinear and its inference
# forms) as one call to the live module, so the layer's Python state (fallbacks, converted backends) stays in charge
# at run time; its nodes are the Tensor methods the model wrote (x.view, x.transpose), and sizes stay graph values
# (x.shape[0] is a node), so a rewrite that keeps them is right for every batch size. torch.export gives a
# functionalized aten graph that inlines those layers with their state frozen at export time, and specializes every
# size not declared dynamic. The result here is a GraphModule that runs in eager mode and under torch.compile.

_METHOD_OPS = {"view": "view", "reshape": "reshape", "flatten": "flatten", "unflatten": "unflatten",
               "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "permute": "permute",
               "contiguous": "contiguous"}
_FUNCTION_OPS = {torch.reshape: "reshape", torch.flatten: "flatten", torch.unflatten: "unflatten",
                 torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose",
                 torch.permute: "permute"}
_PARAMS = {"view": ("shape",), "reshape": ("shape",), "flatten": ("start_dim", "end_dim"),
           "unflatten": ("dim", "sizes"), "transpose": ("dim0", "dim1"), "permute": ("dims",),
           "contiguous": ("memory_format",)}
_DEFAULTS = {"start_dim": 0, "end_dim": -1, "memory_format": torch.contiguous_format}
VIEW_OPS = ("view", "reshape", "flatten", "unflatten")
PERMUTE_OPS = ("transpose", "permute")
# Ops whose output is a freshly allocated contiguous tensor whatever the layout of their input.
_FRESH_FUNCTIONS = {F.layer_norm, F.embedding, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                    torch.rand, torch.randn, torch.randint, torch.tensor}
_FRESH_MODULES = (nn.LayerNorm, nn.Embedding)
# Consumers that make their input contiguous themselves (layer_norm's CPU and CUDA kernels start with
# X = input.expect_contiguous()), so a contiguous() just before them changes no bit and is seen by no one else.
_NORMALIZING_FUNCTIONS = {F.layer_norm}
_NORMALIZING_MODULES = (nn.LayerNorm,)
# Ops after which a value can no longer alias its input: an output reached only through these cannot expose a view.
_NEW_TENSOR_FUNCTIONS = {F.linear, F.layer_norm, F.gelu, F.relu, F.softmax, F.scaled_dot_product_attention,
                         F.embedding, torch.matmul, torch.cat, torch.stack, operator.add, operator.sub, operator.mul,
                         operator.truediv, operator.matmul}
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}


@runtime_checkable
class Pass(Protocol):
    """A graph rewrite: ``run`` changes ``gm.graph`` in place and returns how many rewrites it made."""

    name: str

    def run(self, gm: fx.GraphModule) -> int: ...


class Optimized(NamedTuple):
    """The optimized GraphModule (sharing the model's parameters) and the rewrites each pass made."""

    module: fx.GraphModule
    counts: dict[str, int]


# ---- reading the graph ----------------------------------------------------------------------------------------


def _op(node: Any) -> str | None:
    """The shape op a node is ("view", "transpose", ...), or None when it is another op or a form of one that the
    passes do not model (a dtype view, a non-default memory format, dims that are graph values)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    table = _METHOD_OPS if node.op == "call_method" else _FUNCTION_OPS if node.op == "call_function" else {}
    op = table.get(node.target)
    return op if op is not None and _params(node, op) is not None else None


def _params(node: fx.Node, op: str) -> dict[str, Any] | None:
    names, rest, kwargs = _PARAMS[op], list(node.args[1:]), dict(node.kwargs)
    if not set(kwargs) <= {*names, "size"} or (names[0] not in ("shape", "dims") and len(rest) > len(names)):
        return None
    if names[0] in ("shape", "dims"):  # x.view(2, 3), x.view((2, 3)), x.view(n), torch.reshape(x, shape=...)
        value = kwargs.get(names[0], kwargs.get("size"))
        if value is None:
            value = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, fx.Node)) else tuple(rest)
        if isinstance(value, (tuple, list)):
            value = tuple(value)
            if not all(isinstance(v, (int, fx.Node)) and not isinstance(v, bool) for v in value):
                return None  # x.view(torch.float16) reinterprets bytes: not a shape op
        elif _is_dtype(value) or names[0] == "dims":
            return None
        if names[0] == "dims" and not all(isinstance(v, int) for v in value):
            return None
        return {names[0]: value}
    params = {**dict(zip(names, rest)), **kwargs}
    for name in names:
        params.setdefault(name, _DEFAULTS.get(name))
    if op == "contiguous":
        return params if params["memory_format"] is torch.contiguous_format else None
    if op == "unflatten":
        ok = isinstance(params["dim"], int) and isinstance(params["sizes"], (tuple, list))
        return {"dim": params["dim"], "sizes": tuple(params["sizes"])} if ok else None
    return params if all(isinstance(params[n], int) for n in names) else None


def _is_dtype(value: Any) -> bool:
    return isinstance(value, fx.Node) and value.target is getattr and value.args[1] == "dtype"


def _rank(node: fx.Node) -> int | None:
    """The rank shape propagation recorded. Ranks (never sizes) are used: a traced program fixes them."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return len(shape) if shape is not None else None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


# ---- symbolic shapes: entries are ints, int-valued nodes, _Size(x, i) or _Prod(entries) ------------------------


@dataclass(frozen=True)
class _Size:
    """Dimension ``dim`` of tensor ``node``: becomes ``node.size(dim)`` if a rewrite needs it in the graph."""

    node: fx.Node
    dim: int


@dataclass(frozen=True)
class _Prod:
    factors: tuple[Any, ...]


def _derived_shape(node: fx.Node) -> list[Any] | None:
    """The shape of ``node`` in the graph's symbols, when its op says it (view args, a permute of a known shape)."""
    op = _op(node)
    if op is None:
        return _unbound_shape(node)
    if op == "contiguous":
        return shape_of(node.args[0])
    params = _params(node, op)
    if op in ("view", "reshape"):
        return list(params["shape"]) if isinstance(params["shape"], tuple) else None
    prev = shape_of(node.args[0])
    if prev is None:
        return None
    if op in PERMUTE_OPS:
        perm = _perm(node, len(prev))
        return [prev[p] for p in perm] if perm is not None else None
    if op == "flatten":
        start, end = (_norm(params[k], max(len(prev), 1)) for k in ("start_dim", "end_dim"))
        if start is None or end is None or start > end:
            return None
        return [*prev[:start], _product(prev[start:end + 1]), *prev[end + 1:]]
    dim, sizes = _norm(params["dim"], len(prev)), list(params["sizes"])
    if dim is None or (-1 in sizes and -1 in prev[:dim] + prev[dim + 1:]):
        return None  # two inferred sizes: the chain is not one reshape
    return [*prev[:dim], *sizes, *prev[dim + 1:]]


def _unbound_shape(node: fx.Node) -> list[Any] | None:
    """The shape of ``x.unbind(dim)[i]``: x's shape without ``dim`` (how attention splits q, k, v)."""
    whole = node.args[0] if node.target is operator.getitem and node.args else None
    if not isinstance(whole, fx.Node) or not (
            (whole.op, whole.target) == ("call_method", "unbind") or whole.target is torch.unbind):
        return None
    dim = whole.args[1] if len(whole.args) > 1 else whole.kwargs.get("dim", 0)
    prev = shape_of(whole.args[0])
    dim = _norm(dim, len(prev)) if prev is not None and isinstance(dim, int) else None
    return None if dim is None else prev[:dim] + prev[dim + 1:]


def shape_of(node: Any) -> list[Any] | None:
    """The symbolic shape of a tensor node: derived from its op, else ``x.size(i)`` for each dim of its rank."""
    if not isinstance(node, fx.Node):
        return None
    shape = _derived_shape(node)
    rank = _rank(node)
    return shape if shape is not None else [_Size(node, i) for i in range(rank)] if rank is not None else None


def _norm(dim: int, rank: int) -> int | None:
    d = dim + rank if dim < 0 else dim
    return d if 0 <= d < rank else None


def _product(entries: list[Any]) -> Any:
    if -1 in entries:  # the one inferred size absorbs the merged dims: numel and the other sizes are unchanged
        return -1
    if all(isinstance(e, int) for e in entries):
        out = 1
        for e in entries:
            out *= e
        return out
    return entries[0] if len(entries) == 1 else _Prod(tuple(entries))


def _key(entry: Any) -> Any:
    """A hashable identity: equal keys are equal sizes for every input, not just for the example."""
    if isinstance(entry, fx.Node):
        size = _size_pattern(entry)
        return _key(_Size(*size)) if size is not None else entry
    if isinstance(entry, _Size):
        rank = _rank(entry.node)
        dim = _norm(entry.dim, rank) if rank is not None and entry.dim < 0 else entry.dim
        known = _derived_shape(entry.node)
        if known is not None and dim is not None and 0 <= dim < len(known) and known[dim] != -1:
            return _key(known[dim])
        return ("size", entry.node, dim)
    if isinstance(entry, _Prod):
        return ("prod", tuple(_key(f) for f in entry.factors))
    return entry


def _size_pattern(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, i) when ``node`` is x.size(i), x.size()[i] or x.shape[i]."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    if node.target is operator.getitem and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node):
        whole = node.args[0]
        if (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1) or (
                whole.target is getattr and whole.args[1] == "shape"):
            return whole.args[0], node.args[1]
    return None


def _perm(node: fx.Node, rank: int) -> list[int] | None:
    """The permutation a transpose/permute node applies: output dim i is input dim perm[i]."""
    params = _params(node, _op(node))
    if "dims" in params:
        dims = [_norm(d, rank) for d in params["dims"]]
        return dims if len(dims) == rank and None not in dims and len(set(dims)) == rank else None
    a, b = _norm(params["dim0"], rank), _norm(params["dim1"], rank)
    if a is None or b is None:
        return None
    perm = list(range(rank))
    perm[a], perm[b] = b, a
    return perm


def _materialize(graph: fx.Graph, entry: Any) -> Any:
    """Graph values for a symbolic size; call inside ``graph.inserting_before``."""
    if isinstance(entry, _Size):
        return graph.call_method("size", (entry.node, entry.dim))
    if isinstance(entry, _Prod):
        out = _materialize(graph, entry.factors[0])
        for factor in entry.factors[1:]:
            out = graph.call_function(operator.mul, (out, _materialize(graph, factor)))
        return out
    return entry


# ---- safety checks ----------------------------------------------------------------------------------------------


def mutation_free(gm: fx.GraphModule) -> tuple[bool, str]:
    """Whether no node writes a tensor in place. Rewrites that may turn a copy into a view (or drop a no-op view)
    are exact only then. Leaf modules count as writers only when they say so (``inplace=True``, as torch.nn's do)."""
    for node in gm.graph.nodes:
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if node.op == "call_method" and name.endswith("_") and not name.endswith("__"):
            return False, f"{node.name} calls Tensor.{name} in place"
        if node.op == "call_function" and (target in _INPLACE_FUNCTIONS or name.endswith("_") and
                                           not name.endswith("__") or _inplace_flag(node) or "out" in node.kwargs):
            return False, f"{node.name} calls {name} in place"
        if node.op == "call_module" and getattr(_module(gm, node), "inplace", False):
            return False, f"{node.name} runs {target} in place"
    return True, ""


def _inplace_flag(node: fx.Node) -> bool:
    """``inplace=True`` given by keyword or by position (F.relu(x, True))."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature; calls that would fail anyway
        return bool(node.kwargs.get("inplace"))
    return bool(bound.arguments.get("inplace"))


def _escapes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may reach the graph's output as (a view of) itself, so the caller could see the change
    from a copy to a view. Only ops known to allocate a new tensor stop the search; anything else may alias."""
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        for user in current.users:
            fresh = (user.op == "call_function" and user.target in _NEW_TENSOR_FUNCTIONS) or (
                user.op == "call_module" and type(_module(gm, user)) in (nn.Linear, nn.LayerNorm, nn.GELU))
            if user.op == "output":
                return True
            if not fresh and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def _replace(node: fx.Node, new: Any) -> None:
    """Point every user of ``node`` at ``new``, erase it, and erase the shape ops and size arithmetic that only it
    used (nothing else: an unused call may still have effects)."""
    if isinstance(new, fx.Node):
        new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
    node.replace_all_uses_with(new)
    dead = list(node.all_input_nodes)
    node.graph.erase_node(node)
    while dead:
        current = dead.pop()
        if current.users or not _is_shape_arithmetic(current):
            continue
        dead.extend(current.all_input_nodes)
        current.graph.erase_node(current)


def _is_shape_arithmetic(node: fx.Node) -> bool:
    return _op(node) is not None or (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target in (getattr, operator.getitem, operator.mul, operator.floordiv))


def _alive(node: fx.Node) -> bool:
    return not getattr(node, "_erased", False)


def _chain(node: fx.Node, ops: tuple[str, ...]) -> list[fx.Node]:
    """``node`` and the ops of the same kind before it whose only user is the next op of the chain."""
    chain = [node]
    while _op(chain[0].args[0]) in ops and len(chain[0].args[0].users) == 1:
        chain.insert(0, chain[0].args[0])
    return chain


def _chain_goes_on(node: fx.Node, ops: tuple[str, ...]) -> bool:
    users = list(node.users)
    return len(users) == 1 and _op(users[0]) in ops and users[0].args[0] is node


def _graph_shape(graph: fx.Graph, shape: Any, src: fx.Node) -> tuple[Any, ...]:
    """Reshape args for ``src``: an opaque shape value as is, symbolic entries as graph values."""
    if isinstance(shape, fx.Node):
        return (src, shape)
    return (src, *(_materialize(graph, entry) for entry in shape))


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
            if not _alive(node) or _op(node) not in VIEW_OPS or _chain_goes_on(node, VIEW_OPS):
                continue
            chain = _chain(node, VIEW_OPS)
            if len(chain) < 2:
                continue
            # reshape/flatten may copy where one merged reshape views: exact only if nobody writes or sees it.
            may_copy = any(_op(c) in ("reshape", "flatten") for c in chain)
            if not ok or (may_copy and _escapes(gm, node)):
                self.notes.append(f"view chain ending at {node.name} kept: {why or 'it reaches the output'}")
                continue
            shape = self._final_shape(chain)
            if shape is None:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_method("reshape", _graph_shape(gm.graph, shape, chain[0].args[0]))
            _replace(node, new)
            count += 1
        return count

    @staticmethod
    def _final_shape(chain: list[fx.Node]) -> Any:
        last = chain[-1]
        if _op(last) in ("view", "reshape"):
            return _params(last, _op(last))["shape"]  # numel is the chain's, so a -1 infers the same size
        shape = shape_of(last)
        if shape is None or any(isinstance(e, _Size) and e.node in chain for e in _flat(shape)):
            return None  # only the removed intermediates know this shape
        return shape


def _flat(entries: list[Any]) -> list[Any]:
    return [f for e in entries for f in (_flat(list(e.factors)) if isinstance(e, _Prod) else [e])]


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
            if not _alive(node) or _op(node) not in PERMUTE_OPS or _chain_goes_on(node, PERMUTE_OPS):
                continue
            chain = _chain(node, PERMUTE_OPS)
            src = chain[0].args[0]
            perm = self._compose(chain, src)
            if perm is None:
                continue
            if perm == list(range(len(perm))):
                # Returning the input instead of a view of it differs only to code that changes it in place.
                if not ok:
                    self.notes.append(f"identity permute at {node.name} kept: {why}")
                    continue
                _replace(node, src)
            elif len(chain) > 1:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_method("permute", (src, *perm))
                _replace(node, new)
            else:
                continue
            count += 1
        return count

    def _compose(self, chain: list[fx.Node], src: fx.Node) -> list[int] | None:
        """The chain's permutation; the rank comes from a permute's dims, else from the input's known rank."""
        dims = [len(_params(c, "permute")["dims"]) for c in chain if _op(c) == "permute"]
        shape = shape_of(src)
        rank = dims[0] if dims else len(shape) if shape is not None else None
        if rank is None:
            self.notes.append(f"permute chain ending at {chain[-1].name} kept: rank unknown (pass example_inputs)")
            return None
        perm = list(range(rank))
        for node in chain:
            step = _perm(node, rank)
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
            if not _alive(node) or _op(node) != "contiguous":
                continue
            src, users = node.args[0], list(node.users)
            if _known_contiguous(gm, src) or (users and all(_normalizes(gm, u, node) for u in users)):
                _replace(node, src)
                count += 1
            elif len(users) == 1 and _op(users[0]) in ("view", "reshape") and users[0].args[0] is node and \
                    node not in users[0].args[1:]:
                view = users[0]
                if not ok or _escapes(gm, view):
                    self.notes.append(f"contiguous at {node.name} kept: {why or 'its view reaches the output'}")
                    continue
                with gm.graph.inserting_before(view):
                    new = gm.graph.call_method("reshape", _graph_shape(gm.graph, _params(view, _op(view))["shape"],
                                                                      src))
                _replace(view, new)
                count += 1
        return count


def _known_contiguous(gm: fx.GraphModule, node: Any) -> bool:
    op = _op(node)
    if op == "contiguous":
        return True
    if op in VIEW_OPS:  # a view or reshape of a contiguous tensor is a contiguous view of it
        return _known_contiguous(gm, node.args[0])
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS and "memory_format" not in node.kwargs
    return node.op == "call_module" and type(_module(gm, node)) in _FRESH_MODULES  # exact types: subclasses vary


def _normalizes(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads ``node`` only as the input it makes contiguous itself."""
    others = [*user.args[1:], *user.kwargs.values()]
    if user.args[:1] != (node,) or any(a is node for a in others):
        return False
    if user.op == "call_function":
        return user.target in _NORMALIZING_FUNCTIONS
    return user.op == "call_module" and type(_module(gm, user)) in _NORMALIZING_MODULES and len(user.args) == 1


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
            if not _alive(node) or _op(node) not in ("view", "reshape") or _op(node.args[0]) not in PERMUTE_OPS:
                continue
            target, have = _params(node, _op(node))["shape"], shape_of(node.args[0])
            if isinstance(target, tuple) and have is not None and len(target) == len(have) and all(
                    _key(a) == _key(b) for a, b in zip(target, have)):
                if not ok:  # users would get the permute itself, not a view of it: the same to all but writers
                    self.notes.append(f"no-op reshape at {node.name} kept: {why}")
                    continue
                _replace(node, node.args[0])
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
