"""One setting's value: from the raw text or TOML value of a file, an environment variable or a
flag to the setting's type, checked against its range, choices and check, with errors that name
where the value came from and the fix.

Owns: parse_value and the display of a value (_human). Never: layers sources, checks values
against each other or against hosts.conf (smrd.config.settings does).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .hosts import MAX_REPLICAS, did_you_mean

if TYPE_CHECKING:  # smrd.config.settings imports this module: its types are named, not imported
    from .settings import Source, Spec

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE = re.compile(r"^\s*([0-9]+)\s*(b|k|kib|m|mib|g|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}


def parse_value(spec: Spec, raw: Any, source: Source) -> Any:
    """Turn a raw value (TOML value, env string or flag string) into the setting's type, checked."""
    where = source.locate(spec.name)
    if spec.type is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where}: {raw!r} is not a boolean; use true or false")
    if spec.type is tuple:
        value = _parse_ids(raw, where)
    elif spec.type is int:
        value = _parse_int(spec, raw, where, from_text=source.kind in ("env", "flag"))
        lo = spec.min if spec.min is not None else value
        hi = spec.max if spec.max is not None else value
        if not lo <= value <= hi:
            raise ConfigError(
                f"{where}: {_human(spec, value)} is out of range; use {_human(spec, lo)}..{_human(spec, hi)}"
            )
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {_toml_type(raw)} {raw!r}; quote it")
        value = raw.strip()
        if spec.choices:
            value = value.lower()
            if value not in spec.choices:
                raise ConfigError(
                    f"{where}: {raw!r} is not one of {', '.join(spec.choices)}"
                    f"{did_you_mean(value, spec.choices)}; pick one of those"
                )
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ConfigError(f"{where}: {problem}; fix the value")
    return value


def _parse_ids(raw: Any, where: str) -> tuple[int, ...] | None:
    """A set of replica ids: a TOML array of integers, or text like "0,1,2" / "0 1 2" (env,
    flags); "all" means the default (every replica of the hosts file). Sorted, no duplicates."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() == "all":
            return None
        items: list[Any] = [p for p in re.split(r"[\s,]+", text) if p]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise ConfigError(f"{where}: expected a list of replica ids like [0, 1, 2], got {_toml_type(raw)} {raw!r}")
    if not items:
        raise ConfigError(f"{where}: no replica ids; list at least one, e.g. 0,1,2 (or all)")
    ids = []
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"[0-9]+", item):
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(f"{where}: {item!r} is not a replica id; write whole numbers like 0,1,2")
        if not 0 <= item < MAX_REPLICAS:
            raise ConfigError(f"{where}: replica id {item} is out of range; use 0..{MAX_REPLICAS - 1}")
        if item in ids:
            raise ConfigError(f"{where}: replica id {item} is listed twice; list each voter once")
        ids.append(item)
    return tuple(sorted(ids))


def _parse_int(spec: Spec, raw: Any, where: str, *, from_text: bool) -> int:
    sizes = spec.unit == "bytes"
    unit_hint = " (or a size like 64KiB, 1MiB)" if sizes else ""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ConfigError(f"{where}: expected an integer{unit_hint}, got {_toml_type(raw)} {raw!r}; write a whole number")
    if isinstance(raw, int):
        return raw
    if not raw.strip():
        raise ConfigError(f"{where}: empty value; give a whole number{unit_hint} or leave the setting out")
    if sizes:
        m = _SIZE.match(raw)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2) and m.group(2).lower()]
    elif from_text and re.fullmatch(r"\s*[+-]?[0-9]+\s*", raw):
        return int(raw)
    if not from_text and not sizes:
        raise ConfigError(f"{where}: expected an integer, got a string {raw!r}; write it without quotes")
    raise ConfigError(f"{where}: {raw!r} is not an integer{unit_hint}; write a whole number"
                      f"{' of ' + spec.unit if spec.unit and not sizes else ''}")


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", float: "a float", str: "a string", int: "an integer", list: "an array"}.get(
        type(value), type(value).__name__)


def _human(spec: Spec, value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if spec.unit == "bytes" and isinstance(value, int):
        for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if value >= size and value % size == 0:
                return f"{value // size} {unit}"
        return f"{value} bytes"
    if spec.unit in ("ms", "s") and isinstance(value, int):
        return f"{value} {spec.unit}"
    return str(value)
