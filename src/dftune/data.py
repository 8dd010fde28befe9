"""Training data: read, validate, tokenise with the chat template, store compactly, cache.

Every selected row is checked and tokenised before the first step, so a malformed row
200,000 rows in stops the run at once with its file, row and field, not hours later.

Record formats (``format=auto`` detects them from the first row's keys):
- messages: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``;
  the loss covers every assistant turn (multi-turn too), rendered by the chat template.
- prompt_completion: ``prompt`` / ``completion``.
- problem_solution: ``problem`` / ``solution`` (NuminaMath-CoT, MATH).
- question_answer: ``question`` / ``answer`` (GSM8K; "#### 72" becomes "\\boxed{72}").
- tokenized: ``input_ids`` / ``completion_mask`` (1 = loss), already tokenised; no template.
For the single-turn formats the paper's layout is used: prompt = the chat template's
user turn with the generation prompt, response = the text + EOS, loss on the response.

Scale: rows are streamed (JSONL line by line, Parquet in record batches, Hub datasets
memory-mapped through ``datasets``), tokenised in chunks of rows with one call into the
Rust tokenizer per chunk (several processes when the data is large, ``data.workers``),
and stored as flat arrays (``dftune.tokenized``), cached on disk by a hash of the data,
tokenizer, template and settings. Batching and packing: ``dftune.batching``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dftune.batching import (  # noqa: F401  (re-exported: the batching API lives there)
    Step, collate, count_targets, epoch_steps, pack, plan_epoch, plan_packed_epoch, step_batches,
)
from dftune.config import DataConfig
from dftune.files import read_json
from dftune.tokenized import (  # noqa: F401
    Builder, Example, TokenizedData, cache_key, default_cache_dir, file_digest, load, locked, publish, tokenizer_digest,
)

FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "problem_solution": ("problem", "solution"),
    "question_answer": ("question", "answer"),
    "tokenized": ("input_ids", "completion_mask"),
}
SUFFIXES = (".jsonl", ".json", ".parquet")
CHUNK_ROWS = 512  # rows per tokenizer call (and per task for a worker process)
AUTO_WORKERS_ROWS = 30_000  # below this many rows, worker processes cost more than they save
SHOW_DROPPED = 5  # dropped rows named in the summary, per reason
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


class DataError(ValueError):
    """A data problem, naming the file, row and field."""


@dataclass
class DataSummary:
    rows: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    dropped_rows: dict = field(default_factory=dict)  # reason -> the first SHOW_DROPPED sources
    truncated: int = 0
    length: dict = field(default_factory=dict)  # min / mean / median / max tokens
    response_tokens: int = 0
    cache: str = ""  # "", "hit PATH" or "written PATH"

    def __str__(self) -> str:
        def reason(k, v):
            named = self.dropped_rows.get(k, [])
            more = ", ..." if v > len(named) else ""
            return f"{k}: {v}" + (f" [{', '.join(named)}{more}]" if named else "")

        drop = ", ".join(reason(k, v) for k, v in self.dropped.items()) or "none"
        ln = self.length
        return (
            f"{self.rows} rows, {self.kept} kept, dropped ({drop}), {self.truncated} truncated; "
            f"tokens per example min {ln.get('min')} mean {ln.get('mean', 0):.0f} median {ln.get('median')} "
            f"max {ln.get('max')}; {self.response_tokens} response tokens" + (f"; cache {self.cache}" if self.cache else "")
        )


# ---- reading -------------------------------------------------------------------------
# Rows are (file index, row number, record); a row that cannot be read (bad JSON or UTF-8)
# carries its DataError as the record, so that on_bad_row decides, as for any bad row.


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
        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
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


def _parse_select(select: str) -> tuple[str, int]:
    kind, _, n = select.partition(":")
    if kind == "all" and not n:
        return "all", 0
    if kind not in ("first", "random") or not n.isdigit():
        raise DataError(f"data.select must be all, first:N or random:N; got {select!r}")
    return kind, int(n)


def selected_rows(src: Source, select: str, seed: int):
    """The rows ``select`` keeps (all | first:N | random:N seeded, file order kept), lazily."""
    kind, n = _parse_select(select)
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
    kind, n = _parse_select(select)
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


def gsm8k_boxed(answer: str) -> str:
    """'... #### 72' -> '...\\nThe answer is \\boxed{72}.' (GSM8K's final-answer line)."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        return answer
    return f"{body.rstrip()}\nThe answer is $\\boxed{{{final.strip().replace(',', '')}}}$."


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


def _render(tokenizer, messages, add_generation_prompt: bool, source: str, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001  (a template may raise anything, deliberately or not)
        raise DataError(f"{source}: the chat template failed on field {where}: {type(e).__name__}: {e}") from None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """As apply_chat_template(tokenize=True) does: no special tokens added. One call, many texts."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _response_text(tokenizer, text: str) -> str:
    return " " + text if tokenizer.chat_template == PLAIN_TEMPLATE else text  # "Assistant: ...", as a whole turn renders


def tokenize_example(tokenizer, messages: list[dict], fmt: str, source: str, where: str = "'messages'") -> tuple[list[int], list[int]]:
    """(input_ids, labels) with -100 outside the assistant text."""
    if fmt != "messages":  # the paper's layout: template prompt, then response + EOS
        prompt = _render(tokenizer, messages[:-1], True, source, where)
        p, r = _encode(tokenizer, [prompt, _response_text(tokenizer, messages[-1]["content"])])
        response = r + [tokenizer.eos_token_id]
        return p + response, [-100] * len(p) + response
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = _encode(tokenizer, [_render(tokenizer, messages[:i], True, source, where),
                                           _render(tokenizer, messages[: i + 1], False, source, where)])
        if full[: len(ids)] != ids or full[: len(prefix)] != prefix:
            raise DataError(f"{source}: the chat template does not render turns as a stable prefix; cannot mask per turn")
        labels += [-100] * (len(prefix) - len(ids)) + full[len(prefix):]
        ids = full
    return ids, labels


def _pretokenized(record: dict, source: str, vocab: int) -> tuple[list[int], list[int]]:
    """(input_ids, loss mask) of a pre-tokenised row, every value checked."""
    ids, mask = record.get("input_ids"), record.get("completion_mask")
    for key, val in (("input_ids", ids), ("completion_mask", mask)):
        if not isinstance(val, list) or not val:
            raise DataError(f"{source}: field {key!r} must be a non-empty list of integers")
    for j, x in enumerate(ids):
        if type(x) is not int:  # bool is an int subclass: True is not token 1
            raise DataError(f"{source}: field 'input_ids'[{j}] is {type(x).__name__} {x!r}, not an integer token id")
    for j, x in enumerate(mask):
        if x not in (0, 1) or type(x) not in (int, bool):
            raise DataError(f"{source}: field 'completion_mask'[{j}] is {x!r}; it must be 0 or 1")
    if len(ids) != len(mask):
        raise DataError(f"{source}: fields 'input_ids' and 'completion_mask' differ in length ({len(ids)} vs {len(mask)})")
    if min(ids) < 0 or max(ids) >= vocab:
        raise DataError(f"{source}: field 'input_ids' has ids outside the tokenizer's vocabulary [0, {vocab})")
    if not any(mask[1:]):
        raise DataError(f"{source}: field 'completion_mask' marks no token to learn (all 0, or only the first "
                        "token, which nothing predicts)")
    return ids, [int(x) for x in mask]


@dataclass
class _Chunk:
    """A chunk of rows, tokenised: the kept examples' arrays, and what happened to the rest."""

    ids: list = field(default_factory=list)  # per kept example
    mask: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # (file index, row, truncated)
    dropped: list = field(default_factory=list)  # (reason, source)
    bad: list = field(default_factory=list)  # (source, DataError message), in row order


def encode_rows(rows, fmt: str, cfg: DataConfig, tokenizer, names: list[str]) -> _Chunk:
    """Validate and tokenise ``rows`` ((file index, row, record) triples), in order."""
    out = _Chunk()
    per_row, texts = [], []  # the paper's layout: prompts and responses go to the tokenizer together
    for fi, row, rec in rows:
        source = f"{names[fi]}:{row}"
        try:
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):
                raise DataError(f"{source}: expected a JSON object, got {type(rec).__name__}")
            if fmt == "tokenized":
                per_row.append((fi, row, *_pretokenized(rec, source, len(tokenizer))))
            elif fmt == "messages":
                ids, labels = tokenize_example(tokenizer, to_messages(rec, fmt, cfg, source), fmt, source,
                                               repr(cfg.messages_field or "messages"))
                per_row.append((fi, row, ids, [int(x != -100) for x in labels]))
            else:
                msgs = to_messages(rec, fmt, cfg, source)
                texts += [_render(tokenizer, msgs[:-1], True, source, repr(cfg.prompt_field or FORMATS[fmt][0])),
                          _response_text(tokenizer, msgs[-1]["content"])]
                per_row.append((fi, row, None, len(texts) - 2))
        except DataError as e:
            per_row.append((fi, row, str(e), source))
    encoded = _encode(tokenizer, texts) if texts else []
    eos = tokenizer.eos_token_id
    for fi, row, ids, mask in per_row:
        if isinstance(ids, str):
            out.bad.append((mask, ids))
            continue
        if ids is None:  # paper layout: prompt ids, then response + EOS
            p, r = encoded[mask], encoded[mask + 1]
            ids, mask = p + r + [eos], [0] * len(p) + [1] * (len(r) + 1)
        first_target = mask.index(1) if 1 in mask else len(mask)
        if first_target >= cfg.max_length:
            out.dropped.append(("prompt_overflow", f"{names[fi]}:{row}"))
            continue
        cut = len(ids) > cfg.max_length
        out.ids.append(ids[: cfg.max_length])
        out.mask.append(mask[: cfg.max_length])
        out.kept.append((fi, row, cut))
    return out


_WORKER: dict = {}


def _worker_init(args) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER["args"] = args


def _worker_encode(rows) -> _Chunk:
    fmt, cfg, tokenizer, names = _WORKER["args"]
    return encode_rows(rows, fmt, cfg, tokenizer, names)


def _chunks(rows, size: int):
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _encoded_chunks(rows, fmt, cfg: DataConfig, tokenizer, names, workers: int):
    """Chunks in row order: here, or in ``workers`` spawned processes with a bounded queue
    (rows are read only as fast as they are tokenised)."""
    if workers <= 1:
        for chunk in _chunks(rows, CHUNK_ROWS):
            yield encode_rows(chunk, fmt, cfg, tokenizer, names)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # not fork: the parent may hold threads (torch, tokenizers)
    with ctx.Pool(workers, initializer=_worker_init, initargs=((fmt, cfg, tokenizer, names),)) as pool:
        pending: deque = deque()
        for chunk in _chunks(rows, CHUNK_ROWS):
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _workers(cfg: DataConfig, src: Source) -> int:
    if cfg.workers < 0:
        raise DataError(f"data.workers must be >= 0 (0: automatic); got {cfg.workers}")
    if cfg.workers:
        return cfg.workers
    kind, n = _parse_select(cfg.select)
    if kind != "all" and n < AUTO_WORKERS_ROWS:
        return 1
    rows = count_rows(src)
    return min(os.cpu_count() or 1, 8) if min(rows, n or rows) >= AUTO_WORKERS_ROWS else 1


def _build(cfg: DataConfig, tokenizer, seed: int, src: Source, folder: Path | None) -> tuple[TokenizedData, DataSummary]:
    rows = selected_rows(src, cfg.select, seed)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{cfg.path}: no rows")
    fi, row, rec = first
    if isinstance(rec, DataError):
        raise rec
    fmt = cfg.format if cfg.format != "auto" else detect_format(rec, f"{src.names[fi]}:{row}")
    summary = DataSummary()
    builder = Builder(folder)
    try:
        for chunk in _encoded_chunks(itertools.chain([first], rows), fmt, cfg, tokenizer, src.names, _workers(cfg, src)):
            summary.rows += len(chunk.kept) + len(chunk.dropped) + len(chunk.bad)
            if chunk.bad and cfg.on_bad_row == "error":
                raise DataError(chunk.bad[0][1])
            for reason, source in chunk.dropped + [("bad_row", source) for source, _ in chunk.bad]:
                summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
                named = summary.dropped_rows.setdefault(reason, [])
                if len(named) < SHOW_DROPPED:
                    named.append(source)
            for ids, mask, (f, r, cut) in zip(chunk.ids, chunk.mask, chunk.kept):
                builder.add(ids, mask, f, r)
                summary.truncated += cut
        data = builder.finish(src.names)
    except BaseException:
        builder.abort()
        raise
    summary.kept = len(data)
    if not len(data):
        raise DataError(f"{cfg.path}: no usable examples ({summary})")
    s = np.sort(data.lengths)
    summary.length = {"min": int(s[0]), "mean": float(s.mean()), "median": int(s[len(s) // 2]), "max": int(s[-1])}
    summary.response_tokens = int(data.mask.sum(dtype=np.int64))
    return data, summary


# Settings that do not change the tokenised data (kept out of the cache key)
_NOT_IN_KEY = ("path", "split", "packing", "cache", "cache_dir", "workers")


def _cache_parts(cfg: DataConfig, src: Source, tokenizer, seed: int) -> dict:
    if src.hub is not None:
        data = {"hub": src.names[0], "fingerprint": getattr(src.hub, "_fingerprint", None)}
    else:  # by content: a renamed or copied file hits, an edited one misses
        data = [[p.stat().st_size, file_digest(p)] for p in src.paths]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    if cfg.select.startswith("random"):
        settings["seed"] = seed
    return {"data": data, "tokenizer": tokenizer_digest(tokenizer), "settings": settings}


def build_dataset(cfg: DataConfig, tokenizer, seed: int = 0) -> tuple[TokenizedData, DataSummary]:
    """Read, validate and tokenise every selected row (or map them from the cache); return
    the examples (``TokenizedData``: ``len``, ``data[i]`` -> ``Example``) and a summary."""
    set_chat_template(tokenizer, cfg.chat_template)
    if cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row must be error or skip; got {cfg.on_bad_row!r}")
    _parse_select(cfg.select)
    src = open_source(cfg.path, cfg.split)
    if not cfg.cache:
        return _build(cfg, tokenizer, seed, src, None)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"data: cannot use the cache folder {root} ({e}); tokenising without a cache")
        return _build(cfg, tokenizer, seed, src, None)
    parts = _cache_parts(cfg, src, tokenizer, seed)
    key = cache_key(parts)
    entry = root / key
    status = "hit"
    if not (entry / "meta.json").is_file():
        with locked(root / f"{key}.lock"):  # one process builds; the others wait, then map it
            if not (entry / "meta.json").is_file():
                tmp = root / f"{key}.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    _, summary = _build(cfg, tokenizer, seed, src, tmp)
                    publish(tmp, entry, {"files": src.names, "summary": dataclasses.asdict(summary), "key": parts})
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                status = "written"
    meta = read_json(entry / "meta.json")
    summary = DataSummary(**{**meta["summary"], "cache": f"{status} {entry}"})
    return load(entry, src.names), summary
