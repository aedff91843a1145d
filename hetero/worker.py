"""A persistent background worker: one daemon thread running submitted calls in FIFO order.

Used for the host side of a decode step and for index updates. Exceptions travel back through the
returned ``Future``; the thread is a daemon and ``close()`` (also registered at exit) stops it cleanly, so
the interpreter never hangs at exit on a stuck queue. ``max_pending`` bounds the queue: ``submit`` blocks
while that many calls are waiting, which bounds the memory held by queued work. After ``os.fork()`` the child
serves each open worker's queue on a thread of its own (a call the parent's thread was running at the fork fails
with ``ClosedError`` there instead of never finishing).
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Optional

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
        self._closed = False
        self._lock = threading.Lock()  # submit's check and put against close's: no call queued after the stop
        self._start(queue.Queue(maxsize=max_pending))
        _live.add(self)

    def _start(self, jobs: "queue.Queue") -> None:
        self._queue = jobs
        self._running: list = [None]  # the Future the thread is running (for a forked child to fail it)
        # the thread holds the queue, not the worker: a worker nobody holds is collected, and its finalizer stops
        # the thread (an owner that never calls close() leaks neither the thread nor what the last job held)
        self._thread = threading.Thread(target=_serve, args=(jobs, self._running), name=self.name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _post_stop, jobs)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise ClosedError(f"worker {self.name!r} is closed")
            self._queue.put((fut, fn, args, kwargs))
        return fut

    def try_submit(self, fn: Callable[..., Any], *args: Any, idle_only: bool = False) -> Optional[Future]:
        """``submit`` for work that may be skipped: None, without waiting, when the queue is full or the worker
        closed; with ``idle_only``, also when the worker has a call queued or running (work that must not delay
        anyone's)."""
        fut: Future = Future()
        with self._lock:
            # a call counts from its put until its function has returned: taken from the queue but not yet marked
            # running, it is still counted; done before its result is set, a caller that has the result finds the
            # worker idle (queue.Queue's own count of calls put and not yet task_done)
            busy = self._queue.unfinished_tasks > 0
            if self._closed or (idle_only and busy):
                return None
            try:
                self._queue.put_nowait((fut, fn, args, {}))
            except queue.Full:
                return None
        return fut

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the calls already queued; wait at most ``timeout`` seconds."""
        with self._lock:
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

    def _restart_in_child(self) -> None:
        """After ``os.fork()``, in the child: the parent's thread does not exist here. A call it was running fails
        (ClosedError), the calls queued behind it run on a new thread, so nothing waits forever."""
        self._lock = threading.Lock()  # one held by a parent thread at the fork would never be released here
        running = self._running[0]
        if running is not None and not running.done():
            running.set_exception(ClosedError(f"worker {self.name!r}: the process forked while this call ran in the "
                                              "parent's thread; it did not run in this process"))
        if self._closed:
            return
        self._finalizer.detach()
        jobs = queue.Queue(maxsize=self._queue.maxsize)
        jobs.queue.extend(self._queue.queue)  # no other thread exists in the child to hold the old queue's lock
        jobs.unfinished_tasks = len(jobs.queue)  # each is task_done once it has run
        self._start(jobs)

    @property
    def closed(self) -> bool:
        return self._closed


def _after_fork_in_child() -> None:
    for worker in list(_live):
        worker._restart_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _serve(jobs: "queue.Queue", running: list) -> None:
    """A worker's thread: run the queued calls in order until told to stop."""
    while True:
        item = jobs.get()
        if item is _STOP:
            return
        fut, fn, args, kwargs = item
        item = None
        if fut.set_running_or_notify_cancel():
            running[0] = fut
            error = result = None
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # delivered to the caller through the future
                error = e
            jobs.task_done()  # before the result: its caller may ask for idle-only work at once
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
            running[0] = None
        else:
            jobs.task_done()
        fut = fn = args = kwargs = result = error = None  # what the last call held is not kept while idle


def _post_stop(jobs: "queue.Queue") -> None:
    """A collected worker's finalizer: its thread stops after the calls already queued (never blocks: called from
    the garbage collector)."""
    try:
        jobs.put_nowait(_STOP)
    except queue.Full:
        pass
