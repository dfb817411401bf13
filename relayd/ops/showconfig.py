"""
C{relayctl config}: relayd's effective configuration, key by key, like
Postfix's C{postconf} (docs/relayctl.md).

  - Every key of every section, with the value in force: the file's, else
    the built-in default (L{relayd.config}'s schema); paths resolved as
    relayd resolves them (against the config file's folder); defaults
    computed at startup (the host name, the control socket, the maildrop)
    filled in.  What differs from the built-in default is marked, like
    C{postconf -n} lists it.
  - C{--defaults}: the built-in defaults only, like C{postconf -d}.
  - Secrets never show: a smart host's C{password} is masked, a
    C{password_file} shows as its path, a policy option whose name looks
    secret (password, secret, token, api key, credential) is masked unless
    it names a file (C{*_file}, shown as the path), and so are the user
    name and password in a URL (C{redis://user:secret@host}).

The file is checked as startup checks it first (L{relayd.config.load}), so
what is printed is what relayd would run with.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from typing import Any

from relayd.config import (
    _HOP,
    _LISTENER,
    _ROUTE,
    _SCHEMA,
    CONTROL_SOCKET_NAME,
    MAILDROP_NAME,
    Config,
    load,
)

__all__ = ["MASK", "defaultSettings", "effectiveSettings", "settingLines"]

MASK = "********"
"""What a secret shows as."""

PATH_KEYS = frozenset(
    {
        "tls.certificate",
        "tls.key",
        "auth.users_file",
        "spool.directory",
        "delivery.ca_file",
        "control.socket",
        "maildrop.directory",
    }
)
"""Keys whose value is a path, relative to the config file's folder."""

_SECRET = re.compile(r"pass(word|phrase)?|secret|token|api_?key|credential", re.IGNORECASE)


def _setting(key: str, value: Any, default: Any, isSet: bool) -> dict[str, Any]:
    return {"key": key, "value": value, "default": default, "set": isSet}


def defaultSettings() -> list[dict[str, Any]]:
    """
    The built-in defaults (C{relayctl config --defaults}): every key of
    the sections, then those of each C{[[listeners]]} and
    C{[[routes.hops]]} table (as C{listeners[].KEY}, C{routes[].hops[].KEY}).
    A key with no default (required, or computed at startup) is None.
    """
    settings = []
    for section, schema in _SCHEMA.items():
        for key, spec in schema.items():
            settings.append(_setting(f"{section}.{key}", spec.default, spec.default, False))
    for key, spec in _LISTENER.items():
        settings.append(_setting(f"listeners[].{key}", spec.default, spec.default, False))
    settings.append(_setting("routes[].domains", None, None, False))
    for key in ("mode", "fallback"):
        default = _ROUTE[key].default
        settings.append(_setting(f"routes[].{key}", default, default, False))
    for key, spec in _HOP.items():
        settings.append(_setting(f"routes[].hops[].{key}", spec.default, spec.default, False))
    return settings


def _maskOption(key: str, value: Any, base: str) -> Any:
    """A policy option as shown: files as resolved paths, secrets masked."""
    if key.endswith("_file") and isinstance(value, str):
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if _SECRET.search(key):
        return MASK
    if isinstance(value, dict):
        return {k: _maskOption(k, v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_maskOption(key, v, base) for v in value]
    if isinstance(value, str):
        return _maskURL(value)
    return value


_URL_SECRET = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@]*)@", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"([?&](?:password|username)=)[^&]*", re.IGNORECASE)


def _maskURL(value: str) -> str:
    """
    A URL's credentials masked (C{redis://user:secret@host/0} and
    C{?password=...}, as the Redis URLs of the rate policies may carry).
    """
    value = _URL_SECRET.sub(lambda m: f"{m.group(1)}{MASK}@", value)
    if "://" in value:
        value = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, value)
    return value


def effectiveSettings(path: str) -> list[dict[str, Any]]:
    """
    The config in C{path} as relayd runs it (C{relayctl config}).

    @return: one C{{"key", "value", "default", "set"}} per key: C{set} is
        true when the value differs from the built-in default.
    @raise relayd.config.ConfigError: the file is not a sound config.
    """
    config: Config = load(path)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(path))
    computed = {
        "server.hostname": config.hostname,
        "control.socket": config.controlSocket
        or os.path.join(config.spoolDirectory, CONTROL_SOCKET_NAME),
        "maildrop.directory": os.path.join(config.spoolDirectory, MAILDROP_NAME),
    }
    settings = []
    for section, schema in _SCHEMA.items():
        table = raw.get(section, {})
        for key, spec in schema.items():
            name = f"{section}.{key}"
            value = table.get(key, spec.default)
            if name in PATH_KEYS and isinstance(value, str):
                value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
            if value is None and name in computed:
                value = computed[name]
            settings.append(_setting(name, value, spec.default, value != spec.default))
    for i, listener in enumerate(config.listeners):
        table = raw["listeners"][i]
        for key, spec in _LISTENER.items():
            value = table.get(key, spec.default)
            if key == "name":
                value = listener.name
            settings.append(_setting(f"listeners[{i}].{key}", value, spec.default, True))
    for i, route in enumerate(raw.get("routes", [])):
        settings.append(_setting(f"routes[{i}].domains", route.get("domains"), None, True))
        for key in ("mode", "fallback"):
            default = _ROUTE[key].default
            value = route.get(key, default)
            settings.append(_setting(f"routes[{i}].{key}", value, default, value != default))
        for j, hop in enumerate(route.get("hops", [])):
            for key, spec in _HOP.items():
                value = hop.get(key, spec.default)
                if key == "password" and value is not None:
                    value = MASK
                elif key == "password_file" and isinstance(value, str):
                    value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
                settings.append(
                    _setting(
                        f"routes[{i}].hops[{j}].{key}", value, spec.default, value != spec.default
                    )
                )
    for name, options in raw.get("policies", {}).items():
        for key, value in options.items():
            settings.append(
                _setting(f"policies.{name}.{key}", _maskOption(key, value, base), None, True)
            )
    return settings


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    return json.dumps(value, ensure_ascii=False)


def settingLines(settings: list[dict[str, Any]], mark: bool) -> list[str]:
    """
    C{KEY = VALUE} lines (values as JSON, C{(unset)} for none); with
    C{mark}, a line whose value differs from the built-in default starts
    with C{*} (the others with a space).
    """
    lines = []
    for s in settings:
        prefix = ("* " if s["set"] else "  ") if mark else ""
        lines.append(f"{prefix}{s['key']} = {_show(s['value'])}")
    return lines
