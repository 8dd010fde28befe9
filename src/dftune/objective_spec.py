"""Objective specs: ``"name:key=value,key=value"`` strings, as configs and the command line
write them, resolved to an ``Objective`` of the registry (``objectives.OBJECTIVES``), with
the two parameters every objective accepts (``norm``, ``protect``) applied on top, and
the listing ``--show`` prints. Errors name the spec and the parameter.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import Tensor

from dftune.objectives import OBJECTIVES, Objective, ObjectiveError, TokenContext, need
from dftune.vocab import CLASS_IDS, CLASS_NAMES

# Parameters every objective accepts, applied on top of its own function.
GENERIC_PARAMS = {
    "norm": "tokens (default: sum / global count of target tokens) or weight (sum / global sum of "
            "the per-token weights w_t, so that the effective learning rate does not shrink with "
            "the weights; the training loop rescales the gradient)",
    "protect": "token classes trained with plain NLL instead of the objective, joined by '+': "
               f"{', '.join(CLASS_NAMES)} (e.g. protect=special: EOS, end-of-turn and template tokens)",
}


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _protect(obj: Objective, classes: str) -> Objective:
    names = [c.strip() for c in str(classes).split("+") if c.strip()]
    unknown = [c for c in names if c not in CLASS_IDS]
    if not names or unknown:
        raise ObjectiveError(f"protect={classes!r}: token classes are {', '.join(CLASS_NAMES)} (join several with '+')")
    ids = sorted({CLASS_IDS[c] for c in names})
    inner = obj.fn

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        cls = need(ctx.token_class, "token classes (token_loss(..., token_class=dftune.vocab.token_classes(tok, V)))",
                    obj.name)
        protected = torch.isin(cls, torch.tensor(ids, device=cls.device))
        return torch.where(protected, -logp, inner(logp, ctx))

    label = "+".join(CLASS_NAMES[i] for i in ids)
    return replace(obj, name=_join(obj.name, f"protect={label}"), fn=fn, needs_classes=True,
                   protected=tuple(sorted(set(obj.protected) | set(ids))))


def _join(name: str, param: str) -> str:
    return f"{name},{param}" if ":" in name else f"{name}:{param}"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:key=value,key=value"`` -> (name, {key: value-text}), with clear errors."""
    name, _, params = str(spec).partition(":")
    name = name.strip()
    if name not in OBJECTIVES:
        raise ObjectiveError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    kwargs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ObjectiveError(f"objective {spec!r}: parameter {item!r} is not key=value")
        key = key.strip()
        if key in kwargs:
            raise ObjectiveError(f"objective {spec!r}: parameter {key!r} given twice")
        kwargs[key] = value.strip()
    return name, kwargs


def get_objective(spec: str | Objective) -> Objective:
    """Resolve ``"name"`` or ``"name:key=value,key=value"`` to an Objective.

    >>> get_objective("prob_power:alpha=2").name
    'prob_power:alpha=2'
    >>> get_objective("dft:floor=0.1,protect=special,norm=weight").normalize
    'weights'
    """
    if isinstance(spec, Objective):
        return spec
    name, raw = parse_spec(spec)
    for key, value in raw.items():
        if "->" in value or value.endswith("-"):
            raise ObjectiveError(f"objective {spec!r}: {key}={value} is a ramp; ramps belong in an objective schedule "
                             "(train.objective_schedule, dftune.objective_schedule); quote '->' on a shell command line")
    norm = raw.pop("norm", "tokens")
    protect = raw.pop("protect", None)
    if norm not in ("tokens", "weight"):
        raise ObjectiveError(f"objective {spec!r}: norm must be 'tokens' or 'weight', got {norm!r}")
    factory = OBJECTIVES[name]
    allowed = inspect.signature(factory).parameters
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ObjectiveError(
            f"objective {name!r} has no parameter(s) {sorted(unknown)}; it takes "
            f"{list(allowed) + list(GENERIC_PARAMS)}"
        )
    try:
        obj = factory(**{k: _parse_value(v) for k, v in raw.items()})
    except ObjectiveError:
        raise
    except (TypeError, ValueError) as e:  # e.g. alpha=abc reaching float()
        raise ObjectiveError(f"objective {spec!r}: {e}") from None
    if protect is not None:
        obj = _protect(obj, protect)
    if norm == "weight":
        obj = replace(obj, name=_join(obj.name, "norm=weight"), normalize="weights")
    if obj.follows and "pbar" not in raw:  # auto: the training loop supplies the data's statistic every step
        obj = replace(obj, with_data_prob=lambda pbar: get_objective(_join(str(spec), f"pbar={float(pbar)!r}")))
    return obj


def describe_objectives() -> str:
    """Every registered objective with its parameters, defaults and paper: for ``--show``."""
    lines = ["Objectives (train.objective = NAME or NAME:key=value,key=value):"]
    for name, factory in OBJECTIVES.items():
        if name == "sft":
            continue
        params = ",".join(f"{p.name}={p.default}" for p in inspect.signature(factory).parameters.values())
        doc = " ".join((factory.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"  {name}{':' + params if params else ''}\n      {doc}")
    lines.append("Every objective also takes:")
    lines += [f"  {k}: {v}" for k, v in GENERIC_PARAMS.items()]
    lines.append("Over training (dftune.schedule): phases NAME[:params][@END] and linear ramps a->b, e.g. "
                 "'nll@0.2,dft' (NLL for the first 20% of steps) or 'prob_power:alpha=0->1'.")
    return "\n".join(lines)
