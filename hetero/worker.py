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
_live: "weakref.WeakSet[Worker]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At exit, stop every worker still open (one hook for all of them, not one per worker ever made)."""
    for worker in list(_live):
        worker.close()


class Worker:
    def __init__(self, name: str, max_pending: int = 64):
        self.name = name
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_pending)
        # the thread holds the queue, not the worker: a worker nobody holds is collected, and its finalizer stops
        # the thread (an owner that never calls close() leaks neither the thread nor what the last job held)
        self._thread = threading.Thread(target=_serve, args=(self._queue,), name=name, daemon=True)
        self._thread.start()
        self._closed = False
        self._finalizer = weakref.finalize(self, _post_stop, self._queue)
        _live.add(self)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise ClosedError(f"worker {self.name!r} is closed")
        fut: Future = Future()
        self._queue.put((fut, fn, args, kwargs))
        return fut

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the calls already queued; wait at most ``timeout`` seconds."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed


def _serve(jobs: "queue.Queue") -> None:
    """A worker's thread: run the queued calls in order until told to stop."""
    while True:
        item = jobs.get()
        if item is _STOP:
            return
        fut, fn, args, kwargs = item
        item = None
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # delivered to the caller through the future
                fut.set_exception(e)
        fut = fn = args = kwargs = None  # what the last call held (a layer, a plan) is not kept while idle


def _post_stop(jobs: "queue.Queue") -> None:
    """A collected worker's finalizer: its thread stops after the calls already queued (never blocks: called from
    the garbage collector)."""
    try:
        jobs.put_nowait(_STOP)
    except queue.Full:
        pass
