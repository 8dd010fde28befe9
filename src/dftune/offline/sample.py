"""Rejection sampling for the paper's offline-RL setting.

k responses per question from the model (temperature 1.0), graded with our grader
against the dataset's gold answer, written as
- ``rft.jsonl``: the correct responses, as prompt/completion rows ``dftune train`` reads
  (RFT = plain SFT on them; DFT and iw-SFT train on the same file);
- ``dpo.jsonl``: (prompt, chosen = a correct response, rejected = an incorrect one) pairs
  for the same question, conversational, as TRL's DPOTrainer reads them;
- ``samples.jsonl``: every sample with its verdict (resumable, like evaluations);
- ``stats.json``: the yield (how many questions had 0..k correct responses).

    dftune sample --model M --data ../shared/data/train/math_train.jsonl --k 4 --out data/rft
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dftune.data import DataError, detect_format, gsm8k_boxed, read_records, select_rows, set_chat_template
from dftune.eval.generate import SamplingConfig
from dftune.eval.grade import boxed_contents, grade_batch
from dftune.eval.run import append_rows, read_samples


@dataclass
class Question:
    id: str
    prompt: str  # the user turn (problem + instruction suffix), as training will see it
    golds: list[str]


def gold_answer(record: dict, fmt: str, source: str) -> list[str]:
    """problem/solution: the solution's last \\boxed{}; question/answer: the number after ####;
    an explicit ``answer`` field wins."""
    if isinstance(record.get("answer"), (str, int, float)) and fmt != "question_answer":
        return [str(record["answer"])]
    if fmt == "problem_solution":
        boxes = boxed_contents(str(record.get("solution", "")))
        if not boxes:
            raise DataError(f"{source}: field 'solution' has no \\boxed{{}} answer to grade against")
        return [boxes[-1]]
    if fmt == "question_answer":
        ans = str(record.get("answer", ""))
        if "####" not in ans:
            raise DataError(f"{source}: field 'answer' has no '#### N' final answer")
        return [ans.rsplit("####", 1)[1].strip().replace(",", "")]
    raise DataError(f"{source}: cannot find a gold answer for format {fmt!r} (need an 'answer' field)")


def load_questions(data: str, select: str = "all", suffix: str = "", seed: int = 0) -> list[Question]:
    rows = select_rows(read_records(data), select, seed)
    if not rows:
        raise DataError(f"{data}: no rows")
    fmt = detect_format(rows[0][1], rows[0][0])
    key = {"problem_solution": "problem", "question_answer": "question", "prompt_completion": "prompt"}.get(fmt)
    if key is None:
        raise DataError(f"{data}: sampling needs problem/solution, question/answer or prompt/completion+answer rows")
    out = []
    for i, (source, rec) in enumerate(rows):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise DataError(f"{source}: field {key!r} must be a non-empty string")
        out.append(Question(str(rec.get("id", i)), rec[key] + suffix, gold_answer(rec, fmt, source)))
    return out


def sample(model: str, data: str, out: str | Path, *, k: int = 4, backend: str = "vllm", select: str = "all",
           suffix: str = "", sampling: SamplingConfig | None = None, chunk: int = 64, engine: dict | None = None,
           chat_template: str = "auto", backend_obj=None) -> dict:
    """Sample, grade, and write samples/rft/dpo/stats; resumes from ``out/samples.jsonl``."""
    from transformers import AutoTokenizer

    sc = sampling or SamplingConfig(n=k, temperature=1.0, max_new_tokens=2048)
    sc.n = k
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(data, select, suffix, sc.seed)  # checked before any model is loaded
    tok = AutoTokenizer.from_pretrained(model)
    set_chat_template(tok, chat_template)
    path = out / "samples.jsonl"
    done: dict[str, list[dict]] = {}
    for r in read_samples(path):
        done.setdefault(r["id"], []).append(r)
    todo = [q for q in questions if len(done.get(q.id, [])) < k]
    if todo:
        from tqdm.auto import tqdm

        from dftune.eval.generate import make_backend

        be = backend_obj or make_backend(backend, model, **(engine or {}))
        with tqdm(total=len(todo) * k, desc="sample", unit="response") as bar:
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                prompts = [tok.apply_chat_template([{"role": "user", "content": q.prompt}], tokenize=False,
                                                   add_generation_prompt=True) for q in part]
                texts = [[c.text for c in cs] for cs in be.generate(prompts, [q.id for q in part], sc)]
                verdicts = iter(grade_batch([(t, q.golds) for q, ts in zip(part, texts) for t in ts]))
                rows = [{"id": q.id, "sample": j, "prompt": q.prompt, "response": t, "gold": q.golds,
                         "correct": (v := next(verdicts)).correct, "reason": v.reason}
                        for q, ts in zip(part, texts) for j, t in enumerate(ts)]
                for r in rows:
                    done.setdefault(r["id"], []).append(r)
                append_rows(path, rows)
                bar.update(len(rows))
    return write_datasets(out, questions, done, k, sc.seed)


def write_datasets(out: Path, questions: list[Question], done: dict, k: int, seed: int) -> dict:
    rng = random.Random(seed)
    rft, dpo, hist = [], [], [0] * (k + 1)
    for q in questions:
        rows = sorted(done[q.id], key=lambda r: r["sample"])[:k]
        good = [r["response"] for r in rows if r["correct"]]
        bad = [r["response"] for r in rows if not r["correct"]]
        hist[len(good)] += 1
        rft += [{"id": f"{q.id}-{i}", "prompt": q.prompt, "completion": g} for i, g in enumerate(good)]
        rng.shuffle(bad)
        for i, (g, b) in enumerate(zip(good, bad)):  # each response used at most once per question
            dpo.append({"id": f"{q.id}-{i}", "prompt": [{"role": "user", "content": q.prompt}],
                        "chosen": [{"role": "assistant", "content": g}], "rejected": [{"role": "assistant", "content": b}]})
    for name, rows in (("rft.jsonl", rft), ("dpo.jsonl", dpo)):
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(out / name)
    stats = {"questions": len(questions), "k": k, "responses": len(questions) * k, "correct": len(rft),
             "yield": len(rft) / max(len(questions) * k, 1), "dpo_pairs": len(dpo),
             "questions_by_correct": {str(i): n for i, n in enumerate(hist)}}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats

