"""Config text in, one-line errors out: YAML files, `--set` items, and pydantic's validation
errors worded as `field.path: what is wrong (got value)`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lte_ray.errors import ConfigError

_PHRASES = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "literal_error": "must be one of {expected}", "extra_forbidden": "unknown field",
}


def describe(err: ValidationError) -> str:
    """The first validation error as one line: `field.path: what is wrong (got value)`."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "value_error":  # our own validators write complete, field-named messages
        msg = str(first["ctx"]["error"])
        return msg if ":" in msg.split(" ")[0] else f"{loc}: {msg}"
    msg = _PHRASES[kind].format(**first.get("ctx", {})) if kind in _PHRASES else first["msg"]
    got = first.get("input")
    suffix = "" if kind in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg}{suffix}"


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set section.key=value` items -> {dotted: value}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected section.key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {str(p)!r}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config: {str(p)!r} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {str(p)!r} must hold a mapping of sections")
    return data
