"""Stage options as dataclasses, mapped to and from command-line flags so that each option is declared once.

A field ``max_new_tokens: int = 2048`` with ``metadata={"help": ...}`` becomes ``--max-new-tokens``; booleans
become ``--flag/--no-flag``; ``X | None`` fields accept a value or default to None. An option has one name: its
field's, which is also its key in ``run.json`` and, with dashes, its flag.

Each option also declares its valid values (``check=``, e.g. :func:`positive`; checked with the choices by
:func:`validated` before anything runs; an options class may add a ``check()`` method for rules across its
fields), whether it changes results (``fingerprinted=False``: it cannot, e.g. a device or a batch size that
only changes rounding, or its effect is already in an input's content hash) and whether its value names a
model or a file (``identity="model"|"file"``: fingerprinted by content, not by the path string). See
:mod:`~sppo_kernels.pipeline.core.fingerprint`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from sppo_kernels.pipeline.core.errors import PipelineError

OptionsT = TypeVar("OptionsT")


Check = Callable[[Any], bool]


def opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    *,
    check: tuple[Check, str] | None = None,
    fingerprinted: bool = True,
    identity: str | None = None,
) -> Any:
    """A dataclass field with the help text (and choices) of its command-line flag; ``check``: ``(predicate, "what it
    must be")`` for values other than None; ``fingerprinted``: whether the option is part of the fingerprint of
    the work it produces; ``identity``: ``"model"`` or ``"file"`` when the value is a path whose content counts."""
    metadata = {"help": help, "choices": choices, "check": check}
    return dataclasses.field(
        default=default, metadata={**metadata, "fingerprinted": fingerprinted, "identity": identity}
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> tuple[Check, str]:
    """The check of an option that must be a finite number >= ``low``."""
    return (lambda v: _number(v) and v >= low), f"a number >= {low}"


def positive() -> tuple[Check, str]:
    """The check of an option that must be a finite number > 0."""
    return (lambda v: _number(v) and v > 0), "a finite number > 0"


def between(low: float, high: float, *, low_open: bool = False) -> tuple[Check, str]:
    """The check of an option in [low, high] (or (low, high] with ``low_open``)."""
    above = (lambda v: v > low) if low_open else (lambda v: v >= low)
    return (lambda v: _number(v) and above(v) and v <= high), f"in {'(' if low_open else '['}{low}, {high}]"


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


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
                metavar=field.name.upper(),
                help=help_text,
            )


def from_args(cls: type[OptionsT], args: argparse.Namespace, **overrides: Any) -> OptionsT:
    """Build ``cls`` from parsed flags: flags given on the command line win over ``overrides`` over defaults."""
    values = dict(overrides)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return validated(cls(**values))


def validated(options: OptionsT) -> OptionsT:
    """Check the choices, the ``check`` of every option and the class's ``check()`` (rules across fields), for
    options built in code as well as from flags; raises :class:`PipelineError` naming the flag."""
    for field in dataclasses.fields(options):  # type: ignore[arg-type]
        choices = field.metadata.get("choices")
        value = getattr(options, field.name)
        if choices and value not in choices:
            raise PipelineError(f"{_flag(field)} must be one of {choices}, got {value!r}")
        check = field.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise PipelineError(f"{_flag(field)} must be {check[1]}, got {value!r}")
    if hasattr(options, "check"):
        options.check()
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
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
