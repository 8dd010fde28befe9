"""The numbers the report opens with: per group (a prior, a model...) the objectives ranked by
accuracy with 95% intervals, the paired difference to the baseline objective, and findings
generated from the data (never written by hand).

The interval (docs/design.md, "Report"). Each objective has k seeds; each was evaluated on the
same problems. "Is DFT better than NLL here" has two sources of noise: which seeds were
trained (another seed gives another model) and which problems the benchmark holds. So every
interval is a two-level bootstrap: a replicate draws each objective's seeds with replacement
(independently per objective) and each benchmark's problems with replacement (the same draw
for every objective: paired), and computes the mean over benchmarks of the mean over problems
of the seed-averaged per-problem accuracy. The difference to the baseline is taken replicate by
replicate; its p-value is two-sided, from the replicates shifted to mean 0 (as `dftune compare`).
With one seed per objective this is exactly `dftune compare`'s paired bootstrap over problems.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from dftune.eval.metrics import BOOTSTRAP_REPS, interval, primary_metric

# finding thresholds (documented in docs/design.md, shown in the page's notes)
TAIL_MIN = 0.005  # a tail's share (p < 0.1, p > 0.9) "moved" by at least half a point ...
TAIL_SE = 2.0  # ... and by more than twice the binomial standard error of the difference
CURVE_WINDOW = 0.2  # the first and last fifth of the logged steps are compared
CURVE_MIN = 0.02  # loss "falls" / NLL "rises" by at least 2% of its first-window value
TRUNC_MIN = 0.10  # 10 points more samples hitting the token budget than the baseline
STOP_LOW = 0.3  # end-of-turn tokens with mean p below this are "unlearned" (as the probe's constant)
BASE_NAMES = ("base",)  # compare values that are the untuned model: ranked, never a finding


@dataclass
class Arm:
    """One objective in one group: its seeds' runs and what they scored."""

    name: str
    runs: list = field(default_factory=list)
    score: float | None = None  # mean over seeds of the primary metric's mean over benchmarks
    seed_scores: list = field(default_factory=list)
    ci95: list | None = None
    diff: float | None = None  # score - baseline's score
    diff_ci95: list | None = None
    p: float | None = None
    truncated: float | None = None  # mean fraction of samples that hit the token budget

    @property
    def verdict(self) -> str:
        if self.diff_ci95 is None:
            return ""
        lo, hi = self.diff_ci95
        return "better" if lo > 0 else "worse" if hi < 0 else "unclear"


@dataclass
class Group:
    label: str  # "prior=weak"; "" for a single group
    values: dict
    arms: dict = field(default_factory=dict)  # name -> Arm, in input order
    baseline: str | None = None
    metric: str = ""
    benchmarks: list = field(default_factory=list)
    problems: int = 0
    boot: dict = field(default_factory=dict)  # arm name -> (reps,) replicates of its score
    analysis: object = None  # the Run holding this group's token_probs.json
    probe: object = None  # the Run holding this group's probe.json

    @property
    def ranking(self) -> list[Arm]:
        return sorted([a for a in self.arms.values() if a.score is not None], key=lambda a: -a.score)

    def paired(self, a: str, b: str) -> tuple[float, list[float], float] | None:
        """Score of a minus b with its 95% interval and p-value, from the shared replicates."""
        if a not in self.boot or b not in self.boot:
            return None
        d = self.boot[a] - self.boot[b]
        obs = self.arms[a].score - self.arms[b].score
        p = (1 + np.sum(np.abs(d - d.mean()) >= abs(obs) - 1e-12)) / (len(d) + 1)
        return obs, interval(d), float(min(1.0, p))


def bootstrap(arms: dict[str, list[dict]], reps: int = BOOTSTRAP_REPS, seed: int = 0):
    """arms[name] = per-seed {benchmark: {id: accuracy}}. Returns (seed_scores, replicates,
    benchmarks, problems): per arm each seed's score and (reps,) two-level bootstrap replicates
    of the seed-averaged score, over the benchmarks and problems every run of every arm holds."""
    runs = [acc for seeds in arms.values() for acc in seeds]
    benches = [b for b in runs[0] if all(b in acc for acc in runs)]
    ids = {b: sorted(set.intersection(*(set(acc[b]) for acc in runs))) for b in benches}
    benches = [b for b in benches if ids[b]]
    rng = np.random.default_rng(seed)
    draws = {b: rng.integers(0, len(ids[b]), size=(reps, len(ids[b]))) for b in benches}  # (reps, P): shared
    scores, boot = {}, {}
    for name, seeds in arms.items():
        k = len(seeds)
        counts = np.stack([np.bincount(row, minlength=k) for row in rng.integers(0, k, size=(reps, k))])  # (reps, k)
        weights = counts / k
        total, per_seed = np.zeros(reps), np.zeros(k)
        for b in benches:
            m = np.array([[acc[b][i] for i in ids[b]] for acc in seeds], dtype=np.float64)  # (k, P)
            per = weights @ m  # (reps, P): seed-averaged accuracy per problem
            total += np.take_along_axis(per, draws[b], axis=1).mean(axis=1)
            per_seed += m.mean(axis=1)
        scores[name] = [float(x) for x in per_seed / max(len(benches), 1)]
        boot[name] = total / max(len(benches), 1)
    return scores, boot, benches, sum(len(ids[b]) for b in benches)


def score_group(group: Group, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> Group:
    """Fill every arm's score, interval and paired difference to the baseline."""
    full = {}  # arms whose every seed has per-problem results: bootstrapped together
    for arm in group.arms.values():
        evals = [r for r in arm.runs if r.summary]
        if not evals:
            continue
        group.metric = group.metric or primary_metric(evals[0].summary)
        arm.seed_scores = [r.summary.get("mean", {}).get(primary_metric(r.summary)) for r in evals]
        arm.seed_scores = [s for s in arm.seed_scores if s is not None]
        trunc = [m.get("truncated") for r in evals for m in r.summary.get("benchmarks", {}).values()]
        trunc = [t for t in trunc if t is not None]
        arm.truncated = statistics.mean(trunc) if trunc else None
        if all(r.acc for r in evals):
            full[arm.name] = [r.acc for r in evals]
        elif arm.seed_scores:
            arm.score = statistics.mean(arm.seed_scores)  # no samples.jsonl: the summaries' numbers, no interval
    if full:
        per_seed, group.boot, group.benchmarks, group.problems = bootstrap(full, reps, seed)
        for name, scores in per_seed.items():
            arm = group.arms[name]
            arm.seed_scores, arm.score, arm.ci95 = scores, statistics.mean(scores), interval(group.boot[name])
    base = group.arms.get(group.baseline) if group.baseline else None
    if base is None or base.score is None:
        return group
    for arm in group.arms.values():
        if arm is base or arm.score is None:
            continue
        pair = group.paired(arm.name, base.name)
        if pair:
            arm.diff, arm.diff_ci95, arm.p = pair
        else:
            arm.diff = arm.score - base.score
    return group


# ---- findings -------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # accuracy, no_difference, polarises, raises, nll_rises, truncates, eot_unlearned, probe
    group: str
    text: str


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _pval(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _prefix(label: str) -> str:
    return f"{label}: " if label else ""


def accuracy_findings(g: Group) -> list[Finding]:
    if not g.baseline or not g.boot:
        return []
    out = []
    for arm in g.ranking:
        if arm.name in BASE_NAMES or arm.name == g.baseline or arm.diff_ci95 is None or arm.verdict == "unclear":
            continue
        lo, hi = arm.diff_ci95
        word = "beats" if arm.verdict == "better" else "trails"
        out.append(Finding("accuracy", g.label, f"{_prefix(g.label)}{arm.name} {word} {g.baseline} by {_pts(arm.diff)} "
                                                f"points (95% CI {_pts(lo)} to {_pts(hi)}, {_pval(arm.p)})"))
    tuned = [a for a in g.arms.values() if a.name not in BASE_NAMES and a.name != g.baseline and a.diff_ci95]
    if tuned and not out:
        out.append(Finding("no_difference", g.label, f"{_prefix(g.label)}no objective's accuracy differs clearly from "
                                                     f"{g.baseline}'s (every 95% interval includes 0)"))
    for arm in tuned:
        b = g.arms[g.baseline]
        if arm.truncated is not None and b.truncated is not None and arm.truncated - b.truncated >= TRUNC_MIN:
            out.append(Finding("truncates", g.label, f"{_prefix(g.label)}{arm.name} stops less: {_pct(arm.truncated)} "
                                                     f"of samples hit the token budget ({g.baseline}: {_pct(b.truncated)})"))
    return out


def moved(p0: float, p1: float, n0: float, n1: float) -> int:
    """+1 / -1 when a share went from p0 (of n0 tokens) to p1 (of n1) up / down by at least
    TAIL_MIN and by more than TAIL_SE binomial standard errors (the two treated as independent;
    they are the same tokens, so this errs on the side of "not moved"); else 0."""
    se = math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1) if n0 and n1 else 0.0
    d = p1 - p0
    return 0 if abs(d) < TAIL_MIN or abs(d) <= TAIL_SE * se else (1 if d > 0 else -1)


def _share(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def token_findings(analysis: dict, label: str) -> list[Finding]:
    """Polarisation and end-of-turn learning of each model against the analysis' base model."""
    out = []
    summ = analysis.get("summary", {})
    base = analysis.get("base")
    b = summ.get(base) if base else None
    for m, s in summ.items():
        if b is None or m == base:
            continue
        lo0, lo1 = b.get("frac_below_0.1"), s.get("frac_below_0.1")
        hi0, hi1 = b.get("frac_above_0.9"), s.get("frac_above_0.9")
        if None in (lo0, lo1, hi0, hi1):
            continue
        ent = ""
        if b.get("mean_entropy") and s.get("mean_entropy") is not None:
            ent = f", entropy {100 * (s['mean_entropy'] / b['mean_entropy'] - 1):+.0f}%"
        tails = f"p < 0.1 {_share(lo0)} → {_share(lo1)}, p > 0.9 {_share(hi0)} → {_share(hi1)}{ent} (against {base})"
        n0, n1 = b.get("tokens") or 0, s.get("tokens") or 0
        low, high = moved(lo0, lo1, n0, n1), moved(hi0, hi1, n0, n1)
        if low > 0 and high > 0:
            out.append(Finding("polarises", label, f"{_prefix(label)}{m} polarises token probabilities: {tails}"))
        elif low < 0 and high > 0:
            out.append(Finding("raises", label, f"{_prefix(label)}{m} raises token probabilities across the board: {tails}"))
    eot = analysis.get("end_of_turn") or {}
    learned = [m for m, e in eot.items() if m != base and (e.get("mean_prob") or 0) >= STOP_LOW]
    for m, e in eot.items():
        if m == base or e.get("mean_prob") is None or e["mean_prob"] >= STOP_LOW or not learned:
            continue
        others = ", ".join(f"{x}: {eot[x]['mean_prob']:.2f}" for x in learned)
        out.append(Finding("eot_unlearned", label, f"{_prefix(label)}{m} leaves the end-of-turn token unlearned: mean p "
                                                   f"{e['mean_prob']:.2f} ({others})"))
    return out


def _window(rows: list[dict], key: str) -> tuple[float, float] | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if len(vals) < 2:
        return None
    w = max(1, int(len(vals) * CURVE_WINDOW))
    return statistics.mean(vals[:w]), statistics.mean(vals[-w:])


def nll_rises(log: list[dict]) -> tuple[float, float] | None:
    """(relative loss change, relative NLL change) when the objective's loss fell and NLL rose
    (first vs last fifth of the logged steps, each by at least CURVE_MIN); else None."""
    loss, nll = _window(log, "loss"), _window(log, "nll")
    if not loss or not nll or loss[0] == 0 or nll[0] == 0:
        return None
    if all(r.get("loss") == r.get("nll") for r in log if "loss" in r):
        return None  # the objective is NLL itself
    dl, dn = (loss[1] - loss[0]) / abs(loss[0]), (nll[1] - nll[0]) / abs(nll[0])
    return (dl, dn) if dl <= -CURVE_MIN and dn >= CURVE_MIN else None


def curve_findings(g: Group) -> list[Finding]:
    out = []
    for arm in g.arms.values():
        logs = [r.log for r in arm.runs if r.log]
        hits = [h for h in (nll_rises(lg) for lg in logs) if h]
        if logs and 2 * len(hits) >= len(logs) and hits:
            dl = statistics.mean(h[0] for h in hits)
            dn = statistics.mean(h[1] for h in hits)
            out.append(Finding("nll_rises", g.label, f"{_prefix(g.label)}NLL rises under {arm.name} while its loss falls "
                                                     f"({len(hits)} of {len(logs)} seeds; loss {100 * dl:+.0f}%, NLL "
                                                     f"{100 * dn:+.0f}%, first vs last fifth of training)"))
    return out


def _family(objective: str) -> str:
    return objective.split(":", 1)[0]


def probe_finding(g: Group) -> list[Finding]:
    """The probe's recommendation next to the measured ranking of fine-tuned objectives."""
    if g.probe is None or not g.probe.probe:
        return []
    rec = (g.probe.probe.get("recommendation") or {}).get("objective")
    tuned = [a for a in g.ranking if a.name not in BASE_NAMES]
    if not rec or not tuned:
        return []
    best = tuned[0]
    ran = next((a for a in tuned if a.name == rec), None) or next((a for a in tuned if _family(a.name) == _family(rec)),
                                                                  None)
    head = f"{_prefix(g.label)}the probe recommended {rec}; measured best: {best.name} ({100 * best.score:.1f}%)"
    if ran is None:
        return [Finding("probe", g.label, f"{head}; {rec} was not run")]
    if ran is best:
        return [Finding("probe", g.label, f"{head}: agrees")]
    pair = g.paired(ran.name, best.name)
    if pair is None:
        return [Finding("probe", g.label, f"{head}; {ran.name} scored {100 * ran.score:.1f}%")]
    d, (lo, hi), _ = pair
    word = "disagrees" if hi < 0 else "within noise of the best"
    return [Finding("probe", g.label, f"{head}; {ran.name} {_pts(d)} points (95% CI {_pts(lo)} to {_pts(hi)}): {word}")]


def findings(groups: list[Group], analyses: list[tuple[str, dict]]) -> list[Finding]:
    """Every finding the data supports, group by group; ``analyses`` = [(label, token_probs)]
    (an analysis labelled like a group is reported with it)."""
    tokens = {}
    for label, a in analyses:
        tokens.setdefault(label, []).extend(token_findings(a, label))
    out = []
    for g in groups:
        out += accuracy_findings(g) + curve_findings(g) + tokens.pop(g.label, []) + probe_finding(g)
    return out + [f for fs in tokens.values() for f in fs]
