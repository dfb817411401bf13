"""
C{dkim}: DKIM-sign mail before it is queued (RFC 6376; Ed25519: RFC 8463).

A message modifier (L{IMessageModifier}): it runs once the checks have let
the message through, whatever they answered (an C{ACCEPT} cannot skip it),
and decides nothing.  It picks the signing domain from the C{From:}
header (the domain DMARC aligns with, RFC 7489 section 3.1), or from the
envelope sender when the message has no address in C{From:}, and when
that domain (or, with C{subdomains}, a parent of it) has keys, adds one
C{DKIM-Signature:} field per key at the top of the header section.  Mail
from a domain without a key passes unsigned.  It must be the last
modifier of the chain (where the checks are does not matter): it signs
the message as the earlier modifiers left it, and an edit after it would
break the signature.

Signing reads the whole message, so it runs in the policy's own small
thread pool; keys are read and checked when the config is loaded (a key
that cannot be read or used stops startup with one line naming its option
and file) and again on SIGHUP (L{IReloadable}), so a key file replaced in
place is picked up.

Options (C{[policies.dkim]}):
  - C{domains} (required): a table from signing domain to a key table, or
    to a list of key tables (several signatures, e.g. RSA and Ed25519 side
    by side as RFC 8463 section 6 suggests).  A key table has:
      - C{selector}: the DNS selector (the key is published at
        C{SELECTOR._domainkey.DOMAIN}).
      - C{key}: the private key file: PEM (PKCS#1 or PKCS#8, RSA of at
        least 1024 bits (RFC 8301 section 3.2) or Ed25519), or the base64
        Ed25519 seed that dkimpy's C{dknewkey} writes.  Relative paths are
        taken from the config file's folder.
      - C{subdomains}: also sign mail from any subdomain with this domain
        (C{d=} is then the configured domain); default false.
  - C{sign_headers}: the fields to sign, each as many times as it occurs;
    default L{DEFAULT_SIGN_HEADERS}.  Must include C{From}.
  - C{oversign}: fields signed once more than they occur, so that none
    can be added after signing (RFC 6376 section 8.15); default
    C{["From"]}.
  - C{canonicalization}: C{"header/body"}, each C{relaxed} or C{simple};
    default C{"relaxed/relaxed"}.
  - C{sessions}: C{"all"} (default) or C{"authenticated"}: sign only
    mail from sessions that passed SMTP AUTH.
  - C{threads}: size of the signing thread pool; default 2.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, replace
from typing import Any

# dkimpy ships no type hints (no py.typed, no stubs package).
import dkim  # type: ignore[import-untyped]
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayd.plugin import (
    Envelope,
    Headers,
    IMessageModifier,
    IPolicyLifecycle,
    IReloadable,
    Message,
    PolicyContext,
    PolicyOptionError,
    SessionView,
    normalDomain,
)
from relayd.policies.headers import addressDomains

__all__ = ["DKIMSign", "SigningKey", "loadKey", "DEFAULT_SIGN_HEADERS"]

log = Logger(namespace="relayd.policies.dkim")

DEFAULT_SIGN_HEADERS = (
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
"""
RFC 6376 section 5.4.1's list, plus C{Message-ID}, the MIME fields and
C{List-Unsubscribe-Post} (which RFC 8058 section 4 requires signed).
"""

_NEVER_SIGN = frozenset(h.decode("ascii") for h in dkim.DKIM.SHOULD_NOT)
"""Fields RFC 6376 section 5.4 says not to sign (trace fields and the like)."""

_CANONICALIZATIONS = ("relaxed", "simple")
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]{2,63}$")
_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*$")
_KNOWN = ("domains", "sign_headers", "oversign", "canonicalization", "sessions", "threads")
_PROBE = b"From: probe@example.com\r\nSubject: probe\r\n\r\nprobe\r\n"


@dataclass(frozen=True)
class SigningKey:
    """
    A parsed private key, ready for dkimpy.

    @ivar algorithm: C{b"rsa-sha256"} or C{b"ed25519-sha256"}.
    @ivar private: what C{dkim.sign} takes: PKCS#1 PEM for RSA, the base64
        seed for Ed25519.
    @ivar public: the public key as it goes in the DNS record's C{p=} tag
        (base64 SubjectPublicKeyInfo for RSA, the base64 raw key for
        Ed25519: RFC 8463 section 4.2).
    """

    algorithm: bytes
    private: bytes
    public: str

    @property
    def keyType(self) -> str:
        """The C{k=} tag: C{rsa} or C{ed25519}."""
        return "rsa" if self.algorithm == b"rsa-sha256" else "ed25519"

    def dnsRecord(self) -> str:
        """The TXT record to publish at C{SELECTOR._domainkey.DOMAIN}."""
        return f"v=DKIM1; k={self.keyType}; p={self.public}"


def loadKey(data: bytes) -> SigningKey:
    """
    Parse a private key file's contents.

    @raise ValueError: with a short reason, when it is not an unencrypted
        RSA (1024 bits or more) or Ed25519 key.
    """
    text = data.strip()
    if not text.startswith(b"-----BEGIN"):
        try:
            seed = base64.b64decode(text, validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError("not a PEM private key nor a base64 Ed25519 seed")
        key: Any = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    else:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ValueError("the key is encrypted; give it without a passphrase") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"not a valid PEM private key ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise ValueError(f"RSA key of {key.key_size} bits; RFC 8301 wants 1024 or more")
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return SigningKey(b"rsa-sha256", private, base64.b64encode(public).decode("ascii"))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return SigningKey(
            b"ed25519-sha256", base64.b64encode(seed), base64.b64encode(public).decode("ascii")
        )
    kind = type(key).__name__.lstrip("_")
    raise ValueError(f"unsupported key type ({kind}); DKIM signs with RSA or Ed25519 keys")


@dataclass(frozen=True)
class _Signer:
    """One configured key of a domain."""

    domain: str
    selector: str
    path: str
    option: str
    subdomains: bool
    key: SigningKey


@implementer(IMessageModifier, IPolicyLifecycle, IReloadable)
class DKIMSign:
    """
    The C{dkim} policy (see the module docstring for its options).
    """

    name = "dkim"

    def __init__(
        self,
        signers: tuple[_Signer, ...],
        *,
        signHeaders: tuple[str, ...] = DEFAULT_SIGN_HEADERS,
        oversign: tuple[str, ...] = ("From",),
        canonicalization: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
        authenticatedOnly: bool = False,
        threads: int = 2,
    ) -> None:
        self.signers = signers
        self.signHeaders = tuple(dict.fromkeys(h.lower() for h in signHeaders))
        self.oversign = frozenset(h.lower() for h in oversign)
        self.canonicalization = canonicalization
        self.authenticatedOnly = authenticatedOnly
        self.threads = threads
        self._pool: ThreadPool | None = None
        self._reactor: Any = None

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> DKIMSign:
        """
        Build the policy from C{[policies.dkim]}, reading every key.

        @raise PolicyOptionError: for an unknown option, a bad value, or a
            key file that cannot be read or used (naming the key's option,
            e.g. C{domains."example.com".key}, and the file).
        """
        for key in options:
            if key not in _KNOWN:
                raise PolicyOptionError(key, f"unknown option (known: {', '.join(_KNOWN)})")
        signHeaders = _names(options, "sign_headers", DEFAULT_SIGN_HEADERS)
        if "from" not in (h.lower() for h in signHeaders):
            raise PolicyOptionError("sign_headers", "must include From (RFC 6376 section 5.4)")
        oversign = _names(options, "oversign", ("From",))
        canon = options.get("canonicalization", "relaxed/relaxed")
        parts = canon.split("/") if isinstance(canon, str) else []
        if len(parts) != 2 or any(p not in _CANONICALIZATIONS for p in parts):
            raise PolicyOptionError(
                "canonicalization",
                f'must be like "relaxed/relaxed" or "relaxed/simple", not {canon!r}',
            )
        sessions = options.get("sessions", "all")
        if sessions not in ("all", "authenticated"):
            raise PolicyOptionError(
                "sessions", f'must be "all" or "authenticated", not {sessions!r}'
            )
        threads = options.get("threads", 2)
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            raise PolicyOptionError("threads", "must be a whole number from 1 to 64")
        policy = cls(
            _signers(options.get("domains"), context),
            signHeaders=signHeaders,
            oversign=oversign,
            canonicalization=(parts[0].encode("ascii"), parts[1].encode("ascii")),
            authenticatedOnly=sessions == "authenticated",
            threads=threads,
        )
        for signer in policy.signers:
            try:
                policy._signWith(signer, _PROBE, ["from", "subject"])
            except (dkim.DKIMException, ValueError) as e:
                raise PolicyOptionError(
                    signer.option, f"{signer.path}: cannot sign with this key: {e}"
                ) from None
        return policy

    def startPolicy(self, reactor: Any) -> None:
        """Start the signing thread pool."""
        self._reactor = reactor
        self._pool = ThreadPool(0, self.threads, "relayd-dkim")
        self._pool.start()

    def stopPolicy(self) -> None:
        """Stop the pool; signatures in progress finish first."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def reload(self) -> Deferred[None]:
        """
        Read the key files again (SIGHUP), in the pool: a key replaced in
        place is used from now on.  Any unusable key keeps all the old
        ones (the error is logged by the caller).
        """

        def read() -> tuple[_Signer, ...]:
            return tuple(replace(s, key=_readKey(s.path, s.option)) for s in self.signers)

        def swap(signers: tuple[_Signer, ...]) -> None:
            self.signers = signers
            log.info("dkim: {count} keys read again", count=len(signers))

        return self._inPool(read).addCallback(swap)

    def _inPool(self, f: Any, *args: Any) -> Deferred[Any]:
        if self._pool is None:
            raise RuntimeError("the dkim policy was not started (startPolicy)")
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def signersFor(self, domain: str) -> list[_Signer]:
        """
        The keys that sign mail from C{domain}: those of C{domain} itself,
        else those of the nearest parent domain configured with
        C{subdomains}.
        """
        domain = _asciiDomain(domain)
        exact = [s for s in self.signers if s.domain == domain]
        if exact:
            return exact
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            found = [s for s in self.signers if s.domain == parent and s.subdomains]
            if found:
                return found
        return []

    def modifyMessage(
        self, session: SessionView, envelope: Envelope, message: Message
    ) -> Deferred[None]:
        """
        Sign the message when its domain has keys.  A message that cannot
        be signed is logged and goes on unsigned.
        """
        queueId = envelope.queueId
        if self.authenticatedOnly and session.user is None:
            return succeed(None)
        domain = _fromDomain(message.headers) or envelope.sender.domain
        signers = self.signersFor(domain) if domain else []
        if not signers:
            log.debug(
                "{queue_id}: dkim: no key for {domain!r}; not signed",
                queue_id=queueId,
                domain=domain,
            )
            return succeed(None)
        if not message.hasSeparator and message.bodyOffset < message.receivedSize:
            log.warn(
                "{queue_id}: dkim: no empty line after the header section; not signed",
                queue_id=queueId,
            )
            return succeed(None)
        include = self._includeHeaders([f.name for f in message.headers])

        def sign() -> list[bytes]:
            data = message.asBytes()
            return [self._signWith(s, data, include) for s in signers]

        def signed(signatures: list[bytes]) -> None:
            for signature in reversed(signatures):  # the first key's ends up on top
                message.headers.addRaw(signature, top=True)
            log.info(
                "{queue_id}: dkim: signed d={domain} s={selectors}",
                queue_id=queueId,
                domain=signers[0].domain,
                selectors=",".join(s.selector for s in signers),
            )

        def failed(failure: Failure) -> None:
            failure.trap(dkim.DKIMException)
            log.warn(
                "{queue_id}: dkim: cannot sign this message ({error}); not signed",
                queue_id=queueId,
                error=str(failure.value),
            )

        return self._inPool(sign).addCallbacks(signed, failed)

    def _includeHeaders(self, present: list[str]) -> list[bytes]:
        """
        The C{h=} list: each configured field as often as it occurs, once
        more for the oversigned ones, and C{From} at least once (RFC 6376
        section 5.4: a missing field signed is a null string, so it cannot
        be added later).
        """
        counts: dict[str, int] = {}
        for fieldName in present:
            counts[fieldName.lower()] = counts.get(fieldName.lower(), 0) + 1
        include = []
        for fieldName in self.signHeaders:
            n = counts.get(fieldName, 0)
            if fieldName in self.oversign:
                n += 1
            elif fieldName == "from":
                n = max(n, 1)
            include += [fieldName.encode("ascii")] * n
        return include

    def _signWith(self, signer: _Signer, data: bytes, include: list[Any]) -> bytes:
        """One C{DKIM-Signature} field (blocking: run it in the pool)."""
        signature: bytes = dkim.sign(
            data,
            signer.selector.encode("ascii"),
            signer.domain.encode("ascii"),
            signer.key.private,
            canonicalize=self.canonicalization,
            signature_algorithm=signer.key.algorithm,
            include_headers=include,
        )
        return signature


def _fromDomain(headers: Headers) -> str | None:
    """The domain of the first address in the first C{From:} field."""
    for f in headers:
        if f.name.lower() == "from":
            value = f.raw.split(b":", 1)[1]
            spans = addressDomains(value)
            if spans:
                _, start, end = spans[0]
                return str(value[start:end].decode("utf-8", "surrogateescape"))
            return None
    return None


def _asciiDomain(domain: str) -> str:
    """
    C{domain} lower-case, as A-labels when it has non-ASCII: relayd's
    normal form (L{relayd.address.normalDomain}, IDNA 2008), as the DKIM
    C{d=} of an internationalized domain is written (RFC 8616 section 4).
    """
    return normalDomain(domain)


def _names(options: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = options.get(key, list(default))
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _FIELD_NAME.match(v) for v in value
    ):
        raise PolicyOptionError(key, 'must be a list of field names like ["From", "Subject"]')
    never = sorted({v for v in value if v.lower() in _NEVER_SIGN})
    if never:
        raise PolicyOptionError(key, f"must not sign {', '.join(never)} (RFC 6376 section 5.4)")
    return tuple(value)


def _readKey(path: str, option: str) -> SigningKey:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise PolicyOptionError(option, f"cannot read {path}: {e.strerror or e}") from None
    try:
        key = loadKey(data)
    except ValueError as e:
        raise PolicyOptionError(option, f"{path}: {e}") from None
    if key.algorithm == b"ed25519-sha256" and not _haveEd25519Signing():
        raise PolicyOptionError(
            option,
            f"{path}: an Ed25519 key needs dkimpy's ed25519 support (PyNaCl), "
            'which is not installed: pip install "relayd[dkim-ed25519]"',
        )
    return key


def _haveEd25519Signing() -> bool:
    """dkimpy signs ed25519-sha256 (RFC 8463) with PyNaCl, an optional extra."""
    import importlib.util

    return importlib.util.find_spec("nacl") is not None


def _signers(domains: Any, context: PolicyContext) -> tuple[_Signer, ...]:
    if not isinstance(domains, dict) or not domains:
        raise PolicyOptionError(
            "domains",
            'must be a table like { "example.com" = { selector = "s1", key = "dkim.pem" } }',
        )
    signers = []
    for domain, entries in domains.items():
        where = f'domains."{domain}"'
        if not isinstance(domain, str) or not _DOMAIN.match(domain.rstrip(".")):
            raise PolicyOptionError(where, "not a domain name (use A-labels for IDNs)")
        tables = entries if isinstance(entries, list) else [entries]
        for index, table in enumerate(tables):
            option = f"{where}[{index}]" if isinstance(entries, list) else where
            if not isinstance(table, dict):
                raise PolicyOptionError(option, "must be a table with selector and key")
            unknown = sorted(set(table) - {"selector", "key", "subdomains"})
            if unknown:
                raise PolicyOptionError(
                    f"{option}.{unknown[0]}", "unknown option (known: selector, key, subdomains)"
                )
            selector = table.get("selector")
            if not isinstance(selector, str) or not _SELECTOR.match(selector):
                raise PolicyOptionError(f"{option}.selector", f"not a selector: {selector!r}")
            path = table.get("key")
            if not isinstance(path, str) or not path:
                raise PolicyOptionError(f"{option}.key", "must be the path of a key file")
            subdomains = table.get("subdomains", False)
            if not isinstance(subdomains, bool):
                raise PolicyOptionError(f"{option}.subdomains", "must be true or false")
            path = context.resolvePath(path)
            signers.append(
                _Signer(
                    domain.lower().rstrip("."),
                    selector,
                    path,
                    f"{option}.key",
                    subdomains,
                    _readKey(path, f"{option}.key"),
                )
            )
    return tuple(signers)
