"""Stage options as dataclasses, mapped to and from command-line flags so that each option is declared once.

A field ``max_new_tokens: int = 2048`` with ``metadata={"help": ...}`` becomes ``--max-new-tokens``; booleans
become ``--flag/--no-flag``; ``X | None`` fields accept a value or default to None. An option's name on the
command line and in ``run.json`` is its field name unless ``opt(..., name=...)`` says otherwise (the model
options' ``backend`` is ``--kernel-backend``: the command line also has a generation backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from sppo_kernels.pipeline.errors import PipelineError

OptionsT = TypeVar("OptionsT")


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, *, name: str | None = None) -> Any:
    """A dataclass field with the help text (and choices) of its command-line flag; ``name``: the option's name
    on the command line and in records when it differs from the field's."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "name": name})


def option_name(field: dataclasses.Field) -> str:
    """The name of ``field`` on the command line (with dashes) and in ``run.json`` / stage summaries."""
    return field.metadata.get("name") or field.name


def _flag(field: dataclasses.Field) -> str:
    return "--" + option_name(field).replace("_", "-")


def _value_type(hint: Any) -> type:
    """``int`` for ``int``, ``str`` for ``str | None``; only scalar option types are supported."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint not in (int, float, str, bool):
        raise TypeError(f"unsupported option type {hint!r}")
    return hint


def add_options(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None) -> None:
    """Add one flag per field of the dataclass ``cls`` (defaults are resolved later by :func:`from_args`)."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _value_type(hints[field.name])
        help_text = f"{field.metadata.get('help', '')} (default: {field.default})"
        if kind is bool:
            group.add_argument(_flag(field), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(
                _flag(field),
                type=kind,
                default=None,
                choices=field.metadata.get("choices"),
                metavar=option_name(field).upper(),
                help=help_text,
            )


def from_args(cls: type[OptionsT], args: argparse.Namespace, **overrides: Any) -> OptionsT:
    """Build ``cls`` from parsed flags: flags given on the command line win over ``overrides`` over defaults."""
    values = dict(overrides)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = getattr(args, option_name(field), None)
        if given is not None:
            values[field.name] = given
    return validated(cls(**values))


def validated(options: OptionsT) -> OptionsT:
    """Check choices of a built options object (for options built in code rather than by argparse)."""
    for field in dataclasses.fields(options):  # type: ignore[arg-type]
        choices = field.metadata.get("choices")
        value = getattr(options, field.name)
        if choices and value not in choices:
            raise PipelineError(f"{_flag(field)} must be one of {choices}, got {value!r}")
    return options


def to_argv(options: Any) -> list[str]:
    """The flags that rebuild ``options`` in another process (only values that differ from the default)."""
    argv = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if value == field.default:
            continue
        if isinstance(value, bool):
            argv.append(_flag(field) if value else "--no-" + _flag(field)[2:])
        elif value is not None:
            argv += [_flag(field), str(value)]
    return argv


def to_record(options: Any) -> dict[str, Any]:
    """``{option name: value}`` of an options object, as stored in ``run.json`` and in stage summaries."""
    return {option_name(field): getattr(options, field.name) for field in dataclasses.fields(options)}
