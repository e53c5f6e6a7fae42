"""Command-line flags generated from the config dataclasses.

Every dataclass field becomes a flag named like Megatron-LM's (`num_layers` -> `--num-layers`),
with the field's description as help text. Generated flags default to None ("not given"),
so a preset's value survives unless the user overrides it:

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, LimeConfig, group="model")
    args = parser.parse_args()
    config = dataclass_from_args(LimeConfig, args, base=LimeConfig.from_name(args.model))
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that have a flag (fields with metadata flag=False have none)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """Add one flag per field of `cls` (a dataclass whose fields were made with `config.param`)."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and default != "":
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=help_text)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(typing.get_args(tp)[0])
        elif typing.get_origin(tp) in (list, tuple):
            (item_type, *_) = typing.get_args(tp) or (str,)
            kwargs["nargs"] = "+"
            kwargs["type"] = item_type if item_type is not Ellipsis else str
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp!r}")
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        target.add_argument(flag_name(f.name), **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, base: T | None = None, **extra: Any) -> T:
    """Build `cls` from parsed args: fields the user gave win over `base` (or the defaults)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in flag_fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = list(given) if isinstance(given, tuple) else given
    values.update(extra)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
