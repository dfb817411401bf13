"""
Server endpoint strings from the config (C{[[listeners]] endpoint},
C{[metrics] endpoint}) before Twisted's C{serverFromString} reads them:
file names in them resolved against the config file's folder, as every
other path in the config is, and the common mistakes named in words
instead of Python's (C{invalid literal for int() with base 10}).

File names: a C{unix:} endpoint's socket (C{unix:relayd.sock},
C{unix:address=...}) and an C{ssl:} endpoint's C{privateKey}, C{certKey},
C{extraCertChain}, C{dhParameters} and C{caCertsDir}.  A path is written
back escaped (C{\\:}, C{\\=}, C{\\\\}), so a folder with a colon in its name
works too.
"""

from __future__ import annotations

import ipaddress
import os
import re

__all__ = ["resolvePaths", "endpointProblem", "explainError", "splitEndpoint"]

_SSL_PATHS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "caCertsDir")
_TCP_KINDS = ("tcp", "tcp6", "ssl")


def splitEndpoint(description: str, keepEscapes: bool = True) -> list[str]:
    """
    Split a Twisted endpoint string at the colons that are not escaped
    (C{\\:}); with C{keepEscapes} the escapes stay in the parts, so that
    they can be joined again, else they are removed.
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in description:
        if escaped:
            current.append("\\" + ch if keepEscapes else ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _escape(text: str) -> str:
    return re.sub(r"([\\:=])", r"\\\1", text)


def _keyword(part: str) -> tuple[str, str] | None:
    """C{name=value} (an unescaped C{=}), or None for a positional argument."""
    match = re.match(r"^((?:[^\\=]|\\.)*)=(.*)$", part, re.DOTALL)
    if match is None:
        return None
    return _unescape(match.group(1)), match.group(2)


def resolvePaths(description: str, base: str) -> str:
    """
    C{description} with its relative file names joined to C{base} (the
    config file's folder).  Anything else is left exactly as written.
    """
    parts = splitEndpoint(description)
    kind = _unescape(parts[0]).strip().lower()
    if kind not in ("unix", "ssl"):
        return description

    def absolute(value: str) -> str:
        path = _unescape(value)
        if not path or os.path.isabs(path):
            return value
        return _escape(os.path.join(base, path))

    positional = 0
    for i, part in enumerate(parts[1:], 1):
        keyword = _keyword(part)
        if keyword is None:
            positional += 1
            # unix:PATH; ssl:PORT:PRIVATEKEY
            if (kind == "unix" and positional == 1) or (kind == "ssl" and positional == 2):
                parts[i] = absolute(part)
            continue
        name, value = keyword
        if (kind == "unix" and name == "address") or (kind == "ssl" and name in _SSL_PATHS):
            parts[i] = f"{name}={absolute(value)}"
    return ":".join(parts)


def endpointProblem(description: str) -> str | None:
    """
    What is wrong with a C{tcp:}, C{tcp6:}, C{ssl:} or C{unix:} endpoint
    string, in words; None when nothing this check knows of (Twisted's
    parser has the last word, L{explainError}).
    """
    parts = splitEndpoint(description)
    kind = _unescape(parts[0]).strip().lower()
    if not kind:
        return "no endpoint type (tcp:PORT, tcp6:PORT, ssl:PORT, unix:PATH or systemd:...)"
    positional = [_unescape(p) for p in parts[1:] if _keyword(p) is None]
    keywords: dict[str, str] = {}
    for part in parts[1:]:
        keyword = _keyword(part)
        if keyword is not None:
            keywords[keyword[0]] = _unescape(keyword[1])
    if kind in _TCP_KINDS:
        port = keywords.get("port", positional[0] if positional else None)
        if port is None or port == "":
            return f"no port (write {kind}:PORT, for example {kind}:25)"
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            return f"port {port!r} is not a number from 0 to 65535"
        interface = keywords.get("interface", "")
        if interface:
            try:
                ipaddress.ip_address(interface)
            except ValueError:
                return f"interface {interface!r} is not an IP address"
        backlog = keywords.get("backlog")
        if backlog is not None and not backlog.isdigit():
            return f"backlog {backlog!r} is not a number"
    if kind == "unix":
        address = keywords.get("address", positional[0] if positional else "")
        if not address:
            return "no socket path (write unix:PATH)"
        mode = keywords.get("mode")
        if mode is not None and not re.fullmatch(r"[0-7]{1,4}", mode):
            return f"mode {mode!r} is not an octal file mode such as 660"
    return None


def explainError(error: Exception) -> str:
    """Twisted's complaint about an endpoint string, without Python's wording."""
    text = str(error)
    match = re.search(r"invalid literal for int\(\) with base \d+: (.*)$", text)
    if match:
        return f"{match.group(1)} is not a number"
    return text or type(error).__name__
