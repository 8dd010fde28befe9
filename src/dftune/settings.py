"""The configuration language every command speaks: YAML holding values, ``key=value``
overrides, dataclasses that say what each key is.

    dftune train configs/tiny_cpu.yaml train.objective=nll lr=1e-4
    dftune eval --model runs/dft/final --n 4 --show

A YAML file and ``section.key=value`` overrides fill a command's dataclass (``from_dict``);
an unknown key or a value of the wrong type is a ``ConfigError`` that names the key (with the
closest known key for a typo), raised before anything loads. ``describe`` is ``--show``.
The run's own dataclasses live elsewhere (``dftune.config`` for training, and beside each
command); this module imports none of them, so every module may import it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from dftune.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the dataclasses."""


def choice(where: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}; got {value!r}")


def _is_list(typ) -> bool:
    return typing.get_origin(typ) is list


def _coerce(value, typ, where: str, split: bool = True):
    if _is_list(typ):  # list[str]: a YAML list, or "a,b,c" from the command line
        if isinstance(value, str):  # split=False (field metadata): items may hold commas
            return [v.strip() for v in value.split(",") if v.strip()] if split else [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return [str(v) for v in value]
        raise ConfigError(f"{where}: expected a list of strings (or a,b,c), got {type(value).__name__} {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ in (int, float, str, bool) and type(value) is not typ:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, where: str = "", base=None):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types.

    Keys not given keep ``base``'s values: a section's own defaults are those of the field
    that holds it (``Config.eval``'s short periodic evaluation, not ``EvalConfig()``'s).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields_)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        typ, path = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value or {}, path, _section_default(fields_[key], base))
        else:
            kwargs[key] = _coerce(value, typ, path, fields_[key].metadata.get("split", True))
    if base is not None:
        kept = copy.deepcopy({f.name: getattr(base, f.name) for f in fields_.values() if f.init and f.name not in kwargs})
        kwargs = {**kept, **kwargs}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _section_default(f: dataclasses.Field, base):
    """The default value of a nested section: the enclosing default's, else the field's own."""
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def parse_scalar(raw: str):
    """A command-line value read as YAML, except that 1e-5 (a string in YAML 1.1) is a float."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # e.g. "a: b" text: keep it as typed
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, (dict, list)) or value is None:
        return raw  # "[x]" or "null" typed on a command line is text, not structure
    return value


def resolve_key(cls, key: str) -> list[str]:
    """The field path a ``key`` names: ``train.lr``, or a bare ``lr`` when exactly one
    section has it. Unknown or ambiguous keys are errors naming them."""
    parts = key.split(".")
    path, typ = [], cls
    for i, part in enumerate(parts):
        hints = _hints(typ) if dataclasses.is_dataclass(typ) else {}
        if part in hints:
            path.append(part)
            typ = hints[part]
            continue
        if i == 0 and len(parts) == 1:  # a bare key: look in the sections
            found = [f"{sec}.{part}" for sec, t in hints.items() if dataclasses.is_dataclass(t) and part in _hints(t)]
            if len(found) == 1:
                return found[0].split(".")
            if len(found) > 1:
                raise ConfigError(f"key {key!r} is ambiguous: say {' or '.join(found)}")
        known = sorted(hints) if hints else []
        close = difflib.get_close_matches(part, known, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join('.'.join(path + [c]) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown key {key!r}{hint}" + (f"; known here: {', '.join(known)}" if known else ""))
    if dataclasses.is_dataclass(typ):
        raise ConfigError(f"{key!r} is a section; set one of its keys ({key}.KEY=VALUE)")
    return path


def apply_overrides(cls, data: dict, items) -> dict:
    """Set ``key=value`` items (values read as YAML) into the nested dict ``data``."""
    for item in items:
        key, eq, raw = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        node = data
        path = resolve_key(cls, key.strip())
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = parse_scalar(raw)
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return data


def load(cls, path: str | Path | None = None, overrides=()):
    """A ``cls`` config from an optional YAML file plus ``key=value`` overrides; every key
    and type is checked before anything else happens."""
    data = read_yaml(path) if path else {}
    apply_overrides(cls, data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_diff(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every key whose value differs."""
    a, b = flatten(saved), flatten(to_dict(cfg))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """The resolved config as YAML (atomically): what the run actually used."""
    from dftune.files import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls) -> dict[str, str]:
    """``name: text`` lines of a dataclass docstring (continuation lines indented)."""
    docs, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        names = [n.strip() for n in head.split(",")]
        if sep and names and all(n in {f.name for f in dataclasses.fields(cls)} for n in names):
            for n in names:
                docs[n] = rest.strip()
            current = names
        elif current and stripped and line.startswith("        "):
            for n in current:
                docs[n] += " " + stripped
        else:
            current = None
    return docs


def describe(cls, prefix: str = "", base=None) -> str:
    """Every key with its default and meaning: the ``--show`` of each command. A nested
    section shows the defaults of the field that holds it (``base``), as ``from_dict`` uses."""
    hints, docs = _hints(cls), field_docs(cls)
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__name__
    out = [f"[{prefix.rstrip('.') or cls.__name__}] {summary}"]
    sections = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append((f.name, hints[f.name], _section_default(f, base)))
            continue
        if base is not None:
            default = getattr(base, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        line = f"  {prefix}{f.name} = {default!r}"
        if f.name in docs:
            line += f"\n      {docs[f.name]}"
        out.append(line)
    for name, sub, sub_base in sections:
        out.append("")
        out.append(describe(sub, f"{prefix}{name}.", sub_base))
    return "\n".join(out)
