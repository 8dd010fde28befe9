"""What a path setting may name, checked before anything loads: a model (a local folder that
holds one, or a Hugging Face Hub id), a data file or folder (or a Hub dataset id), an input
file. Each check returns the problem as one line naming the key, or None.

A path is meant as local when it could not be a Hub id (``./``, ``../``, ``/``, ``~``, a
file suffix, more than one ``/``) or when its first folder exists here (``out/tiny-base``
with an ``out`` folder); a local path that is missing is "not found", never a Hub lookup.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MODEL_FILES = ("config.json", "adapter_config.json")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".yaml", ".yml", ".jinja", ".gguf", ".safetensors")


def looks_local(path: str) -> bool:
    """``path`` cannot be a Hub id, or names something under a folder that exists here."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or not _HUB_ID.match(path) or path.endswith(FILE_SUFFIXES):
        return True
    head = path.split("/", 1)[0]
    return "/" in path and Path(head).is_dir()


def model_problem(key: str, path: str, gguf_file: str = "") -> str | None:
    """A model setting: a folder with a model in it (config.json, or ``gguf_file``), or a Hub
    id. A run folder given for its model gets a hint at RUN/final."""
    if not path:
        return f"{key}: empty; give a model folder or a Hugging Face Hub id"
    p = Path(path).expanduser()
    if p.is_dir():
        if gguf_file:
            return None if (p / gguf_file).is_file() else f"{key}: {p} has no {gguf_file} (model.gguf_file)"
        if any((p / f).is_file() for f in MODEL_FILES):
            return None
        if (p / "final" / "config.json").is_file():
            return f"{key}: {p} is a run folder; its model is {p / 'final'}"
        return f"{key}: {p} holds no model (no config.json)"
    if p.is_file():
        return f"{key}: {p} is a file; give the folder that holds the model"
    if looks_local(path):
        return f"{key}: {path} not found"
    return None  # a Hub id: resolved (and downloaded) when loaded


def data_problem(key: str, path: str) -> str | None:
    """A data setting: a file or folder here, or a Hub dataset id."""
    if not path:
        return f"{key}: empty; give a .jsonl/.json/.parquet file, a folder of them, or a Hub dataset id"
    p = Path(path).expanduser()
    if p.exists() or not looks_local(path):
        return None
    return f"{key}: {path} not found"


def file_problem(key: str, path: str, what: str = "file") -> str | None:
    """A setting that names an existing local file."""
    if not path:
        return f"{key}: empty; give a {what}"
    return None if Path(path).expanduser().is_file() else f"{key}: {path} not found"


def folder_problem(key: str, path: str, needs: str = "") -> str | None:
    """A setting that names an existing local folder (holding ``needs``, when given)."""
    if not path:
        return f"{key}: empty; give a folder"
    p = Path(path).expanduser()
    if not p.is_dir():
        return f"{key}: {path} not found"
    if needs and not (p / needs).exists():
        return f"{key}: {path} has no {needs}"
    return None
