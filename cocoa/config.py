"""One pydantic config per command: loadable from YAML, every field also a CLI flag.

A command declares ``class FooConfig(Config)``; ``@config_options(FooConfig)`` adds ``--config FILE``
and one click option per field (nested sections flatten with dashes: ``stage1.lr`` -> ``--stage1-lr``).
Precedence: defaults < YAML file < flags given on the command line.
"""

from __future__ import annotations

import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="Config")


class ConfigError(click.UsageError):
    """A configuration problem (unknown key, bad value); click prints it as a usage error (exit 2)."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        from .fs import TextFileError, read_text

        try:
            text = read_text(path, fix="save the config file as UTF-8")
        except TextFileError as e:
            raise ConfigError(str(e)) from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
        return cls.build(data, overrides, where=str(path))

    @classmethod
    def build(cls: type[T], data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
              where: str = "config") -> T:
        merged = _deep_merge(dict(data or {}), overrides or {})
        _refuse_bools_for_numbers(cls, merged, where)
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            msg = format_validation_error(e, flags=True)
            raise ConfigError(f"{where}: {msg}" if where else msg) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base loader reports an unhashable key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _refuse_bools_for_numbers(model: type[BaseModel], data: Any, where: str, prefix: str = "") -> None:
    """A YAML ``true``/``false`` (or a Python bool) for an int or float setting is refused, never taken as 1/0."""
    if not isinstance(data, dict):
        return
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        v = data[name]
        tp = _unwrap_optional(field.annotation)
        key = f"{prefix}{name}"
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            _refuse_bools_for_numbers(tp, v, where, key + ".")
        elif tp in (int, float) and isinstance(v, bool):
            what = "a whole number" if tp is int else "a number"
            msg = f"{key}: {str(v).lower()} is a yes/no value, not {what}; give {what}"
            raise ConfigError(f"{where}: {msg}" if where else msg)


def format_validation_error(e: ValidationError, *, flags: bool = False) -> str:
    """One line for a pydantic error. ``flags``: name each setting's command-line flag too
    (``stage3.steps (--stage3-steps): ...``), for command configs."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r} (check its spelling; `--help` lists the settings)")
        else:
            msg = str(err["msg"])
            if msg.startswith("Value error, "):  # our own validators' messages already name the flag
                msg = msg[len("Value error, "):]
            if loc and flags and all(isinstance(x, str) for x in err["loc"]):
                loc = f"{loc} (--{loc.replace('.', '-').replace('_', '-')})"
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _deep_merge(dict(base[k]), v)
        else:
            base[k] = v
    return base


def _unwrap_optional(tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Any]]:
    out = []
    for name, field in model.model_fields.items():
        tp = _unwrap_optional(field.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out += _leaves(tp, prefix + (name,))
        else:
            out.append((prefix + (name,), tp, field))
    return out


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, is_flag)."""
    if tp is bool:
        return None, True
    if get_origin(tp) is Literal:
        return click.Choice([str(a) for a in get_args(tp)]), False
    if tp is int:
        return int, False
    if tp is float:
        return float, False
    return str, False  # str, Path, lists ("a,b"), dicts (YAML/JSON text) — pydantic converts


def _parse_cli_value(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(tp)
    if origin in (list, tuple) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if origin is dict and isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{value!r} is not a YAML/JSON mapping ({' '.join(str(e).split())[:200]}); "
                              "give e.g. '{key: value}'") from None
    if get_origin(tp) is Literal:
        for a in get_args(tp):
            if str(a) == value:
                return a
    return value


def config_options(cls: type[Config], skip: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """Decorator: add ``--config`` and one option per config field; pass ``config=<cls instance>``."""
    leaves = [leaf for leaf in _leaves(cls) if ".".join(leaf[0]) not in skip]

    def decorator(fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cfg_file = kwargs.pop("config", None)
            overrides: dict[str, Any] = {}
            for path, tp, _ in leaves:
                pname = "__".join(path)
                value = kwargs.pop(pname, None)
                if value is None:
                    continue
                d = overrides
                for p in path[:-1]:
                    d = d.setdefault(p, {})
                try:
                    d[path[-1]] = _parse_cli_value(tp, value)
                except ConfigError as e:
                    raise ConfigError(f"--{'-'.join(p.replace('_', '-') for p in path)}: {e.message}") from None
            if cfg_file:
                config = cls.from_yaml(cfg_file, overrides)
            else:
                config = cls.build({}, overrides, where="")
            return fn(*args, config=config, **kwargs)

        for path, tp, field in reversed(leaves):
            pname = "__".join(path)
            flag = "--" + "-".join(p.replace("_", "-") for p in path)
            ctype, is_flag = _click_type(tp)
            default = field.default if field.default_factory is None else field.default_factory()
            if isinstance(default, BaseModel):
                default = None
            if isinstance(default, (list, tuple)):
                default = ",".join(str(x) for x in default)
            desc = (field.description or "").rstrip(".")
            help_text = f"{desc} [default: {default}]" if desc else f"[default: {default}]"
            if is_flag:
                no_flag = "--no-" + flag[2:]
                wrapper = click.option(f"{flag}/{no_flag}", pname, default=None, help=help_text)(wrapper)
            else:
                wrapper = click.option(flag, pname, type=ctype, default=None, help=help_text)(wrapper)
        wrapper = click.option(
            "--config", "config", type=click.Path(dir_okay=False), default=None,
            help="YAML file with settings (flags given on the command line override it).",
        )(wrapper)
        return wrapper

    return decorator
