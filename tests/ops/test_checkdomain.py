"""
C{relayctl check-domain} against a real DNS server (L{relayd.testing.DNSServer}
on loopback, asked through dnspython as the config's C{[delivery] resolvers}
say), with a config whose dkim policy signs with keys made here.

relayd's host name C{relay.example.test} resolves to 192.0.2.10 (the
address relayd sends from); the domain checked is C{example.test}.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.ops import relayctl as ctl
from relayd.testing import DNSServer, TestSetup

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "example.test"
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_ED = ed25519.Ed25519PrivateKey.generate()
_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=1024)


def publicRecord(key: Any) -> str:
    """The DKIM TXT record of C{key}, made here rather than by relayd."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = ctl.main(argv, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


class CheckDomainTests(unittest.TestCase):
    """The checks one by one, through L{ctl.main} in a thread."""

    def setUp(self) -> None:
        self.dns = DNSServer(ttl=1)
        port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.directory = tempfile.mkdtemp(prefix="checkdomain-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        with open(os.path.join(self.directory, "rsa.pem"), "wb") as f:
            f.write(
                _RSA.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        with open(os.path.join(self.directory, "ed.pem"), "wb") as f:
            f.write(
                _ED.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self.setup = TestSetup(
            self.directory,
            modes=("relay",),
            chain=["mynetworks", "dkim"],
            policies={
                "dkim": {
                    "domains": {
                        DOMAIN: [
                            {"selector": "rsa1", "key": "rsa.pem"},
                            {"selector": "ed1", "key": "ed.pem"},
                        ]
                    }
                }
            },
            sections={
                "server": {"hostname": "relay.example.test"},
                "delivery": {"resolvers": ["127.0.0.1"], "resolver_port": port, "dns_timeout": 3},
            },
        )
        d = self.dns
        d.setA("relay.example.test", ["192.0.2.10"])
        d.setTXT(DOMAIN, ["v=spf1 ip4:192.0.2.0/24 -all", "google-site-verification=abc"])
        d.setTXT(f"rsa1._domainkey.{DOMAIN}", [publicRecord(_RSA)])
        d.setTXT(f"ed1._domainkey.{DOMAIN}", [publicRecord(_ED)])
        d.setTXT(f"_dmarc.{DOMAIN}", ["v=DMARC1; p=reject; adkim=s; aspf=r"])
        d.setTXT(f"_mta-sts.{DOMAIN}", ["v=STSv1; id=20260101T000000;"])
        d.setTXT(f"_smtp._tls.{DOMAIN}", ["v=TLSRPTv1; rua=mailto:tls@example.test"])

    def check(self, *args: str) -> defer.Deferred[tuple[int, str, str]]:
        return deferToThread(
            run, ["--config", self.setup.configPath, "check-domain", DOMAIN, *args]
        )

    @defer.inlineCallbacks
    def findings(self, *args: str) -> Any:
        """The findings as JSON, and the exit status."""
        status, out, err = yield self.check("--json", *args)
        self.assertEqual(err, "")
        return status, json.loads(out)

    def only(self, findings: list[dict[str, Any]], check: str) -> list[dict[str, Any]]:
        return [f for f in findings if f["check"] == check]

    @defer.inlineCallbacks
    def test_allGood(self) -> Any:
        """
        Everything published right: one ok line per finding, exit status 0.
        """
        status, out, err = yield self.check()
        self.assertEqual((status, err), (0, ""), out)
        lines = out.splitlines()
        self.assertEqual(
            lines,
            [
                (
                    "ok    spf: example.test authorises 192.0.2.10 (pass, by ip4:192.0.2.0/24 "
                    "(in the record of example.test); 0 of 10 DNS lookups)"
                ),
                (
                    "ok    dkim: rsa1._domainkey.example.test matches relayd's rsa key "
                    "(d=example.test)"
                ),
                (
                    "ok    dkim: ed1._domainkey.example.test matches relayd's ed25519 key "
                    "(d=example.test)"
                ),
                (
                    "ok    dmarc: _dmarc.example.test (p=reject): relayd's mail aligns through "
                    "DKIM (d=example.test, adkim=s) and SPF (example.test, aspf=r) "
                    "(assuming From: and envelope sender domain example.test)"
                ),
                (
                    "ok    mta-sts: _mta-sts.example.test is well formed "
                    "(v=STSv1; id=20260101T000000;); the policy at "
                    "https://mta-sts.example.test/.well-known/mta-sts.txt was not fetched"
                ),
                (
                    "ok    tlsrpt: _smtp._tls.example.test is well formed "
                    "(v=TLSRPTv1; rua=mailto:tls@example.test)"
                ),
            ],
        )

    @defer.inlineCallbacks
    def test_spfIncludeAndMX(self) -> Any:
        """
        C{include:} and C{mx} are followed: an address in the included
        record passes, and so does the MX host's address.  The record is
        published as two character-strings, joined without a space.
        """
        self.dns.setTXT(DOMAIN, [["v=spf1 mx include:_spf.prov", "ider.test -all"]])
        self.dns.setTXT("_spf.provider.test", ["v=spf1 ip4:192.0.2.10 ~all"])
        self.dns.setMX(DOMAIN, [(10, "mx.example.test")])
        self.dns.setA("mx.example.test", ["198.51.100.7"])
        status, findings = yield self.findings(
            "--address", "192.0.2.10", "--address", "198.51.100.7"
        )
        self.assertEqual(status, 0, findings)
        spf = self.only(findings, "spf")
        self.assertEqual([f["status"] for f in spf], ["ok", "ok"])
        self.assertIn(
            "by ip4:192.0.2.10 (in the record of _spf.provider.test), through "
            "include:_spf.provider.test (in the record of example.test); 2 of 10",
            spf[0]["what"],
        )
        self.assertIn(
            "198.51.100.7 (pass, by mx (in the record of example.test); 1 of 10", spf[1]["what"]
        )

    @defer.inlineCallbacks
    def test_spfFail(self) -> Any:
        """
        An address the record does not cover fails, with the term to add
        and the record with it; exit status 1.  DMARC still passes through
        DKIM.
        """
        self.dns.setTXT(DOMAIN, ["v=spf1 ip4:198.51.100.0/24 -all"])
        status, out, _err = yield self.check()
        self.assertEqual(status, 1)
        self.assertIn(
            "fail  spf: example.test does not authorise 192.0.2.10 (fail, by -all (in the "
            'record of example.test))  [fix: add "ip4:192.0.2.10" to the SPF record of '
            'example.test: "v=spf1 ip4:192.0.2.10 ip4:198.51.100.0/24 -all"]',
            out.splitlines(),
        )
        self.assertIn(
            "ok    dmarc: _dmarc.example.test (p=reject): relayd's mail aligns through "
            "DKIM (d=example.test, adkim=s) (assuming",
            out,
        )

    @defer.inlineCallbacks
    def test_spfSoftfailIPv6(self) -> Any:
        """
        An IPv6 address of the host name is checked too; softfail is a
        warning, the fix names C{ip6:}.
        """
        self.dns.setAAAA("relay.example.test", ["2001:db8::10"])
        self.dns.setTXT(DOMAIN, ["v=spf1 ip4:192.0.2.10 ~all"])
        status, findings = yield self.findings()
        self.assertEqual(status, 0, findings)
        spf = self.only(findings, "spf")
        self.assertEqual([f["status"] for f in spf], ["ok", "warn"])
        self.assertEqual(
            spf[1]["fix"],
            'add "ip6:2001:db8::10" to the SPF record of example.test: '
            '"v=spf1 ip6:2001:db8::10 ip4:192.0.2.10 ~all"',
        )

    @defer.inlineCallbacks
    def test_spfTooManyLookups(self) -> Any:
        """
        Eleven C{include:} terms: the eleventh is not even looked up, and
        the result is a permerror (RFC 7208 section 4.6.4).
        """
        includes = " ".join(f"include:i{n}.example.test" for n in range(1, 12))
        self.dns.setTXT(DOMAIN, [f"v=spf1 {includes} ip4:192.0.2.10 -all"])
        for n in range(1, 12):
            self.dns.setTXT(f"i{n}.example.test", [f"v=spf1 ip4:198.51.100.{n} -all"])
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [spf] = self.only(findings, "spf")
        self.assertEqual(spf["status"], "fail")
        self.assertIn("permerror for 192.0.2.10: more than 10 DNS-querying terms", spf["what"])
        self.assertIn("flatten", spf["fix"])
        self.assertEqual(self.dns.queryCount("i10.example.test", "TXT"), 1)
        self.assertEqual(self.dns.queryCount("i11.example.test", "TXT"), 0)
        # SPF does not pass, DKIM does: DMARC still aligns.
        [dmarc] = self.only(findings, "dmarc")
        self.assertEqual(dmarc["status"], "ok")

    @defer.inlineCallbacks
    def test_spfVoidLookups(self) -> Any:
        """Three terms naming domains without addresses: permerror."""
        self.dns.setTXT(
            DOMAIN,
            ["v=spf1 a:n1.example.test a:n2.example.test mx:n3.example.test ip4:192.0.2.10 -all"],
        )
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [spf] = self.only(findings, "spf")
        self.assertIn("more than 2 void lookups (at mx:n3.example.test", spf["what"])

    @defer.inlineCallbacks
    def test_spfRedirectAndMacro(self) -> Any:
        """C{redirect=} with a macro in it is followed."""
        self.dns.setTXT(DOMAIN, ["v=spf1 redirect=_spf.%{d}"])
        self.dns.setTXT("_spf.example.test", ["v=spf1 a:%{h} -all"])
        status, findings = yield self.findings()
        self.assertEqual(status, 0, findings)
        [spf] = self.only(findings, "spf")
        self.assertIn("by a:%{h} (in the record of _spf.example.test); 2 of 10", spf["what"])

    @defer.inlineCallbacks
    def test_spfExistsAndPTR(self) -> Any:
        """
        C{exists:} with the C{%{ir}} macro (the address reversed) matches
        when the name has an A record; C{ptr} matches a validated reverse
        name under the domain.
        """
        self.dns.setTXT(DOMAIN, ["v=spf1 exists:%{ir}._spf.%{d} ptr -all"])
        self.dns.setA("10.2.0.192._spf.example.test", ["127.0.0.2"])
        self.dns.setPTR("198.51.100.20", ["out.example.test"])
        self.dns.setA("out.example.test", ["198.51.100.20"])
        self.dns.setPTR("198.51.100.21", ["out.elsewhere.test"])
        self.dns.setA("out.elsewhere.test", ["198.51.100.21"])
        status, findings = yield self.findings(
            "--address", "192.0.2.10", "--address", "198.51.100.20", "--address", "198.51.100.21"
        )
        self.assertEqual(status, 1, findings)
        spf = self.only(findings, "spf")
        self.assertIn("by exists:%{ir}._spf.%{d} (in the record of example.test)", spf[0]["what"])
        self.assertIn("by ptr (in the record of example.test)", spf[1]["what"])
        self.assertEqual(spf[2]["status"], "fail")
        self.assertIn("198.51.100.21 (fail, by -all", spf[2]["what"])

    @defer.inlineCallbacks
    def test_spfMissingAndDouble(self) -> Any:
        """No SPF record: fail, publish one; two records: permerror."""
        self.dns.setTXT(DOMAIN, ["google-site-verification=abc"])
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [spf] = self.only(findings, "spf")
        self.assertEqual(spf["fix"], 'publish TXT "v=spf1 ip4:192.0.2.10 ~all" at example.test')
        self.dns.setTXT(DOMAIN, ["v=spf1 -all", "v=spf1 ip4:192.0.2.10 -all"])
        status, findings = yield self.findings()
        [spf] = self.only(findings, "spf")
        self.assertIn("permerror", spf["what"])
        self.assertIn("has 2 v=spf1 records", spf["what"])

    @defer.inlineCallbacks
    def test_spfServfail(self) -> Any:
        """A name server failing: temperror, a failure."""
        self.dns.setServfail(DOMAIN)
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [spf] = self.only(findings, "spf")
        self.assertIn("temperror", spf["what"])

    @defer.inlineCallbacks
    def test_dkimMismatchAndMissing(self) -> Any:
        """
        Another key at the RSA selector: mismatch, with the record to
        publish instead; nothing at the Ed25519 selector: missing, with the
        exact record.
        """
        self.dns.setTXT(f"rsa1._domainkey.{DOMAIN}", [publicRecord(_OTHER)])
        self.dns.remove(f"ed1._domainkey.{DOMAIN}")
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        rsaFinding, edFinding = self.only(findings, "dkim")
        self.assertEqual(rsaFinding["status"], "fail")
        self.assertIn("publishes another key", rsaFinding["what"])
        self.assertEqual(
            rsaFinding["fix"],
            f'replace it by TXT "{publicRecord(_RSA)}" at rsa1._domainkey.example.test '
            "(as several strings of at most 255 octets in one record)",
        )
        self.assertEqual(edFinding["status"], "fail")
        self.assertEqual(edFinding["what"], "no key published at ed1._domainkey.example.test")
        self.assertEqual(
            edFinding["fix"], f'publish TXT "{publicRecord(_ED)}" at ed1._domainkey.example.test'
        )
        # SPF still passes and aligns: DMARC passes.
        [dmarc] = self.only(findings, "dmarc")
        self.assertEqual(dmarc["status"], "ok")

    @defer.inlineCallbacks
    def test_dkimRevokedAndSelector(self) -> Any:
        """
        C{--selector} narrows the check to one key; an empty C{p=} is a
        revoked key.
        """
        self.dns.setTXT(f"ed1._domainkey.{DOMAIN}", ["v=DKIM1; k=ed25519; p="])
        status, findings = yield self.findings("--selector", "ed1")
        self.assertEqual(status, 1)
        [dkim] = self.only(findings, "dkim")
        self.assertEqual(dkim["what"], "ed1._domainkey.example.test: the key is revoked (empty p=)")
        status, findings = yield self.findings("--selector", "rsa1")
        self.assertEqual(status, 0, findings)

    @defer.inlineCallbacks
    def test_dkimTestingAndDouble(self) -> Any:
        """
        The right key in testing mode (t=y) is a warning; two records at
        one selector a failure.
        """
        self.dns.setTXT(f"ed1._domainkey.{DOMAIN}", [publicRecord(_ED) + "; t=y"])
        self.dns.setTXT(f"rsa1._domainkey.{DOMAIN}", [publicRecord(_RSA), publicRecord(_OTHER)])
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        rsaFinding, edFinding = self.only(findings, "dkim")
        self.assertEqual(rsaFinding["status"], "fail")
        self.assertIn("has 2 TXT records", rsaFinding["what"])
        self.assertEqual(edFinding["status"], "warn")
        self.assertIn("testing mode (t=y)", edFinding["what"])

    @defer.inlineCallbacks
    def test_dmarcMissing(self) -> Any:
        """
        No DMARC record, here or at the organisational domain: a warning
        (exit status 0) with a record to start from.
        """
        self.dns.remove(f"_dmarc.{DOMAIN}")
        status, findings = yield self.findings()
        self.assertEqual(status, 0)
        [dmarc] = self.only(findings, "dmarc")
        self.assertEqual(dmarc["status"], "warn")
        self.assertEqual(
            dmarc["fix"],
            'publish TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.test" '
            "at _dmarc.example.test",
        )

    @defer.inlineCallbacks
    def test_dmarcNotAligned(self) -> Any:
        """
        Neither SPF nor DKIM pass: with p=reject that fails, with p=none it
        is a warning.  The record of a subdomain is taken from the
        organisational domain (sp= applies).
        """
        self.dns.setTXT(DOMAIN, ["v=spf1 -all"])
        self.dns.setTXT(f"rsa1._domainkey.{DOMAIN}", [publicRecord(_OTHER)])
        self.dns.remove(f"ed1._domainkey.{DOMAIN}")
        _, findings = yield self.findings()
        [dmarc] = self.only(findings, "dmarc")
        self.assertEqual(dmarc["status"], "fail")
        self.assertIn("relayd's mail would fail DMARC", dmarc["what"])
        self.dns.setTXT(f"_dmarc.{DOMAIN}", ["v=DMARC1; p=none"])
        _status, findings = yield self.findings()
        [dmarc] = self.only(findings, "dmarc")
        self.assertEqual(dmarc["status"], "warn")

    @defer.inlineCallbacks
    def test_dmarcOrganizationalDomain(self) -> Any:
        """
        A subdomain without its own record gets the organisational
        domain's, with sp=; relaxed DKIM alignment takes the parent's
        signature (the dkim key has subdomains = true).
        """
        self.dns.setTXT(f"_dmarc.{DOMAIN}", ["v=DMARC1; p=reject; sp=quarantine"])
        self.dns.setTXT("news.example.test", ["v=spf1 -all"])
        _status, out, _err = yield deferToThread(
            run,
            [
                "--config",
                self.setup.configPath,
                "check-domain",
                "news.example.test",
                "--json",
            ],
        )
        findings = json.loads(out)
        [dmarc] = self.only(findings, "dmarc")
        # relayd has no key for news.example.test (no subdomains = true):
        # no DKIM, SPF fails: quarantine applies.
        self.assertEqual(dmarc["status"], "fail")
        self.assertIn(
            "_dmarc.example.test (p=quarantine, inherited from the organisational domain)",
            dmarc["what"],
        )

    @defer.inlineCallbacks
    def test_dmarcPublicSuffix(self) -> Any:
        """
        Under a multi-label public suffix the organisational domain comes
        from the Public Suffix List: mail.example.co.uk inherits
        _dmarc.example.co.uk, never _dmarc.co.uk ("the last two labels").
        """
        self.dns.setTXT("_dmarc.co.uk", ["v=DMARC1; p=none"])
        self.dns.setTXT("_dmarc.example.co.uk", ["v=DMARC1; p=reject; sp=quarantine"])
        self.dns.setTXT("mail.example.co.uk", ["v=spf1 -all"])
        _status, out, _err = yield deferToThread(
            run,
            ["--config", self.setup.configPath, "check-domain", "mail.example.co.uk", "--json"],
        )
        [dmarc] = self.only(json.loads(out), "dmarc")
        self.assertIn(
            "_dmarc.example.co.uk (p=quarantine, inherited from the organisational domain)",
            dmarc["what"],
        )

    @defer.inlineCallbacks
    def test_dmarcWithoutPublicSuffixList(self) -> Any:
        """
        Without the list file: the last two labels, and a warning line
        that says so and what to install.
        """
        from relayd.ops import publicsuffix

        self.patch(publicsuffix, "DEFAULT_PATH", os.path.join(self.directory, "absent.dat"))
        publicsuffix.default.cache_clear()
        self.addCleanup(publicsuffix.default.cache_clear)
        self.dns.setTXT("_dmarc.co.uk", ["v=DMARC1; p=none"])
        self.dns.setTXT("mail.example.co.uk", ["v=spf1 -all"])
        _status, out, _err = yield deferToThread(
            run, ["--config", self.setup.configPath, "check-domain", "mail.example.co.uk"]
        )
        self.assertIn(
            "warn  dmarc: no Public Suffix List at "
            f"{publicsuffix.DEFAULT_PATH}: the organisational domain is taken as the last "
            "two labels",
            out,
        )
        self.assertIn("[fix: install Debian's publicsuffix package]", out)
        self.assertIn("_dmarc.co.uk (p=none, inherited from the organisational domain)", out)

    @defer.inlineCallbacks
    def test_dmarcMalformed(self) -> Any:
        self.dns.setTXT(f"_dmarc.{DOMAIN}", ["v=DMARC1; p=block"])
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [dmarc] = self.only(findings, "dmarc")
        self.assertIn("p=block (must be one of none, quarantine, reject)", dmarc["what"])

    @defer.inlineCallbacks
    def test_mtaSTSAndTLSRPTBroken(self) -> Any:
        """Malformed MTA-STS and TLSRPT records fail, with a record to publish."""
        self.dns.setTXT(f"_mta-sts.{DOMAIN}", ["v=STSv1; id=2026-01-01;"])
        self.dns.setTXT(f"_smtp._tls.{DOMAIN}", ["v=TLSRPTv1; rua=tls@example.test"])
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [sts] = self.only(findings, "mta-sts")
        self.assertEqual(sts["status"], "fail")
        self.assertIn("id= must appear once, 1 to 32 letters and digits", sts["what"])
        [tlsrpt] = self.only(findings, "tlsrpt")
        self.assertEqual(tlsrpt["status"], "fail")
        self.assertIn("is not a mailto: or https: URI", tlsrpt["what"])
        self.assertEqual(
            tlsrpt["fix"],
            'publish one TXT "v=TLSRPTv1; rua=mailto:tls-reports@example.test" '
            "at _smtp._tls.example.test",
        )

    @defer.inlineCallbacks
    def test_mtaSTSAndTLSRPTAbsent(self) -> Any:
        """Both are optional: absent is fine."""
        self.dns.remove(f"_mta-sts.{DOMAIN}")
        self.dns.remove(f"_smtp._tls.{DOMAIN}")
        status, findings = yield self.findings()
        self.assertEqual(status, 0, findings)
        self.assertEqual(
            [f["status"] for f in findings if f["check"] in ("mta-sts", "tlsrpt")], ["ok", "ok"]
        )

    @defer.inlineCallbacks
    def test_hostnameWithoutAddress(self) -> Any:
        """
        relayd's host name has no address: SPF cannot be checked, which
        fails and says to give --address.
        """
        self.dns.remove("relay.example.test")
        status, findings = yield self.findings()
        self.assertEqual(status, 1)
        [spf] = self.only(findings, "spf")
        self.assertIn("cannot tell which addresses relayd sends from", spf["what"])
        self.assertIn("--address", spf["fix"])

    @defer.inlineCallbacks
    def test_smartHost(self) -> Any:
        """
        With every message routed through a smart host, the SPF findings
        start with a warning that receivers see the smart host's addresses.
        """
        self.setup.routeAllTo(587, host="smtp.provider.test", tls="required")
        status, findings = yield self.findings()
        self.assertEqual(status, 0, findings)
        self.assertEqual(findings[0]["status"], "warn")
        self.assertIn(
            "all mail leaves through the smart host smtp.provider.test", findings[0]["what"]
        )
        self.assertEqual(findings[1]["status"], "ok")

    @defer.inlineCallbacks
    def test_dkimNotInChain(self) -> Any:
        """Keys configured but dkim not in the chain: relayd signs nothing."""
        with open(self.setup.configPath) as f:
            text = f.read()
        with open(self.setup.configPath, "w") as f:
            f.write(text.replace('chain = ["mynetworks", "dkim"]', 'chain = ["mynetworks"]'))
        _status, findings = yield self.findings()
        [dkim] = self.only(findings, "dkim")
        self.assertEqual(dkim["status"], "warn")
        self.assertIn("dkim is not in [policy] chain", dkim["what"])
        # Without DKIM, SPF alone aligns.
        [dmarc] = self.only(findings, "dmarc")
        self.assertIn("aligns through SPF (example.test, aspf=r)", dmarc["what"])

    @defer.inlineCallbacks
    def test_internationalizedDomain(self) -> Any:
        """A domain given in Unicode is looked up by its A-labels."""
        self.dns.setTXT("xn--bcher-kva.test", ["v=spf1 ip4:192.0.2.10 -all"])
        _status, out, _err = yield deferToThread(
            run, ["--config", self.setup.configPath, "check-domain", "BÜCHER.test"]
        )
        self.assertIn("ok    spf: xn--bcher-kva.test authorises 192.0.2.10", out)

    @defer.inlineCallbacks
    def test_usage(self) -> Any:
        """A bad domain or address is a usage error (2)."""
        status, _, err = yield deferToThread(
            run, ["--config", self.setup.configPath, "check-domain", "not a domain"]
        )
        self.assertEqual(status, 2)
        status, _out, err = yield self.check("--address", "relay.example.test")
        self.assertEqual(status, 2)
        self.assertIn("not an IP address", err)

    @defer.inlineCallbacks
    def test_subprocess(self) -> Any:
        """
        relayctl as a real process, as an operator runs it: the same
        findings as JSON, exit status 1 on a failure.
        """
        self.dns.setTXT(DOMAIN, ["v=spf1 ip4:198.51.100.0/24 -all"])
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = yield deferToThread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "relayd.ops.relayctl",
                "--config",
                self.setup.configPath,
                "check-domain",
                DOMAIN,
                "--json",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        findings = json.loads(result.stdout)
        self.assertEqual(
            [(f["check"], f["status"]) for f in findings],
            [
                ("spf", "fail"),
                ("dkim", "ok"),
                ("dkim", "ok"),
                ("dmarc", "ok"),
                ("mta-sts", "ok"),
                ("tlsrpt", "ok"),
            ],
        )
        self.assertEqual(set(findings[0]), {"status", "check", "what", "fix"})


class DNSServerTXTTests(unittest.TestCase):
    """The test DNS server's TXT records, as dnspython reads them."""

    def setUp(self) -> None:
        self.dns = DNSServer()
        self.port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)

    def strings(self, name: str) -> defer.Deferred[list[list[bytes]]]:
        def ask() -> list[list[bytes]]:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            resolver.port = self.port
            resolver.lifetime = 5
            return sorted(list(r.strings) for r in resolver.resolve(name, "TXT"))

        return deferToThread(ask)

    @defer.inlineCallbacks
    def test_severalStrings(self) -> Any:
        """
        A record given as a list keeps its character-strings as given; a
        long string is split at 255 octets.
        """
        self.dns.setTXT("t.test", [["v=spf1 ", "-all"], "x" * 300])
        strings = yield self.strings("t.test")
        self.assertEqual(strings, [[b"v=spf1 ", b"-all"], [b"x" * 255, b"x" * 45]])

    def test_tooLong(self) -> None:
        self.assertRaises(ValueError, self.dns.setTXT, "t.test", [["x" * 256]])
