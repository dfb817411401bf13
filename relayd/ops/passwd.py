"""
C{relayd-passwd}: set a user's password in a relayd users file.

    relayd-passwd [--rounds N] [--stdin] USERSFILE USER

The password is asked twice on the terminal without echo or, with
C{--stdin}, read as one line from standard input (for scripts; the line end
is dropped).  The file is created (mode 0o600) if missing and rewritten
atomically, keeping every other line as it was; a running relayd picks the
change up within a second.

Exit status: 0 done, 1 failure (one line on standard error), 2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

from relayd.configfile import versionLine
from relayd.smtp.auth import DEFAULT_ROUNDS, UsersFileError, checkUsername, setPassword

__all__ = ["main", "readPassword", "PasswordError"]

_PROG = "relayd-passwd"


class _Failure(Exception):
    """A problem to report on one line, exiting with status 1."""


PasswordError = _Failure
"""Raised by L{readPassword}: no password, or no matching pair (one line)."""


def _rounds(text: str) -> int:
    """Parse C{--rounds}: an integer bcrypt cost in 4..31."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 4 <= value <= 31:
        raise argparse.ArgumentTypeError(f"must be between 4 and 31, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Set a user's password in a relayd users file "
        "(htpasswd -B compatible bcrypt hashes).",
    )
    parser.add_argument(
        "--version", action="version", version=versionLine(_PROG), help="print the version"
    )
    parser.add_argument(
        "--rounds",
        type=_rounds,
        default=DEFAULT_ROUNDS,
        metavar="N",
        help=f"bcrypt cost, 4..31 (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--stdin",
        action="store_true",
        help="read the password as one line from standard input",
    )
    parser.add_argument("usersFile", metavar="USERSFILE", help="the users file")
    parser.add_argument("user", metavar="USER", help="the user name (case-sensitive)")
    return parser


def _readFromStdin(stdin: BinaryIO) -> str:
    """Read one line of UTF-8 and drop its line end (LF or CRLF)."""
    line = stdin.readline()
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise _Failure("the password read from standard input is not UTF-8") from None


def _askTwice(ask: Callable[[str], str]) -> str:
    """Ask for the password and its confirmation; they must match."""
    try:
        first = ask("New password: ")
        second = ask("Retype new password: ")
    except EOFError:
        raise _Failure("no password given") from None
    except KeyboardInterrupt:
        raise _Failure("interrupted") from None
    if first != second:
        raise _Failure("the passwords do not match")
    return first


def readPassword(
    fromStdin: bool,
    stdin: BinaryIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> str:
    """
    Get a new password the way C{relayd-passwd} does (C{relayctl passwd}
    shares it): asked twice without echo, or one UTF-8 line from C{stdin}.

    @raise PasswordError: nothing given, interrupted, not UTF-8, or the
        two answers differ.
    """
    if fromStdin:
        return _readFromStdin(sys.stdin.buffer if stdin is None else stdin)
    return _askTwice(ask)


def main(
    argv: Sequence[str] | None = None,
    stdin: BinaryIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> int:
    """
    Run C{relayd-passwd}.

    @param argv: the arguments without the program name; C{sys.argv[1:]}
        when None.
    @param stdin: where C{--stdin} reads from; C{sys.stdin.buffer} when None.
    @param ask: prompts for a password without echo (for tests).
    @return: the exit status, 0 or 1.  Usage errors exit with 2 through
        L{argparse}.
    """
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        checkUsername(options.user)
    except ValueError as e:
        parser.error(f"invalid USER {options.user!r}: {e}")
    try:
        password = readPassword(options.stdin, stdin, ask)
        try:
            setPassword(options.usersFile, options.user, password, options.rounds)
        except ValueError as e:
            raise _Failure(str(e)) from None
        except UsersFileError as e:
            raise _Failure(str(e)) from None
        except OSError as e:
            raise _Failure(f"{options.usersFile}: {e.strerror or e}") from None
    except _Failure as e:
        print(f"{_PROG}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
