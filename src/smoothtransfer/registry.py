"""One registry type shared by models, objectives, datasets and denoisers."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from smoothtransfer.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> factory mapping with helpful errors.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("resnet20")
    ... def resnet20(num_classes): ...
    >>> MODELS.get("resnet20")  # the factory
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator (``@REG.register("name")``)."""

        def deco(o: T) -> T:
            key = name or getattr(o, "__name__", None)
            if key is None:
                raise ValueError(f"cannot infer a {self.kind} name for {o!r}")
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = o
            return o

        return deco(obj) if obj is not None else deco

    def get(self, name: str) -> T:
        """The object registered under ``name``; a :class:`UserError` listing the choices otherwise."""
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown {self.kind} '{name}'{hint}; choose from: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered under ``name``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
