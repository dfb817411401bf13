"""
Packaging: the wheel carries relayd's Twisted plugin without claiming
Twisted's own packages (no C{twisted/__init__.py} or
C{twisted/plugins/__init__.py}, which would shadow Twisted's when
installed), and the C{relayd.policies} entry points; the installed
C{twistd} knows the C{relayd} command.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

POLICIES = {
    "mynetworks": "relayd.policies.mynetworks:MyNetworks",
    "authenticated": "relayd.policies.authenticated:Authenticated",
    "access": "relayd.policies.access:Access",
    "senderlogin": "relayd.policies.senderlogin:SenderLogin",
    "headers": "relayd.policies.headers:HeaderRewrite",
    "dkim": "relayd.policies.dkim:DKIMSign",
    "ratelimit": "relayd.policies.ratelimit:RateLimit",
}


def _major(distribution: str) -> int:
    try:
        return int(importlib.metadata.version(distribution).split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """
    Build the wheel from a copy of the checkout (so that build/ and the
    egg-info never land in the working tree others use) and open it.
    """
    source = tmp_path_factory.mktemp("source") / "relayd"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "var",
            "build",
            "dist",
            "tests",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            "_trial_temp*",
            "dropin.cache",
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    # Without build isolation when this environment has what pyproject.toml
    # asks for (scripts/test sees to that): quick, and no network needed.
    isolated = _major("setuptools") < 68
    if importlib.util.find_spec("build") is not None:
        args = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out)]
        args += [] if isolated else ["--no-isolation"]
    else:
        args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out)]
        args += [] if isolated else ["--no-build-isolation"]
    args.append(str(source))
    result = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    wheels = list(out.glob("relayd-*.whl"))
    assert len(wheels) == 1, wheels
    archive = zipfile.ZipFile(wheels[0])
    yield archive
    archive.close()


def test_pluginWithoutNamespaceInit(wheel: zipfile.ZipFile) -> None:
    """
    The plugin file is in the wheel; C{twisted/__init__.py} and
    C{twisted/plugins/__init__.py} are not, nor a stale C{dropin.cache}.
    """
    names = set(wheel.namelist())
    assert "twisted/plugins/relayd_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert {n.split("/")[0] for n in names if not n.startswith("relayd-")} == {
        "relayd",
        "twisted",
    }
    assert "relayd/__init__.py" in names
    assert "relayd/policies/__init__.py" in names


def test_entryPoints(wheel: zipfile.ZipFile) -> None:
    """
    C{entry_points.txt} holds the built-in policies in group
    C{relayd.policies}, each pointing at a module in the wheel, and the
    C{relayd-passwd} script.
    """
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(name).decode("utf-8"))
    assert dict(parser["relayd.policies"]) == POLICIES
    names = set(wheel.namelist())
    for target in POLICIES.values():
        module = target.split(":")[0]
        assert module.replace(".", "/") + ".py" in names
    assert parser["console_scripts"]["relayd-passwd"] == "relayd.ops.passwd:main"
    assert parser["console_scripts"]["relayd-sendmail"] == "relayd.ops.sendmail:main"


def test_installedEntryPoints() -> None:
    """The installed relayd registers its policies where the chain looks."""
    installed = {
        ep.name: ep.value for ep in importlib.metadata.entry_points(group="relayd.policies")
    }
    for name, value in POLICIES.items():
        assert installed.get(name) == value


def test_twistdHelp(tmp_path: Path) -> None:
    """
    The installed C{twistd}, run away from the checkout, finds the plugin
    and C{twistd relayd --help} lists C{--config}.
    """
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        args = [str(twistd)]
    else:
        args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    result = subprocess.run(
        [*args, "relayd", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert "Unknown command: relayd" not in output, (
        "twistd cannot find twisted/plugins/relayd_plugin.py.  An editable "
        "install must put the checkout on sys.path: pip install "
        "--config-settings editable_mode=compat -e . (as scripts/test does)"
    )
    assert result.returncode == 0, output
    assert "--config" in result.stdout
    assert "relayd" in result.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Build the sdist from a copy of the checkout; the names it holds."""
    import tarfile

    source = tmp_path_factory.mktemp("sdist-source") / "relayd"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__",
            ".pytest_cache", "_trial_temp*", "dropin.cache",
        ),
    )  # fmt: skip
    out = tmp_path_factory.mktemp("sdist")
    isolated = _major("setuptools") < 68
    if importlib.util.find_spec("build") is None:
        pytest.fail("the build package is missing: scripts/test installs relayd[test]")
    args = [sys.executable, "-m", "build", "--sdist", "--outdir", str(out)]
    args += [] if isolated else ["--no-isolation"]
    args.append(str(source))
    result = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    [archive] = list(out.glob("relayd-*.tar.gz"))
    with tarfile.open(archive) as tar:
        # Without the leading relayd-VERSION/ folder.
        yield {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdistCarriesWhatTestsNeed(sdist: set[str]) -> None:
    """
    The sdist holds the licence, the example configs and units, the docs,
    the example policy package and the scripts, not only the code.
    """
    for name in (
        "LICENSE",
        "etc/relayd.toml",
        "etc/dev.toml",
        "etc/relayd.service",
        "docs/sendmail.md",
        "docs/relayctl.md",
        "examples/relayd-policy-example/setup.cfg",
        "scripts/test",
        "scripts/run",
        "tests/ops/test_sendmail.py",
        "relayd/ops/maildrop.py",
    ):
        assert name in sdist, name


def test_metadataDependencies(wheel: zipfile.ZipFile) -> None:
    """
    cryptography (imported directly) is a requirement; redis and the
    Ed25519 DKIM support (PyNaCl through dkimpy[ed25519]) are extras; the
    licence file is in the wheel.
    """
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = wheel.read(name).decode("utf-8")
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    plain = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("cryptography") for r in plain), plain
    assert not any(r.startswith("redis") for r in plain), plain
    assert not any(r.startswith("dkimpy[") for r in plain), plain
    assert any(r.startswith("redis") and 'extra == "redis"' in r for r in requires), requires
    assert any(
        r.startswith("dkimpy[ed25519]") and 'extra == "dkim-ed25519"' in r for r in requires
    ), requires
    assert "Provides-Extra: redis" in metadata
    assert "Provides-Extra: dkim-ed25519" in metadata
    assert any(n.endswith("LICENSE") for n in wheel.namelist())


@pytest.mark.parametrize(
    "command",
    [["relayctl"], ["relayd-sendmail"], ["relayd-passwd"], ["twistd", "relayd"]],
)
def test_version(command: list[str], tmp_path: Path) -> None:
    """Every command prints relayd's version (from the package metadata)."""
    script = Path(sys.executable).with_name(command[0])
    result = subprocess.run(
        [str(script), *command[1:], "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    version = importlib.metadata.version("relayd")
    assert result.stdout.strip().endswith(f"relayd {version}") or result.stdout.strip().endswith(
        f"(relayd) {version}"
    ), result.stdout


def _startWithout(module: str, tmp_path: Path, policies: dict, chain: list) -> str:
    """
    C{twistd -n relayd} in an interpreter where C{module} cannot be
    imported (as when its extra is not installed): what it printed, after
    checking that it exited 1 without a traceback.
    """
    from relayd.testing import TestSetup

    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",), chain=chain, policies=policies)
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from twisted.scripts.twistd import run; "
        f"sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', {setup.configPath!r}]; "
        "run()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    return output


def test_redisExtraMissing(tmp_path: Path) -> None:
    """backend = "redis" without redis-py: one line naming the extra."""
    output = _startWithout(
        "redis",
        tmp_path,
        {
            "ratelimit": {
                "backend": "redis",
                "rules": [{"name": "per-client", "key": "client", "recipients": ["10/hour"]}],
            }
        },
        ["mynetworks", "ratelimit"],
    )
    assert 'policies.ratelimit.backend: "redis" needs the redis package' in output, output
    assert 'pip install "relayd[redis]"' in output


def test_ed25519ExtraMissing(tmp_path: Path) -> None:
    """An Ed25519 DKIM key without PyNaCl: one line naming the extra."""
    import base64
    import os

    key = tmp_path / "ed25519.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    output = _startWithout(
        "nacl",
        tmp_path,
        {"dkim": {"domains": {"example.test": {"selector": "s1", "key": str(key)}}}},
        ["mynetworks", "dkim"],
    )
    assert "needs dkimpy's ed25519 support (PyNaCl)" in output, output
    assert 'pip install "relayd[dkim-ed25519]"' in output
