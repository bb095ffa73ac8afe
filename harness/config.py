"""Turning `--param key=value` strings into a model's dataclass config, with clear errors, and
the one check of a value (or a searched range) against the range its config declares."""
from __future__ import annotations

import dataclasses
from typing import Any

from harness.errors import HarnessError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _trainer_ranges() -> dict:
    """What the trainer keys a study file or a grid may set accept (the CLI flags' own ranges)."""
    from models.base import NON_NEGATIVE, POSITIVE, at_least

    return {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": at_least(1)}


def model_name(config_cls: type) -> str:
    """The registered model whose config `config_cls` is (the one that fixes none of its fields)."""
    import models

    for name in models.names():
        spec = models.get(name)
        if spec.config_cls is config_cls and not spec.fixed:
            return name
    return config_cls.__name__


def check_range(model: str | None, config_cls: type, key: str, low: Any, high: Any = None,
                where: str = "--param") -> None:
    """THE range check: a value (`high` None), or every value of a searched range [low, high], must
    lie inside the range `config_cls` declares for `key` (its `RANGES`, models/base.py; a trainer
    key: the trainer's); a key that declares none takes anything. Used for --param values, study
    files' [fixed] values and [space] ranges, and experiment grids. Raises a one-line HarnessError
    naming `model` (default: the model `config_cls` is): `WHERE: igr-sr's m must be >= 1`,
    `WHERE: range [-0.5, 0.5] is outside sasrec's attn_dropout range [0, 1)`."""
    from models.base import declared

    fields = {f.name for f in dataclasses.fields(config_cls)}
    allowed = (declared(config_cls) if key in fields else _trainer_ranges()).get(key)
    if allowed is None:
        return
    if high is None:
        if not allowed.contains(low):
            raise HarnessError(f"{where}: {model or model_name(config_cls)}'s {key} must be {allowed.requirement()}")
    elif not (allowed.contains(low) and allowed.contains(high)):
        raise HarnessError(f"{where}: range [{low!r}, {high!r}] is outside {model or model_name(config_cls)}'s "
                           f"{key} range {allowed}")


def check_multiples(model: str, config_cls: type, values: dict[str, Any], where: str = "") -> None:
    """The config's `MULTIPLE_OF` (e.g. hidden a multiple of heads) over `values` (every field
    named there must be in it; others are skipped)."""
    from models.base import declared

    for key, other in declared(config_cls, "MULTIPLE_OF").items():
        if key in values and other in values and values[other] >= 1 and values[key] % values[other]:
            raise HarnessError(f"{where}{model}'s {key} ({values[key]}) must be a multiple of {other} "
                               f"({values[other]})")


def parse_params(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--param {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def coerce(config_cls: type, raw: dict[str, Any], where: str = "--param", model: str | None = None) -> dict[str, Any]:
    """Convert raw values to the types of `config_cls`'s fields, each checked against its declared
    range (`check_range`; `model` names it in messages, default the model `config_cls` is);
    unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise HarnessError(f"{where} {key}: unknown parameter; known: {', '.join(fields)}")
        kind = fields[key].type if isinstance(fields[key].type, type) else eval(fields[key].type)  # noqa: S307
        out[key] = _convert(value, kind, f"{where} {key}")
        check_range(model, config_cls, key, out[key], where=f"{where} {key}={value}")
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
