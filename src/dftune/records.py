"""Rows of training data: reading them (files, folders, Hub datasets), selecting them,
and turning each record into chat messages, every field checked.

Rows are streamed: JSONL line by line, Parquet in record batches, a Hub dataset through
``datasets`` (memory-mapped Arrow, read in batches), so no list of every record as a dict
is ever built. Each row is (file index, row number, record); a row that cannot be read
(bad JSON or UTF-8) carries its ``DataError`` as the record, and ``data.on_bad_row``
decides, as for any other bad row.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dftune.errors import UserError

if TYPE_CHECKING:  # annotations only: records is imported by eval (and so by config) at run time
    from dftune.config import DataConfig

FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "problem_solution": ("problem", "solution"),
    "question_answer": ("question", "answer"),
    "tokenized": ("input_ids", "completion_mask"),
}
SUFFIXES = (".jsonl", ".json", ".parquet")
READ_BATCH = 512  # Parquet rows decoded at a time


class DataError(UserError, ValueError):
    """A data problem, naming the file, row and field."""


# ---- reading -------------------------------------------------------------------------


@dataclass
class Source:
    """Where rows come from: local files (``paths``) or a memory-mapped Hub dataset."""

    names: list[str]  # per file: what its rows' sources start with
    paths: list[Path] = field(default_factory=list)
    hub: object = None  # datasets.Dataset


def _looks_local(path: str) -> bool:
    """A path meant as a file: a data suffix, ./ ../ / ~, not owner/name, or a folder that exists."""
    head = path.split("/", 1)[0]
    return (not path or path.endswith(SUFFIXES) or path.startswith((".", "/", "~")) or path.count("/") != 1
            or Path(head).is_dir())


def open_source(path: str, split: str = "train") -> Source:
    p = Path(path).expanduser()
    if p.is_file():
        return Source([str(p)], [p])
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{p}: no .jsonl, .json or .parquet files in this folder")
        return Source([str(f) for f in files], files)
    if _looks_local(path):
        raise DataError(f"data file not found: {path!r} (relative paths are read from {os.getcwd()})")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path!r} is not a local file; for a Hub dataset install 'dftune[hub]'") from e
    # memory-mapped Arrow: rows are read in batches, never all at once as dicts
    return Source([f"{path}[{split}]"], hub=datasets.load_dataset(path, split=split))


def _jsonl_rows(path: Path):
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield i, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield i, DataError(f"{path}, row {i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            except json.JSONDecodeError as e:
                yield i, DataError(f"{path}, row {i}: not valid JSON ({e.msg})")


def _json_rows(path: Path):
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} on line {raw[:e.start].count(10) + 1})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    yield from enumerate(data, 1)


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH):
            for rec in batch.to_pylist():
                i += 1
                yield i, rec
    except Exception as e:  # noqa: BLE001  (pyarrow raises many types for a damaged file)
        raise DataError(f"{path}, after row {i}: cannot read the Parquet file ({type(e).__name__}: {e})") from None


def dataset_rows(ds, batch_size: int = 1000):
    """(row number, dict) from a ``datasets.Dataset``, batch by batch (memory-mapped)."""
    i = 0
    for batch in ds.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            i += 1
            yield i, dict(zip(keys, values))


def iter_rows(src: Source):
    """(file index, row number, record) for every row, lazily."""
    if src.hub is not None:
        for row, rec in dataset_rows(src.hub):
            yield 0, row, rec
        return
    for fi, p in enumerate(src.paths):
        reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}.get(p.suffix)
        if reader is None:
            raise DataError(f"{p}: unsupported file type (use .jsonl, .json or .parquet)")
        for row, rec in reader(p):
            yield fi, row, rec


def count_rows(src: Source) -> int:
    """The number of rows ``iter_rows`` yields (JSONL: non-blank lines; not parsed)."""
    if src.hub is not None:
        return len(src.hub)
    total = 0
    for p in src.paths:
        if p.suffix == ".jsonl":
            with p.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(p).metadata.num_rows
        else:
            total += sum(1 for _ in _json_rows(p))
    return total


def parse_select(select: str) -> tuple[str, int]:
    kind, _, n = select.partition(":")
    if kind == "all" and not n:
        return "all", 0
    if kind not in ("first", "random") or not n.isdigit():
        raise DataError(f"data.select must be all, first:N or random:N; got {select!r}")
    return kind, int(n)


def selected_rows(src: Source, select: str, seed: int):
    """The rows ``select`` keeps (all | first:N | random:N seeded, file order kept), lazily."""
    kind, n = parse_select(select)
    rows = iter_rows(src)
    if kind == "all":
        return rows
    if kind == "first":
        return itertools.islice(rows, n)
    total = count_rows(src)
    keep = set(random.Random(seed).sample(range(total), min(n, total)))
    return (r for i, r in enumerate(rows) if i in keep)


def read_records(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """(source, record) pairs from a file, a folder of files, or a Hub dataset id (all in memory:
    for small files; training streams them instead). A row that cannot be read raises."""
    src = open_source(path, split)
    out = []
    for fi, row, rec in iter_rows(src):
        if isinstance(rec, DataError):
            raise rec
        out.append((f"{src.names[fi]}:{row}", rec))
    return out


def select_rows(rows: list, select: str, seed: int) -> list:
    """all | first:N | random:N (seeded, order kept), on a list."""
    kind, n = parse_select(select)
    if kind == "all":
        return rows
    if kind == "first":
        return rows[:n]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


# ---- records to chat messages --------------------------------------------------------


def detect_format(record, source: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object (a record with fields), got {type(record).__name__}")
    for name, fields in FORMATS.items():
        if all(f in record for f in fields):
            return name
    raise DataError(
        f"{source}: cannot detect the record format from fields {sorted(record)}; expected one of "
        + "; ".join(f"{k} ({'/'.join(v)})" for k, v in FORMATS.items())
        + " (or set data.format and the field names)"
    )


def gsm8k_final(answer: str) -> str:
    """GSM8K's final answer: '... #### 1,200' -> '1200'; '' when there is no '####' line.
    The one parser of that line (training data, the gsm8k benchmark, offline sampling)."""
    _, sep, final = answer.rpartition("####")
    return final.strip().replace(",", "") if sep else ""


def gsm8k_boxed(answer: str) -> str:
    """'... #### 72' -> '...\\nThe answer is \\boxed{72}.' (GSM8K's final-answer line)."""
    body, sep, _ = answer.rpartition("####")
    if not sep:
        return answer
    return f"{body.rstrip()}\nThe answer is $\\boxed{{{gsm8k_final(answer)}}}$."


def _unicode(value: str, source: str, where: str) -> str:
    """Lone surrogates (JSON "\\ud800" escapes) are not text: the tokenizer cannot encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{source}: field {where} holds a lone surrogate (\\u{ord(value[e.start]):04x} at character "
                        f"{e.start}), which is not valid Unicode text") from None
    return value


def _text(record: dict, key: str, source: str) -> str:
    if key not in record:
        raise DataError(f"{source}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: field {key!r} must be a non-empty string, got {type(value).__name__} {str(value)[:40]!r}")
    return _unicode(value, source, repr(key))


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
            _unicode(m["content"], source, f"{key!r}[{j}]")
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{source}: field {key!r}[{j}] is an empty assistant turn (nothing to learn)")
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
