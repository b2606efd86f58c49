"""Search spaces: a TOML file of choices for a model family, or a user callable ``space(trial) -> arch``."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnas.config import reject_unknown
from dsnas.errors import Invalid, SpecError
from dsnas.models import FAMILIES, family
from dsnas.plugins import import_callable

SampleFn = Callable[[Any], dict[str, Any]]


# `precision = "auto"` (or a space-level `engine = "auto"`, which also decides sparsity): the engine probe decides.
AUTO = "auto"


@dataclass(frozen=True)
class SearchSpace:
    """Choices for one model family. ``choices`` are sampled once per model (a layer key there is shared
    by all layers); ``per_layer`` once per layer, as ``layer{i}.{key}``. ``by_device`` names the engine keys the
    engine probe decides on the trial's device (see :meth:`resolved`); until then they hold fp32 / dense only."""

    family: str
    choices: dict[str, tuple[Any, ...]]
    per_layer: dict[str, tuple[Any, ...]]
    by_device: tuple[str, ...] = ()

    def resolved(self, precisions: tuple[str, ...], sparsities: tuple[str, ...]) -> SearchSpace:
        """This space with its ``by_device`` keys set to what pays on the device (the probe's offer)."""
        if any(s != "dense" for s in sparsities):
            try:  # 2:4 needs widths in groups of 4: a space that cannot build it is offered dense only
                family(self.family).check_choices({**self.choices, **self.per_layer, "sparsity": sparsities})
            except Invalid:
                sparsities = ("dense",)
        offer = {"precision": precisions, "sparsity": sparsities}
        choices = {k: offer[k] if k in self.by_device else v for k, v in self.choices.items()}
        per_layer = {k: offer[k] if k in self.by_device else v for k, v in self.per_layer.items()}
        return SearchSpace(self.family, choices, per_layer)

    def linear_widths(self) -> list[tuple[int, int]]:
        """The (in, out) widths of the engine layers this space can build (for the probe); [] when the family does
        not say."""
        widths = getattr(family(self.family), "linear_widths", None)
        return widths({**self.choices, **self.per_layer}) if widths else []

    def sample(self, trial: Any) -> dict[str, Any]:
        picked = {key: _suggest(trial, key, options) for key, options in self.choices.items()}
        n_layers = picked.pop("n_layers")
        shared = {key: picked.pop(key) for key in list(picked) if key in self.per_layer_keys}
        layers = []
        for i in range(n_layers):
            per = {key: _suggest(trial, f"layer{i}.{key}", opts) for key, opts in self.per_layer.items()}
            layers.append({**shared, **per})
        return {"family": self.family, **picked, "layers": layers}

    @property
    def per_layer_keys(self) -> tuple[str, ...]:
        return family(self.family).LAYER_KEYS


def _suggest(trial: Any, name: str, options: tuple[Any, ...]) -> Any:
    # A single option is a fixed value, not a search dimension.
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))


def load_space_file(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; errors name the file and the key."""
    where = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # also bad UTF-8, an int of > 4300 digits, deep nesting
        raise SpecError(where, "-", f"must be a readable TOML file ({e})", None,
                        "check the path and the TOML syntax") from None
    reject_unknown(where, "", raw, ("family", "engine", "choices", "per_layer"))
    name = raw.get("family")
    if name not in FAMILIES:
        raise SpecError(where, "family", f"must be one of {list(FAMILIES)}", name, 'set family = "transformer_lm"')
    fam = family(name)
    named = getattr(fam, "NAMED_CHOICES", {})
    optional_arch = tuple(getattr(fam, "OPTIONAL_ARCH_KEYS", ()))
    choices = _options(where, "choices", raw.get("choices", {}), fam.ARCH_KEYS + optional_arch + fam.LAYER_KEYS,
                       named)
    per_layer = _options(where, "per_layer", raw.get("per_layer", {}), fam.LAYER_KEYS, named)
    by_device = _by_device(where, raw, choices, per_layer)
    for key in fam.ARCH_KEYS:
        if key not in choices:
            raise SpecError(where, f"choices.{key}", "is required", None, f"add {key} = [...] under [choices]")
    required = getattr(fam, "REQUIRED_LAYER_KEYS", fam.LAYER_KEYS)
    for key in fam.LAYER_KEYS:
        given = (key in choices) + (key in per_layer)
        if given > 1 or (given == 0 and key in required):
            raise SpecError(where, key, "must be given once: under [choices] (shared by all layers) or under "
                            "[per_layer] (chosen per layer)", None, f"add {key} = [...] to exactly one of them")
    try:
        fam.check_choices({**choices, **per_layer})
    except Invalid as e:
        section = "choices" if e.key in choices else "per_layer"
        raise SpecError(where, f"{section}.{e.key}", e.rule, e.got, e.fix) from None
    return SearchSpace(family=name, choices=choices, per_layer=per_layer, by_device=by_device)


def _by_device(where: str, raw: dict[str, Any], choices: dict[str, tuple[Any, ...]],
               per_layer: dict[str, tuple[Any, ...]]) -> tuple[str, ...]:
    """The engine keys the probe decides, each left at fp32 / dense in its section until it has: `precision =
    "auto"`, or `engine = "auto"` (precision and sparsity, per layer). Sparsity's own "auto" is another thing (the
    Hessian trace decides per layer, see dsnas.kernels.choices) and stays as it is."""
    engine = raw.get("engine")
    if engine is not None:
        if engine != AUTO:
            raise SpecError(where, "engine", 'must be "auto" (the engine probe decides precision and sparsity)',
                            engine, 'set engine = "auto", or remove it and list precision and sparsity')
        given = [k for k in ("precision", "sparsity") if k in choices or k in per_layer]
        if given:
            raise SpecError(where, "engine", f'= "auto" decides {" and ".join(given)} itself', given,
                            f'remove {" and ".join(given)}, or remove engine = "auto"')
        per_layer.update(precision=("fp32",), sparsity=("dense",))
        return ("precision", "sparsity")
    for section in (choices, per_layer):
        if AUTO in section.get("precision", ()):
            section["precision"] = ("fp32",)
            return ("precision",)
    return ()


def _options(where: str, section: str, table: Any, known: tuple[str, ...],
             named: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    if not isinstance(table, dict):
        raise SpecError(where, section, "must be a table", table, f"write it as [{section}]")
    reject_unknown(where, f"{section}.", table, known)
    out = {}
    for key, value in table.items():
        values = value if isinstance(value, list) else [value]
        if key == "precision" and AUTO in values:
            if values != [AUTO]:
                raise SpecError(where, f"{section}.{key}", '"auto" must stand alone: the probe decides the whole '
                                "list", value, 'write precision = "auto", or list the precisions without it')
            out[key] = (AUTO,)
            continue
        if key in named:
            allowed = named[key]
            if not values or any(isinstance(v, bool) or v not in allowed for v in values):
                raise SpecError(where, f"{section}.{key}", f"must be one or a non-empty list of {list(allowed)}",
                                value, f"e.g. {key} = {list(allowed[:2])!r}".replace("'", '"'))
            if len(set(values)) != len(values):
                raise SpecError(where, f"{section}.{key}", "must not repeat a choice", value,
                                f"write each choice once: {list(dict.fromkeys(values))!r}".replace("'", '"'))
            out[key] = tuple(values)
            continue
        ok = values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        if not ok:
            raise SpecError(where, f"{section}.{key}", "must be an integer >= 1 or a non-empty list of them",
                            value, f"e.g. {key} = [1, 2, 4]")
        out[key] = tuple(values)
    return out


def arch_sampler(file: str | None, callable_target: str | None, base_dir: str | Path) -> SampleFn:
    """The function that turns an Optuna trial into an architecture."""
    if file is not None:
        return load_space_file(file).sample

    return import_callable(callable_target or "", base_dir)
