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

Scale: rows are streamed (``dftune.records``: reading, selection, record checks),
tokenised in chunks of rows with one call into the Rust tokenizer per chunk (several
processes when the data is large, ``data.workers``), and stored as flat arrays
(``dftune.tokenized``), cached on disk by a hash of the data, tokenizer, template and
settings. Batching and packing: ``dftune.batching``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dftune.config import DataConfig
from dftune.files import read_json
from dftune.progress import bar, step
from dftune.records import (
    FORMATS,
    DataError,
    Source,
    count_rows,
    detect_format,
    open_source,
    parse_select,
    selected_rows,
    to_messages,
)
from dftune.tokenized import (
    Builder,
    TokenizedData,
    cache_key,
    default_cache_dir,
    file_digest,
    load,
    locked,
    publish,
    tokenizer_digest,
)

CHUNK_ROWS = 512  # rows per tokenizer call (and per task for a worker process)
AUTO_WORKERS_ROWS = 30_000  # below this many rows, worker processes cost more than they save
SHOW_DROPPED = 5  # dropped rows named in the summary, per reason
# For base models without a template of their own (LLaMA, DeepSeekMath base): the layout of
# the Qwen2.5-Math harness's "deepseek-math" prompt ("User: {q}\n\nAssistant:"), so that a
# model trained with it is evaluated on the same layout (prompt style "plain" or "deepseek-math"); BOS
# first when the tokenizer has one, as these models were pretrained with it (the harness's
# engine adds it to the prompt string). The response follows "Assistant:" after a space.
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


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


def response_text(tokenizer, text: str) -> str:
    return " " + text if tokenizer.chat_template == PLAIN_TEMPLATE else text  # "Assistant: ...", as a whole turn renders


def tokenize_example(tokenizer, messages: list[dict], fmt: str, source: str, where: str = "'messages'") -> tuple[list[int], list[int]]:
    """(input_ids, labels) with -100 outside the assistant text."""
    if fmt != "messages":  # the paper's layout: template prompt, then response + EOS
        prompt = _render(tokenizer, messages[:-1], True, source, where)
        p, r = _encode(tokenizer, [prompt, response_text(tokenizer, messages[-1]["content"])])
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
    """A chunk of rows, tokenised: the kept examples' tokens, and what happened to the rest."""

    ids: np.ndarray = None  # (N,) int32: the kept examples, one after the other
    mask: np.ndarray = None  # (N,) uint8: 1 = loss
    lengths: list = field(default_factory=list)  # per kept example
    kept: list = field(default_factory=list)  # (file index, row) per kept example
    truncated: int = 0
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
                          response_text(tokenizer, msgs[-1]["content"])]
                per_row.append((fi, row, None, len(texts) - 2))
        except DataError as e:
            per_row.append((fi, row, str(e), source))
    encoded = _encode(tokenizer, texts) if texts else []
    eos = tokenizer.eos_token_id
    ids_kept, mask_kept = [], []
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
        if len(ids) > cfg.max_length:
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            out.truncated += 1
        ids_kept.append(ids)
        mask_kept.append(mask)
        out.lengths.append(len(ids))
        out.kept.append((fi, row))
    n = sum(out.lengths)
    out.ids = np.fromiter(itertools.chain.from_iterable(ids_kept), dtype=np.int32, count=n)
    out.mask = np.fromiter(itertools.chain.from_iterable(mask_kept), dtype=np.uint8, count=n)
    return out


_WORKER: dict = {}


def _worker_init(args) -> None:
    _WORKER["args"] = args


def _worker_encode(rows) -> _Chunk:
    fmt, cfg, tokenizer, names = _WORKER["args"]
    return encode_rows(rows, fmt, cfg, tokenizer, names)


def _chunks(rows, size: int):
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _encoded_chunks(rows, fmt, cfg: DataConfig, tokenizer, names, workers: int):
    """Chunks in row order: here, or in ``workers`` processes with a bounded queue (rows are
    read only as fast as they are tokenised)."""
    if workers <= 1:
        for chunk in _chunks(rows, CHUNK_ROWS):
            yield encode_rows(chunk, fmt, cfg, tokenizer, names)
        return
    import multiprocessing

    # fork on Linux (as datasets.map and torch's DataLoader do): no re-import, the tokenizer and
    # the parent's pages are shared, no __main__ guard needed; spawn elsewhere
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited: the workers are the parallelism
    try:
        with ctx.Pool(workers, initializer=_worker_init, initargs=((fmt, cfg, tokenizer, names),)) as pool:
            pending: deque = deque()
            for chunk in _chunks(rows, CHUNK_ROWS):
                pending.append(pool.apply_async(_worker_encode, (chunk,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _workers(cfg: DataConfig, src: Source) -> int:
    if cfg.workers < 0:
        raise DataError(f"data.workers must be >= 0 (0: automatic); got {cfg.workers}")
    if cfg.workers:
        return cfg.workers
    kind, n = parse_select(cfg.select)
    if kind != "all" and n < AUTO_WORKERS_ROWS:
        return 1
    rows = count_rows(src)
    return min(os.cpu_count() or 1, 8) if min(rows, n or rows) >= AUTO_WORKERS_ROWS else 1


def _add_chunk(chunk, cfg: DataConfig, summary: DataSummary, builder: Builder) -> None:
    """One tokenised chunk into the arrays; its dropped and bad rows counted (the first bad
    row stops the run with data.on_bad_row=error)."""
    summary.rows += len(chunk.kept) + len(chunk.dropped) + len(chunk.bad)
    if chunk.bad and cfg.on_bad_row == "error":
        raise DataError(chunk.bad[0][1])
    for reason, source in chunk.dropped + [("bad_row", source) for source, _ in chunk.bad]:
        summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
        named = summary.dropped_rows.setdefault(reason, [])
        if len(named) < SHOW_DROPPED:
            named.append(source)
    builder.add(chunk.ids, chunk.mask, chunk.lengths, chunk.kept)
    summary.truncated += chunk.truncated


def _build(cfg: DataConfig, tokenizer, seed: int, src: Source, folder: Path) -> tuple[TokenizedData, DataSummary]:
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
    workers = _workers(cfg, src)
    try:
        with step(f"data: tokenising {cfg.path} ({workers} process{'es' if workers > 1 else ''})"), \
                bar(desc="tokenise", unit="row") as shown:
            for chunk in _encoded_chunks(itertools.chain([first], rows), fmt, cfg, tokenizer, src.names, workers):
                shown.update(len(chunk.kept) + len(chunk.dropped) + len(chunk.bad))
                _add_chunk(chunk, cfg, summary, builder)
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


def _build_uncached(cfg: DataConfig, tokenizer, seed: int, src: Source) -> tuple[TokenizedData, DataSummary]:
    """Built into a temporary folder that is deleted at once: the arrays stay mapped (POSIX
    keeps a deleted file's pages while they are mapped), so memory never holds them twice."""
    tmp = Path(tempfile.mkdtemp(prefix="dftune-data-"))
    try:
        return _build(cfg, tokenizer, seed, src, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # where a mapped file cannot be deleted, the OS cleans its temp


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
    parse_select(cfg.select)
    src = open_source(cfg.path, cfg.split)
    if cfg.cache:
        root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        try:
            return _cached(cfg, tokenizer, seed, src, root)
        except OSError as e:  # a read-only, foreign or impossible cache folder: still train
            print(f"data: cannot use the cache folder {root} ({e}); tokenising without a cache")
    return _build_uncached(cfg, tokenizer, seed, src)


def _cached(cfg: DataConfig, tokenizer, seed: int, src: Source, root: Path) -> tuple[TokenizedData, DataSummary]:
    root.mkdir(parents=True, exist_ok=True)
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
