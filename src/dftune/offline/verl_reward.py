"""The PPO reward for verl: 1.0 when our grader judges the response's final answer correct, else 0.0.

verl imports this module (``reward.custom_reward_function.path=pkg://dftune.offline.verl_reward``,
``name=compute_score``; ``dftune baseline ppo`` sets both) and calls it once per response with
keyword arguments: ``data_source``, ``solution_str`` (the decoded response),
``ground_truth`` (the parquet's ``reward_model.ground_truth``) and ``extra_info`` (the
parquet's ``extra_info``, to which verl adds its own keys), plus optional extras we ignore.
It runs in verl's reward workers, in threads: the grader's own worker process (spawned per
call) bounds time and memory, and math-verify's SIGALRM timeouts need that process's main
thread. dftune (with math-verify) must be installed in verl's environment on every node.
"""

from __future__ import annotations


def golds_of(ground_truth, extra_info) -> list[str]:
    """The gold answer as the grader takes it (a list of parts, all required): ``extra_info['golds']``
    as dftune wrote it, else ``ground_truth``. Parquet hands lists back as lists or numpy arrays."""
    golds = (extra_info or {}).get("golds") if isinstance(extra_info, dict) else None
    if golds is None:
        golds = ground_truth
    if isinstance(golds, (str, int, float)):
        return [str(golds)]
    return [str(g) for g in list(golds)]


def compute_score(data_source=None, solution_str: str = "", ground_truth=None, extra_info=None, **kwargs) -> float:
    """verl's custom-reward signature; the grader is dftune's (``dftune.eval.grade``)."""
    from dftune.eval.grade import grade_batch

    golds = golds_of(ground_truth, extra_info)
    if not golds or not isinstance(solution_str, str):
        return 0.0
    verdict = grade_batch([(solution_str, golds)], workers=1)[0]
    return 1.0 if verdict.correct else 0.0
