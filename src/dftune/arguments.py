"""One argument grammar for every command:

    dftune COMMAND [CONFIG.yaml] [key=value ...] [--key value ...] [--flag] [ARG ...]

``parse_argv`` turns a command line into the YAML path and the overrides (``--key value`` is
``key=value``; a boolean key is a bare flag, ``--no-KEY`` its negation; a list key collects the
items up to the next flag; bare ``ARG``s fill the command's positional field); ``build_config``
reads them into the command's dataclass through ``dftune.settings``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from dftune.settings import ConfigError, apply_overrides, from_dict, read_yaml, resolve_key


@dataclass
class Parsed:
    yaml: str | None = None
    overrides: list = field(default_factory=list)
    show: bool = False
    help: bool = False


def _field_type(cls, key: str):
    """The type of the field ``key`` resolves to (for flags: bool needs no value, lists collect)."""
    typ = cls
    for part in resolve_key(cls, key):
        typ = typing.get_type_hints(typ)[part]
    return typ


def _is_bool(cls, key: str) -> bool:
    try:
        return _field_type(cls, key) is bool
    except ConfigError:
        return False


def parse_argv(cls, argv: list[str], cmd) -> Parsed:
    """``[CONFIG.yaml] [key=value] [--key value] [--flag] [ARG]`` -> YAML path and overrides.
    ``cmd`` says how short flags, bare arguments and a YAML argument map onto keys (a
    ``dftune.cli.Command``: ``flags``, ``positional``, ``yaml_field``)."""
    out, positional, i = Parsed(), [], 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok in ("-h", "--help"):
            out.help = True
        elif tok == "--show":
            out.show = True
        elif tok.startswith("-") and len(tok) > 1 and not tok[1:2].isdigit():
            name, eq, value = tok.partition("=")
            key = cmd.flags.get(name) or name.lstrip("-").replace("-", "_")
            if "=" in key:  # a flag that stands for a whole setting
                out.overrides.append(key)
                continue
            if key.startswith("no_") and not eq and _is_bool(cls, key[3:]):  # --no-strip-think
                out.overrides.append(f"{key[3:]}=false")
                continue
            typ = _field_type(cls, key)
            if typ is bool and not eq:
                out.overrides.append(f"{key}=true")
                continue
            if typing.get_origin(typ) is list and not eq:  # --grid a=1,2 b=3 --next: every item up to the next flag
                items = []
                while i < len(argv) and not argv[i].startswith("--"):
                    items.append(argv[i])
                    i += 1
                if not items:
                    raise ConfigError(f"{name} needs a value")
                out.overrides.append((key, items))
                continue
            if not eq:
                if i >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                value = argv[i]
                i += 1
            out.overrides.append(f"{key}={value}")
        elif "=" in tok:
            out.overrides.append(tok)
        elif tok.endswith((".yaml", ".yml")) and cmd.yaml_field:
            out.overrides.append(f"{cmd.yaml_field}={tok}")
        elif tok.endswith((".yaml", ".yml")) and out.yaml is None and not positional and not out.overrides:
            out.yaml = tok
        else:
            positional.append(tok)
    if positional:
        if not cmd.positional:
            raise ConfigError(f"unexpected argument {positional[0]!r}; settings are key=value (see --show)")
        typ = _field_type(cls, cmd.positional)
        if typing.get_origin(typ) is list:
            out.overrides.append((cmd.positional, positional))
        elif len(positional) == 1:
            out.overrides.append(f"{cmd.positional}={positional[0]}")
        else:
            raise ConfigError(f"one {cmd.positional} expected, got {positional}")
    return out


def build_config(cls, parsed: Parsed):
    """YAML + overrides -> the dataclass; list items given as flags keep their commas."""
    data = read_yaml(parsed.yaml) if parsed.yaml else {}
    for item in parsed.overrides:
        if isinstance(item, tuple):  # (key, [items]) from a list flag or positionals
            node, path = data, resolve_key(cls, item[0])
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node.setdefault(path[-1], [])
            if not isinstance(node[path[-1]], list):
                node[path[-1]] = []
            node[path[-1]] = [*node[path[-1]], *_split_items(cls, item[0], item[1])]
        else:
            apply_overrides(cls, data, [item])
    return from_dict(cls, data)


def _split_items(cls, key: str, items: list[str]) -> list[str]:
    """Items of a list flag are split on commas unless the field keeps them (metadata split=False)."""
    typ, f = cls, None
    for part in resolve_key(cls, key):
        f = {x.name: x for x in dataclasses.fields(typ)}[part]
        typ = typing.get_type_hints(typ)[part]
    if f is not None and f.metadata.get("split", True) is False:
        return list(items)
    return [v.strip() for item in items for v in item.split(",") if v.strip()]
