"""Tokenised examples stored compactly, and the on-disk cache that runs share.

Every example's token ids sit in one flat int32 array and its loss mask in one flat uint8
array, cut into examples by an int64 offsets array: 5 bytes a token. A list of Python ints
costs ~40 (an 8-byte pointer plus a 28-byte int object, per list), so the paper's 100K
NuminaMath rows (~50M tokens) took gigabytes in every process; as arrays they are a few
hundred MB, and memory-mapped from the cache they are shared by every process of a run.

Cache entries are folders named by a hash of everything that decides their contents (the
data files' bytes, the tokenizer, the chat template, the data settings, the library
versions); they are written to a temporary folder and renamed into place, and built by one
process at a time (a file lock): the other processes of a ``torchrun`` wait, then map it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dftune.files import read_json, write_json

CACHE_VERSION = 1  # bump when tokenisation or the layout below changes
IGNORE_INDEX = -100


@dataclass
class Example:
    """One example as Python lists (for analysis and tests; training reads the arrays)."""

    input_ids: list[int]
    labels: list[int]  # -100 where the loss mask is 0 (prompt tokens)
    source: str  # "file:row", for error messages and analysis


class TokenizedData(Sequence):
    """The tokenised dataset: ``len``, ``data[i]`` (an ``Example``), ``data[a:b]`` (a list).

    ids (N,) int32 and mask (N,) uint8 over all examples; offsets (n+1,) int64;
    origin (n, 2) int64: (index into ``files``, row number in that file).
    """

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, origin: np.ndarray, files: list[str]):
        self.ids, self.mask, self.offsets, self.origin, self.files = ids, mask, offsets, origin, list(files)
        self._targets = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids, mask = self.tokens(i)
        return Example(ids.tolist(), np.where(mask.astype(bool), ids, IGNORE_INDEX).tolist(), self.source(i))

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss mask) of example ``i``: views, no copy."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def source(self, i: int) -> str:
        f, row = self.origin[i]
        return f"{self.files[int(f)]}:{int(row)}"

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (n,)

    @property
    def targets(self) -> np.ndarray:
        """Per example, the tokens that carry loss after the shift (position 0 predicts nothing)."""
        if self._targets is None:
            starts = self.offsets[:-1]
            per = np.add.reduceat(self.mask, starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
            self._targets = per - self.mask[starts]
        return self._targets

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ids, self.mask, self.offsets, self.origin))


class Builder:
    """Appends chunks of examples to the flat files of ``folder`` (a cache entry being
    written, or a temporary folder): memory holds one chunk at a time, never all tokens."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.offsets, self.origin = array("q", [0]), array("q")
        self._files = (open(folder / "ids.bin", "wb"), open(folder / "mask.bin", "wb"))

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths, origin) -> None:
        """ids (N,) int32 and mask (N,) uint8 of several examples; their lengths; (file, row) each."""
        self._files[0].write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._files[1].write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        total = self.offsets[-1]
        for n, (f, row) in zip(lengths, origin):
            total += n
            self.offsets.append(total)
            self.origin.extend((f, row))

    def finish(self, files: list[str]) -> TokenizedData:
        self.abort()
        np.save(self.folder / "offsets.npy", np.frombuffer(self.offsets, dtype=np.int64))
        np.save(self.folder / "origin.npy", np.frombuffer(self.origin, dtype=np.int64).reshape(-1, 2))
        return load(self.folder, files)

    def abort(self) -> None:
        for f in self._files:
            f.close()


def load(folder: Path, files: list[str] | None = None) -> TokenizedData:
    """A cache folder's arrays, memory-mapped read-only (``files`` renames the sources)."""
    meta = read_json(folder / "meta.json") or {}
    offsets = np.load(folder / "offsets.npy")
    n = int(offsets[-1])
    # memory-mapped: the pages are the page cache's, shared by every process that maps them
    ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r", shape=(n,)) if n else np.zeros(0, np.int32)
    mask = np.memmap(folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
    return TokenizedData(ids, mask, offsets, np.load(folder / "origin.npy"), files or meta.get("files", []))


# ---- the cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$DFTUNE_CACHE_DIR, else $XDG_CACHE_HOME/dftune/data, else ~/.cache/dftune/data."""
    if os.environ.get("DFTUNE_CACHE_DIR"):
        return Path(os.environ["DFTUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dftune" / "data"


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Everything of the tokenizer that can change the ids: its whole definition (vocabulary,
    merges, normaliser, added tokens), special tokens, chat template, library versions."""
    import tokenizers
    import transformers

    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and class stand in
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.bos_token,
             str(tokenizer.special_tokens_map), tokenizers.__version__, transformers.__version__]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` across processes (fcntl; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: processes may build the same entry twice, which is harmless
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(tmp: Path, entry: Path, meta: dict) -> None:
    """Write meta.json last, then rename the folder into place (readers never see half)."""
    write_json(tmp / "meta.json", meta)
    if entry.exists():  # written meanwhile by a process that did not take the lock
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, entry)
