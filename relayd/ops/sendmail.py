"""
C{relayd-sendmail}: a C{sendmail}-compatible command that submits a message
to a relayd over SMTP, for cron, mailx, PHP's C{mail()} and other programs
that pipe a message into C{/usr/sbin/sendmail}.

    relayd-sendmail [-t] [-i] [-f SENDER] [-F NAME] [OPTIONS] [--] [RECIPIENT ...]

    relayd-sendmail -bp         (or run as mailq): list relayd's queue
    relayd-sendmail -q          submit what waits in the maildrop now
    relayd-sendmail --version

The message is read from standard input.  It connects to one relayd
(C{/etc/relayd/sendmail.toml}, or the file named by
C{RELAYD_SENDMAIL_CONFIG} or C{--config}), hands the message over in one
SMTP transaction and exits with a C{sysexits.h} status saying whether
relayd took it.  Either every recipient is accepted and the message is
sent, or nothing is sent.  When relayd cannot be reached at all (no
connection, a 421 greeting, a timeout before the transaction began), the
message is written durably into relayd's maildrop (L{relayd.ops.maildrop}),
which relayd picks up once it runs, and the status is 0: the mail is
queued.  The maildrop is C{maildrop} in C{sendmail.toml}, else relayd's
(C{[maildrop] directory} of relayd's config file, C{RELAYD_CONFIG} or
C{/etc/relayd/relayd.toml}).

Exit status (sysexits.h): 0 queued by relayd; 64 (EX_USAGE) bad command
line; 65 (EX_DATAERR) bad address or message; 69 (EX_UNAVAILABLE) relayd
refused permanently (5xx); 70 (EX_SOFTWARE) a bug; 75 (EX_TEMPFAIL) try again later (4xx, no
connection, timeout, TLS trouble); 78 (EX_CONFIG) bad configuration.  Any
error is one line on standard error starting with C{relayd-sendmail: }.

This is a blocking command-line program: it uses the standard library's
L{smtplib}, not Twisted, and imports nothing that starts a reactor.  See
C{docs/sendmail.md} for the options, the configuration file and how to
install it as C{/usr/sbin/sendmail}.
"""

from __future__ import annotations

import contextlib
import getopt
import os
import pwd
import re
import signal
import smtplib
import socket
import ssl
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from email import errors
from email.policy import default as _HEADERS
from email.utils import formataddr, formatdate, make_msgid
from types import FrameType
from typing import Any, BinaryIO, NoReturn

from relayd.address import AddressError, parsePath

__all__ = [
    "main",
    "SendmailConfig",
    "Arguments",
    "SendmailError",
    "loadConfig",
    "parseArguments",
    "readMessage",
    "prepareMessage",
    "submit",
    "envelopeSender",
    "DEFAULT_CONFIG",
    "mailq",
    "flushMaildrop",
    "EX_OK",
    "EX_USAGE",
    "EX_DATAERR",
    "EX_UNAVAILABLE",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_CONFIG",
]

PROG = "relayd-sendmail"
DEFAULT_CONFIG = "/etc/relayd/sendmail.toml"
CONFIG_ENV = "RELAYD_SENDMAIL_CONFIG"

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

MAX_LINE = 998
"""RFC 5322 section 2.1.1: a line is at most 998 characters, CRLF excluded."""

USAGE = (
    "usage: relayd-sendmail [-t] [-i] [-f SENDER] [-F NAME] [-v] "
    "[--config FILE] [--server HOST:PORT] [--] [RECIPIENT ...]; "
    "relayd-sendmail -bp (mailq); relayd-sendmail -q; relayd-sendmail --version"
)

# Options taken the getopt way: letters followed by ':' take an argument,
# attached (-fADDR) or as the next word (-f ADDR).
_SHORT = "tif:r:F:vo:b:B:N:R:V:L:h:mnUG"
_LONG = ["config=", "server=", "help", "version"]

# -oX options that change nothing here.  -oi (ignore dots) is handled.
_IGNORED_O = {
    "em",  # error mode: mail back ... errors are reported by exit status
    "ee",
    "ep",
    "eq",
    "ew",
    "db",  # delivery mode: background, interactive, queue, deferred
    "di",
    "dq",
    "dd",
    "m",  # "metoo": the sender is not an alias expansion target here
    "o",  # old-style headers
}
# Flags that change nothing here: -m (metoo), -n (no aliasing), -U
# (initial user submission), -G (gateway submission).
_IGNORED_FLAGS = {"-m", "-n", "-U", "-G"}
# Options with an argument accepted and ignored: DSN NOTIFY (-N), RET (-R)
# and ENVID (-V), which relayd does not implement yet; -L syslog tag; -h hop
# count.  -B is checked.
_IGNORED_WITH_ARGUMENT = {"-N", "-R", "-V", "-L", "-h"}

_HEADER_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_FOLD = re.compile(r"\r\n(?=[ \t])")


class SendmailError(Exception):
    """
    A failure to report on one line of standard error, with the exit
    status that goes with it.

    @ivar status: a C{sysexits.h} code.
    """

    def __init__(
        self,
        status: int,
        message: str,
        unreachable: bool = False,
        replies: tuple[tuple[str | None, int, str], ...] = (),
    ) -> None:
        """
        @param unreachable: relayd could not be reached at all (no
            connection, a 421 greeting): nothing of the message was sent,
            so it may go into the maildrop without risk of a duplicate.
        @param replies: the refusals behind the error, as C{(recipient,
            code, text)}: a recipient's own for a refused RCPT, C{None} for
            one that applies to every recipient (MAIL, DATA); empty when
            no reply refused (a lost connection).  relayd's maildrop
            pickup reports them in its bounce (L{relayd.ops.pickup}).
        """
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.unreachable = unreachable
        self.replies = replies

    def __str__(self) -> str:
        return self.message


# --- configuration ---------------------------------------------------------


@dataclass(frozen=True)
class SendmailConfig:
    """
    Where and how to submit, from C{sendmail.toml}.

    @ivar path: the file read, or None when no file was found and the
        defaults apply.
    @ivar host: relayd's address (name or IP).
    @ivar port: relayd's port.
    @ivar tls: C{"none"}, C{"starttls"} (required; verified) or
        C{"implicit"} (TLS from the first byte, port 465 style).
    @ivar caFile: certificates to trust instead of the system store.
    @ivar timeout: seconds allowed for the connect and for each read or
        write.
    @ivar deadline: seconds allowed for the whole SMTP dialogue.
    @ivar helo: the name given in EHLO.
    @ivar user: the AUTH user, or None for no AUTH.
    @ivar password: the AUTH password, read from C{password_file}.
    @ivar domain: the domain of the default sender (C{login@domain}) and of
        addresses given without one.
    """

    path: str | None = None
    host: str = "127.0.0.1"
    port: int = 25
    tls: str = "none"
    caFile: str | None = None
    timeout: float = 60.0
    deadline: float = 300.0
    helo: str = field(default_factory=socket.gethostname)
    user: str | None = None
    password: str | None = None
    domain: str = field(default_factory=socket.gethostname)
    maildrop: str | None = None


_TLS_MODES = ("none", "starttls", "implicit")
_NUMBER = (int, float)
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "": {"domain": str, "maildrop": str},
    "server": {
        "host": str,
        "port": int,
        "tls": str,
        "ca_file": str,
        "timeout": _NUMBER,
        "deadline": _NUMBER,
        "helo": str,
    },
    "auth": {"user": str, "password_file": str},
}


def _configError(path: str, key: str, problem: str) -> SendmailError:
    return SendmailError(EX_CONFIG, f"config error: {path}: {key}: {problem}")


def _check(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """Flatten the TOML into C{section.key} to value, checking the schema."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            if name not in _SCHEMA or not name:
                raise _configError(path, name, "unknown section (known: [server], [auth])")
            items = [(f"{name}.{k}", name, k, v) for k, v in value.items()]
        else:
            items = [(name, "", name, value)]
        for full, section, key, v in items:
            kinds = _SCHEMA[section]
            if key not in kinds:
                known = ", ".join(sorted(kinds))
                raise _configError(path, full, f"unknown key (known: {known})")
            kind = kinds[key]
            if isinstance(v, bool) or not isinstance(v, kind):
                want = "a number" if kind is _NUMBER else f"a {getattr(kind, '__name__', kind)}"
                raise _configError(path, full, f"must be {want}, not {type(v).__name__}")
            flat[full] = v
    return flat


def loadConfig(path: str | None = None, environ: dict[str, str] | None = None) -> SendmailConfig:
    """
    Read the configuration.

    The file is C{path} when given (C{--config}), else the one named by
    C{RELAYD_SENDMAIL_CONFIG}, else L{DEFAULT_CONFIG}.  Only the default
    file may be missing (then every default applies: 127.0.0.1:25, no TLS,
    no AUTH); a file named explicitly must exist.

    @raise SendmailError: with L{EX_CONFIG}, naming the file, the key and
        the problem.
    """
    env = os.environ if environ is None else environ
    explicit = path if path is not None else env.get(CONFIG_ENV) or None
    filename = explicit if explicit is not None else DEFAULT_CONFIG
    try:
        with open(filename, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit is None:
            return SendmailConfig()
        raise SendmailError(EX_CONFIG, f"config error: {filename}: no such file") from None
    except OSError as e:
        raise SendmailError(EX_CONFIG, f"config error: {filename}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SendmailError(EX_CONFIG, f"config error: {filename}: {e}") from None
    flat = _check(filename, data)
    base = os.path.dirname(os.path.abspath(filename))

    def relative(value: str) -> str:
        return os.path.join(base, value)

    values: dict[str, Any] = {"path": filename}
    if "domain" in flat:
        domain = flat["domain"]
        try:
            parsePath(f"TO:<x@{domain}>", "TO:", allowNull=False)
        except AddressError:
            raise _configError(filename, "domain", f"not a domain: {domain!r}") from None
        values["domain"] = domain
    if "maildrop" in flat:
        if not flat["maildrop"]:
            raise _configError(filename, "maildrop", "must not be empty")
        values["maildrop"] = relative(flat["maildrop"])
    if "server.host" in flat:
        if not flat["server.host"]:
            raise _configError(filename, "server.host", "must not be empty")
        values["host"] = flat["server.host"]
    if "server.port" in flat:
        if not 0 < flat["server.port"] < 65536:
            raise _configError(filename, "server.port", "must be between 1 and 65535")
        values["port"] = flat["server.port"]
    if "server.tls" in flat:
        if flat["server.tls"] not in _TLS_MODES:
            raise _configError(filename, "server.tls", f"must be one of {', '.join(_TLS_MODES)}")
        values["tls"] = flat["server.tls"]
    if "server.ca_file" in flat:
        values["caFile"] = relative(flat["server.ca_file"])
    for key, name in (("server.timeout", "timeout"), ("server.deadline", "deadline")):
        if key in flat:
            if not flat[key] > 0:
                raise _configError(filename, key, "must be greater than 0")
            values[name] = float(flat[key])
    if "server.helo" in flat:
        values["helo"] = flat["server.helo"]
    user, passwordFile = flat.get("auth.user"), flat.get("auth.password_file")
    if (user is None) != (passwordFile is None):
        missing = "auth.password_file" if passwordFile is None else "auth.user"
        raise _configError(filename, missing, "auth needs both user and password_file")
    if user is not None:
        if values.get("tls", "none") == "none":
            raise _configError(
                filename, "auth.user", 'AUTH needs server.tls = "starttls" or "implicit"'
            )
        passwordPath = relative(str(passwordFile))
        try:
            with open(passwordPath, encoding="utf-8") as text:
                password = text.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            problem = getattr(e, "strerror", None) or str(e)
            raise _configError(
                filename, "auth.password_file", f"{passwordPath}: {problem}"
            ) from None
        values["user"], values["password"] = user, password
    return SendmailConfig(**values)


# --- command line ----------------------------------------------------------


@dataclass
class Arguments:
    """
    The parsed command line.

    @ivar extract: C{-t}: take recipients from the To, Cc and Bcc headers
        too.
    @ivar sender: C{-f}/C{-r}: the envelope sender as given (C{""} for the
        null sender), or None for the default.
    @ivar fullName: C{-F}: the name put in an added From header.
    @ivar ignoreDots: C{-i}/C{-oi}: a line with a single dot does not end
        the message.
    @ivar verbose: C{-v}: print relayd's final reply on standard error.
    @ivar recipients: the recipient arguments, in order.
    @ivar configPath: C{--config}.
    @ivar server: C{--server HOST:PORT} (port optional).
    @ivar help: C{--help}.
    """

    extract: bool = False
    sender: str | None = None
    fullName: str | None = None
    ignoreDots: bool = False
    verbose: bool = False
    recipients: list[str] = field(default_factory=list)
    configPath: str | None = None
    server: tuple[str, int | None] | None = None
    help: bool = False
    version: bool = False
    listQueue: bool = False
    flushQueue: bool = False


def _usage(problem: str) -> NoReturn:
    raise SendmailError(EX_USAGE, f"{problem} ({USAGE})")


def _serverOption(value: str) -> tuple[str, int | None]:
    """Parse C{HOST}, C{HOST:PORT} or C{[IPV6]:PORT}."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value)
    if match is None:
        _usage(f"--server: expected HOST:PORT, not {value!r}")
    host = match.group(1) or match.group(3)
    port = match.group(2) or match.group(4)
    if port is not None and not 0 < int(port) < 65536:
        _usage(f"--server: port must be between 1 and 65535, not {port}")
    return host, int(port) if port is not None else None


def parseArguments(argv: Sequence[str]) -> Arguments:
    """
    Parse a sendmail command line (Postfix's sendmail(1) set, less the
    modes that need a local queue).  Options may follow recipients; C{--}
    ends them.

    @raise SendmailError: with L{EX_USAGE} for an unknown or unsupported
        option.
    """
    result = Arguments()
    words = list(argv)
    # -q, -q30m, -qR...: sendmail's queue runs, with an argument getopt
    # cannot take (optional, attached).  Here: one flush of the maildrop.
    end = words.index("--") if "--" in words else len(words)
    queueRuns = [w for w in words[:end] if w.startswith("-q")]
    if queueRuns:
        result.flushQueue = True
        words = [w for w in words[:end] if not w.startswith("-q")] + words[end:]
    try:
        options, operands = getopt.gnu_getopt(words, _SHORT, _LONG)
    except getopt.GetoptError as e:
        _usage(str(e))
    for option, value in options:
        if option == "-t":
            result.extract = True
        elif option == "-i":
            result.ignoreDots = True
        elif option in ("-f", "-r"):
            result.sender = value
        elif option == "-F":
            result.fullName = value
        elif option == "-v":
            result.verbose = True
        elif option == "-o":
            if value == "i":
                result.ignoreDots = True
            elif value not in _IGNORED_O:
                _usage(f"option -o{value} not supported")
        elif option == "-b":
            if value == "p":
                result.listQueue = True
            elif value != "m":
                _usage(f"mode -b{value} not supported (only -bm deliver mail, -bp list the queue)")
        elif option == "-B":
            if value.upper() not in ("7BIT", "8BITMIME"):
                _usage(f"-B takes 7BIT or 8BITMIME, not {value!r}")
        elif option in _IGNORED_FLAGS or option in _IGNORED_WITH_ARGUMENT:
            pass
        elif option == "--config":
            result.configPath = value
        elif option == "--server":
            result.server = _serverOption(value)
        elif option == "--version":
            result.version = True
        else:
            assert option == "--help", option
            result.help = True
    result.recipients = list(operands)
    return result


# --- the message -----------------------------------------------------------


def readMessage(stream: BinaryIO, ignoreDots: bool) -> bytes:
    """
    Read the message from C{stream} with every line ending (LF, CR or CRLF)
    made CRLF, as SMTP requires (RFC 5321 section 2.3.8).

    Unless C{ignoreDots}, a line holding just a dot ends the message, as
    with classic sendmail; the rest of the input is not read.

    @raise SendmailError: with L{EX_DATAERR} for a NUL byte or a line
        longer than 998 octets (RFC 5322 section 2.1.1), which relayd would
        refuse anyway.
    """
    lines = []
    for raw in stream:
        if not ignoreDots and raw.rstrip(b"\r\n") == b".":
            break
        lines.append(raw)
    data = _LINE_END.sub(b"\r\n", b"".join(lines))
    if b"\0" in data:
        raise SendmailError(EX_DATAERR, "message contains a NUL byte")
    for number, line in enumerate(data.split(b"\r\n"), 1):
        if len(line) > MAX_LINE:
            raise SendmailError(
                EX_DATAERR,
                f"message line {number} is {len(line)} octets long; "
                f"SMTP allows {MAX_LINE} (RFC 5322 section 2.1.1)",
            )
    return data


def _splitHeaders(data: bytes) -> tuple[list[bytes], bytes, bool]:
    """
    Split a CRLF message into header fields and the rest.

    @return: the fields (each with its continuation lines and CRLFs), the
        rest of the message from the line that ended the header section,
        and whether that line is the empty separator line (if not, the
        header section ended on a line that is no header field).
    """
    fields: list[bytes] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _HEADER_NAME.match(line):
            fields.append(line)
        else:
            return fields, data[position:], line == b"\r\n"
        position = end
    return fields, b"", False


def _fieldName(headerField: bytes) -> str:
    match = _HEADER_NAME.match(headerField)
    assert match is not None
    return match.group(1).decode("ascii").lower()


def _fieldValue(headerField: bytes) -> str:
    text = headerField.decode("utf-8", "replace")
    return _FOLD.sub("", text.split(":", 1)[1]).strip()


def _qualify(address: str, domain: str) -> str:
    return address if "@" in address else f"{address}@{domain}"


def _checkAddress(address: str, what: str) -> str:
    try:
        parsePath(f"TO:<{address}>", "TO:", allowNull=False)
    except AddressError as e:
        raise SendmailError(EX_DATAERR, f"bad {what} address {address!r}: {e}") from None
    if not address.isascii():
        # relayd's grammar takes SMTPUTF8 addresses (RFC 6531); this
        # command does not send SMTPUTF8, so relayd would refuse them.
        raise SendmailError(EX_DATAERR, f"bad {what} address {address!r}: non-ASCII needs SMTPUTF8")
    return address


def _addresses(values: Iterable[str], domain: str, what: str) -> list[str]:
    """
    The mailboxes in address lists (RFC 5322 section 3.4: names, groups,
    comments), qualified with C{domain} when they have none.

    @raise SendmailError: with L{EX_DATAERR} when a list does not parse
        cleanly: the lenient parse of something malformed is some other
        address, and mail must not go there.
    """
    result = []
    for value in values:
        parsed = _HEADERS.header_factory("To", value)
        for defect in parsed.defects:
            if isinstance(defect, errors.NonASCIILocalPartDefect) or (
                isinstance(defect, errors.InvalidHeaderDefect)
                and str(defect) != "addr-spec local part with no domain"
            ):
                raise SendmailError(EX_DATAERR, f"bad {what} address in {value!r}: {defect}")
        for address in parsed.addresses:
            result.append(_checkAddress(_qualify(address.addr_spec, domain), what))
    return result


def envelopeSender(arguments: Arguments, config: SendmailConfig, login: str | None) -> str:
    """
    The envelope sender: C{-f} (qualified with the configured domain when
    it has none; C{""} or C{<>} for the null sender), else the invoking
    user's login at the configured domain.
    """
    if arguments.sender is not None:
        given = arguments.sender.strip()
        if given.startswith("<") and given.endswith(">"):
            given = given[1:-1].strip()
        if not given:
            return ""
        return _checkAddress(_qualify(given, config.domain), "sender")
    if login is None:
        raise SendmailError(EX_CONFIG, "cannot tell who is running me; give the sender with -f")
    return _checkAddress(f"{login}@{config.domain}", "sender")


def prepareMessage(
    data: bytes,
    arguments: Arguments,
    sender: str,
    config: SendmailConfig,
    now: float | None = None,
) -> tuple[bytes, list[str]]:
    """
    Turn what was read into what is sent, and find the recipients.

      - A leading Unix mailbox C{From } line is dropped.
      - Bcc fields are removed (RFC 5322 section 3.6.3: their recipients
        get the message without them), with or without C{-t}.
      - From, Date and Message-ID are added at the end of the header
        section when missing (RFC 5322 section 3.6 requires the first two
        and recommends the third; RFC 6409 section 8 lets a submission
        agent add them).  From is C{-F NAME} and the C{-f} address, or the
        default sender; the null sender gives the default sender's
        address.
      - When the header section ends on a line that is no header field, an
        empty line is put before it, so that the body stays a body.

    Everything else is sent byte for byte.

    @return: the message and the recipients: the arguments, then with
        C{-t} those of To, Cc and Bcc, qualified, checked, without
        duplicates.
    @raise SendmailError: with L{EX_DATAERR} for a bad address, or when
        there is no recipient at all.
    """
    if data.startswith(b"From "):
        data = data[data.find(b"\r\n") + 2 :] if b"\r\n" in data else b""
    fields, rest, separated = _splitHeaders(data)
    recipients = _addresses(arguments.recipients, config.domain, "recipient")
    if arguments.extract:
        values = [_fieldValue(f) for f in fields if _fieldName(f) in ("to", "cc", "bcc")]
        recipients += _addresses(values, config.domain, "recipient")
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        if arguments.extract:
            raise SendmailError(EX_DATAERR, "no recipients: none given and none in To, Cc or Bcc")
        _usage("no recipients given (name them, or use -t)")
    names = {_fieldName(f) for f in fields}
    kept = [f for f in fields if _fieldName(f) != "bcc"]
    added = []
    if "from" not in names:
        address = sender or _defaultAddress(config)
        name = " ".join((arguments.fullName or "").split())  # no header injection
        added.append(f"From: {formataddr((name, address))}")
    if "date" not in names:
        added.append(f"Date: {formatdate(now, localtime=True)}")
    if "message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=config.domain)}")
    header = b"".join(kept) + b"".join(a.encode("ascii") + b"\r\n" for a in added)
    if not separated:
        rest = b"\r\n" + rest
    return header + rest, recipients


def _login() -> str | None:
    """The invoking user's login name: the password entry of the real uid."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or None


def _defaultAddress(config: SendmailConfig) -> str:
    login = _login()
    return f"{login}@{config.domain}" if login else f"MAILER-DAEMON@{config.domain}"


# --- SMTP ------------------------------------------------------------------


class _Deadline(Exception):
    """The whole dialogue took longer than C{deadline} seconds."""


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(f"{code} {text}".split())


def _text(text: bytes | str) -> str:
    """A reply's text on one line, without its code."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(text.split())


def _status(code: int) -> int:
    """RFC 5321 section 4.2.1: 5yz is permanent, anything else retryable."""
    return EX_UNAVAILABLE if 500 <= code <= 599 else EX_TEMPFAIL


def _tlsContext(config: SendmailConfig) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=config.caFile)
    except (OSError, ssl.SSLError) as e:
        raise SendmailError(
            EX_CONFIG,
            f"config error: {config.path}: server.ca_file: {config.caFile}: "
            f"{getattr(e, 'strerror', None) or e}",
        ) from None


def submit(
    config: SendmailConfig,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
) -> str:
    """
    Send one message to relayd in one SMTP transaction: all recipients are
    accepted and the message is sent, or the transaction is reset and
    nothing is sent.

    @return: relayd's final reply, e.g. C{"250 2.0.0 Ok: queued as ..."}.
    @raise SendmailError: with L{EX_UNAVAILABLE} for a 5xx reply,
        L{EX_TEMPFAIL} for a 4xx reply, a connection failure, a timeout or
        a TLS failure.
    """
    where = f"{config.host}:{config.port}"
    context = _tlsContext(config) if config.tls != "none" else None
    try:
        if context is not None and config.tls == "implicit":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                config.host,
                config.port,
                local_hostname=config.helo,
                timeout=config.timeout,
                context=context,
            )
        else:
            smtp = smtplib.SMTP(
                config.host, config.port, local_hostname=config.helo, timeout=config.timeout
            )
    except smtplib.SMTPConnectError as e:
        raise SendmailError(
            _status(e.smtp_code),
            f"{where} refused the connection: {_reply(e.smtp_code, e.smtp_error)}",
            unreachable=e.smtp_code == 421,  # RFC 5321 4.2.2: shutting down
        ) from None
    except (OSError, smtplib.SMTPException) as e:
        raise SendmailError(
            EX_TEMPFAIL, f"cannot connect to {where}: {_why(e)}", unreachable=True
        ) from None
    try:
        return _transaction(smtp, config, sender, recipients, message, context)
    except SendmailError:
        _quit(smtp)
        raise
    except smtplib.SMTPResponseException as e:
        _quit(smtp)
        raise SendmailError(
            _status(e.smtp_code),
            f"{where} said: {_reply(e.smtp_code, e.smtp_error)}",
            replies=((None, e.smtp_code, _text(e.smtp_error)),),
        ) from None
    except (OSError, smtplib.SMTPException) as e:
        raise SendmailError(EX_TEMPFAIL, f"lost {where}: {_why(e)}") from None
    finally:
        smtp.close()


def _quit(smtp: smtplib.SMTP) -> None:
    """Say QUIT after a refusal, if the connection still works."""
    with contextlib.suppress(OSError, smtplib.SMTPException):
        smtp.quit()


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError) or (
        isinstance(e, smtplib.SMTPServerDisconnected) and isinstance(e.__context__, TimeoutError)
    ):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {e.verify_message}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _transaction(
    smtp: smtplib.SMTP,
    config: SendmailConfig,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    context: ssl.SSLContext | None,
) -> str:
    where = f"{config.host}:{config.port}"
    smtp.ehlo_or_helo_if_needed()
    if config.tls == "starttls":
        if not smtp.has_extn("starttls"):
            raise SendmailError(EX_TEMPFAIL, f"{where} does not offer STARTTLS")
        smtp.starttls(context=context)
        smtp.ehlo()
    if config.user is not None:
        if not smtp.has_extn("auth"):
            raise SendmailError(EX_TEMPFAIL, f"{where} does not offer AUTH")
        assert config.password is not None
        try:
            smtp.login(config.user, config.password)
        except smtplib.SMTPAuthenticationError as e:
            raise SendmailError(
                _status(e.smtp_code),
                f"{where} refused AUTH as {config.user}: {_reply(e.smtp_code, e.smtp_error)}",
            ) from None
    parameters = ""
    if smtp.has_extn("size"):
        parameters += f" SIZE={len(message)}"
    if smtp.has_extn("8bitmime") and any(b > 0x7F for b in message):
        parameters += " BODY=8BITMIME"
    code, text = smtp.docmd("MAIL", f"FROM:<{sender}>{parameters}")
    if not 200 <= code <= 299:
        raise SendmailError(
            _status(code),
            f"{where} refused sender <{sender}>: {_reply(code, text)}",
            replies=((None, code, _text(text)),),
        )
    refused = []
    for recipient in recipients:
        code, text = smtp.docmd("RCPT", f"TO:<{recipient}>")
        if not 200 <= code <= 299:
            refused.append((recipient, code, text))
    if refused:
        # Nothing is sent unless everyone gets it: abort the transaction
        # (RSET, RFC 5321 section 4.1.1.5).  The error is the refusal even
        # if the connection is gone by now.
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.rset()
        recipient, code, text = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise SendmailError(
            _worst(refused),
            f"{where} refused recipient <{recipient}>: {_reply(code, text)}{more}; nothing sent",
            replies=tuple((r, c, _text(t)) for r, c, t in refused),
        )
    final: bytes | str
    try:
        code, final = smtp.data(message)
    except smtplib.SMTPDataError as e:  # DATA itself refused
        code, final = e.smtp_code, e.smtp_error
    if not 200 <= code <= 299:
        raise SendmailError(
            _status(code),
            f"{where} refused the message: {_reply(code, final)}",
            replies=((None, code, _text(final)),),
        )
    _quit(smtp)  # the message is queued: a lost QUIT changes nothing
    return _reply(code, final)


def _worst(refused: list[tuple[str, int, bytes]]) -> int:
    """A permanent refusal of any recipient makes retrying pointless."""
    if any(500 <= code <= 599 for _, code, _ in refused):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL


def _withDeadline(seconds: float, call: Any, *args: Any) -> Any:
    """
    Run C{call(*args)} with an overall time limit, so that a server that
    answers slowly but within each read's timeout cannot hold a cron job
    forever.  A limit is set only in the main thread (signals).
    """
    if threading.current_thread() is not threading.main_thread():
        return call(*args)

    def expired(signum: int, frame: FrameType | None) -> None:
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the maildrop and the queue ----------------------------------------------


def _relaydPaths() -> Any:
    """
    relayd's spool, control socket and maildrop, from its config file
    (C{RELAYD_CONFIG}, else C{/etc/relayd/relayd.toml}).

    @raise SendmailError: with L{EX_CONFIG}, saying which paths were tried.
    """
    from relayd.configfile import ConfigNotFound, configPath, relaydPaths

    try:
        return relaydPaths(configPath())
    except ConfigNotFound as e:
        raise SendmailError(EX_CONFIG, f"relayd's {e}") from None
    except ValueError as e:
        raise SendmailError(EX_CONFIG, f"config error: {e}") from None


def _maildropDirectory(config: SendmailConfig) -> str:
    """
    The maildrop: C{maildrop} in sendmail.toml, else relayd's.

    @raise SendmailError: with L{EX_CONFIG} when neither says.
    """
    if config.maildrop is not None:
        return config.maildrop
    return str(_relaydPaths().maildrop)


def _drop(
    config: SendmailConfig,
    why: SendmailError,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
) -> str:
    """
    relayd cannot be reached: write the message into the maildrop, where
    relayd picks it up once it runs (L{relayd.ops.maildrop}).

    @return: what C{-v} prints.
    @raise SendmailError: C{why} (status 75), with the reason the maildrop
        could not take the message either.
    """
    from relayd.ops.maildrop import drop

    try:
        directory = _maildropDirectory(config)
    except SendmailError as e:
        raise SendmailError(why.status, f"{why}; no maildrop either: {e}") from None
    try:
        path = drop(directory, sender, list(recipients), message)
    except OSError as e:
        raise SendmailError(
            why.status,
            f"{why}; cannot write to the maildrop {directory}: {e.strerror or e}",
        ) from None
    return f"{why}; queued in the maildrop as {path} (relayd picks it up when it runs)"


def flushMaildrop(config: SendmailConfig, verbose: bool) -> int:
    """
    C{-q}: submit every file in the maildrop to relayd now, as relayd's own
    pickup would (L{relayd.ops.maildrop.flush}), over sendmail.toml's server
    settings.

    @return: L{EX_OK} when the maildrop is empty afterwards (or was),
        L{EX_TEMPFAIL} when relayd is not running or files are left.
    """
    from relayd.ops.maildrop import Dropped, Refused, Unreachable, flush, receivedField

    directory = _maildropDirectory(config)

    def submitOne(dropped: Dropped) -> str:
        message = receivedField(dropped, config.helo) + dropped.message
        try:
            reply: str = _withDeadline(
                config.deadline,
                submit,
                config,
                dropped.sender,
                dropped.recipients,
                message,
            )
        except _Deadline:
            raise Refused(f"gave up after {config.deadline:g} seconds", False) from None
        except SendmailError as e:
            if e.unreachable:
                raise Unreachable(e.message) from None
            raise Refused(e.message, permanent=e.status == EX_UNAVAILABLE) from None
        return reply

    try:
        result = flush(directory, submitOne)
    except OSError as e:
        raise SendmailError(
            EX_TEMPFAIL, f"cannot read the maildrop {directory}: {e.strerror or e}"
        ) from None
    for name, reply in result.submitted:
        if verbose:
            print(f"{PROG}: {name}: {reply}", file=sys.stderr)
    for name, why in result.broken:
        print(f"{PROG}: {name}: moved aside to {directory}/broken: {why}", file=sys.stderr)
    if result.unreachable is not None:
        print(
            f"{PROG}: relayd is not running ({result.unreachable}); "
            f"{_count(len(result.left), 'message')} left in the maildrop {directory}",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    if result.left:
        print(
            f"{PROG}: {_count(len(result.left), 'message')} left in the maildrop {directory} "
            "(deferred by relayd, or being submitted by relayd itself)",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    if verbose:
        print(f"{PROG}: maildrop flushed: {len(result.submitted)} submitted", file=sys.stderr)
    return EX_OK


def _arrival(seconds: float | None) -> str:
    """Postfix's mailq arrival time: C{Thu Dec  3 10:12:27}."""
    if seconds is None:
        return "-"
    return time.strftime("%a %b %e %H:%M:%S", time.localtime(seconds))


def _queueEntries() -> tuple[list[dict[str, Any]], str]:
    """
    relayd's queue as L{relayd.ops.queueview.summarize} entries: through the
    control socket when relayd runs, else read from the spool
    (L{relayd.ops.queueview.readQueue}).

    @return: the entries and where they came from (for the last line).
    """
    from relayd.ops.commands import QueueList
    from relayd.ops.controlclient import ControlClient, ControlClientError, NotRunning
    from relayd.ops.queueview import readQueue

    paths = _relaydPaths()
    try:
        client = ControlClient(paths.socket, 60.0)
    except NotRunning:
        client = None
    except ControlClientError as e:
        raise SendmailError(EX_TEMPFAIL, str(e)) from None
    if client is None:
        if not os.path.isdir(os.path.join(paths.spool, "incoming")):
            raise SendmailError(
                EX_TEMPFAIL, f"relayd is not running, and {paths.spool} holds no spool"
            )
        try:
            return readQueue(paths.spool)[0], f"relayd is not running; read from {paths.spool}"
        except OSError as e:
            raise SendmailError(
                EX_TEMPFAIL, f"cannot read the spool: {e.filename or paths.spool}: {e.strerror}"
            ) from None
    entries: list[dict[str, Any]] = []
    with client:
        after = ""
        while True:
            try:
                page = client.call(QueueList, after=after, limit=2000)
            except Exception as e:  # ControlError, ControlClientError: one line
                raise SendmailError(EX_TEMPFAIL, str(e)) from None
            entries += page["entries"]
            if not page["more"] or not page["entries"]:
                return entries, "from relayd"
            after = page["entries"][-1]["queue_id"]


def mailq(out: Any) -> int:
    """
    C{-bp} and C{mailq}: list relayd's queue the way Postfix's C{mailq}
    does: queue id (C{*} being delivered, C{!} on hold), size, arrival
    time, sender; then each recipient still to be delivered, after its
    last reply in parentheses when it has one.
    """
    entries, source = _queueEntries()
    _listEntries(out, entries, source)
    # Mail relayd-sendmail kept while relayd was down is not in the queue
    # yet; say so (when this user may list the maildrop).
    from relayd.ops.maildrop import pending

    directory = _relaydPaths().maildrop
    try:
        waiting = len(pending(directory))
    except OSError:
        waiting = 0
    if waiting:
        out.write(
            f"-- {_count(waiting, 'message')} in the maildrop {directory}, "
            "not yet picked up by relayd\n"
        )
    return EX_OK


def _count(number: int, word: str) -> str:
    return f"{number} {word}" + ("" if number == 1 else "s")


def _listEntries(out: Any, entries: list[dict[str, Any]], source: str) -> None:
    if not entries:
        out.write("Mail queue is empty\n")
        return
    out.write(f"{'-Queue ID-':<20} {'--Size--':>8} {'----Arrival Time----':<20} ")
    out.write("-Sender/Recipient-------\n")
    octets = 0
    for e in entries:
        mark = "*" if e.get("delivering") else "!" if e["state"] == "hold" else " "
        octets += e.get("size") or 0
        if e.get("error"):
            out.write(f"{e['queue_id'] + mark:<20} {'?':>8} {'-':<20} ({e['error']})\n\n")
            continue
        sender = e["sender"] or "MAILER-DAEMON"
        when = _arrival(e["arrival"])
        out.write(f"{e['queue_id'] + mark:<20} {e['size'] or 0:>8} {when:<20} {sender}\n")
        for r in e["recipients"]:
            if r["state"] in ("delivered", "failed"):
                continue
            if r.get("last_reply"):
                out.write(f"{'':<51}({' '.join(str(r['last_reply']).split())})\n")
            out.write(f"{'':<51}{r['address']}\n")
        out.write("\n")
    count = len(entries)
    out.write(
        f"-- {(octets + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}."
        f" ({source})\n"
    )


# --- main ------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    stdin: BinaryIO | None = None,
    program: str | None = None,
) -> int:
    """
    Run C{relayd-sendmail}.

    @param argv: the arguments without the program name; C{sys.argv[1:]}
        when None.
    @param stdin: where the message is read from; C{sys.stdin.buffer} when
        None.
    @param program: the name it was run as (C{sys.argv[0]} when None): as
        C{mailq} it lists the queue.
    @return: the exit status (sysexits.h; see the module docstring).
    """
    args = sys.argv[1:] if argv is None else argv
    name = os.path.basename(sys.argv[0] if program is None else program)
    try:
        arguments = parseArguments(args)
        if name == "mailq":
            arguments.listQueue = True  # mailq is sendmail -bp
        if arguments.help:
            print(USAGE)
            return EX_OK
        if arguments.version:
            from relayd.configfile import versionLine

            print(versionLine(PROG))
            return EX_OK
        if arguments.listQueue:
            return mailq(sys.stdout)
        config = loadConfig(arguments.configPath)
        if arguments.server is not None:
            host, port = arguments.server
            config = replace(config, host=host, port=port or config.port)
        if arguments.flushQueue:
            return flushMaildrop(config, arguments.verbose)
        if not arguments.recipients and not arguments.extract:
            _usage("no recipients given (name them, or use -t)")
        sender = envelopeSender(arguments, config, _login())
        data = readMessage(sys.stdin.buffer if stdin is None else stdin, arguments.ignoreDots)
        message, recipients = prepareMessage(data, arguments, sender, config, time.time())
        try:
            reply = _withDeadline(config.deadline, submit, config, sender, recipients, message)
        except _Deadline:
            raise SendmailError(
                EX_TEMPFAIL,
                f"{config.host}:{config.port}: gave up after {config.deadline:g} seconds",
            ) from None
        except SendmailError as e:
            if not e.unreachable:
                raise
            reply = _drop(config, e, sender, recipients, message)
    except SendmailError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EX_TEMPFAIL
    except Exception as e:  # a bug: still one line, and a sysexits status
        print(f"{PROG}: internal error: {e!r}", file=sys.stderr)
        return EX_SOFTWARE
    if arguments.verbose:
        print(f"{PROG}: {reply}", file=sys.stderr)
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
