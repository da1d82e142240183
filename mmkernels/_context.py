"""Context-local stacks: the one mechanism behind every scoped runtime setting.

``mmkernels.backend(...)``, ``use_path``, ``explain``, ``pretend_device`` and
``tuning.scope`` each push an entry on entering a ``with`` block and remove it on exit. The
stack lives in a ``contextvars.ContextVar`` holding an immutable tuple, so

* each thread sees only its own blocks (a new thread starts with an empty stack);
* each asyncio task works on a copy of its creator's stack, so tasks do not see each other's;
* an entry is removed by identity, not by popping the top, so blocks that exit out of order
  (two generators, each holding a block open across ``yield``, resumed alternately) remove
  their own entries and leave no stale setting behind. While such a generator is suspended
  inside its block, its caller still sees the setting: generators share their caller's context.

``torch.compile`` cannot trace a ``ContextVar`` read: while tracing, a stack is read once, in
Python, and what it held becomes a constant of the compiled graph (the settings of the context
that compiled it), as the dispatch choice itself does.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Generic, Iterator, TypeVar

import torch

T = TypeVar("T")

_STACKS: dict[str, "ContextStack"] = {}


@torch.compiler.assume_constant_result
def _values_while_tracing(name: str) -> tuple:
    return tuple(e.value for e in _STACKS[name]._var.get())


class _Entry(Generic[T]):
    __slots__ = ("value",)

    def __init__(self, value: T):
        self.value = value


class ContextStack(Generic[T]):
    """A stack of values private to the current thread / asyncio task."""

    def __init__(self, name: str):
        if name in _STACKS:
            raise ValueError(f"a context stack named {name!r} exists already")
        self.name = name
        self._var: contextvars.ContextVar[tuple] = contextvars.ContextVar(name, default=())
        _STACKS[name] = self

    def values(self) -> tuple:
        """Every value pushed in this context, innermost last."""
        if torch.compiler.is_compiling():
            return _values_while_tracing(self.name)
        return tuple(e.value for e in self._var.get())

    def top(self, default: T | None = None) -> T | None:
        """The innermost value, or ``default`` when the stack is empty."""
        values = self.values()
        return values[-1] if values else default

    def __bool__(self) -> bool:
        return bool(self.values())

    @contextlib.contextmanager
    def pushed(self, value: T) -> Iterator[T]:
        """Push ``value`` for the duration of the block."""
        entry = _Entry(value)
        self._var.set(self._var.get() + (entry,))
        try:
            yield value
        finally:
            self._var.set(tuple(e for e in self._var.get() if e is not entry))
