"""A space's device-decided engine choices (`precision = "auto"`, `engine = "auto"`), settled once per study before
its first trial: the engine probe runs where the trials run, the space offers what pays there, and the offer is
stored in the study so that a resumed study samples from the same choices (Optuna's distributions stay fixed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsnas.errors import DsnasError
from dsnas.profiler.engine_probe import EngineProbe, Shape, linear_shapes, probe_on_device
from dsnas.space import SearchSpace
from dsnas.spec import StudySpec, fp8_may_run

OFFER_ATTR = "dsnas_engine_offer"  # the study's user attribute that keeps the offer


def settle(space: SearchSpace, spec: StudySpec, study: Any, context: int, call: Callable[..., Any],
           say: Callable[[str], None]) -> SearchSpace:
    """``space`` with its ``by_device`` keys decided. ``call(fn, *args)`` runs fn where the trials run."""
    stored = study.user_attrs.get(OFFER_ATTR)
    if stored:
        _check_runs_here(stored, spec)
        say(f"  engine: {_offer_line(_as_sampled(space, stored))} (decided at this study's first run on "
            f"{stored['device']})")
        unprobed = [w for w in space.choices.get(space.width_key or "", ())
                    if stored.get("by_width") and str(w) not in stored["by_width"]]
        if unprobed:
            say(f"  engine: width {', '.join(map(str, unprobed))} was not probed when the offer was decided: fp32 "
                "dense there (a new study ([study] name) probes every width)")
        return offered_space(space, stored)
    shapes = study_shapes(space, spec, context)
    if not shapes:
        offer = {"precision": ["fp32"], "sparsity": ["dense"], "device": "-",
                 "why": f"the {space.family} family does not say its layers' widths, so nothing was probed"}
    else:
        probe: EngineProbe = call(probe_on_device, spec.hardware.device, shapes, spec.hardware.threads,
                                  spec.engine.int8_backend)
        say("\n".join("  " + line for line in probe.table().splitlines()))
        offer = {"precision": list(probe.precisions()), "sparsity": list(probe.sparsities()), "device": probe.device,
                 "fingerprint_id": probe.fingerprint_id, "probe": probe.as_dict(),
                 "by_width": {str(w): {k: list(v) for k, v in there.items()} for w, there in probe.by_width().items()},
                 "sparse_with": list(probe.sparse_with())}
    sampled = _as_sampled(space, offer)
    offered = [c for c in sampled["precision"] + sampled["sparsity"] if c not in ("fp32", "dense")]
    if not offered:  # not an error: the search goes on, over what runs fastest here
        say(f"  engine: no engine choice pays on {offer['device']} at this space's shapes"
            f"{' (' + offer['why'] + ')' if 'why' in offer else ''}: this study searches fp32 dense layers only")
    else:
        say(f"  engine: {_offer_line(sampled)}")
    study.set_user_attr(OFFER_ATTR, offer)
    return offered_space(space, offer)


def offered_space(space: SearchSpace, offer: dict[str, Any]) -> SearchSpace:
    """The space an offer makes. An offer stored before sparse_with was kept asks a sparsity beside every
    precision, as its trials were sampled."""
    return space.resolved(tuple(offer["precision"]), tuple(offer["sparsity"]), offer.get("by_width"),
                          tuple(offer.get("sparse_with", ())))


def study_shapes(space: SearchSpace, spec: StudySpec, context: int) -> tuple[Shape, ...]:
    """The shapes the probe times: the space's layer widths at the rows of the batch sizes the study's speed
    objectives are measured at: the largest for throughput, the smallest for latency. A choice that pays where the
    objective is measured serves the search even where it is slower at another batch size (a low precision at
    batch 1, say); a latency limit is checked on every candidate anyway. A study without a speed objective is
    probed at both."""
    sizes = sorted(set(spec.hardware.batch_sizes))
    named = {o.name for o in spec.objectives}
    speed = {"latency": sizes[0], "throughput": sizes[-1]}
    batches = [size for name, size in speed.items() if name in named] or list(speed.values())
    return linear_shapes(space.linear_widths(), dict.fromkeys(b * context for b in batches))


def _as_sampled(space: SearchSpace, offer: dict[str, Any]) -> dict[str, Any]:
    """The offer as the space samples it, for saying so: a sparsity the space lists itself (precision = "auto"
    beside sparsity = ["dense", "2:4"]) is sampled from its list, not from the probe's offer."""
    if "sparsity" in space.by_device:
        return offer
    listed = space.per_layer.get("sparsity") or space.choices.get("sparsity") or ("dense",)
    return {**offer, "sparsity": list(listed), "sparsity_listed": True}


def _check_runs_here(offer: dict[str, Any], spec: StudySpec) -> None:
    """A study resumed where its stored offer cannot run (fp8, decided on a GPU, where trials now run on the CPU)
    is refused before any trial, as a listed fp8 is: each trial that drew it failed."""
    if "fp8" not in offer.get("precision", ()) or fp8_may_run(spec):
        return
    raise DsnasError(f"{spec.path}: [hardware.device] the study's engine offer was decided on {offer.get('device')} "
                     "and holds fp8, which needs an NVIDIA GPU of compute capability 8.9 or newer; trials here run "
                     "on the CPU. Fix: resume it where it was searched, or search a new study ([study] name) here")


def _offer_line(offer: dict[str, Any]) -> str:
    where, by_width = [], offer.get("by_width", {})  # the choices offered at some widths only
    for key in ("precision", "sparsity"):
        for choice in offer[key][1:]:
            at = [w for w, there in by_width.items() if choice in there[key]]
            if len(at) < len(by_width):
                where.append(f"{choice} at width {', '.join(at)} only")
    sparse = any(c != "dense" for c in offer["sparsity"])
    if offer.get("sparse_with") and sparse:  # asked beside these precisions only (SearchSpace.sparse_with)
        where.append(f"a sparsity beside {' or '.join(offer['sparse_with'])} only, which a sparse kernel takes")
    listed = " (as the space lists it)" if offer.get("sparsity_listed") else ""
    return (f"precision {offer['precision']}, sparsity {offer['sparsity']}{listed} (what pays on this device"
            f"{': ' + '; '.join(where) if where else ''})")
