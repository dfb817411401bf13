"""
L{relayd.ops.publicsuffix}: the Public Suffix List's algorithm (normal,
wildcard and exception rules, https://publicsuffix.org/list/) on the list
Debian's C{publicsuffix} package installs, and on small lists written here
so that each rule kind is tested whatever the installed list says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.ops import publicsuffix
from relayd.ops.publicsuffix import PublicSuffixList

SMALL = """\
// a comment line, then rules
uk
co.uk
*.ck
!www.ck
*.kawasaki.jp
!city.kawasaki.jp
jp
// Unicode rule: kept in A-label form too
公司.cn
cn
"""


@pytest.fixture
def small() -> PublicSuffixList:
    return PublicSuffixList(SMALL.splitlines())


def test_multiLabelSuffix(small: PublicSuffixList) -> None:
    """co.uk is a suffix: the organisational domain of mail.example.co.uk is example.co.uk."""
    assert small.publicSuffix("mail.example.co.uk") == "co.uk"
    assert small.organizationalDomain("mail.example.co.uk") == "example.co.uk"
    assert small.organizationalDomain("Example.CO.UK.") == "example.co.uk"
    # The longest matching rule wins over uk.
    assert small.organizationalDomain("example.uk") == "example.uk"


def test_wildcard(small: PublicSuffixList) -> None:
    """*.ck: every name directly under ck is a suffix."""
    assert small.publicSuffix("shop.example.ck") == "example.ck"
    assert small.organizationalDomain("a.shop.example.ck") == "shop.example.ck"
    assert small.organizationalDomain("x.y.kawasaki.jp") == "x.y.kawasaki.jp"
    assert small.organizationalDomain("a.x.y.kawasaki.jp") == "x.y.kawasaki.jp"


def test_exception(small: PublicSuffixList) -> None:
    """!www.ck: www.ck is registrable although *.ck matches it."""
    assert small.publicSuffix("www.ck") == "ck"
    assert small.organizationalDomain("mail.www.ck") == "www.ck"
    assert small.organizationalDomain("www.city.kawasaki.jp") == "city.kawasaki.jp"


def test_implicitRuleAndSuffixItself(small: PublicSuffixList) -> None:
    """No rule: the implicit '*' (one label); a suffix is its own organisational domain."""
    assert small.organizationalDomain("news.example.test") == "example.test"
    assert small.organizationalDomain("co.uk") == "co.uk"
    assert small.organizationalDomain("test") == "test"


def test_unicodeRule(small: PublicSuffixList) -> None:
    """A rule in Unicode matches the A-label form relayd uses."""
    assert small.organizationalDomain("mail.example.xn--55qx5d.cn") == "example.xn--55qx5d.cn"


def test_debianList() -> None:
    """The installed list (scripts/test installs it) gives the same answers."""
    suffixes = publicsuffix.load()
    assert suffixes is not None, f"{publicsuffix.DEFAULT_PATH} missing: install publicsuffix"
    assert suffixes.organizationalDomain("mail.example.co.uk") == "example.co.uk"
    assert suffixes.organizationalDomain("a.b.example.ck") == "b.example.ck"
    assert suffixes.organizationalDomain("mail.www.ck") == "www.ck"
    assert suffixes.organizationalDomain("www.city.kawasaki.jp") == "city.kawasaki.jp"
    assert suffixes.organizationalDomain("mail.example.com") == "example.com"


def test_missingFile(tmp_path: Path) -> None:
    """No file: None, so that the caller falls back and warns."""
    assert publicsuffix.load(str(tmp_path / "absent.dat")) is None
