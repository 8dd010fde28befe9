"""Training data: read, validate, tokenise with the chat template, and batch.

Every row is checked and tokenised before the first step, so a malformed row 200,000
rows in stops the run at once with its file, row and field, not hours later.

Record formats (``format=auto`` detects them from the first row's keys):
- messages: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``;
  the loss covers every assistant turn (multi-turn too), rendered by the chat template.
- prompt_completion: ``prompt`` / ``completion``.
- problem_solution: ``problem`` / ``solution`` (NuminaMath-CoT, MATH).
- question_answer: ``question`` / ``answer`` (GSM8K; "#### 72" becomes "\\boxed{72}").
- tokenized: ``input_ids`` / ``completion_mask`` (1 = loss), already tokenised; no template.
For the single-turn formats the paper's layout is used: prompt = the chat template's
user turn with the generation prompt, response = the text + EOS, loss on the response.

Batching: each optimizer step takes ``global_batch`` sequences from a seeded shuffle;
within that step they are sorted by length and dealt to processes and micro-batches,
so sequences of similar length share a padded micro-batch. The step still sees exactly
the same sequences as without grouping (the gradient is unchanged), only the padding
shrinks. We pad rather than pack because packing needs attention kernels that respect
sequence boundaries (flash-attention varlen), which CPU and SDPA runs lack.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dftune.config import DataConfig
from dftune.errors import UserError

FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "problem_solution": ("problem", "solution"),
    "question_answer": ("question", "answer"),
    "tokenized": ("input_ids", "completion_mask"),
}
# For base models without a template of their own (LLaMA, DeepSeekMath base): the layout of
# the Qwen2.5-Math harness's "deepseek-math" prompt ("User: {q}\n\nAssistant:"), so that a
# model trained with it is evaluated on the same layout (prompt style "deepseek-math"); BOS
# first when the tokenizer has one, as these models were pretrained with it (the harness's
# engine adds it to the prompt string). The response follows "Assistant:" after a space.
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class DataError(UserError, ValueError):
    """A data problem, naming the file, row and field."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens
    source: str  # "file:row", for error messages and analysis


@dataclass
class DataSummary:
    rows: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    truncated: int = 0
    length: dict = field(default_factory=dict)  # min / mean / median / max tokens
    response_tokens: int = 0

    def __str__(self) -> str:
        drop = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        ln = self.length
        return (
            f"{self.rows} rows, {self.kept} kept, dropped ({drop}), {self.truncated} truncated; "
            f"tokens per example min {ln.get('min')} mean {ln.get('mean', 0):.0f} median {ln.get('median')} "
            f"max {ln.get('max')}; {self.response_tokens} response tokens"
        )


# ---- reading -------------------------------------------------------------------------


def _read_file(path: Path) -> list[tuple[str, dict]]:
    rows = []
    if path.suffix == ".jsonl":
        with path.open() as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, row {i}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of records")
        rows = [(f"{path}:{i}", r) for i, r in enumerate(data, 1)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}:{i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    else:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    return rows


def read_records(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """(source, record) pairs from a file, a folder of files, or a Hub dataset id."""
    p = Path(path)
    if p.is_file():
        return _read_file(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(f"{p}: no .jsonl, .json or .parquet files in this folder")
        return [r for f in files for r in _read_file(f)]
    if not path or path.startswith((".", "/")) or path.count("/") != 1:
        raise DataError(f"data file not found: {path!r}")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path!r} is not a local file; for a Hub dataset install 'dftune[hub]'") from e
    ds = datasets.load_dataset(path, split=split)
    return [(f"{path}[{split}]:{i}", dict(r)) for i, r in enumerate(ds, 1)]


def select_rows(rows: list, select: str, seed: int) -> list:
    """all | first:N | random:N (seeded, order kept)."""
    kind, _, n = select.partition(":")
    if kind == "all":
        return rows
    if kind not in ("first", "random") or not n.isdigit():
        raise DataError(f"data.select must be all, first:N or random:N; got {select!r}")
    n = int(n)
    if kind == "first":
        return rows[:n]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


# ---- records to chat messages --------------------------------------------------------


def detect_format(record: dict, source: str) -> str:
    for name, fields in FORMATS.items():
        if all(f in record for f in fields):
            return name
    raise DataError(
        f"{source}: cannot detect the record format from fields {sorted(record)}; expected one of "
        + "; ".join(f"{k} ({'/'.join(v)})" for k, v in FORMATS.items())
        + " (or set data.format and the field names)"
    )


def gsm8k_boxed(answer: str) -> str:
    """'... #### 72' -> '...\\nThe answer is \\boxed{72}.' (GSM8K's final-answer line)."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        return answer
    return f"{body.rstrip()}\nThe answer is $\\boxed{{{final.strip().replace(',', '')}}}$."


def _text(record: dict, key: str, source: str) -> str:
    if key not in record:
        raise DataError(f"{source}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: field {key!r} must be a non-empty string, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def to_messages(record: dict, fmt: str, cfg: DataConfig, source: str) -> list[dict]:
    """The record as chat messages; the last (or every) assistant turn is the target."""
    if fmt == "messages":
        key = cfg.messages_field or "messages"
        msgs = record.get(key)
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{source}: field {key!r} must be a non-empty list of messages")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise DataError(f"{source}: field {key!r}[{j}] must be {{role: system|user|assistant, content: str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{source}: field {key!r} has no assistant turn to learn from")
        return msgs
    if fmt not in FORMATS:
        raise DataError(f"data.format must be auto or one of {sorted(FORMATS)}; got {fmt!r}")
    pkey = cfg.prompt_field or FORMATS[fmt][0]
    rkey = cfg.response_field or FORMATS[fmt][1]
    prompt, response = _text(record, pkey, source), _text(record, rkey, source)
    if fmt == "question_answer" and cfg.boxed_answers:
        response = gsm8k_boxed(response)
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return msgs + [{"role": "user", "content": prompt + cfg.instruction_suffix}, {"role": "assistant", "content": response}]


# ---- tokenisation ----------------------------------------------------------------------


def set_chat_template(tokenizer, choice: str) -> None:
    """auto: keep the tokenizer's (error if none); plain: PLAIN_TEMPLATE; else a .jinja path."""
    if choice == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; set data.chat_template=plain (a minimal "
                "User:/Assistant: template for base models) or a path to a .jinja file"
            )
    elif choice == "plain":
        tokenizer.chat_template = PLAIN_TEMPLATE
    else:
        p = Path(choice)
        if not p.is_file():
            raise DataError(f"data.chat_template: file not found: {p}")
        tokenizer.chat_template = p.read_text()


def _ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # newer transformers return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def tokenize_example(tokenizer, messages: list[dict], fmt: str, source: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with -100 outside the assistant text."""
    if fmt != "messages":  # the paper's layout: template prompt, then response + EOS
        prompt = _ids(tokenizer, messages[:-1], add_generation_prompt=True)
        text = messages[-1]["content"]
        if tokenizer.chat_template == PLAIN_TEMPLATE:
            text = " " + text  # "Assistant: ...", as the template renders a whole turn
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt + response, [-100] * len(prompt) + response
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = _ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(ids)] != ids or full[: len(prefix)] != prefix:
            raise DataError(f"{source}: the chat template does not render turns as a stable prefix; cannot mask per turn")
        labels += [-100] * (len(prefix) - len(ids)) + full[len(prefix):]
        ids = full
    return ids, labels


def _pretokenized(record: dict, source: str, vocab: int) -> tuple[list[int], list[int]]:
    ids, mask = record.get("input_ids"), record.get("completion_mask")
    for key, val in (("input_ids", ids), ("completion_mask", mask)):
        if not isinstance(val, list) or not val or not all(isinstance(x, int) for x in val):
            raise DataError(f"{source}: field {key!r} must be a non-empty list of integers")
    if len(ids) != len(mask):
        raise DataError(f"{source}: fields 'input_ids' and 'completion_mask' differ in length ({len(ids)} vs {len(mask)})")
    if min(ids) < 0 or max(ids) >= vocab:
        raise DataError(f"{source}: field 'input_ids' has ids outside the tokenizer's vocabulary [0, {vocab})")
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def build_dataset(cfg: DataConfig, tokenizer, seed: int = 0) -> tuple[list[Example], DataSummary]:
    """Read, validate and tokenise everything; return the examples and a summary."""
    set_chat_template(tokenizer, cfg.chat_template)
    if cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row must be error or skip; got {cfg.on_bad_row!r}")
    rows = select_rows(read_records(cfg.path, cfg.split), cfg.select, seed)
    if not rows:
        raise DataError(f"{cfg.path}: no rows")
    summary = DataSummary(rows=len(rows))
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0][1], rows[0][0])
    examples, lengths = [], []

    def drop(reason):
        summary.dropped[reason] = summary.dropped.get(reason, 0) + 1

    for source, record in rows:
        try:
            if not isinstance(record, dict):
                raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
            if fmt == "tokenized":
                ids, labels = _pretokenized(record, source, len(tokenizer))
            else:
                ids, labels = tokenize_example(tokenizer, to_messages(record, fmt, cfg, source), fmt, source)
        except DataError:
            if cfg.on_bad_row == "error":
                raise
            drop("bad_row")
            continue
        first_target = next((i for i, lab in enumerate(labels) if lab != -100), len(labels))
        if first_target >= cfg.max_length:
            drop("prompt_overflow")
            continue
        if len(ids) > cfg.max_length:
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            summary.truncated += 1
        examples.append(Example(ids, labels, source))
        lengths.append(len(ids))
        summary.response_tokens += sum(lab != -100 for lab in labels)
    summary.kept = len(examples)
    if lengths:
        s = sorted(lengths)
        summary.length = {"min": s[0], "mean": sum(s) / len(s), "median": s[len(s) // 2], "max": s[-1]}
    if not examples:
        raise DataError(f"{cfg.path}: no usable examples ({summary})")
    return examples, summary


# ---- batching --------------------------------------------------------------------------


def plan_epoch(n_examples: int, global_batch: int, world: int, micro: int, seed: int, epoch: int,
               lengths: list[int]) -> list[list[list[list[int]]]]:
    """plan[step][rank][micro] = example indices. Deterministic in (seed, epoch).

    The last incomplete global batch is dropped (every step has the same size).
    """
    if global_batch % (micro * world):
        raise ValueError(f"global_batch {global_batch} must be a multiple of micro_batch x processes = {micro * world}")
    order = list(range(n_examples))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    steps = []
    for s in range(n_examples // global_batch):
        batch = sorted(order[s * global_batch:(s + 1) * global_batch], key=lambda i: (-lengths[i], i))
        per_rank = [batch[r::world] for r in range(world)]  # dealt round-robin: balanced lengths
        steps.append([[rank[j:j + micro] for j in range(0, len(rank), micro)] for rank in per_rank])
    return steps


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_targets(examples: list[Example]) -> int:
    """Tokens that carry loss after the shift (a label at position 0 predicts nothing)."""
    return sum(sum(lab != -100 for lab in e.labels[1:]) for e in examples)

