"""Reading torch.fx graphs for the passes: ops and their parameters, symbolic shapes, and the checks that make a
rewrite safe."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

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
# Ops after which a value can no longer alias its input: an output reached only through these cannot expose a view.
_NEW_TENSOR_FUNCTIONS = {F.linear, F.layer_norm, F.gelu, F.relu, F.softmax, F.scaled_dot_product_attention,
                         F.embedding, torch.matmul, torch.cat, torch.stack, operator.add, operator.sub, operator.mul,
                         operator.truediv, operator.matmul}
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}


# ---- reading the graph ----------------------------------------------------------------------------------------


def shape_op(node: Any) -> str | None:
    """The shape op a node is ("view", "transpose", ...), or None when it is another op or a form of one that the
    passes do not model (a dtype view, a non-default memory format, dims that are graph values)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    table = _METHOD_OPS if node.op == "call_method" else _FUNCTION_OPS if node.op == "call_function" else {}
    op = table.get(node.target)
    return op if op is not None and op_params(node, op) is not None else None


def op_params(node: fx.Node, op: str) -> dict[str, Any] | None:
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


def module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


# ---- symbolic shapes: entries are ints, int-valued nodes, Size(x, i) or Prod(entries) --------------------------


@dataclass(frozen=True)
class Size:
    """Dimension ``dim`` of tensor ``node``: becomes ``node.size(dim)`` if a rewrite needs it in the graph."""

    node: fx.Node
    dim: int


@dataclass(frozen=True)
class Prod:
    factors: tuple[Any, ...]


def _derived_shape(node: fx.Node) -> list[Any] | None:
    """The shape of ``node`` in the graph's symbols, when its op says it (view args, a permute of a known shape)."""
    op = shape_op(node)
    if op is None:
        return _unbound_shape(node)
    if op == "contiguous":
        return shape_of(node.args[0])
    params = op_params(node, op)
    if op in ("view", "reshape"):
        return list(params["shape"]) if isinstance(params["shape"], tuple) else None
    prev = shape_of(node.args[0])
    if prev is None:
        return None
    if op in PERMUTE_OPS:
        perm = permutation(node, len(prev))
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
    return shape if shape is not None else [Size(node, i) for i in range(rank)] if rank is not None else None


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
    return entries[0] if len(entries) == 1 else Prod(tuple(entries))


def key(entry: Any) -> Any:
    """A hashable identity: equal keys are equal sizes for every input, not just for the example."""
    if isinstance(entry, fx.Node):
        size = _size_pattern(entry)
        return key(Size(*size)) if size is not None else entry
    if isinstance(entry, Size):
        rank = _rank(entry.node)
        dim = _norm(entry.dim, rank) if rank is not None and entry.dim < 0 else entry.dim
        known = _derived_shape(entry.node)
        if known is not None and dim is not None and 0 <= dim < len(known) and known[dim] != -1:
            return key(known[dim])
        return ("size", entry.node, dim)
    if isinstance(entry, Prod):
        return ("prod", tuple(key(f) for f in entry.factors))
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


def permutation(node: fx.Node, rank: int) -> list[int] | None:
    """The permutation a transpose/permute node applies: output dim i is input dim perm[i]."""
    params = op_params(node, shape_op(node))
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
    if isinstance(entry, Size):
        return graph.call_method("size", (entry.node, entry.dim))
    if isinstance(entry, Prod):
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
        if node.op == "call_module" and getattr(module(gm, node), "inplace", False):
            return False, f"{node.name} runs {target} in place"
    return True, ""


def _inplace_flag(node: fx.Node) -> bool:
    """``inplace=True`` given by keyword or by position (F.relu(x, True))."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature; calls that would fail anyway
        return bool(node.kwargs.get("inplace"))
    return bool(bound.arguments.get("inplace"))


def escapes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may reach the graph's output as (a view of) itself, so the caller could see the change
    from a copy to a view. Only ops known to allocate a new tensor stop the search; anything else may alias."""
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        for user in current.users:
            fresh = (user.op == "call_function" and user.target in _NEW_TENSOR_FUNCTIONS) or (
                user.op == "call_module" and type(module(gm, user)) in (nn.Linear, nn.LayerNorm, nn.GELU))
            if user.op == "output":
                return True
            if not fresh and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def replace(node: fx.Node, new: Any) -> None:
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
    return shape_op(node) is not None or (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target in (getattr, operator.getitem, operator.mul, operator.floordiv))


def alive(node: fx.Node) -> bool:
    return not getattr(node, "_erased", False)


def chain_of(node: fx.Node, ops: tuple[str, ...]) -> list[fx.Node]:
    """``node`` and the ops of the same kind before it whose only user is the next op of the chain."""
    chain = [node]
    while shape_op(chain[0].args[0]) in ops and len(chain[0].args[0].users) == 1:
        chain.insert(0, chain[0].args[0])
    return chain


def chain_goes_on(node: fx.Node, ops: tuple[str, ...]) -> bool:
    users = list(node.users)
    return len(users) == 1 and shape_op(users[0]) in ops and users[0].args[0] is node


def graph_shape(graph: fx.Graph, shape: Any, src: fx.Node) -> tuple[Any, ...]:
    """Reshape args for ``src``: an opaque shape value as is, symbolic entries as graph values."""
    if isinstance(shape, fx.Node):
        return (src, shape)
    return (src, *(_materialize(graph, entry) for entry in shape))
