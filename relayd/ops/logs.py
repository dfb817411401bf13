"""
relayd's log formats: twistd's readable text lines (the default), or JSON
lines, one flat object per event, for log shippers (C{[logging] format}).

Every event relayd logs about a message carries its queue id as the field
C{queue_id} and in the text, so one C{grep QUEUEID} over either format tells
the message's story: client, MAIL, RCPT, queued, each delivery attempt,
removed (Postfix's habit).

How the format reaches twistd: L{relayd.tap.makeService} hands the observer
from L{observerFor} to the service tree, which sets it as the application's
C{ILogObserver} component when twistd adds it to the application.  twistd
looks for that component before building its own text observer, and its
own C{--logger} option still wins over it.  The JSON observer writes where
twistd would have written: standard output with C{-n} (unless
C{--logfile} names a file), else C{--logfile} or C{twistd.log}, with
twistd's rotation (1 MB, and on SIGUSR1).  With C{--syslog} twistd's syslog
text lines are kept.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.logger import Logger as _TwistedLogger
from twisted.python.compat import ioType
from zope.interface import implementer

__all__ = [
    "Logger",
    "eventAsJSON",
    "jsonFileLogObserver",
    "observerFor",
    "formatObserver",
    "levelFiltered",
    "idFields",
    "ABSENT",
]

ABSENT = "none"
"""How the text format (and the JSON C{message}) shows a field that has no
value (None: no TLS, no AUTH user, no queue id yet); the JSON field itself
is null.  One spelling for every field, in every line."""


_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(_TwistedLogger):
    """
    Twisted's L{twisted.logger.Logger}, the same events, checking the
    level against a set.  Twisted's C{emit} checks it against
    C{LogLevel.iterconstants()}, which sorts the levels anew (a Python
    call per level) for every event: a tenth of the cost of a log line
    on the hot path.  An invalid level still goes Twisted's way (its
    failure event).
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)
            return
        event = kwargs
        event.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        if "log_trace" in event:
            trace: Any = event["log_trace"]
            trace.append((self, self.observer))
        self.observer(event)


def idFields(session: Any, envelope: Any = None) -> dict[str, Any]:
    """
    The id fields of a log event about a session or its transaction:
    C{prefix} (the queue id once MAIL was accepted, else the session id:
    what a line starts with, so that no line starts with C{None:}),
    C{session_id} and C{queue_id} (None before MAIL).  Either argument may
    be None.
    """
    queueId = getattr(envelope, "queueId", None)
    sessionId = getattr(session, "sessionId", None)
    return {"prefix": queueId or sessionId or "-", "session_id": sessionId, "queue_id": queueId}


def _present(event: Mapping[str, Any]) -> dict[str, Any]:
    """
    C{event} for formatting its text: fields without a value (None) shown
    as L{ABSENT}, the same in every line (the JSON fields stay null).
    """
    return {
        key: ABSENT if value is None and not key.startswith("log_") else value
        for key, value in event.items()
    }


_RESERVED = ("time", "level", "namespace", "message")
# Keys that the legacy twisted.python.log API (twistd's own messages, parts
# of Twisted) puts in events, already rendered into the message text; its
# "message" is a tuple.
_LEGACY = frozenset({"isError", "system", "time", "format", "why", "failure"})


def eventAsJSON(event: Mapping[str, Any]) -> str:
    """
    One log event as one line of JSON: a flat object with C{time} (UTC,
    ISO 8601), C{level}, C{namespace} and C{message} (the formatted text,
    as the text format shows it), then the event's own fields (such as
    C{queue_id}, C{session_id}, C{to}, C{relay}, C{status}); a field whose
    name is taken gets a C{_} appended.  For an event with a failure,
    C{error} and C{traceback}.  Values JSON cannot hold are given as text.
    """
    level = event.get("log_level")
    stamp = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(stamp, UTC).isoformat(timespec="microseconds")
            if isinstance(stamp, (int, float))
            else None
        ),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": _message(_present(event)),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY:
            continue
        if key == "message" and isinstance(value, tuple):
            continue
        record[key + "_" if key in _RESERVED else key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def jsonFileLogObserver(outFile: IO[Any]) -> ILogObserver:
    """
    An observer writing L{eventAsJSON} lines to C{outFile}, flushed after
    each event.  (Twisted's own C{jsonFileLogObserver} writes its
    round-trip format instead: nested, with a record separator.)
    """
    observer: ILogObserver = FileLogObserver(outFile, eventAsJSON)
    return observer


def observerFor(config: Any, twistdOptions: Mapping[str, Any] | None = None) -> Any:
    """
    The log observer that C{[logging] format} and C{level} ask for, writing
    where twistd would have written; or None to leave twistd's own choice
    alone (its C{--logger} and C{--syslog} options win).

    Events below C{[logging] level} are dropped before they are formatted
    or written: on the hot path every line costs, and debug lines are for
    debugging.

    @param config: a L{relayd.config.Config}.
    @param twistdOptions: twistd's parsed options (C{logfile},
        C{nodaemon}, C{syslog}, C{logger}); None when not run by twistd.
    """
    options = twistdOptions or {"nodaemon": True}
    if options.get("logger") or options.get("syslog"):
        return None
    logfile = options.get("logfile") or ""
    if logfile == "-" and not options.get("nodaemon"):
        return None  # twistd itself refuses this, with its own message
    if logfile == "-" or (not logfile and options.get("nodaemon")):
        # Captured now: once logging starts, a daemon's sys.stdout is
        # redirected into the log system itself.
        out: Any = sys.stdout
    else:
        out = _rotatingFile(logfile or "twistd.log")
    return levelFiltered(formatObserver(config.logFormat, out), config.logLevel)


def formatObserver(logFormat: str, out: IO[Any]) -> ILogObserver:
    """
    An observer writing C{logFormat} (C{"text"}, as twistd's, or C{"json"})
    to C{out}, flushed lazily (L{LazyFlushObserver}).
    """
    if logFormat == "json":
        return LazyFlushObserver(out, eventAsJSON)
    return LazyFlushObserver(out, _classicText)


def _quickFormat(event: Mapping[str, Any]) -> str | None:
    """
    The message of C{event} by C{str.format_map}, or None to leave it to
    Twisted.  Twisted's L{formatEvent} runs C{string.Formatter} in Python
    to support its C{{callable()}} fields; relayd's formats use plain
    fields, attributes and indexes, which C{format_map} (in C) renders the
    same at a fraction of the cost.  Anything else (a call, a missing
    field, a failing C{__format__}) raises here and Twisted formats it,
    with its own wording for what cannot be formatted.
    """
    fmt = event.get("log_format")
    if type(fmt) is not str or "()" in fmt:
        return None
    try:
        return fmt.format_map(event)
    except Exception:
        return None


def _message(event: Mapping[str, Any]) -> str:
    """The formatted message of C{event}, as L{formatEvent} gives it."""
    text = _quickFormat(event)
    return formatEvent(dict(event)) if text is None else text


def _classicText(event: Mapping[str, Any]) -> str | None:
    """
    twistd's text line: time, [namespace#level] or [system], message; the
    same text as L{formatEventAsClassicLogText}, most lines formatted by
    L{_quickFormat} (tested to agree).
    """
    present = _present(event)
    if "log_failure" not in present:
        text = _quickFormat(present)
        if text:
            system = present.get("log_system")
            if system is None:
                level = present.get("log_level")
                system = (
                    f"{present.get('log_namespace', '-')}#{'-' if level is None else level.name}"
                )
            line = f"{_formatTime(present.get('log_time'))} [{system}] {text}"
            return line.replace("\n", "\n\t") + "\n"
    return formatEventAsClassicLogText(present, formatTime=_formatTime)


_lastSecond: list[Any] = [None, ""]


def _formatTime(when: float | None) -> str:
    """Twisted's default time stamp, computed once per second, not per line."""
    if when is None:
        return "-"
    second = int(when)
    if _lastSecond[0] != second:
        _lastSecond[0] = second
        _lastSecond[1] = formatTime(second)
    return str(_lastSecond[1])


@implementer(ILogObserver)
class LazyFlushObserver:
    """
    Like Twisted's C{FileLogObserver}, but lines are written in batches:
    kept in memory and written with one C{write} at most every
    L{FLUSH_INTERVAL} seconds (at once for warnings and worse, past
    L{BATCH_LIMIT} characters, and when the reactor is not running).  On a
    busy relay a C{write} system call per line took a fifth of the reactor
    thread: twistd's log file is unbuffered, and so is standard output
    under C{PYTHONUNBUFFERED} (common in containers), so batching at the
    file does not happen by itself.  What a crash can lose is the last
    fraction of a second of informational lines; relayd's own state is on
    disk either way.  Lines still waiting are written when the process
    exits normally.
    """

    def __init__(self, outFile: IO[Any], format: Callable[[Mapping[str, Any]], str | None]) -> None:
        self._binary = ioType(outFile) is not str
        self._outFile = outFile
        self._format = format
        self._pending = False
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()  # lines can come from threads
        _unflushed.add(self)

    def __call__(self, event: Mapping[str, Any]) -> None:
        text = self._format(event)
        if not text:
            return
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            full = self._size >= BATCH_LIMIT
        if full or event.get("log_level") in _SEVERE:
            self.flush()
            return
        running = _reactor()
        if not running.running:  # before start or after stop: nothing would flush
            self.flush()
        elif not self._pending:
            self._pending = True
            running.callFromThread(self._later, running)

    def _later(self, reactor: Any) -> None:
        if not reactor.running:
            self.flush()
            return
        reactor.callLater(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write the lines kept so far, and flush the file."""
        self._pending = False
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            text = "".join(lines)
            with contextlib.suppress(OSError, ValueError):
                self._outFile.write(text.encode("utf-8") if self._binary else text)
        with contextlib.suppress(OSError, ValueError):
            self._outFile.flush()


def _reactor() -> Any:
    """The global reactor, imported once it is installed (twistd chooses it)."""
    global _theReactor
    if _theReactor is None:
        from twisted.internet import reactor

        _theReactor = reactor
    return _theReactor


_theReactor: Any = None
_unflushed: weakref.WeakSet[LazyFlushObserver] = weakref.WeakSet()


@atexit.register
def _flushAtExit() -> None:
    for observer in list(_unflushed):
        observer.flush()


FLUSH_INTERVAL = 0.2
"""Seconds an informational log line may wait in the buffer."""
BATCH_LIMIT = 64 * 1024
"""Characters of log lines kept before they are written regardless."""


def levelFiltered(observer: ILogObserver, level: str) -> ILogObserver:
    """C{observer}, passed only the events at C{level} (a L{LogLevel} name) or above."""
    return _LevelFilter(observer, LogLevel.levelWithName(level))


def _levelsFrom(minimum: Any) -> frozenset[Any]:
    """The L{LogLevel}s at C{minimum} or above, as a set to test membership in."""
    return frozenset(level for level in LogLevel.iterconstants() if level >= minimum)


_SEVERE = _levelsFrom(LogLevel.warn)


@implementer(ILogObserver)
class _LevelFilter:
    """
    Pass on the events at a level or above.  Twisted's
    C{FilteringLogObserver} with a predicate does the same through its
    predicate protocol and C{constantly}'s ordering (Python-level
    comparisons); every log line of the hot path goes through here, so it
    is a set lookup.  An event without a level (rare: hand-made ones) is
    kept.
    """

    def __init__(self, observer: ILogObserver, minimum: Any) -> None:
        self._observer = observer
        self._levels = _levelsFrom(minimum)

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is None or level in self._levels:
            self._observer(event)


def _rotatingFile(path: str) -> Any:
    """twistd's log file: rotated at 1 MB, and on SIGUSR1."""
    import signal

    from twisted.python.logfile import LogFile

    logFile = LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            # The global reactor is typed as a module; it provides IReactorFromThreads.
            reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return logFile
