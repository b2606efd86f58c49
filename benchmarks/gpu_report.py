"""The GPU check's report: sections of checks (a measured value against a bound, with the reason for the bound),
tables, notes and timings, written as JSON and Markdown after every section so that a check cut short by its time
limit still leaves what it found."""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    """``value`` against ``low``/``high``; ``ok`` is None when the value could not be had (``why`` says why)."""

    name: str
    value: float | str | None
    low: float | None = None
    high: float | None = None
    unit: str = ""
    why: str = ""  # why the bound is what it is, or why there is no value
    ok: bool | None = None

    @property
    def bound(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{_num(self.low)} .. {_num(self.high)}"
        if self.low is not None:
            return f">= {_num(self.low)}"
        if self.high is not None:
            return f"<= {_num(self.high)}"
        return "-"


@dataclass
class Section:
    name: str
    status: str = "not run"  # ok | failed (a check failed) | error (it raised) | skipped
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def check(self, name: str, value: float | None, low: float | None = None, high: float | None = None, *,
              unit: str = "", why: str = "") -> bool | None:
        """Record ``low <= value <= high``; a None or NaN value is unavailable (ok None), never a pass."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            ok = None
        else:
            ok = (low is None or value >= low) and (high is None or value <= high)
        self.checks.append(Check(name, None if ok is None else float(value), low, high, unit, why, ok))
        return ok

    def within_peak(self, name: str, value: float | None, peak: float | None, floor: float, *, unit: str,
                    how: str, why: str) -> bool | None:
        """``floor * peak <= value <= peak``, the peak this device's own (how: where it came from); without a
        known peak the value is recorded unjudged (ok None), never a pass."""
        if peak is None:
            self.fact(name, None, f"{value:.4g} {unit}" if value is not None else "-", f"no peak to judge it: {how}")
            return None
        return self.check(name, value, floor * peak, peak, unit=unit, why=f"{why}; peak {peak:.4g} {unit}: {how}")

    def fact(self, name: str, ok: bool | None, value: str, why: str = "") -> None:
        """A yes/no finding (a capability, a backend that ran), shown as a check with its text."""
        self.checks.append(Check(name, value, unit="", why=why, ok=ok))

    def table(self, title: str, head: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"title": title, "head": head, "rows": [[_cell(c) for c in r] for r in rows]})

    def note(self, text: str) -> None:
        self.notes.append(text)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Section:
        """A section as Report.write stored it."""
        checks = [Check(**{k: v for k, v in c.items() if k != "bound"}) for c in doc.get("checks", [])]
        return cls(doc["name"], doc.get("status", "not run"), doc.get("seconds", 0.0), checks,
                   doc.get("tables", []), doc.get("notes", []), doc.get("error", ""))


@dataclass
class Report:
    out: Path
    meta: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)  # this run's
    started: float = field(default_factory=time.perf_counter)
    kept: list[Section] = field(default_factory=list)  # an earlier run's, in the same folder (keep_earlier)

    def keep_earlier(self) -> list[str]:
        """Take the sections of the report already in ``out`` (a run of --only some sections keeps the rest: it
        overwrote a whole check's report with its one section); the names kept."""
        try:
            doc = json.loads((self.out / "gpu_check.json").read_text())
            self.kept = [Section.from_dict(s) for s in doc["sections"]]
        except (OSError, ValueError, KeyError, TypeError):  # none, or not a report: nothing to keep
            self.kept = []
        if self.kept:
            self.meta = {**self.meta, "sections kept from": doc.get("meta", {}).get("date", "an earlier run")}
        return [s.name for s in self.kept]

    @property
    def all_sections(self) -> list[Section]:
        """The earlier run's sections, each rerun one in its place, then this run's new ones."""
        new = {s.name: s for s in self.sections}
        merged = [new.pop(s.name, s) for s in self.kept]
        return merged + [s for s in self.sections if s.name in new]

    def run(self, name: str, fn: Callable[[Section], None], *, estimate_s: float, budget_s: float,
            needs: str = "") -> Section:
        """Run one section unless ``needs`` says why it cannot, or its estimate would overrun the budget."""
        sec = Section(name)
        self.sections.append(sec)
        left = budget_s - (time.perf_counter() - self.started)
        if needs:
            sec.status, sec.error = "skipped", needs
        elif estimate_s > left:
            sec.status = "skipped"
            sec.error = f"would overrun --budget-s: estimated {estimate_s:.0f} s, {max(left, 0):.0f} s left"
        else:
            start = time.perf_counter()
            print(f"== {name} ({left:.0f} s of the budget left)", flush=True)
            try:
                fn(sec)
                sec.status = "failed" if any(c.ok is False for c in sec.checks) else "ok"
            except Exception as err:  # a section that breaks is a finding; the others still run
                sec.status, sec.error = "error", "".join(traceback.format_exception(err)).strip()
                print(sec.error, flush=True)
            sec.seconds = time.perf_counter() - start
        print(f"   {name}: {sec.status} ({sec.seconds:.1f} s){': ' + sec.error.splitlines()[-1] if sec.error else ''}",
              flush=True)
        self.write()
        return sec

    @property
    def ok(self) -> bool:
        """This run's sections passed or were skipped, and at least one ran: all skipped checked nothing."""
        return all(s.status in ("ok", "skipped") for s in self.sections) and any(s.status == "ok"
                                                                                 for s in self.sections)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"_type": "dsnas.gpu_check", "_version": 1, "meta": self.meta,
               "seconds": time.perf_counter() - self.started,
               "sections": [{**asdict(s), "checks": [{**asdict(c), "bound": c.bound} for c in s.checks]}
                            for s in self.all_sections]}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        meta = self.meta
        lines = [f"# dsnas GPU check, {meta.get('date', '')}", "",
                 ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "date"), "",
                 f"Total {time.perf_counter() - self.started:.0f} s.", "",
                 "| section | status | seconds | checks passed | note |", "|---|---|---|---|---|"]
        for s in self.all_sections:
            passed = sum(c.ok is True for c in s.checks)
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {passed}/{len(s.checks)} | "
                         f"{_md(s.error.splitlines()[-1]) if s.error else ''} |")
        lines += ["", "## Checks", "", "| section | check | value | bound | result | why |",
                  "|---|---|---|---|---|---|"]
        for s in self.all_sections:
            for c in s.checks:
                result = {True: "pass", False: "**FAIL**",
                          None: "unavailable" if c.value is None else "not judged"}[c.ok]
                value = _num(c.value) + (f" {c.unit}" if c.unit and c.value is not None else "")
                lines.append(f"| {s.name} | {_md(c.name)} | {_md(value)} | {c.bound} | {result} | {_md(c.why)} |")
        for s in self.all_sections:
            if not (s.tables or s.notes or s.status == "error"):
                continue
            lines += ["", f"## {s.name}", ""]
            lines += [f"- {_md(n)}" for n in s.notes]
            for t in s.tables:
                lines += ["", f"{t['title']}:", "", "| " + " | ".join(t["head"]) + " |",
                          "|" + "---|" * len(t["head"])]
                lines += ["| " + " | ".join(_md(str(c)) for c in r) + " |" for r in t["rows"]]
            if s.status == "error":
                lines += ["", "```", s.error[-3000:], "```"]
        return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def _cell(value: Any) -> Any:
    return _num(value) if isinstance(value, float) else value


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
