"""Ctrl-C held back over a write that must not stop half-way.

A ``KeyboardInterrupt`` raised between a window slot's overwrite and the host tier's append would lose the token
that slot held. Inside ``deferred()`` a SIGINT is recorded instead, and raised once the block is done. Only the
main thread receives signals in Python, and only Python's own handler is replaced (a program that installed its
own keeps it: hetero does not decide what its Ctrl-C does).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block with SIGINT deferred to its end (main thread, default handler only; otherwise as it is)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if received:
            signal.default_int_handler(signal.SIGINT, received[0])
