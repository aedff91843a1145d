"""A persistent background worker: one daemon thread running submitted calls in FIFO order.

Used for the host side of a decode step and for index updates. Exceptions travel back through the
returned ``Future``; the thread is a daemon and ``close()`` (also registered at exit) stops it cleanly, so
the interpreter never hangs at exit on a stuck queue. ``max_pending`` bounds the queue: ``submit`` blocks
while that many calls are waiting, which bounds the memory held by queued work.
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable

from .errors import ClosedError

_STOP = object()


class Worker:
    def __init__(self, name: str, max_pending: int = 64):
        self.name = name
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._closed = False
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise ClosedError(f"worker {self.name!r} is closed")
        fut: Future = Future()
        self._queue.put((fut, fn, args, kwargs))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # delivered to the caller through the future
                fut.set_exception(e)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the calls already queued; wait at most ``timeout`` seconds."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

