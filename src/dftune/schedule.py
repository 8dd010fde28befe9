"""Objective schedules: the objective (or one of its parameters) changing over training.

Grammar (``train.objective_schedule``):

    schedule := phase ( "," phase )*
    phase    := objective [ "@" END ]          END: fraction of training where the phase ends
    objective:= NAME [ ":" param ( "," param )* ]
    param    := KEY "=" VALUE | KEY "=" START "->" STOP    (a linear ramp over the phase)

Examples:

    prob_power:alpha=0->1            NLL at the start, DFT's gradient at the end, linearly
    nll@0.2,dft                      NLL for the first 20% of steps, then DFT
    nll@0.1,prob_power:alpha=0->1    NLL for 10%, then alpha from 0 to 1 over the other 90%
    dft:floor=0.5->0,protect=special a floor decaying from 0.5 to 0

Every phase but the last ends at ``@END`` (increasing, in (0, 1)); the last runs to the
end. A ramp is linear in the phase's own progress. An item of the comma list that is
``key=value`` (no ":") continues the previous phase's parameters; anything else starts a
new phase. On a shell command line quote the argument (``>`` is a redirection). A plain
objective ("dft") is a one-phase schedule, so the training loop can always use one.

    schedule = objective_schedule("nll@0.2,dft")
    objective = schedule.at(step / total_steps)     # an Objective for token_loss
    log.update(schedule.values(step / total_steps))  # {"objective": "...", "phase": 0, ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dftune.objective_spec import get_objective, parse_spec
from dftune.objectives import Objective, ObjectiveError


@dataclass(frozen=True)
class Phase:
    name: str  # objective name
    end: float  # fraction of training where this phase ends (1.0 for the last)
    fixed: dict[str, str]  # key -> value text
    ramps: dict[str, tuple[float, float]]  # key -> (start, stop)

    def spec(self, u: float) -> str:
        """The objective spec at phase-local progress u in [0, 1]."""
        params = dict(self.fixed)
        for k, (a, b) in self.ramps.items():
            params[k] = repr(a + (b - a) * u)
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")


@dataclass
class Schedule:
    """Phases of objectives over training progress in [0, 1]."""

    spec: str
    phases: list[Phase]
    _cache: dict[str, Objective] = field(default_factory=dict, repr=False)

    def _locate(self, progress: float) -> tuple[int, float]:
        x = min(max(float(progress), 0.0), 1.0)
        start = 0.0
        for i, ph in enumerate(self.phases):
            if x < ph.end or i == len(self.phases) - 1:
                return i, (x - start) / (ph.end - start)
            start = ph.end
        raise AssertionError("unreachable")

    def at(self, progress: float) -> Objective:
        """The objective at ``progress`` (step / total steps; clamped to [0, 1])."""
        i, u = self._locate(progress)
        spec = self.phases[i].spec(u)
        obj = self._cache.get(spec)
        if obj is None:
            if len(self._cache) > 64:
                self._cache.clear()
            obj = self._cache[spec] = get_objective(spec)
        return obj

    def values(self, progress: float) -> dict:
        """For the step's log: the objective's name, the phase index and every ramped value."""
        i, u = self._locate(progress)
        ph = self.phases[i]
        out: dict = {"objective": self.at(progress).name, "phase": i}
        for k, (a, b) in ph.ramps.items():
            out[k] = a + (b - a) * u
        return out

    def _all(self) -> list[Objective]:
        return [self.at(p) for p in self.checkpoints()]

    def checkpoints(self) -> list[float]:
        """Progress values at which every phase and ramp end is visited (for validation)."""
        out, start = [], 0.0
        for ph in self.phases:
            out += [start, start + (ph.end - start) * 0.999999]
            start = ph.end
        return out

    @property
    def static(self) -> bool:
        """One phase and no ramp: the objective never changes."""
        return len(self.phases) == 1 and not self.phases[0].ramps

    @property
    def needs_ref(self) -> bool:
        """A reference model is needed at some point (set it up before step 1)."""
        return any(o.needs_ref for o in self._all())

    @property
    def needs_classes(self) -> bool:
        return any(o.needs_classes for o in self._all())

    @property
    def topk(self) -> int:
        return max(o.topk for o in self._all())


def _number(text: str, spec: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        hint = " (did the shell take '>' as a redirection? quote the argument)" if text.endswith("-") or not text else ""
        raise ObjectiveError(f"objective schedule {spec!r}: {key}: {text!r} is not a number{hint}") from None


def _split_phases(spec: str) -> list[str]:
    phases: list[list[str]] = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            raise ObjectiveError(f"objective schedule {spec!r}: empty item (two commas, or a trailing comma)")
        if "=" in item and ":" not in item.split("=", 1)[0] and phases:
            phases[-1].append(item)  # key=value: continues the previous phase's parameters
        else:
            phases.append([item])
    return [",".join(p) for p in phases]


def objective_schedule(spec: str) -> Schedule:
    """Parse a schedule (see the module docstring); every objective it can produce is
    resolved once here, so a bad name, parameter or value fails before training starts."""
    text = str(spec).strip()
    if not text:
        raise ObjectiveError("objective schedule is empty")
    parts = _split_phases(text)
    phases, last_end = [], 0.0
    for i, part in enumerate(parts):
        body, at, end_text = part.rpartition("@") if "@" in part else (part, "", "")
        is_last = i == len(parts) - 1
        if at:
            end = _number(end_text, text, f"phase {body!r} end")
            if is_last:
                raise ObjectiveError(f"objective schedule {text!r}: the last phase ({body!r}) runs to the end; drop '@{end_text}'")
            if not last_end < end < 1.0:
                raise ObjectiveError(f"objective schedule {text!r}: phase ends must increase within (0, 1); "
                                 f"{body!r} ends at {end_text} after {last_end:g}")
        elif not is_last:
            raise ObjectiveError(f"objective schedule {text!r}: phase {body!r} needs '@END' (the fraction of training "
                             "where it ends), e.g. nll@0.2,dft")
        else:
            end = 1.0
        name, raw = parse_spec(body)
        fixed, ramps = {}, {}
        for k, v in raw.items():
            if "->" in v:
                a, _, b = v.partition("->")
                ramps[k] = (_number(a, text, k), _number(b, text, k))
            elif v.endswith("-"):
                _number(v, text, k)  # raises with the shell hint
            else:
                fixed[k] = v
        phases.append(Phase(name, end, fixed, ramps))
        last_end = end
    sched = Schedule(text, phases)
    sched._all()  # validate every phase at its start and end (ramp values included)
    return sched
