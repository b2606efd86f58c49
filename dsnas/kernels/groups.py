"""The engine on any model: a space's ``[engine.NAME]`` tables name module-name patterns (``"blocks.*.mlp.*"``, as
torchao's ``quantize_`` takes a filter) and the group's precision and sparsity; each matched ``nn.Linear`` becomes an
EngineLinear and each matched ``nn.Conv2d`` an EngineConv2d, sharing the original's parameters (so weights a user
tied stay tied). A matched layer the engine has no kernel for stays as it is, with the reason."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from dsnas.errors import TrialError
from dsnas.kernels.conv import CONV_PRECISIONS, NOT_FOR_CONV, EngineConv2d
from dsnas.kernels.linear import EngineLayer, EngineLinear

SHOWN_NAMES = 40  # module names listed in the error of a pattern that matches none


def apply_groups(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, str]:
    """Put each group's choices on the layers its patterns match, in place; returns {module name: why it stayed as
    it was} for matched layers the engine cannot run. A layer matched by two groups takes the first's."""
    names = [name for name, _ in model.named_modules() if name]
    left_alone: dict[str, str] = {}
    taken: set[str] = set()
    for group in groups:
        decided, matched_any = 0, []
        for pattern in group["modules"]:
            matched = [n for n in names if fnmatchcase(n, pattern)]
            if not matched:
                shown = ", ".join(names[:SHOWN_NAMES]) + (f", ... ({len(names) - SHOWN_NAMES} more)"
                                                           if len(names) > SHOWN_NAMES else "")
                raise TrialError(f"engine group {group['group']!r}: the pattern {pattern!r} matches no module of "
                                 f"the model; its modules are: {shown}")
            matched_any += matched
            for name in matched:
                if name in taken:
                    continue
                why = _convert(model, name, group["precision"], group["sparsity"])
                if why is None:
                    taken.add(name)
                    decided += 1
                elif why:
                    left_alone[name] = why
        if not decided:  # the group's sampled choice would change nothing: a dimension of the search spent on it
            reasons = [f"{n}: {left_alone[n]}" for n in dict.fromkeys(matched_any) if n in left_alone]
            raise TrialError(f"engine group {group['group']!r} decides no layer: "
                             + ("; ".join(reasons[:3]) if reasons else "every layer it matches is an earlier "
                                "group's, or it matches only blocks and activations")
                             + ". Fix: name layers the engine converts in its modules (nn.Linear; nn.Conv2d in fp32, "
                               "bf16 or fp16), or offer the group only the choices they take")
    return left_alone


def _convert(model: nn.Module, name: str, precision: str, sparsity: str) -> str | None:
    """None when the layer became an engine layer; else why not ('' for what is no layer: a block, an activation,
    whose own layers the pattern may match too)."""
    module = model.get_submodule(name)
    # A built-in family's engine layer is rebuilt with the group's choices like a plain one: the group decides the
    # layers it names (before, it kept the family's, and the group's sampled choice changed nothing). A layer an
    # earlier pattern took never reaches here (apply_groups skips it).
    if isinstance(module, EngineLayer) and (module.precision, module.sparsity) == (precision, sparsity):
        return None
    if type(module) in (nn.Linear, EngineLinear):
        layer: nn.Module = EngineLinear(module.in_features, module.out_features, module.bias is not None,
                                        precision=precision, sparsity=sparsity)
        if sparsity != "dense" and module.in_features % 4:
            return f"2:4 sparsity needs in_features divisible by 4 (got {module.in_features})"
        tied = [n for n, m in model.named_modules() if m is not module and n != name and
                any(p is module.weight for p in m.parameters(recurse=False))]
        if sparsity != "dense" and tied:  # pruning is in place, on the shared tensor
            return (f"2:4 sparsity on a weight tied to {tied[0]}'s would zero half of {tied[0]}'s too (a tied "
                    "lm_head pruned the input embedding)")
    elif type(module) in (nn.Conv2d, EngineConv2d):
        refused = NOT_FOR_CONV.get(sparsity) if sparsity != "dense" else NOT_FOR_CONV.get(precision)
        if refused or precision not in CONV_PRECISIONS:
            return f"{precision} {sparsity} convolution: {refused}"
        layer = EngineConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                             padding=module.padding, groups=module.groups, bias=module.bias is not None,
                             precision=precision, dilation=module.dilation, padding_mode=module.padding_mode)
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        return (f"{type(module).__name__} is not a plain {type(module).__mro__[1].__name__} (its owner may use its "
                "weight directly, as nn.MultiheadAttention does with out_proj)")
    elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() >= 2:
        # a layer of weights (Conv1d, Conv3d, ConvTranspose2d, Embedding): it stays, and the profile says so
        return f"{type(module).__name__} has no engine form (the engine converts nn.Linear and nn.Conv2d)"
    else:
        return ""  # a block or an activation, whose own layers the pattern may match too
    # The original's parameters themselves, not copies: ties and the optimizer's view of them survive.
    layer.weight = module.weight
    layer.bias = module.bias
    layer.to(module.weight.device)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
    return None
