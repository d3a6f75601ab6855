"""Old names of renamed keyword arguments and attributes, still accepted with a FutureWarning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

__all__ = ["renamed_attributes", "renamed_keywords"]


def _warn(owner: str, old: str, new: str) -> None:
    warnings.warn(f"{owner}: {old} is deprecated; use {new}", FutureWarning, stacklevel=3)


def renamed_keywords(owner: str, **old_to_new: str) -> Callable[[F], F]:
    """Decorator: ``function(old=value)`` is ``function(new=value)`` (``old="new"``), with a FutureWarning."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    _warn(owner, old, new)
                    if new in kwargs:
                        raise TypeError(f"{owner}: got both {new} and its old name {old}")
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attributes(**old_to_new: str) -> Callable[[C], C]:
    """Class decorator: the constructor accepts the old keywords and instances read the old attribute names
    (``old="new"``), each with a FutureWarning."""

    def decorate(cls: C) -> C:
        owner = cls.__name__
        cls.__init__ = renamed_keywords(owner, **old_to_new)(cls.__init__)  # type: ignore[misc]
        inherited = getattr(cls, "__getattr__", None)

        def __getattr__(self: Any, name: str) -> Any:  # only called for attributes that do not exist
            if name in old_to_new:
                _warn(owner, name, old_to_new[name])
                return getattr(self, old_to_new[name])
            if inherited is not None:
                return inherited(self, name)
            raise AttributeError(f"{owner!r} object has no attribute {name!r}")

        cls.__getattr__ = __getattr__  # type: ignore[attr-defined]
        return cls

    return decorate
