"""Search spaces: a TOML file of choices for a model family, or a user callable ``space(trial) -> arch``."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnas.config import reject_unknown
from dsnas.errors import Invalid, SpecError
from dsnas.kernels.choices import PRECISIONS, SPARSITIES
from dsnas.models import DSNAS_KEYS, FAMILIES, family, is_user_family
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
    groups: tuple[EngineGroup, ...] = ()  # [engine.NAME] tables: the engine's choices by module name
    # The probe's offer per model width (the family's WIDTH_KEY, e.g. d_model): width -> engine key -> options.
    # A width whose options differ from the key's own takes them under its own parameter name (see _engine_name).
    width_offer: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    # The precisions a sparse kernel takes on the device (the probe's offer; e.g. bf16 and fp16 beside cuSPARSELt):
    # a layer of another precision is dense without being asked, since its 2:4 zeros would be multiplied densely
    # (slower, less exact, never faster). Empty (a CPU, a space without "auto", an older study): no such rule.
    sparse_with: tuple[str, ...] = ()
    # The parameter names ``sample`` asks for, by the values of ``choices`` (see :meth:`used`).
    _asked: dict[tuple[Any, ...], tuple[str, ...]] = field(default_factory=dict, init=False, repr=False,
                                                           compare=False)

    def resolved(self, precisions: tuple[str, ...], sparsities: tuple[str, ...],
                 by_width: dict[int, dict[str, tuple[str, ...]]] | None = None,
                 sparse_with: tuple[str, ...] = ()) -> SearchSpace:
        """This space with its ``by_device`` keys set to what pays on the device (the probe's offer), and, given
        ``by_width``, each width's keys to what pays at that width; given ``sparse_with``, a layer's sparsity is
        asked only beside those precisions (where the device's precision is "auto")."""
        if any(s != "dense" for s in sparsities):
            try:  # 2:4 needs widths in groups of 4: a space that cannot build it is offered dense only
                family(self.family).check_choices({**self.choices, **self.per_layer, "sparsity": sparsities})
            except Invalid:
                sparsities = ("dense",)
        named = getattr(family(self.family), "NAMED_CHOICES", {})
        precisions = tuple(p for p in precisions if p in named.get("precision", precisions))  # a family's own
        offer = {"precision": precisions, "sparsity": sparsities}
        choices = {k: offer[k] if k in self.by_device else v for k, v in self.choices.items()}
        per_layer = {k: offer[k] if k in self.by_device else v for k, v in self.per_layer.items()}
        widths = {}
        if by_width and self.width_key:
            widths = {int(w): {k: tuple(o for o in offer[k] if o in there.get(k, offer[k])) for k in self.by_device}
                      for w, there in by_width.items() if int(w) in self.choices.get(self.width_key, ())}
            # A width the probe never timed (added to a resumed study's space): fp32 dense there, not the offer
            # of other widths, which nothing measured at this one.
            widths.update({int(w): {k: offer[k][:1] for k in self.by_device}
                           for w in self.choices.get(self.width_key, ()) if str(w) not in map(str, by_width)})
        sparse_with = tuple(sparse_with) if "precision" in self.by_device else ()
        return SearchSpace(self.family, choices, per_layer, groups=self.groups, width_offer=widths,
                           sparse_with=sparse_with)

    @property
    def width_key(self) -> str | None:
        """The architecture key that sets the engine layers' width (d_model), where the family says."""
        return None if is_user_family(self.family) else getattr(family(self.family), "WIDTH_KEY", None)

    @property
    def _width_keys(self) -> set[str]:
        return {key for there in self.width_offer.values() for key in there}

    def _engine_options(self, key: str, options: tuple[Any, ...], width: Any) -> tuple[Any, ...]:
        return self.width_offer.get(width, {}).get(key, options)

    def _engine_name(self, name: str, key: str, options: tuple[Any, ...], width: Any) -> str:
        """An engine key's parameter name at ``width``: its own where the width offers the key's options, else
        suffixed with the width (``layer0.precision@32``), because an Optuna parameter keeps one set of options."""
        return name if self._engine_options(key, options, width) == options else f"{name}@{width}"

    def linear_widths(self) -> list[tuple[int, int]]:
        """The (in, out) widths of the engine layers this space can build (for the probe); [] when the family does
        not say."""
        if is_user_family(self.family):
            return []
        widths = getattr(family(self.family), "linear_widths", None)
        return widths({**self.choices, **self.per_layer}) if widths else []

    def sample(self, trial: Any) -> dict[str, Any]:
        by_width = self._width_keys  # sampled after the width, from its options
        picked: dict[str, Any] = {}
        for key in sorted(self.choices, key=lambda k: (k in by_width, self._sparsity_last(k))):
            picked[key] = self._ask(picked.get(self.width_key), trial, key, key, self.choices[key], picked)
        width = picked.get(self.width_key)
        engine = [g.sample(trial) for g in self.groups]
        if is_user_family(self.family):
            return {"family": self.family, **picked, **({"engine": engine} if engine else {})}
        n_layers = picked.pop("n_layers")
        shared = {key: picked.pop(key) for key in list(picked) if key in self.per_layer_keys}
        layers = []
        for i in range(n_layers):
            per: dict[str, Any] = {}
            for key in sorted(self.per_layer, key=self._sparsity_last):
                per[key] = self._ask(width, trial, f"layer{i}.{key}", key, self.per_layer[key], {**shared, **per})
            layer = {**shared, **{key: per[key] for key in self.per_layer}}
            if self.sparse_with and layer.get("sparsity", "dense") != "dense" \
                    and layer.get("precision", "fp32") not in self.sparse_with:
                layer["sparsity"] = "dense"  # a shared sparsity beside a per-layer precision no sparse kernel takes
            layers.append(layer)
        return {"family": self.family, **picked, "layers": layers, **({"engine": engine} if engine else {})}

    def _sparsity_last(self, key: str) -> bool:
        """Whether ``key`` is asked after the others: a sparsity asked only beside some precisions is."""
        return bool(self.sparse_with) and key == "sparsity"

    def _ask(self, width: Any, trial: Any, name: str, key: str, options: tuple[Any, ...],
             beside: dict[str, Any]) -> Any:
        """A choice at ``width`` (see _suggest_at); a sparsity beside a precision no sparse kernel takes on the
        device (not in ``sparse_with``) is dense, not asked."""
        if self._sparsity_last(key) and beside.get("precision", self.sparse_with[0]) not in self.sparse_with:
            return "dense"
        return self._suggest_at(width, trial, name, key, options)

    def _suggest_at(self, width: Any, trial: Any, name: str, key: str, options: tuple[Any, ...]) -> Any:
        """A choice at ``width``: an engine key from that width's offer (under its name there), any other as is."""
        return _suggest(trial, self._engine_name(name, key, options, width),
                        self._engine_options(key, options, width))

    def parameters(self) -> dict[str, tuple[Any, ...]]:
        """Every Optuna parameter this space can ask for, with its options (those with more than one): a per-layer
        key once per layer of the deepest model, and an engine key once more per width that offers it other
        options."""
        def named(name: str, key: str, options: tuple[Any, ...]) -> dict[str, tuple[Any, ...]]:
            if key not in self._width_keys:
                return {name: options}
            return {self._engine_name(name, key, options, w): self._engine_options(key, options, w)
                    for w in self.choices.get(self.width_key, ())}

        out = {}
        for key, options in self.choices.items():
            out.update(named(key, key, options))
        depth = max(self.choices.get("n_layers", (0,))) if not is_user_family(self.family) else 0
        for i in range(depth):
            for key, opts in self.per_layer.items():
                out.update(named(f"layer{i}.{key}", key, opts))
        out = {name: options for name, options in out.items() if len(options) > 1}
        for group in self.groups:
            out.update({f"{group.name}.{key}": opts for key, opts in (("precision", group.precision),
                                                                      ("sparsity", group.sparsity)) if len(opts) > 1})
        return out

    def changed_options(self, stored: dict[str, tuple[Any, ...]]) -> tuple[str, str, tuple, tuple] | None:
        """The first parameter that ``stored`` (a study's trials: parameter -> the options it was sampled from)
        sampled from other options than this space offers now, as (its key in the space file, the parameter, the
        stored options, the offered ones); None when they agree. Optuna keeps one set of options per parameter for
        a study's life and fails every trial that asks with others."""
        offered = self.parameters()
        for name, options in stored.items():
            # By type too: Optuna takes [3.0, 5.0] for the [3, 5] it stored (equal in Python), and a builder then
            # got kernel 3.0, a float: each new trial failed (a TypeError in torch), a true for a 1 changed no error.
            if name in offered and _typed(options) != _typed(offered[name]):
                return self._file_key(name), name, tuple(options), tuple(offered[name])
        return None

    def _file_key(self, name: str) -> str:
        base = name.split("@")[0]  # an engine key's parameter at one width (see _engine_name)
        head, _, key = base.partition(".")
        if any(head == group.name for group in self.groups):
            return f"engine.{head}.{key}"
        if key and head.startswith("layer") and head[5:].isdigit():
            return f"per_layer.{key}"
        return f"choices.{base}"

    def used(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters an architecture takes of ``params``: those ``sample`` asks for with them as its answers
        (none of a layer past its depth, none of another width's engine options). Which names it asks depends on
        the model-wide choices alone (the depth, the width), and, where a sparsity is asked only beside some
        precisions, on the precisions too; so they are found once per combination of those: dsnas's sampler calls
        this for every candidate it scores (~20,000 a proposal, 1.6 s on one core before)."""
        try:
            structure = tuple(params.get(key, _Answers) for key in self.choices)  # _Answers: a value not given
            if self.sparse_with:
                structure += tuple(sorted((name, value) for name, value in params.items()
                                          if name.split("@")[0].rpartition(".")[2] == "precision"))
            names = self._asked.get(structure)
        except TypeError:  # an option that cannot be a key (a list): ask every time
            structure, names = None, None
        if names is None:
            asked = _Answers(params, record=True)
            self.sample(asked)
            names = tuple(asked.asked)
            if structure is not None:
                self._asked[structure] = names
        return {name: params[name] for name in names if name in params}

    def arch_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """The architecture these parameters make (as ``sample`` would, with them as the trial's answers)."""
        return self.sample(_Answers(params))

    @property
    def per_layer_keys(self) -> tuple[str, ...]:
        return () if is_user_family(self.family) else family(self.family).LAYER_KEYS


@dataclass(frozen=True)
class EngineGroup:
    """``[engine.NAME]``: the layers whose module names match ``modules`` (fnmatch patterns, e.g.
    ``"blocks.*.mlp.*"``) take one precision and one sparsity, sampled as ``NAME.precision`` and ``NAME.sparsity``."""

    name: str
    modules: tuple[str, ...]
    precision: tuple[str, ...] = ("fp32",)
    sparsity: tuple[str, ...] = ("dense",)

    def sample(self, trial: Any) -> dict[str, Any]:
        return {"group": self.name, "modules": list(self.modules),
                "precision": _suggest(trial, f"{self.name}.precision", self.precision),
                "sparsity": _suggest(trial, f"{self.name}.sparsity", self.sparsity)}


class _Answers:
    """A trial whose answers are given: what ``sample`` needs of an Optuna trial, without a study. Recording, it
    notes the names asked and answers one it lacks (a half-sampled trial's) with the first option."""

    def __init__(self, params: dict[str, Any], record: bool = False) -> None:
        self.params, self.record, self.asked = params, record, []

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        if not self.record:
            return self.params[name]
        self.asked.append(name)
        return self.params.get(name, choices[0])


def _suggest(trial: Any, name: str, options: tuple[Any, ...]) -> Any:
    # A single option is a fixed value, not a search dimension.
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))


def load_space_file(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; errors name the file and the key."""
    where = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # also bad UTF-8, an int of > 4300 digits, deep nesting
        raise SpecError(where, "-", f"must be a readable TOML file ({e})", None,
                        "check the path and the TOML syntax") from None
    reject_unknown(where, "", raw, ("family", "engine", "choices", "per_layer"))
    name = raw.get("family")
    if not isinstance(name, str) or (name not in FAMILIES and not _is_target(name)):
        raise SpecError(where, "family", f'must be one of {list(FAMILIES)} or a model builder "module:callable"',
                        name, 'set family = "transformer_lm", or family = "my_model:build" for def build(arch) in '
                        "my_model.py beside the study file")
    groups = _groups(where, raw.get("engine"), is_user_family(name)) if isinstance(raw.get("engine"), dict) else ()
    if is_user_family(name):
        return _user_space(where, name, raw, groups)
    fam = family(name)
    named = getattr(fam, "NAMED_CHOICES", {})
    optional_arch = tuple(getattr(fam, "OPTIONAL_ARCH_KEYS", ()))
    choices = _options(where, "choices", raw.get("choices", {}), fam.ARCH_KEYS + optional_arch + fam.LAYER_KEYS,
                       named)
    if raw.get("per_layer") and not fam.LAYER_KEYS:  # the unknown-key error named an empty list of known keys
        raise SpecError(where, "per_layer", f"the {name} family has no per-layer choices", None,
                        "remove [per_layer]; choose the engine by module name in [engine.NAME] tables "
                        f"(see the comments in search_spaces/{name}.toml)")
    per_layer = _options(where, "per_layer", raw.get("per_layer", {}), fam.LAYER_KEYS, named)
    by_device = _by_device(where, raw, choices, per_layer)
    if by_device and not hasattr(fam, "linear_widths"):
        raise SpecError(where, "precision" if by_device == ("precision",) else "engine",
                        f'"auto" needs the engine probe, which times linear layers; the {name} family does not say '
                        "its layers' widths (its convolutions are not what the probe measures)", AUTO,
                        'list the precisions instead, e.g. precision = ["fp32", "bf16"]')
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
        if e.key in by_device and raw.get("engine") == AUTO:  # set by engine = "auto": it read [per_layer.precision]
            raise SpecError(where, "engine", e.rule, AUTO, e.fix) from None  # and ['fp32'], neither of them written
        section = "choices" if e.key in choices else "per_layer"
        raise SpecError(where, f"{section}.{e.key}", e.rule, e.got, e.fix) from None
    return SearchSpace(family=name, choices=choices, per_layer=per_layer, by_device=by_device, groups=groups)


def _typed(options: tuple[Any, ...]) -> tuple[tuple[type, Any], ...]:
    return tuple((type(option), option) for option in options)


def _is_target(name: str) -> bool:
    module, _, attr = name.partition(":")
    return bool(module and attr) and all(p.isidentifier() for p in [*module.split("."), *attr.split(".")])


def _user_space(where: str, name: str, raw: dict[str, Any], groups: tuple[EngineGroup, ...]) -> SearchSpace:
    """A user family's space: [choices] of any names and values (the builder reads them), and [engine.NAME]."""
    if "per_layer" in raw:
        raise SpecError(where, "per_layer", "is for the built-in families; a model builder reads [choices] only",
                        sorted(raw["per_layer"]) if isinstance(raw["per_layer"], dict) else raw["per_layer"],
                        "put the choices under [choices] and let build(arch) lay them out")
    if isinstance(raw.get("engine"), str):
        raise SpecError(where, "engine", 'is a table of groups for a model builder: "auto" is for the built-in '
                        "families", raw["engine"], '[engine.mlp] modules = ["blocks.*.mlp.*"] precision = ["fp32", '
                        '"bf16"]')
    table = raw.get("choices", {})
    if not isinstance(table, dict):
        raise SpecError(where, "choices", "must be a table", table, "write it as [choices]")
    choices = {}
    for key, value in table.items():
        values = value if isinstance(value, list) else [value]
        if key in DSNAS_KEYS:  # the arch's "family" and "engine" are dsnas's: a choice of that name replaced them
            raise SpecError(where, f"choices.{key}", f"is a name dsnas writes into every architecture "
                            f"({', '.join(DSNAS_KEYS)})", value, f"name the choice otherwise, e.g. model_{key}")
        if not values or not all(isinstance(v, (int, float, str, bool)) for v in values):
            raise SpecError(where, f"choices.{key}", "must be a value or a non-empty list of numbers, strings or "
                            "booleans", value, f"e.g. {key} = [32, 64]")
        if len(set(values)) != len(values):  # by equality, as Optuna stores a choice: 1, 1.0 and true are one
            raise SpecError(where, f"choices.{key}", "must not repeat a choice (1, 1.0 and true are one choice to "
                            "Optuna)", value, "write each choice once")
        choices[key] = tuple(values)
    return SearchSpace(family=name, choices=choices, per_layer={}, groups=groups)


def _groups(where: str, table: dict[str, Any], users: bool = False) -> tuple[EngineGroup, ...]:
    """[engine.NAME] tables: modules (patterns), precision and sparsity (one or a list each). ``users``: of a
    user family's space, which has no per-layer parameters (a ResNet's [engine.layer4] names no one else's)."""
    groups = []
    for name, group in table.items():
        key = f"engine.{name}"
        if not isinstance(group, dict):
            raise SpecError(where, key, "must be a table with modules, precision and sparsity", group,
                            f'[engine.{name}] modules = ["blocks.*.mlp.*"] precision = ["fp32", "bf16"]')
        if not name.isidentifier():
            raise SpecError(where, key, "the group's name must be a word (letters, digits, _): it names the "
                            "Optuna parameters NAME.precision and NAME.sparsity", name, "e.g. [engine.mlp]")
        if not users and re.fullmatch(r"layer\d+", name):  # layerI.precision: [per_layer]'s parameter of layer I
            raise SpecError(where, key, "the group's name is that of a layer's parameters (layerI.precision): the "
                            "group and the layer would share one", name, "name the group otherwise, e.g. "
                            f"[engine.{name}_group]")
        reject_unknown(where, f"{key}.", group, ("modules", "precision", "sparsity"))
        modules = group.get("modules")
        patterns = [modules] if isinstance(modules, str) else modules
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise SpecError(where, f"{key}.modules", "must be a module-name pattern or a non-empty list of them",
                            modules, 'e.g. modules = ["blocks.*.mlp.*", "head"]')
        picked = {}
        for engine_key, allowed in (("precision", PRECISIONS), ("sparsity", SPARSITIES)):
            value = group.get(engine_key, allowed[0])
            values = value if isinstance(value, list) else [value]
            if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise SpecError(where, f"{key}.{engine_key}", f"must be one or a list (without repeats) of "
                                f"{list(allowed)}", value,
                                f"e.g. {engine_key} = {list(allowed[:2])!r}".replace("'", '"'))
            picked[engine_key] = tuple(values)
        groups.append(EngineGroup(name, tuple(patterns), **picked))
    return tuple(groups)


def _by_device(where: str, raw: dict[str, Any], choices: dict[str, tuple[Any, ...]],
               per_layer: dict[str, tuple[Any, ...]]) -> tuple[str, ...]:
    """The engine keys the probe decides, each left at fp32 / dense in its section until it has: `precision =
    "auto"`, or `engine = "auto"` (precision and sparsity, per layer). Sparsity's own "auto" is another thing (the
    Hessian trace decides per layer, see dsnas.kernels.choices) and stays as it is."""
    engine = raw.get("engine")
    if engine is not None and not isinstance(engine, dict):  # a table: [engine.NAME] groups (see _groups)
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
            if not values or any(isinstance(v, (bool, float)) or v not in allowed for v in values):  # 3.0 == 3
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
        if len(set(values)) != len(values):  # a repeat is drawn more often: n_layers = [1, 1, 1, 2] drew 1 3:1
            raise SpecError(where, f"{section}.{key}", "must not repeat a choice", value,
                            f"write each choice once: {list(dict.fromkeys(values))!r}")
        out[key] = tuple(values)
    return out


def arch_sampler(file: str | None, callable_target: str | None, base_dir: str | Path) -> SampleFn:
    """The function that turns an Optuna trial into an architecture."""
    if file is not None:
        return load_space_file(file).sample

    return import_callable(callable_target or "", base_dir)
