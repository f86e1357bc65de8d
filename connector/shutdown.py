"""Queued saves are written before an engine process exits: on SIGINT/SIGTERM and at exit.

Ctrl-C on ``vllm serve`` signals every process of the group at once: the API server, the engine
core and its workers. vLLM's worker turns the signal into ``SystemExit`` and its engine core stops
stepping, so without help the saver thread (a daemon) dies with what it still holds. Each worker
connector registers its ``Saver`` here; the first one installs, from the main thread only, a
handler for SIGINT and SIGTERM that flushes every registered saver within its deadline (one log
line each: what was stored, what was dropped) and then hands the signal to the handler installed
before it (vLLM's), so vLLM's own shutdown still happens; and an ``atexit`` hook that does the same
for an exit without a signal. The worker side's ``shutdown`` (worker.py) flushes again and closes.

vLLM's API server gives its engine processes no time by default: with ``--shutdown-timeout 0`` it
kills them (SIGKILL) a few milliseconds after Ctrl-C. What survives that is what was written before
the signal, which is why the worker opens its pool connections at start (``SafePool.warm``) rather
than on the first save; ``--shutdown-timeout N`` gives the flush here its deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import weakref
from typing import Protocol

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Flushable(Protocol):
    def flush_report(self, timeout: float, why: str, *, final: bool = False) -> dict[str, int]: ...


_savers: weakref.WeakKeyDictionary[Flushable, float] = weakref.WeakKeyDictionary()
_previous: dict[int, object] = {}  # signal → the handler ours replaced
_atexit_installed = False
_lock = threading.Lock()


def register(saver: Flushable, deadline_s: float) -> None:
    """Flush ``saver`` (at most ``deadline_s`` seconds) when this process gets SIGINT or SIGTERM,
    and at exit. Installs the handlers once per process; handlers are only installed from the
    main thread (Python allows no other), elsewhere only the exit hook is."""
    global _atexit_installed
    with _lock:
        _savers[saver] = deadline_s
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(_flush_all, "exit")
    install_handlers()


def note_kill_deadline(grace_s: float, flush_ms: int) -> None:
    """At start-up, when vLLM's --shutdown-timeout (``grace_s``) is shorter than the saver's flush
    deadline: a `vllm serve` stopped by Ctrl-C or SIGTERM kills its engine before the chunks
    still being written are, so say which flag lets them be written."""
    if grace_s * 1000 < flush_ms:
        log.info(
            "kvpool: vLLM's --shutdown-timeout is %g s; a `vllm serve` stopped by Ctrl-C or SIGTERM "
            "kills this engine before the connector can write the chunks it still holds (they are "
            "recomputed later). Run it with --shutdown-timeout %d to let them be written.",
            grace_s, -(-flush_ms // 1000),
        )  # fmt: skip


def unregister(saver: Flushable) -> None:
    with _lock:
        _savers.pop(saver, None)


def install_handlers() -> bool:
    """Put our handler in front of the current SIGINT/SIGTERM handlers (once); False when not in
    the main thread. A handler installed over ours later (vLLM's engine core resets them at its
    end) simply replaces it; ``shutdown()`` and the exit hook still flush."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is _handler:
            continue
        try:
            signal.signal(sig, _handler)
        except (ValueError, OSError):  # not the main interpreter, or a signal we may not catch
            continue
        _previous[sig] = current
    return True


def _flush_all(why: str) -> None:
    with contextlib.suppress(Exception):  # never in the way of the process's own shutdown
        for saver, deadline_s in list(_savers.items()):
            saver.flush_report(deadline_s, why)


def _handler(signum: int, frame) -> None:
    """Flush (bounded), then do what the replaced handler would have done."""
    name = signal.Signals(signum).name
    _flush_all(name)
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # vLLM's: raises SystemExit (worker) or starts its shutdown
    elif previous == signal.SIG_DFL:
        # the default action (terminate) as if we had never been here
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # SIG_IGN (or None: set outside Python): ignored, as before
