"""Reading and writing the files a run leaves behind: JSONL logs and atomic JSON/text.

One policy everywhere:
- ``read_jsonl`` returns every complete line. A final line without its newline is a
  write in progress (or torn by a crash) and is skipped; a bad line *before* the end is
  corruption and raises ``CorruptFileError`` naming the file and line. Reading never
  modifies the file, so a report can read a live run.
- ``append_jsonl`` appends whole lines in one write and fsyncs. The one process that owns
  the file calls ``repair_tail`` once before its first append, which cuts a torn final
  line left by a crash (so the next row does not fuse with it).
- ``write_text`` / ``write_json`` write a temporary file and rename it over the target:
  readers see the old or the new content, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dftune.errors import UserError


class CorruptFileError(UserError, ValueError):
    """A JSONL file with a bad line before its end (not a torn final line)."""


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete JSON line of ``path`` ([] if it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # after the last newline: b"" for a complete file, else a partial line
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{p}, line {i}: not valid JSON ({e}); the file is corrupt before its end") from None
    del torn  # a final line without its newline is incomplete by construction: never parsed
    return rows


def repair_tail(path: str | Path) -> int:
    """Cut an incomplete final line (no trailing newline) off ``path``; return the bytes cut.

    Only the process that owns the file (the one about to append) may call this.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    size = p.stat().st_size
    if size == 0:
        return 0
    with p.open("rb+") as f:
        # scan back from the end to the last newline, in blocks
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines in one write, then fsync."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (write a sibling temporary, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def write_jsonl(path: str | Path, rows) -> Path:
    """Atomically replace ``path`` with ``rows`` as JSON lines."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str | Path, data) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | Path):
    """The parsed JSON of ``path``, or None if it does not exist."""
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
