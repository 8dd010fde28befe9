"""Objective schedules: the grammar, the objective and logged values at each progress point."""

import pytest
import torch

from dftune.loss import token_loss
from dftune.schedule import objective_schedule

# (spec, progress, expected objective name, expected logged values beyond name/phase)
CASES = [
    ("dft", 0.0, "dft", {}),
    ("dft", 1.0, "dft", {}),
    ("prob_power:alpha=0->1", 0.0, "prob_power:alpha=0", {"alpha": 0.0}),
    ("prob_power:alpha=0->1", 0.25, "prob_power:alpha=0.25", {"alpha": 0.25}),
    ("prob_power:alpha=0->1", 1.0, "prob_power:alpha=1", {"alpha": 1.0}),
    ("prob_power:alpha=0->1", 7.0, "prob_power:alpha=1", {"alpha": 1.0}),  # clamped
    ("nll@0.2,dft", 0.0, "nll", {}),
    ("nll@0.2,dft", 0.1999, "nll", {}),
    ("nll@0.2,dft", 0.2, "dft", {}),
    ("nll@0.2,dft", 1.0, "dft", {}),
    ("nll@0.2,prob_power:alpha=0->1", 0.6, "prob_power:alpha=0.5", {"alpha": 0.5}),  # phase-local progress
    ("nll@0.25,dft:floor=0.5->0,protect=special", 0.625, "dft:floor=0.25,protect=special", {"floor": 0.25}),
    ("dft:floor=0.1,protect=special@0.5,nll", 0.3, "dft:floor=0.1,protect=special", {}),
    ("dft:floor=0.1,protect=special@0.5,nll", 0.7, "nll", {}),
    ("nll@0.1,eaft:k=20,alpha=2->0@0.6,dft", 0.35, "eaft:k=20,alpha=1", {"alpha": 1.0}),
    ("nll@0.1,eaft:k=20,alpha=2->0@0.6,dft", 0.9, "dft", {}),
]


@pytest.mark.parametrize("spec, progress, name, values", CASES)
def test_schedule_table(spec, progress, name, values):
    s = objective_schedule(spec)
    assert s.at(progress).name == name
    got = s.values(progress)
    assert got["objective"] == name
    for k, v in values.items():
        assert got[k] == pytest.approx(v)
    assert set(got) == {"objective", "phase", *values}


def test_phase_index_and_static():
    s = objective_schedule("nll@0.2,dft")
    assert [s.values(p)["phase"] for p in (0.0, 0.5)] == [0, 1]
    assert objective_schedule("dft:floor=0.1").static and not s.static
    assert not objective_schedule("prob_power:alpha=0->1").static
    assert s.at(0.5) is s.at(0.9)  # resolved once, not per step


def test_requirements_cover_every_phase():
    s = objective_schedule("nll@0.5,iw_sft")
    assert s.needs_ref and not s.needs_classes and s.topk == 0
    s = objective_schedule("eaft:k=8@0.5,dft:protect=special")
    assert s.topk == 8 and s.needs_classes and not s.needs_ref


def test_a_ramped_objective_trains_like_its_endpoints():
    """At progress 0 the ramp prob_power:alpha=0->1 has NLL's gradient, at 1 DFT's."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(20, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 20, (12,), generator=g)
    s = objective_schedule("prob_power:alpha=0->1")

    def grad(obj):
        h = hidden.clone().requires_grad_(True)
        token_loss(h, weight, labels, obj).loss.backward()
        return h.grad

    torch.testing.assert_close(grad(s.at(0.0)), grad("nll"))
    torch.testing.assert_close(grad(s.at(1.0)), grad("dft"))


@pytest.mark.parametrize(
    "spec, match",
    [("", "empty"), ("nll,dft", "needs '@END'"), ("nll@0.5,dft@0.8", "last phase"), ("nll@0.6,dft@0.4,nll", "increase"),
     ("nll@1.0,dft", "increase"), ("nll@x,dft", "not a number"), ("prob_power:alpha=0-", "redirection"),
     ("prob_power:alpha=a->1", "not a number"), ("prob_power:alpha=1->-1", "alpha must be >= 0"),
     ("dtf@0.5,dft", "unknown objective"), ("nll@0.5,,dft", "empty item"), ("dft:beta=0->1", "no parameter"),
     ("dft:floor=0.1,floor=0.2", "given twice")],
)
def test_bad_schedules_fail_clearly(spec, match):
    with pytest.raises(ValueError, match=match):
        objective_schedule(spec)
