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

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
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
        if isinstance(value, str) and split and value.strip().startswith("[") and value.strip().endswith("]"):
            value = value.strip()[1:-1]  # "[a,b]" and "[]" typed on a command line: the list's items
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


def _omitted(f: dataclasses.Field) -> dict[str, str]:
    """Keys of the section held by field ``f`` that its command does not honour, with the
    reason (field metadata ``omit``: the periodic evaluation inside training has no model or
    out of its own). They are refused, and ``--show`` leaves them out."""
    return dict(f.metadata.get("omit", {}))


def from_dict(cls, data: dict, where: str = "", base=None, omit: dict | None = None):
    """Build dataclass ``cls`` from a nested dict; every unknown key and wrong type is
    collected, then raised together (one line each).

    Keys not given keep ``base``'s values: a section's own defaults are those of the field
    that holds it (``Config.eval``'s short periodic evaluation, not ``EvalConfig()``'s).
    """
    problems = Problems()
    built = _build(cls, data, where, base, omit or {}, problems)
    problems.raise_all()
    return built


def _build(cls, data, where: str, base, omit: dict, problems: Problems):
    before = len(problems)
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = _hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in omit:
            problems.append(f"{path}: not a setting here: {omit[key]}")
        elif key not in fields_:
            known = [f"{where}.{k}" if where else k for k in fields_ if k not in omit]
            problems.append(f"unknown key {path!r}{did_you_mean(path, known)}; known here: {', '.join(sorted(known))}")
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, path, _section_default(fields_[key], base),
                                 _omitted(fields_[key]), problems)
        else:
            try:
                kwargs[key] = _coerce(value, hints[key], path, fields_[key].metadata.get("split", True))
            except ConfigError as e:
                problems.append(str(e))
    if len(problems) > before:  # nothing built from a section with problems
        return None
    if base is not None:
        kept = copy.deepcopy({f.name: getattr(base, f.name) for f in fields_.values() if f.init and f.name not in kwargs})
        kwargs = {**kept, **kwargs}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default
        problems.append(f"{where or cls.__name__}: {e}")
    except ConfigError as e:  # a dataclass that checks itself
        problems.append(str(e))
    return None


def known_keys(cls, prefix: str = "", omit: dict | None = None) -> dict[str, object]:
    """Every key a command honours, dotted (``train.lr``), with its type; sections' keys
    included, the keys a section's field omits left out."""
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in (omit or {}):
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(known_keys(typ, f"{prefix}{f.name}.", _omitted(f)))
        else:
            out[f"{prefix}{f.name}"] = typ
    return out


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
    section has it. Unknown or ambiguous keys are errors naming them, with the closest
    known keys for a typo (``lrr`` -> ``train.lr``)."""
    known = known_keys(cls)
    if key in known:
        return key.split(".")
    sections = {k.rpartition(".")[0] for k in known} - {""}
    sections |= {".".join(s.split(".")[:i]) for s in sections for i in range(1, s.count(".") + 1)}
    if key in sections:
        raise ConfigError(f"{key!r} is a section; set one of its keys ({key}.KEY=VALUE)")
    head = key.split(".")[0]
    for f in dataclasses.fields(cls):  # a key of a section that this command does not honour
        sub = key.partition(".")[2].split(".")[0]
        if f.name == head and sub in _omitted(f):
            raise ConfigError(f"{head}.{sub}: not a setting here: {_omitted(f)[sub]}")
    if "." not in key:  # a bare key: the one top-level section that has it
        found = [k for k in known if k.count(".") == 1 and k.rpartition(".")[2] == key]
        if len(found) == 1:
            return found[0].split(".")
        if len(found) > 1:
            raise ConfigError(f"key {key!r} is ambiguous: say {' or '.join(found)}")
    raise ConfigError(f"unknown key {key!r}{did_you_mean(key, known)}")


def did_you_mean(key: str, known) -> str:
    """`` (did you mean train.lr?)`` for the known keys closest to ``key``: by name within its
    section for a dotted key, by name in any section for a bare one (``lrr`` finds
    ``train.lr``), else by the whole dotted key; '' when none is close."""
    known = list(known)
    section, _, name = key.rpartition(".")
    pool = [k for k in known if k.rpartition(".")[0] == section] if section else known
    by_name: dict[str, list[str]] = {}
    for k in pool:
        by_name.setdefault(k.rpartition(".")[2], []).append(k)
    close = [k for n in difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5) for k in by_name[n]]
    close = close or difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


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
    """{"train": {"lr": 1}} -> {"train.lr": 1}: nested settings as dotted keys (config
    differences, the report's config table, a sampling run's stored settings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg, omit: dict | None = None) -> dict:
    """The config as plain data (what config.yaml holds): the keys it honours, no others."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in (omit or {}):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = to_dict(value, _omitted(f)) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def save_config(cfg, path: str | Path) -> None:
    """The resolved config as YAML (atomically): what the run actually used."""
    from dftune.files import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls) -> dict[str, str]:
    """Each field's help: the string literal right after the field in the class body (its
    own docstring, as in litgpt's ``args.py``); a base class's for inherited fields. Read
    from the source, so the help is where the field is and cannot drift from it."""
    docs = {}
    for klass in reversed(cls.__mro__):  # a subclass's text wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError):  # no source (a class built in a REPL): no help
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe(cls, prefix: str = "", base=None, omit: dict | None = None, title: str = "") -> str:
    """Every key with its default and meaning: the ``--show`` of each command. A nested
    section shows the defaults of the field that holds it (``base``), as ``from_dict`` uses,
    and only the keys its command honours."""
    hints, docs = _hints(cls), field_docs(cls)
    paragraph = title or " ".join((cls.__doc__ or cls.__name__).strip().split("\n\n")[0].split())
    out = [f"[{prefix.rstrip('.') or cls.__name__}] {paragraph}"]
    sections = []
    for f in dataclasses.fields(cls):
        if f.name in (omit or {}):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append((f.name, hints[f.name], _section_default(f, base), _omitted(f), docs.get(f.name, "")))
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
    for name, sub, sub_base, sub_omit, sub_title in sections:
        out.append("")
        out.append(describe(sub, f"{prefix}{name}.", sub_base, sub_omit, sub_title))
    return "\n".join(out)


class Problems(list):
    """Every problem with a command's settings, collected and then raised together as one
    ``ConfigError`` (litgpt's ``validate_args``): the user fixes them all in one go. One line
    per problem; a single problem is a single line."""

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.append(message)
        return ok

    def add(self, problem: str | None) -> None:
        """A check's result: its problem, or None when there is none."""
        if problem:
            self.append(problem)

    def at_least(self, where: str, value, low) -> bool:
        return self.check(value >= low, f"{where}: must be >= {low}; got {value}")

    def positive(self, where: str, value) -> bool:
        return self.check(value > 0, f"{where}: must be > 0; got {value}")

    def fraction(self, where: str, value, *, one: bool = False) -> bool:
        """``value`` in [0, 1), or [0, 1] with ``one``."""
        ok = 0 <= value <= 1 if one else 0 <= value < 1
        return self.check(ok, f"{where}: must be in [0, 1{']' if one else ')'}; got {value}")

    def nonempty(self, where: str, value, what: str) -> bool:
        return self.check(bool(value), f"{where}: empty; give {what}")

    def one_of(self, where: str, value, choices) -> bool:
        return self.check(value in choices, f"{where}: must be one of {', '.join(map(str, choices))}; got {value!r}")

    def raise_all(self) -> None:
        if len(self) == 1:
            raise ConfigError(self[0])
        if self:
            raise ConfigError(f"{len(self)} problems with the settings:\n  " + "\n  ".join(self))
