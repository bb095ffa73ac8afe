"""Turning `--param key=value` strings into a model's dataclass config, with clear errors."""
from __future__ import annotations

import dataclasses
from typing import Any

from harness.errors import HarnessError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_params(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--param {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def coerce(config_cls: type, raw: dict[str, Any], where: str = "--param") -> dict[str, Any]:
    """Convert raw values to the types of `config_cls`'s fields; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise HarnessError(f"{where} {key}: unknown parameter; known: {', '.join(fields)}")
        kind = fields[key].type if isinstance(fields[key].type, type) else eval(fields[key].type)  # noqa: S307
        out[key] = _convert(value, kind, f"{where} {key}")
    return out


def _convert(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, str):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind):
            return value
        raise HarnessError(f"{where}: expected {kind.__name__}, got {value!r}")
    try:
        if kind is bool:
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError
        return kind(value)
    except ValueError:
        raise HarnessError(f"{where}: expected {kind.__name__}, got {value!r}") from None
