"""Rejection sampling for the paper's offline-RL setting.

k responses per question from the model (temperature 1.0), graded with our grader
against the dataset's gold answer, written as
- ``rft.jsonl``: the correct responses, as prompt/completion rows ``dftune train`` reads
  (RFT = plain SFT on them; DFT and iw-SFT train on the same file, see
  configs/paper/qwen2.5-math-1.5b-rft.yaml and -dft-on-rft.yaml);
- ``dpo.jsonl``: (prompt, chosen = a correct response, rejected = an incorrect one) pairs
  for the same question, conversational, as TRL's DPOTrainer reads them;
- ``samples.jsonl``: every sample with its verdict, one row per (id, sample) (resumable);
- ``sample_config.json``: the settings; a re-run into the same folder with other settings
  is refused (the samples would mix two distributions);
- ``stats.json``: the yield (how many questions had 0..k correct responses) and how many
  rows were skipped for want of a gold answer (NuminaMath's proofs have no ``\\boxed{}``).

    dftune sample --model M --data ../shared/data/train/math_train.jsonl --k 4 --out data/rft
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from dftune.data import set_chat_template
from dftune.eval.generate import SamplingConfig
from dftune.eval.grade import boxed_contents, grade_batch
from dftune.files import (
    append_jsonl,
    read_json,
    read_jsonl,
    repair_tail,
    write_json,
    write_jsonl,
)
from dftune.records import DataError, detect_format, gsm8k_final, read_records, select_rows
from dftune.settings import ConfigError, Problems, flatten

PROMPT_FIELD = {"problem_solution": "problem", "question_answer": "question", "prompt_completion": "prompt"}


@dataclass
class Question:
    id: str
    prompt: str  # the user turn (problem + instruction suffix), as training will see it
    golds: list[str]


def gold_answer(record: dict, fmt: str) -> list[str]:
    """The gold answer(s) to grade against, or [] when the row has none.

    An explicit ``answer`` field wins (except GSM8K's, which holds a worked solution);
    problem/solution: the solution's last \\boxed{}; question/answer: the number after ####.
    """
    if isinstance(record.get("answer"), (str, int, float)) and fmt != "question_answer":
        ans = str(record["answer"]).strip()
        return [ans] if ans else []
    if fmt == "problem_solution":
        boxes = boxed_contents(str(record.get("solution", "")))
        return [boxes[-1]] if boxes and boxes[-1].strip() else []
    if fmt == "question_answer":
        final = gsm8k_final(str(record.get("answer", "")))
        return [final] if final else []
    return []


def load_questions(data: str, select: str = "all", suffix: str = "", seed: int = 0) -> tuple[list[Question], list[str]]:
    """The questions with a gold answer, and the sources (file:row) of the rows without one.

    Ids are the rows' ``id`` field, else their index in the file (stable under first:N).
    A row whose prompt field is missing or empty is an error, not a skip: the file is wrong.
    """
    records = read_records(data)
    rows = select_rows(list(enumerate(records)), select, seed)
    if not rows:
        raise DataError(f"{data}: no rows")
    first_source, first = rows[0][1]
    fmt = detect_format(first, first_source)
    key = PROMPT_FIELD.get(fmt)
    if key is None:
        raise DataError(f"{data}: sampling needs problem/solution, question/answer or prompt/completion+answer rows")
    out, skipped, seen = [], [], {}
    for index, (source, rec) in rows:
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise DataError(f"{source}: field {key!r} must be a non-empty string")
        golds = gold_answer(rec, fmt)
        if not golds:
            skipped.append(source)
            continue
        qid = str(rec.get("id", index))
        if qid in seen:
            raise DataError(f"{source}: id {qid!r} repeats row {seen[qid]}; samples are keyed by id")
        seen[qid] = source
        out.append(Question(qid, rec[key] + suffix, golds))
    if not out:
        raise DataError(f"{data}: none of the {len(rows)} selected rows has a gold answer to grade against "
                        f"(problem/solution: a \\boxed{{}} in the solution; question/answer: '#### N'; else an 'answer' field)")
    return out, skipped


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model continues: the user turn in the chat template, with the generation prompt.

    Training on rft.jsonl renders the same (data.format prompt_completion, same chat_template).
    """
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _text(x) -> str:
    """A generated sample as text: backends return plain strings or records with a ``text`` field."""
    if isinstance(x, str):
        return x
    return x["text"] if isinstance(x, dict) else x.text


def _finish_reason(x) -> str:
    if isinstance(x, str):
        return ""
    return str((x.get("finish_reason") if isinstance(x, dict) else getattr(x, "finish_reason", None)) or "")


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to add samples drawn with other settings to ``out``; else record the settings."""
    path = out / "sample_config.json"
    old = read_json(path)
    if old is not None and read_jsonl(out / "samples.jsonl"):  # a start that sampled nothing binds nothing
        before, now = flatten(old), flatten(settings)
        diff = [k for k in now if before.get(k) != now[k]]
        if diff:
            lines = "; ".join(f"{k}: {str(before.get(k))[:60]!r} -> {str(now[k])[:60]!r}" for k in diff)
            raise ConfigError(f"{out} holds samples drawn with other settings ({lines}); see {path}. "
                              "Use another --out, or the same settings to resume")
    write_json(path, settings)


def sample(model: str, data: str, out: str | Path, *, k: int = 4, backend: str = "vllm", select: str = "all",
           suffix: str = "", sampling: SamplingConfig | None = None, chunk: int = 64, engine=None,
           chat_template: str = "auto", backend_obj=None, grade_workers: int | None = None) -> dict:
    """Sample, grade, and write samples/rft/dpo/stats; resumes from ``out/samples.jsonl``.

    Everything is checked (data, gold answers, chat template, settings against an earlier
    run in ``out``) before the model is loaded.
    """
    from transformers import AutoTokenizer

    if k < 1:
        raise ConfigError(f"k must be >= 1; got {k}")
    sc = sampling or SamplingConfig(n=k, temperature=1.0, max_new_tokens=2048)
    sc.n = k
    out = Path(out)
    questions, skipped = load_questions(data, select, suffix, sc.seed)
    tok = AutoTokenizer.from_pretrained(model)
    set_chat_template(tok, chat_template)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, {
        "model": model, "data": data, "select": select, "k": k, "sampling": asdict(sc), "instruction_suffix": suffix,
        "chat_template": chat_template, "chat_template_sha256": _sha256(tok.chat_template),
        "questions_sha256": _sha256([[q.id, q.prompt, q.golds] for q in questions]),
    })
    path = out / "samples.jsonl"
    repair_tail(path)  # a line torn by a crash would fuse with the next append
    done: dict[str, dict[int, dict]] = {}
    for r in read_jsonl(path):
        done.setdefault(r["id"], {}).setdefault(r["sample"], r)  # one row per (id, sample): the first
    todo = [q for q in questions if any(j not in done.get(q.id, {}) for j in range(k))]
    if todo:
        from tqdm.auto import tqdm

        from dftune.eval.generate import make_backend

        be = backend_obj or make_backend(backend, model, engine=engine, seed=sc.seed)
        with tqdm(total=len(todo) * k, desc="sample", unit="response") as bar:
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                outs = be.generate([render_prompt(tok, q.prompt) for q in part], [q.id for q in part], sc)
                verdicts = iter(grade_batch([(_text(x), q.golds) for q, xs in zip(part, outs) for x in xs],
                                            workers=grade_workers))
                rows = []
                for q, xs in zip(part, outs):
                    for j, x in enumerate(xs):
                        v = next(verdicts)
                        if j in done.get(q.id, {}):
                            continue  # already on disk (a partly written question): keep the first
                        row = {"id": q.id, "sample": j, "prompt": q.prompt, "response": _text(x), "gold": q.golds,
                               "correct": v.correct, "reason": v.reason}
                        if _finish_reason(x):
                            row["finish_reason"] = _finish_reason(x)
                        rows.append(row)
                        done.setdefault(q.id, {})[j] = row
                append_jsonl(path, rows)
                bar.update(len(part) * k)
    return write_datasets(out, questions, done, k, sc.seed, skipped)


def write_datasets(out: Path, questions: list[Question], done: dict[str, dict[int, dict]], k: int, seed: int,
                   skipped: list[str] = ()) -> dict:
    """rft.jsonl, dpo.jsonl and stats.json from the graded samples 0..k-1 of every question."""
    rng = random.Random(seed)
    rft, dpo, hist = [], [], [0] * (k + 1)
    for q in questions:
        rows = [done[q.id][j] for j in range(k)]
        good = [r for r in rows if r["correct"]]
        bad = [r["response"] for r in rows if not r["correct"]]
        hist[len(good)] += 1
        rft += [{"id": f"{q.id}-{r['sample']}", "prompt": q.prompt, "completion": r["response"]} for r in good]
        rng.shuffle(bad)
        for i, (g, b) in enumerate(zip(good, bad)):  # each response used at most once per question
            dpo.append({"id": f"{q.id}-{i}", "prompt": [{"role": "user", "content": q.prompt}],
                        "chosen": [{"role": "assistant", "content": g["response"]}],
                        "rejected": [{"role": "assistant", "content": b}]})
    for name, rows in (("rft.jsonl", rft), ("dpo.jsonl", dpo)):
        write_jsonl(out / name, rows)
    stats = {"questions": len(questions), "k": k, "responses": len(questions) * k, "correct": len(rft),
             "yield": len(rft) / max(len(questions) * k, 1), "dpo_pairs": len(dpo),
             "questions_by_correct": {str(i): n for i, n in enumerate(hist)},
             "skipped_no_gold": len(skipped), "skipped_examples": list(skipped[:5])}
    write_json(out / "stats.json", stats)
    return stats


@dataclass
class SampleConfig:
    """Settings of `dftune sample` (rejection sampling for the offline-RL setting)."""

    model: str = ""
    """the policy to sample from: a local folder or a Hub id."""
    data: str = ""
    """problem/solution or question/answer rows (the gold answer comes from the data)."""
    out: str = ""
    """the output folder (re-running with the same settings resumes)."""
    k: int = 4
    """responses per question."""
    select: str = "all"
    """all, first:N (the paper: first:100000 of NuminaMath-CoT) or random:N."""
    backend: str = "vllm"
    """vllm (what real runs use) or hf (transformers generate, for CPUs and tests)."""
    instruction_suffix: str = ""
    """text appended to every question (e.g. the boxed instruction)."""
    chat_template: str = "auto"
    """auto (the tokenizer's), plain, or a .jinja file."""
    temperature: float = 1.0
    """Sampling temperature (the paper: 1.0); 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    max_new_tokens: int = 2048
    """The generation budget of each response, in tokens."""
    seed: int = 0
    """Base seed; each question's seed is derived from it and its id."""
    batch_size: int = 64
    """hf backend: sequences per generate call."""
    tensor_parallel_size: int = 1
    """vllm backend: GPUs per model."""
    grade_workers: int = 0
    """grader processes (0: one per CPU)."""


def validate_sample(cfg: SampleConfig) -> None:
    """Every problem with `dftune sample`'s settings, raised together before anything loads."""
    from dftune.paths import data_problem, model_problem

    p = Problems()
    p.add(model_problem("model", cfg.model))
    p.add(data_problem("data", cfg.data))
    p.nonempty("out", cfg.out, "the output folder")
    p.at_least("k", cfg.k, 1)
    p.check(cfg.select == "all" or (cfg.select.partition(":")[0] in ("first", "random")
                                    and cfg.select.partition(":")[2].isdigit()),
            f"select: must be all, first:N or random:N; got {cfg.select!r}")
    p.one_of("backend", cfg.backend, ("vllm", "hf"))
    if cfg.chat_template not in ("auto", "plain"):
        p.check(Path(cfg.chat_template).is_file(), f"chat_template: {cfg.chat_template} not found")
    p.at_least("temperature", cfg.temperature, 0)
    p.check(0 < cfg.top_p <= 1, f"top_p: must be in (0, 1]; got {cfg.top_p}")
    p.at_least("max_new_tokens", cfg.max_new_tokens, 1)
    p.at_least("batch_size", cfg.batch_size, 1)
    p.at_least("tensor_parallel_size", cfg.tensor_parallel_size, 1)
    p.at_least("grade_workers", cfg.grade_workers, 0)
    p.raise_all()


def run_sample(cfg: SampleConfig) -> dict:
    """`dftune sample`: check the settings, then sample() (see its docstring)."""
    validate_sample(cfg)
    from dftune.eval.generate import EngineConfig

    engine = EngineConfig(batch_size=cfg.batch_size, tensor_parallel_size=cfg.tensor_parallel_size)
    sc = SamplingConfig(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                        seed=cfg.seed)
    return sample(cfg.model, cfg.data, cfg.out, k=cfg.k, backend=cfg.backend, select=cfg.select,
                  suffix=cfg.instruction_suffix, sampling=sc, engine=engine, chat_template=cfg.chat_template,
                  grade_workers=cfg.grade_workers or None)
