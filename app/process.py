"""Resources of one process: made on first use, and made again after a fork.

A forked child inherits its parent's objects, but not the threads that serve
them, and shares their sockets with the parent: a connection, a connection
pool or a consumer thread made before a fork is the parent's alone. (kombu's
``register_after_fork`` rests on the same idea.)
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar, cast

P = ParamSpec("P")
T = TypeVar("T")

_UNMADE = object()


class _Slot(Generic[T]):
    """The value of one :func:`per_process` in this process, and its lock."""

    __slots__ = ("__weakref__", "lock", "value")

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self.lock = threading.Lock()
        self.value: T | object = _UNMADE


def _forget_in_child(slot: weakref.ReferenceType[_Slot[T]]) -> Callable[[], None]:
    def forget() -> None:
        found = slot()
        if found is not None:
            found.forget()

    return forget


def per_process(make: Callable[P, T]) -> Callable[P, T]:
    """A function that returns the one ``make(...)`` of the calling process.

    The first call in a process makes it, with that call's arguments (later
    calls' arguments are not looked at); calls from many threads or greenlets
    at once make it once, the others wait for it. A child forked after that
    (``os.fork``, and so multiprocessing, billiard and gunicorn) makes its
    own on its first call: what it inherited is its parent's, and is left
    alone. The lock is new in the child too, so a fork while another thread
    was making the value does not leave the child waiting for ever.

    The fork hook holds the value only weakly: once the returned function is
    dropped, so is its value.
    """
    slot: _Slot[T] = _Slot()
    os.register_at_fork(after_in_child=_forget_in_child(weakref.ref(slot)))

    def get(*args: P.args, **kwargs: P.kwargs) -> T:
        value = slot.value
        if value is _UNMADE:
            with slot.lock:
                value = slot.value
                if value is _UNMADE:
                    value = slot.value = make(*args, **kwargs)
        return cast(T, value)

    return get
