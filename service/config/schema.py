"""The machinery under every job config: frozen dataclasses from YAML and dotted CLI overrides.

A config is a tree of frozen dataclasses. It is loaded from YAML, overridden from the command
line with dotted keys (``--train.lr 1e-4``), validated before any cluster work starts (the
class's ``validate``), and flattened to ``section.key`` params for MLflow. Tune search spaces
use the same dotted keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


C = TypeVar("C")


# ---------------------------------------------------------------- building from dicts


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Converts a YAML or CLI value to the field's type, or raises ConfigError naming it.

    Floats must be finite: inf and nan are refused for every float field.
    """
    optional, inner = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed (expected {_type_name(tp)})")
    tp = inner
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            # No setting means anything at inf or nan: such a learning rate or weight decay only
            # turns the loss into nan some steps into a run, long after the cluster started.
            if not math.isfinite(number):
                raise ConfigError(f"{key}={number!r} is not allowed: a finite number")
            return number
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if typing.get_origin(tp) is dict:
            # Dotted keys may arrive flat ({"train.blr": ...}) or nested by CLI overrides
            # ({"train": {"blr": ...}}); both mean the same entry.
            if not isinstance(value, Mapping):
                raise ValueError
            _, value_type = typing.get_args(tp)
            return {k: _coerce(f"{key}.{k}", v, value_type) for k, v in _flat_items(value, "")}
        if typing.get_origin(tp) is tuple:
            item_types = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            value = list(value)
            if len(value) != len(item_types):
                raise ValueError
            return tuple(_coerce(key, v, t) for v, t in zip(value, item_types))
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}") from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _flat_items(tree: Mapping[str, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat_items(v, f"{prefix}{k}.")
        else:
            yield prefix + str(k), v


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _is_optional(_resolved_types(cls)[f.name])[1]
        keys += _dotted_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return keys


def _closest_key(cls: type, key: str, prefix: str) -> str | None:
    """The known dotted key a mistyped ``key`` (found under ``prefix``) most likely meant: a
    close spelling, or a key of the same name in another section (``--lr`` for ``train.lr``)."""
    import difflib

    keys = _dotted_keys(cls, prefix)
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(prefix + key, keys, n=1, cutoff=0.75)
    return close[0] if close else None


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Builds a config dataclass from a nested mapping; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _resolved_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        hints = [f"{prefix}{k}: did you mean {guess}?" for k in unknown if (guess := _closest_key(cls, k, prefix))]
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} at {where}"
            + (f" ({'; '.join(hints)})" if hints else "") + f"; allowed: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


# A URL's ``user:password@`` anywhere in a text: greedy up to the authority's last ``@``, so a
# password with an unescaped ``@`` goes whole.
_URL_USERINFO = re.compile(r"\b([a-zA-Z][\w+.-]*://)[^/\s'\"<>@]*(?:@[^/\s'\"<>@]*)*@")


def redact_text(text: str) -> str:
    """``text`` with every URL's ``user:password@`` removed, for messages and logs."""
    return _URL_USERINFO.sub(r"\1", text) if "@" in text else text


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages and logs."""
    return redact_text(url)


def redacted(config: Any) -> dict[str, Any]:
    """``to_dict(config)`` for showing or logging: URLs without ``user:password@``.

    Credentials are never config, but an endpoint or tracking URL may carry them as given."""

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return redact_url(v)
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(to_dict(config))


def flatten(config: Any, *, redact: bool = False) -> dict[str, Any]:
    """``{'train.lr': 1e-4, ...}``: the dotted keys used by the CLI, Tune and MLflow params
    (``redact``: URLs without ``user:password@``, for logging)."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(redacted(config) if redact else to_dict(config), "")
    return out


def field_docs(cls: type) -> dict[str, str]:
    """What each field of config dataclass ``cls`` (and its bases) means, from its comment in
    the source: the comment on the field's line, else the comment lines right above it."""
    import ast
    import inspect
    import io
    import tokenize

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen app): keys go without help
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            text = comments.get(node.end_lineno) if node.end_lineno in comments and \
                lines[node.end_lineno - 1].lstrip()[:1] != "#" else None
            if text is None:
                above, line = [], node.lineno - 1
                while line in comments and lines[line - 1].lstrip().startswith("#"):
                    above.insert(0, comments[line])
                    line -= 1
                text = " ".join(above) or None
            if text:
                docs[node.target.id] = text
    return docs


def key_docs(config_cls: type) -> dict[str, str]:
    """``{'train.lr': 'absolute lr; overrides blr when set', ...}`` for every dotted key of a
    job's config that its source explains."""
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_resolved_types(cls)[f.name]):
                walk(_resolved_types(cls)[f.name], f"{prefix}{f.name}.")
            elif f.name in docs:
                out[prefix + f.name] = docs[f.name]

    walk(config_cls, "")
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def with_overrides(config: C, overrides: Mapping[str, Any]) -> C:
    """A copy of ``config`` with dotted-key overrides applied and types checked."""
    tree = to_dict(config)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return from_dict(type(config), tree)


def parse_cli_overrides(args: Iterable[str]) -> dict[str, Any]:
    """``['--train.lr', '1e-4', '--dist.use_gpu=false']`` -> ``{'train.lr': '1e-4', ...}``.

    Values stay strings (or YAML scalars) and are typed by ``from_dict``; YAML parsing lets
    ``--train.betas [0.9,0.95]`` and ``--train.clip_grad null`` work.
    """
    args = list(args)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            i += 1
            raw = args[i]
        key = key.replace("-", "_")
        out[key] = _yaml_scalar(raw)
        i += 1
    return out


def _yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def load_config(
    cls: type[C],
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Defaults <- YAML file <- overrides, then validation (if the class has ``validate``)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = _read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        tree = loaded
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    config = from_dict(cls, tree)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a file that is not YAML is a ConfigError naming where."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}"
                          + (f" ({context})" if context else "")) from None


def dump_yaml(config: Any) -> str:
    """The config as YAML to show (``--print-config``): URLs without ``user:password@``."""
    return yaml.safe_dump(redacted(config), sort_keys=False)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raises a ``ConfigError`` naming ``key``, its ``value`` and what is ``allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
