"""
The blocking client of the control socket that C{relayctl} (and
C{relayd-sendmail}'s C{mailq}) use: a plain socket speaking the AMP wire
format, so a command line tool needs no reactor and can run anywhere, a
thread of a Twisted program included.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.protocols import amp

from relayd.ops.commands import ControlError, reachablePath

__all__ = ["ControlClient", "ControlClientError", "NotRunning"]


class ControlClientError(Exception):
    """Talking to the daemon failed; C{str()} is the line to print."""


class NotRunning(ControlClientError):
    """Nothing listens on the control socket: relayd is not running."""


class ControlClient:
    """
    A blocking AMP client for the control socket (no reactor needed).

    Use as a context manager::

        with ControlClient(path) as client:
            answer = client.call(Status)
    """

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        """
        @param path: the control socket.
        @param timeout: seconds to wait for the connection and for each answer.
        @raise NotRunning: nothing listens there.
        @raise ControlClientError: it cannot be reached (e.g. permissions).
        """
        self.path = path
        self.timeout = timeout
        self._tag = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        fd = None
        try:
            connectPath, fd = reachablePath(path)
            self._sock.connect(connectPath)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise NotRunning(f"relayd is not running (nothing listens on {path})") from None
        except OSError as e:
            self._sock.close()
            raise ControlClientError(f"cannot connect to {path}: {e.strerror or e}") from None
        finally:
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """
        Send one command and wait for its answer.

        @return: the answer's values by name.
        @raise ControlError: the daemon refused the command (its reason).
        @raise ControlClientError: the connection failed or timed out, or the
            daemon failed unexpectedly (its log says more).
        """
        self._tag += 1
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = str(self._tag).encode("ascii")
        try:
            self._sock.sendall(box.serialize())
            answer = self._readBox()
        except TimeoutError:
            raise ControlClientError(
                f"no answer from relayd within {self.timeout:g} seconds"
            ) from None
        except OSError as e:
            raise ControlClientError(f"connection to relayd failed: {e.strerror or e}") from None
        if b"_error" in answer:
            description = answer.get(b"_error_description", b"").decode("utf-8", "replace")
            if answer.get(b"_error_code") == b"CONTROL_ERROR":
                raise ControlError(description)
            raise ControlClientError(
                f"relayd failed to answer {command.__name__} ({description}; see its log)"
            )
        result: dict[str, Any] = command.parseResponse(answer, None)
        return result

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self._sock.recv(count - len(data))
            if not chunk:
                raise ControlClientError("relayd closed the control connection")
            data += chunk
        return data

    def _readBox(self) -> dict[bytes, bytes]:
        """One AMP box: (16-bit length, key, 16-bit length, value)... then an empty key."""
        box: dict[bytes, bytes] = {}
        while True:
            (length,) = struct.unpack("!H", self._read(2))
            if length == 0:
                return box
            key = self._read(length)
            (length,) = struct.unpack("!H", self._read(2))
            box[key] = self._read(length)
