"""
Tests for L{relayd.config} and for how C{twistd relayd} reports a bad
configuration: every class of mistake stops startup with exactly one line,
C{relayd: config error: FILE: KEY: PROBLEM}, and no traceback.

Most cases run in-process through L{relayd.config.load} and
L{relayd.service.buildService} (the two steps of
L{relayd.tap.makeService}); a few representative ones run the real
C{twistd} as a subprocess, all at once, to keep this file fast.

Also checks the shipped configurations: C{etc/relayd.toml} documents every
key of the schema and loads, and C{etc/dev.toml} (used by C{scripts/run})
builds a service.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from relayd.certificates import makeSelfSigned, writeKeyPair
from relayd.config import _LISTENER, _SCHEMA, ConfigError, fromDict, load
from relayd.service import buildService
from relayd.smtp.auth import setPassword

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "relayd.toml"
DEV = REPO / "etc" / "dev.toml"

# The real twistd, run by the interpreter running the tests.  It runs with
# the checkout as its working directory and "" first on sys.path, so that
# Twisted's plugin scan finds twisted/plugins/relayd_plugin.py however
# relayd was installed (tests/test_packaging.py checks the installed
# twistd script on its own).
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A certificate, its key, a users file and a file that is not PEM."""
    d = tmp_path_factory.mktemp("material")
    cert, key = makeSelfSigned("localhost")
    writeKeyPair(str(d / "cert.pem"), str(d / "key.pem"), cert, key)
    setPassword(str(d / "users"), "demo", "secret", rounds=4)
    (d / "notpem.txt").write_text("this is not a PEM file\n")
    return {
        "cert": d / "cert.pem",
        "key": d / "key.pem",
        "users": d / "users",
        "notpem": d / "notpem.txt",
        "dir": d,
    }


def baseBlocks(material: dict[str, Path], spool: Path) -> dict[str, str]:
    """A valid configuration, in blocks a case can replace one by one."""
    return {
        "tls": f'[tls]\ncertificate = "{material["cert"]}"\nkey = "{material["key"]}"\n',
        "auth": f'[auth]\nusers_file = "{material["users"]}"\nthreads = 1\n',
        "spool": f'[spool]\ndirectory = "{spool}"\n',
        "listeners": (
            '[[listeners]]\nendpoint = "tcp:port=0:interface=127.0.0.1"\nmode = "relay"\n'
            '[[listeners]]\nendpoint = "tcp:port=0:interface=127.0.0.1"\nmode = "submission"\n'
        ),
    }


def writeConfig(
    directory: Path,
    material: dict[str, Path],
    replace: dict[str, str] | None = None,
    extra: str = "",
    name: str = "relayd.toml",
) -> Path:
    blocks = baseBlocks(material, directory / "spool")
    blocks.update(replace or {})
    path = directory / name
    path.write_text("\n".join(blocks.values()) + "\n" + extra)
    return path


# --- the cases ------------------------------------------------------------------

# id: (blocks to replace, text to add, key named, words of the problem)
CASES: dict[str, tuple[dict[str, str], str, str, tuple[str, ...]]] = {
    "invalid-toml": ({}, "[server\nhostname = \n", "", ("not valid TOML", "line")),
    "unknown-section": (
        {},
        "[spoool]\ndirectory = 'x'\n",
        "spoool",
        ("unknown section",),
    ),
    "unknown-key": (
        {},
        "[limits]\nrecipient = 5\n",
        "limits.recipient",
        ("unknown key", "recipients"),
    ),
    "wrong-type": (
        {},
        '[limits]\nrecipients = "many"\n',
        "limits.recipients",
        ("must be an integer",),
    ),
    "header-size-too-small": (
        {},
        "[limits]\nheader_size = 512\n",
        "limits.header_size",
        ("must be at least 1024",),
    ),
    "hops-zero": ({}, "[limits]\nhops = 0\n", "limits.hops", ("must be greater than 0",)),
    "route-to-own-listener": (
        {
            "listeners": '[[listeners]]\nendpoint = "tcp:25250:interface=127.0.0.1"\n'
            'mode = "relay"\n'
        },
        '[[routes]]\ndomains = ["*"]\n[[routes.hops]]\nhost = "127.0.0.1"\nport = 25250\n',
        "routes[0].hops[0]",
        ("127.0.0.1:25250", "own listener 'relay0'", "tcp:25250:interface=127.0.0.1", "loop"),
    ),
    "route-to-localhost": (
        {"listeners": '[[listeners]]\nname = "mx"\nendpoint = "tcp:25251"\nmode = "relay"\n'},
        (
            '[[routes]]\ndomains = ["example.org"]\n'
            '[[routes.hops]]\nhost = "smart.example.net"\nport = 25251\n'
            '[[routes.hops]]\nhost = "localhost"\nport = 25251\n'
        ),
        "routes[0].hops[1]",
        ("localhost:25251", "own listener 'mx'", "loop"),
    ),
    "route-to-own-hostname": (
        {"listeners": '[[listeners]]\nendpoint = "tcp:25252"\nmode = "relay"\n'},
        (
            '[server]\nhostname = "mx.example.test"\n'
            '[[routes]]\ndomains = ["*"]\n'
            '[[routes.hops]]\nhost = "MX.example.test."\nport = 25252\n'
        ),
        "routes[0].hops[0]",
        ("MX.example.test.:25252", "own listener 'relay0'", "loop"),
    ),
    "route-to-own-ipv6": (
        {
            "listeners": "[[listeners]]\nendpoint = 'tcp6:port=25253:interface=\\:\\:1'\n"
            "mode = 'relay'\n"
        },
        '[[routes]]\ndomains = ["*"]\n[[routes.hops]]\nhost = "[::1]"\nport = 25253\n',
        "routes[0].hops[0]",
        ("[::1]:25253", "own listener 'relay0'", "loop"),
    ),
    "route-mode-unknown": (
        {},
        '[[routes]]\ndomains = ["*"]\nmode = "proxy"\n[[routes.hops]]\nhost = "192.0.2.1"\n',
        "routes[0].mode",
        ("must be one of", "passthrough", "spool"),
    ),
    "route-fallback-without-passthrough": (
        {},
        (
            '[[routes]]\ndomains = ["*"]\nfallback = "tempfail"\n'
            '[[routes.hops]]\nhost = "192.0.2.1"\n'
        ),
        "routes[0].fallback",
        ('mode = "passthrough"',),
    ),
    "route-fallback-unknown": (
        {},
        (
            '[[routes]]\ndomains = ["*"]\nmode = "passthrough"\nfallback = "bounce"\n'
            '[[routes.hops]]\nhost = "192.0.2.1"\n'
        ),
        "routes[0].fallback",
        ("must be one of", "spool", "tempfail"),
    ),
    "boolean-for-number": (
        {},
        "[timeouts]\ncommand = true\n",
        "timeouts.command",
        ("must be a number",),
    ),
    "bad-listener-mode": (
        {"listeners": '[[listeners]]\nendpoint = "tcp:0"\nmode = "smtp"\n'},
        "",
        "listeners[0].mode",
        ("must be one of", "relay", "submission", "'smtp'"),
    ),
    "no-listeners": ({"listeners": ""}, "", "listeners", ("at least one",)),
    "missing-spool-directory": (
        {"spool": "[spool]\nthreads = 2\n"},
        "",
        "spool.directory",
        ("missing",),
    ),
    "missing-certificate": (
        {"tls": '[tls]\ncertificate = "nope/cert.pem"\nkey = "nope/key.pem"\n'},
        "",
        "tls.certificate",
        ("file not found", "nope/cert.pem"),
    ),
    "key-is-a-directory": (
        {"tls": "[tls]\ncertificate = '{cert}'\nkey = '{dir}'\n"},
        "",
        "tls.key",
        ("directory",),
    ),
    "key-not-pem": (
        {"tls": "[tls]\ncertificate = '{cert}'\nkey = '{notpem}'\n"},
        "",
        "tls.key",
        ("notpem.txt", "no PEM private key"),
    ),
    "certificate-not-pem": (
        {"tls": "[tls]\ncertificate = '{notpem}'\nkey = '{key}'\n"},
        "",
        "tls.certificate",
        ("notpem.txt", "no PEM certificate"),
    ),
    "submission-without-tls": ({"tls": ""}, "", "tls.certificate", ("needs TLS",)),
    "tls-min-version-sslv3": (
        {"tls": "[tls]\ncertificate = '{cert}'\nkey = '{key}'\nmin_version = 'SSLv3'\n"},
        "",
        "tls.min_version",
        ("must be one of", "TLSv1.2", "TLSv1.3", "'SSLv3'"),
    ),
    "tls-min-version-tls1": (
        {"tls": "[tls]\ncertificate = '{cert}'\nkey = '{key}'\nmin_version = 'TLSv1'\n"},
        "",
        "tls.min_version",
        ("must be one of", "'TLSv1'"),
    ),
    "tls-bad-ciphers": (
        {"tls": "[tls]\ncertificate = '{cert}'\nkey = '{key}'\nciphers = 'NOPE-NOT-A-CIPHER'\n"},
        "",
        "tls.ciphers",
        ("no TLS 1.2 cipher suite matches", "'NOPE-NOT-A-CIPHER'"),
    ),
    "tls-ciphers-only-tls13": (
        {
            "tls": "[tls]\ncertificate = '{cert}'\nkey = '{key}'\n"
            "ciphers = 'TLS_AES_128_GCM_SHA256'\n"
        },
        "",
        "tls.ciphers",
        ("no TLS 1.2 cipher suite matches",),
    ),
    "tls-bad-opportunistic-ciphers": (
        {
            "tls": "[tls]\ncertificate = '{cert}'\nkey = '{key}'\n"
            "opportunistic_ciphers = 'RC4-MD5'\n"
        },
        "",
        "tls.opportunistic_ciphers",
        ("no TLS 1.2 cipher suite matches", "'RC4-MD5'"),
    ),
    "unknown-policy": (
        {},
        '[policy]\nchain = ["mynetworks", "nope"]\n',
        "policy.chain",
        ("unknown policy 'nope'", "installed:", "authenticated", "mynetworks"),
    ),
    "bad-network": (
        {},
        '[policies.mynetworks]\nnetworks = ["10.0.0.0/8", "10.0.0.300/8"]\n',
        "policies.mynetworks.networks",
        ("not a network", "10.0.0.300/8"),
    ),
    "unknown-policy-option": (
        {},
        "[policies.authenticated]\nusers = 1\n",
        "policies.authenticated.users",
        ("unknown option",),
    ),
    "bad-endpoint": (
        {"listeners": '[[listeners]]\nendpoint = "tcp:notaport"\nmode = "relay"\n'},
        "",
        "listeners[0].endpoint",
        ("bad endpoint", "tcp:notaport"),
    ),
    "unknown-endpoint-type": (
        {"listeners": '[[listeners]]\nendpoint = "smtp:25"\nmode = "relay"\n'},
        "",
        "listeners[0].endpoint",
        ("bad endpoint", "smtp:25"),
    ),
}

# The ones also run through the real twistd: one per stage of startup
# (reading the file, the schema, the certificates, the policies).
TWISTD_CASES = (
    "missing-file",
    "invalid-toml",
    "unknown-key",
    "key-not-pem",
    "tls-min-version-sslv3",
    "unknown-policy",
    "route-to-own-listener",
)


def caseConfig(
    case: str, directory: Path, material: dict[str, Path]
) -> tuple[Path, str, tuple[str, ...]]:
    """Write the config for C{case}; return its path, key and problem words."""
    if case == "missing-file":
        return directory / "absent.toml", "", ("config file not found",)
    replace, extra, key, words = CASES[case]
    fill = {name: str(p) for name, p in material.items()}
    replace = {block: text.format(**fill) for block, text in replace.items()}
    path = writeConfig(directory, material, replace, extra)
    return path, key, words


def build(path: Path) -> Any:
    """What L{relayd.tap.makeService} does, without a real reactor."""
    return buildService(load(str(path)), MemoryReactorClock())


def checkLine(line: str, path: Path, key: str, words: tuple[str, ...]) -> None:
    """C{line} is one config error line naming C{path}, C{key} and the problem."""
    assert "\n" not in line
    assert line.startswith(f"relayd: config error: {path}: "), line
    rest = line[len(f"relayd: config error: {path}: ") :]
    if key:
        assert rest.startswith(f"{key}: "), line
    for word in words:
        assert word in rest, f"{word!r} not in {line!r}"


# An unknown endpoint type makes Twisted import every endpoint plugin,
# twisted.conch's among them, which imports the deprecated spwd module.
@pytest.mark.filterwarnings("ignore:'spwd' is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", ["missing-file", *CASES])
def test_loadError(case: str, tmp_path: Path, material: dict[str, Path]) -> None:
    """
    Each mistake raises one L{ConfigError} from C{load} or C{buildService}
    whose line names the file, the key and the problem.
    """
    path, key, words = caseConfig(case, tmp_path, material)
    with pytest.raises(ConfigError) as caught:
        build(path)
    error = caught.value
    assert error.path == str(path)
    assert error.key == key
    checkLine(f"relayd: config error: {error}", path, key, words)


def test_routesNotToSelf(tmp_path: Path, material: dict[str, Path]) -> None:
    """
    Hops that only look like relayd's listeners load: another port,
    another loopback address than the one listened on, IPv6 to an IPv4
    listener, a name relayd does not know as its own (not resolved).
    """
    listeners = (
        '[[listeners]]\nendpoint = "tcp:25260:interface=127.0.0.1"\nmode = "relay"\n'
        '[[listeners]]\nendpoint = "tcp:25261"\nmode = "relay"\n'
        '[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\nmode = "relay"\n'
    )
    hops = [("127.0.0.1", 25262), ("127.0.0.2", 25260), ("::1", 25261), ("mx.example.net", 25261)]
    routes = "".join(
        f'[[routes]]\ndomains = ["d{i}.example"]\n[[routes.hops]]\nhost = "{h}"\nport = {p}\n'
        for i, (h, p) in enumerate(hops)
    )
    config = load(str(writeConfig(tmp_path, material, {"listeners": listeners}, routes)))
    assert [r.hops[0].host for r in config.routes] == [h for h, _ in hops]


def test_baseIsValid(tmp_path: Path, material: dict[str, Path]) -> None:
    """The configuration the cases start from builds a service."""
    service = build(writeConfig(tmp_path, material))
    assert [f.mode for f in service.factories] == ["relay", "submission"]


@pytest.fixture(scope="module")
def twistdRuns(
    tmp_path_factory: pytest.TempPathFactory, material: dict[str, Path]
) -> dict[str, tuple[Path, str, tuple[str, ...], subprocess.CompletedProcess[str]]]:
    """Run the real twistd once per case in L{TWISTD_CASES}, all at once."""
    started = {}
    for case in TWISTD_CASES:
        directory = tmp_path_factory.mktemp(case)
        path, key, words = caseConfig(case, directory, material)
        args = [*TWISTD, "-n", "--pidfile=", "relayd", "--config", str(path)]
        process = subprocess.Popen(
            args,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[case] = (path, key, words, args, process)
    results = {}
    try:
        for case, (path, key, words, args, process) in started.items():
            out, err = process.communicate(timeout=120)
            results[case] = (
                path,
                key,
                words,
                subprocess.CompletedProcess(args, process.returncode, out, err),
            )
    finally:
        for *_, process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.mark.parametrize("case", TWISTD_CASES)
def test_twistdConfigError(
    case: str,
    twistdRuns: dict[str, tuple[Path, str, tuple[str, ...], subprocess.CompletedProcess[str]]],
) -> None:
    """
    C{twistd -n relayd --config BAD} exits non-zero having printed exactly
    one line, C{relayd: config error: FILE: KEY: PROBLEM}, and nothing else.
    """
    path, key, words, result = twistdRuns[case]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("relayd: config error:")]
    assert len(errors) == 1, output
    checkLine(errors[0], path, key, words)
    assert lines == errors, f"twistd printed more than the error line:\n{output}"


# --- etc/relayd.toml ---------------------------------------------------------------


def test_sampleParses() -> None:
    """The sample is valid TOML with the three documented listeners."""
    with SAMPLE.open("rb") as f:
        raw = tomllib.load(f)
    assert [(one["mode"], one["endpoint"]) for one in raw["listeners"]] == [
        ("relay", "tcp:25"),
        ("submission", "tcp:587"),
        ("submissions", "tcp:465"),
    ]
    assert raw["policy"]["chain"] == ["mynetworks", "authenticated"]
    assert raw["policies"]["mynetworks"]["networks"]


def commentsBefore(text: str) -> dict[str, str]:
    """For each C{key = ...} line, by C{section.key}: the comment block above it."""
    found: dict[str, str] = {}
    section = ""
    comments: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        header = re.match(r"^\[+([^\]]+)\]+", stripped)
        if header:
            section = header.group(1).strip()
            comments = []
        elif stripped.startswith("#"):
            comments.append(stripped)
        elif match := re.match(r"^([A-Za-z_]+)\s*=", stripped):
            found.setdefault(f"{section}.{match.group(1)}", "\n".join(comments))
            comments = []
        elif not stripped:
            pass
        else:
            comments = []
    return found


def test_sampleDocumentsEveryKey() -> None:
    """
    Every key of the schema is set in the sample, under a comment giving its
    default (or saying it is required), and keys that have a default are
    set to it, so the sample cannot fall behind L{relayd.config}.
    """
    text = SAMPLE.read_text()
    raw = tomllib.loads(text)
    comments = commentsBefore(text)
    for section, schema in _SCHEMA.items():
        assert section in raw, f"[{section}] missing from {SAMPLE}"
        for key, spec in schema.items():
            name = f"{section}.{key}"
            assert key in raw[section], f"{name} not in {SAMPLE}"
            comment = comments[name].lower()
            assert "default" in comment or "required" in comment, (
                f"{name} has no comment giving its default in {SAMPLE}"
            )
            if spec.default is not None:
                assert raw[section][key] == spec.default, (
                    f"{name} = {raw[section][key]!r} in {SAMPLE}, "
                    f"but its default is {spec.default!r}"
                )
    for listener in raw["listeners"]:
        assert set(listener) == set(_LISTENER)
    for key in _LISTENER:
        assert re.search(rf"^#\s+{key}\s", text, re.MULTILINE), f"listener key {key} not described"


def test_sampleLoads(tmp_path: Path, material: dict[str, Path]) -> None:
    """
    With the files it names in place, the sample loads and builds a service;
    without them, C{load} stops at the first missing file.
    """
    with pytest.raises(ConfigError) as caught:
        load(str(SAMPLE))
    assert caught.value.key == "tls.certificate"
    assert "file not found" in caught.value.problem

    with SAMPLE.open("rb") as f:
        raw = tomllib.load(f)
    raw["tls"]["certificate"] = str(material["cert"])
    raw["tls"]["key"] = str(material["key"])
    raw["auth"]["users_file"] = str(material["users"])
    raw["spool"]["directory"] = str(tmp_path / "spool")
    raw["delivery"]["ca_file"] = str(material["cert"])
    config = fromDict(raw, str(tmp_path / "relayd.toml"))
    assert config.hostname == "mail.example.org"
    assert config.policyChain == ("mynetworks", "authenticated")
    service = buildService(config, MemoryReactorClock())
    assert [f.mode for f in service.factories] == ["relay", "submission", "submissions"]


# --- etc/dev.toml -------------------------------------------------------------------


def test_devConfig(tmp_path: Path, material: dict[str, Path]) -> None:
    """
    C{etc/dev.toml} finds everything under C{var/} next to C{etc/} (as
    scripts/run lays it out) and builds a service listening on 127.0.0.1.
    """
    (tmp_path / "etc").mkdir()
    (tmp_path / "var" / "tls").mkdir(parents=True)
    shutil.copy(DEV, tmp_path / "etc" / "dev.toml")
    shutil.copy(material["cert"], tmp_path / "var" / "tls" / "cert.pem")
    shutil.copy(material["key"], tmp_path / "var" / "tls" / "key.pem")
    shutil.copy(material["users"], tmp_path / "var" / "users")

    config = load(str(tmp_path / "etc" / "dev.toml"))
    var = tmp_path / "var"
    assert config.hostname == "localhost"
    assert config.spoolDirectory == str(var / "spool")
    assert config.tlsCertificate == str(var / "tls" / "cert.pem")
    assert config.tlsKey == str(var / "tls" / "key.pem")
    assert config.usersFile == str(var / "users")
    assert config.spoolReserveBytes <= 10 * 1024 * 1024
    assert [(one.mode, one.endpoint) for one in config.listeners] == [
        ("relay", "tcp:port=2525:interface=127.0.0.1"),
        ("submission", "tcp:port=2587:interface=127.0.0.1"),
        ("submissions", "tcp:port=2465:interface=127.0.0.1"),
    ]
    assert config.policyOptions["mynetworks"]["networks"] == ["127.0.0.0/8", "::1/128"]
    service = buildService(config, MemoryReactorClock())
    assert [f.mode for f in service.factories] == ["relay", "submission", "submissions"]


def test_sampleExampleChainLoads(tmp_path: Path, material: dict[str, Path]) -> None:
    """
    The commented example chain in C{etc/relayd.toml} (a typical internal
    smart host), uncommented and with the files it names created, loads:
    every policy accepts its options and the service tree builds.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    text = SAMPLE.read_text()
    block = text.split("# (example begins)\n", 1)[1].split("# (example ends)\n", 1)[0]
    example = "\n".join(line[2:] if line.startswith("# ") else "" for line in block.splitlines())
    raw = tomllib.loads(SAMPLE.read_text())
    raw.update(tomllib.loads(example))
    raw["tls"]["certificate"] = str(material["cert"])
    raw["tls"]["key"] = str(material["key"])
    raw["auth"]["users_file"] = str(material["users"])
    raw["spool"]["directory"] = str(tmp_path / "spool")
    raw["delivery"]["ca_file"] = str(material["cert"])
    (tmp_path / "access").mkdir()
    (tmp_path / "access" / "clients-deny.txt").write_text("# none yet\n192.0.2.0/24\n")
    (tmp_path / "senders.txt").write_text("bob  bob@example.com, @bob.example.com\n")
    (tmp_path / "dkim").mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "dkim" / "example.com.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = fromDict(raw, str(tmp_path / "relayd.toml"))
    assert config.policyChain == (
        "access",
        "senderlogin",
        "ratelimit",
        "mynetworks",
        "authenticated",
        "headers",
        "dkim",
    )
    service = buildService(config, MemoryReactorClock())
    assert service.policies is not None
    assert list(service.policies.chain.names) == list(config.policyChain)


def test_maildropListenerMustBeRelay(tmp_path: Path) -> None:
    """[maildrop] listener names a relay listener: the pickup submits there."""
    from relayd.testing import TestSetup

    setup = TestSetup(str(tmp_path / "relayd"), sections={"maildrop": {"listener": "submission"}})
    with pytest.raises(ConfigError) as caught:
        load(setup.configPath)
    assert (caught.value.key, caught.value.problem) == (
        "maildrop.listener",
        "must name a relay listener",
    )
    setup = TestSetup(str(tmp_path / "ok"), sections={"maildrop": {"listener": "relay"}})
    config = load(setup.configPath)
    assert (config.maildropListener, config.maildropDirectory, config.maildropInterval) == (
        "relay",
        str(Path(setup.spoolPath) / "maildrop"),
        5.0,
    )


def test_spoolJournal(tmp_path: Path, material: dict[str, Path]) -> None:
    """
    C{[spool] journal} is on by default; C{false} turns it off; anything
    but a boolean is one clear error naming the key.
    """
    raw = tomllib.loads(SAMPLE.read_text())
    raw["tls"]["certificate"] = str(material["cert"])
    raw["tls"]["key"] = str(material["key"])
    raw["auth"]["users_file"] = str(material["users"])
    raw["spool"]["directory"] = str(tmp_path / "spool")
    raw["delivery"]["ca_file"] = str(material["cert"])
    path = str(tmp_path / "relayd.toml")
    assert fromDict(raw, path).spoolJournal is True
    raw["spool"]["journal"] = False
    assert fromDict(raw, path).spoolJournal is False
    raw["spool"]["journal"] = "yes"
    with pytest.raises(ConfigError) as error:
        fromDict(raw, path)
    assert "spool.journal" in str(error.value), error.value
