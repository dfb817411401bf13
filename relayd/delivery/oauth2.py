"""
OAuth2 access tokens for smart hosts that want SASL XOAUTH2 or OAUTHBEARER
(RFC 7628) instead of a password: Microsoft 365 and Google Workspace are
retiring password AUTH for SMTP.

A route hop with C{auth = "xoauth2"} (or C{"oauthbearer"}) names a token
endpoint and one of two grants of RFC 6749:

  - the refresh grant (section 6): a long-lived refresh token, kept in a
    file, is exchanged for short-lived access tokens.  When the response
    carries a new C{refresh_token} (rotation, section 6 last paragraph),
    the file is replaced atomically (L{relayd.queue.safeio}, mode 0600), so
    a restart uses the new one: the old one may already be revoked.
  - the client-credentials grant (section 4.4), as Microsoft 365 uses for
    unattended senders: client id and secret alone.

The client secret and the refresh token live in files named by the config,
never in the config itself, and never appear in a log line or an error
text: errors name the endpoint, the grant and the server's C{error} code
(section 5.2), nothing else.

L{TokenSource} fetches over HTTPS with L{twisted.web.client.Agent}
(certificate verified against the system trust store or a CA file; connect
and overall time limits; the response size capped), keeps the access token
in memory until shortly before C{expires_in} runs out, and starts a
refresh in the background when a token is asked for during the last part
of its life, so that deliveries do not wait for the endpoint.  One fetch
runs at a time; callers meanwhile share its result.

A failed fetch is a L{TokenError} carrying the reply delivery reports, a
deferral either way (RFC 3463):

  - endpoint unreachable, timed out, TLS failure: C{451 4.4.1} (no answer
    from the host the attempt needed);
  - the endpoint refused the grant (C{invalid_grant}, C{invalid_client},
    ...), answered with an HTTP error or a malformed body: C{454 4.7.0},
    RFC 4954's temporary authentication failure, the code relayd also
    gives when a smart host refuses its AUTH.

L{saslResponse} builds the initial client response for either mechanism.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

from twisted.internet import error as internetError
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from relayd.ops.logs import Logger
from relayd.queue.safeio import writeAtomically

__all__ = [
    "MECHANISMS",
    "GRANTS",
    "OAuth2Config",
    "TokenError",
    "TokenSource",
    "TokenSources",
    "saslResponse",
]

log = Logger(namespace="relayd.oauth2")

MECHANISMS = ("xoauth2", "oauthbearer")
"""C{auth} values that use OAuth2 tokens."""

GRANTS = ("refresh_token", "client_credentials")
"""C{oauth2_grant} values: RFC 6749 sections 6 and 4.4."""

MAX_RESPONSE = 65536
"""The largest token endpoint response read, in octets."""

DEFAULT_LIFETIME = 3600.0
"""
Seconds an access token is assumed valid when the response has no
C{expires_in} (RFC 6749 section 5.1 only recommends it); a token that
expires sooner is refused by the server with 535, which refreshes it.
"""


@dataclass(frozen=True)
class OAuth2Config:
    """
    The OAuth2 settings of one route hop.  Holds file names, never the
    secret or the refresh token themselves, so that printing a config or a
    hop shows nothing secret.

    @ivar mechanism: C{"xoauth2"} or C{"oauthbearer"}.
    @ivar grant: C{"refresh_token"} or C{"client_credentials"}.
    @ivar tokenURL: the token endpoint, C{https://} only.
    @ivar clientID: the client identifier (RFC 6749 section 2.2).
    @ivar clientSecretFile: file holding the client secret (first line);
        None for a public client using the refresh grant.
    @ivar refreshTokenFile: file holding the refresh token (first line);
        replaced when the endpoint rotates it.
    @ivar scope: the C{scope} parameter, or None to leave it out.
    @ivar caFile: PEM file of CAs trusted for the endpoint; None for the
        system's trust store.
    @ivar timeout: seconds a fetch may take, connecting included.
    """

    mechanism: str
    grant: str
    tokenURL: str
    clientID: str
    clientSecretFile: str | None = None
    refreshTokenFile: str | None = None
    scope: str | None = None
    caFile: str | None = None
    timeout: float = 30.0


class TokenError(Exception):
    """
    No access token: the reply delivery reports for the hop, and why.

    @ivar code: the SMTP reply code (C{451} or C{454}).
    @ivar enhanced: the RFC 3463 code (C{4.4.1} or C{4.7.0}).
    @ivar text: why, naming the endpoint; never a secret.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced
        self.text = text


def saslResponse(mechanism: str, user: str, token: str, host: str, port: int) -> bytes:
    """
    The base64 initial client response for AUTH C{mechanism}.

      - XOAUTH2 (Google's and Microsoft's documentation):
        C{user=<u>^Aauth=Bearer <token>^A^A}.
      - OAUTHBEARER (RFC 7628 section 3.1): the GS2 header
        C{n,a=<u>,} then C{host}, C{port} and C{auth} key-value pairs,
        each ended by ^A, and a final ^A.  C{,} and C{=} in the user name
        are escaped as C{=2C} and C{=3D} (RFC 5801 section 4).
    """
    if mechanism == "xoauth2":
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    elif mechanism == "oauthbearer":
        escaped = user.replace("=", "=3D").replace(",", "=2C")
        raw = f"n,a={escaped},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    else:
        raise ValueError(f"unknown OAuth2 SASL mechanism {mechanism!r}")
    return base64.b64encode(raw.encode("utf-8"))


def loadTrustRoot(caFile: str) -> Any:
    """The CA certificates of a PEM file as a trust root."""
    end = b"-----END CERTIFICATE-----"
    with open(caFile, "rb") as f:
        data = f.read()
    certificates = [
        Certificate.loadPEM(block + end + b"\n")
        for block in data.split(end)
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not certificates:
        raise ValueError(f"{caFile}: no PEM certificate found")
    return trustRootFromCertificates(certificates)


def _firstLine(path: str) -> str:
    """The first line of a small secret file (blocking: call from a thread)."""
    with open(path, encoding="utf-8") as f:
        return f.readline().strip("\r\n").strip()


@implementer(IBodyProducer)
class _Body:
    """A request body given at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _TooLarge(Exception):
    pass


class _Reader(Protocol):
    """Collect a response body of at most L{MAX_RESPONSE} octets."""

    def __init__(self, finished: Deferred[bytes]) -> None:
        self.finished = finished
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE:
            if not self.finished.called:
                self.finished.errback(_TooLarge())
            # Response.deliverBody gives the protocol an IPushProducer as
            # its transport (twisted.web.iweb.IResponse.deliverBody).
            cast(IPushProducer, self.transport).stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


@dataclass
class _Token:
    value: str
    obtained: float
    lifetime: float

    @property
    def margin(self) -> float:
        """Seconds before the end of its life a token is no longer used."""
        return min(60.0, self.lifetime / 10)

    def usable(self, now: float) -> bool:
        return now < self.obtained + self.lifetime - self.margin

    def dueForRefresh(self, now: float) -> bool:
        """In the last fifth of its life (less the margin): refresh ahead."""
        return now >= self.obtained + self.lifetime * 0.8 - self.margin


class TokenSource:
    """
    Access tokens for one L{OAuth2Config}.  See the module docstring.

    A failed fetch is remembered for L{failureHold} seconds: callers in that
    time get the same L{TokenError} at once, so that a queue of messages
    does not hammer an endpoint that is down or refusing the grant (each
    deferred message would otherwise ask again).

    @ivar fetches: completed fetches, successful or not (for tests and
        C{relayctl check-config --live}).
    @ivar expiresAt: when the cached token expires (clock seconds), or None.
    """

    failureHold = 10.0

    def __init__(self, config: OAuth2Config, reactor: Any, clock: Any = None) -> None:
        """
        @param reactor: for HTTPS (C{IReactorTCP}, C{IReactorTime}) and the
            thread pool that reads and writes the secret files.
        @param clock: the time used for expiry; the reactor by default.
        """
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.fetches = 0
        self._token: _Token | None = None
        # A rotated refresh token that could not be written to its file.
        self._unstored: str | None = None
        self._fetching: Deferred[str] | None = None
        self._waiting: list[Deferred[str]] = []
        self._failure: tuple[float, TokenError] | None = None
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent: Agent | None = None

    @property
    def expiresAt(self) -> float | None:
        if self._token is None:
            return None
        return self._token.obtained + self._token.lifetime

    def token(self) -> Deferred[str]:
        """
        An access token: the cached one while it is usable (refreshing it in
        the background in the last part of its life), else a fresh one.

        @return: a Deferred firing with the token, or failing with
            L{TokenError}.
        """
        now = self.clock.seconds()
        cached = self._token
        if cached is not None and cached.usable(now):
            if cached.dueForRefresh(now) and self._fetching is None and not self._held(now):
                log.info(
                    "OAuth2 access token from {url} expires in {seconds:.0f}s: "
                    "refreshing it in the background",
                    url=self.config.tokenURL,
                    seconds=cached.obtained + cached.lifetime - now,
                )
                self._startFetch()
            d: Deferred[str] = Deferred()
            d.callback(cached.value)
            return d
        return self._wait()

    def refresh(self, stale: str | None = None) -> Deferred[str]:
        """
        A new access token, after the server refused C{stale}: unless the
        cached token is already another one (someone refreshed meanwhile),
        it is dropped and fetched anew.
        """
        if self._token is not None and (stale is None or self._token.value == stale):
            self._token = None
        if self._token is not None:
            return self.token()
        return self._wait()

    def stop(self) -> Deferred[None]:
        """Cancel a fetch in flight and close the HTTPS connections."""
        if self._fetching is not None:
            self._fetching.cancel()
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    # --- fetching --------------------------------------------------------

    def _held(self, now: float) -> TokenError | None:
        """The last fetch's error while it is still held, else None."""
        if self._failure is not None and now < self._failure[0] + self.failureHold:
            return self._failure[1]
        return None

    def _wait(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        held = self._held(self.clock.seconds())
        if held is not None and self._fetching is None:
            d.errback(TokenError(held.code, held.enhanced, held.text))
            return d
        self._waiting.append(d)
        if self._fetching is None:
            self._startFetch()
        return d

    def _startFetch(self) -> None:
        fetching = Deferred.fromCoroutine(self._fetch())
        self._fetching = fetching
        fetching.addBoth(self._fetched)

    def _fetched(self, result: str | Failure) -> None:
        self._fetching = None
        self.fetches += 1
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            if result.check(TokenError):
                error = result.value
            else:
                log.failure(
                    "OAuth2 token fetch from {url} failed", result, url=self.config.tokenURL
                )
                error = TokenError(
                    454, "4.7.0", f"OAuth2 token fetch from {self.config.tokenURL} failed"
                )
            assert isinstance(error, TokenError)
            self._failure = (self.clock.seconds(), error)
            log.warn("OAuth2 token fetch failed: {text}", text=error.text, url=self.config.tokenURL)
            for d in waiting:
                d.errback(TokenError(error.code, error.enhanced, error.text))
            return
        self._failure = None
        for d in waiting:
            d.callback(result)

    def _getAgent(self) -> Agent:
        if self._agent is None:
            trustRoot = loadTrustRoot(self.config.caFile) if self.config.caFile else None
            self._agent = Agent(
                self.reactor,
                contextFactory=BrowserLikePolicyForHTTPS(trustRoot),
                connectTimeout=self.config.timeout,
                pool=self._pool,
            )
        return self._agent

    async def _fetch(self) -> str:
        config = self.config
        url = config.tokenURL
        threads = self.reactor.getThreadPool()
        form: dict[str, str] = {"grant_type": config.grant, "client_id": config.clientID}
        try:
            if config.clientSecretFile is not None:
                form["client_secret"] = await deferToThreadPool(
                    self.reactor, threads, _firstLine, config.clientSecretFile
                )
            if config.grant == "refresh_token":
                # Read each time (unless a rotated token could not be
                # stored): every delivery process has its own source, and
                # one of them may have stored a rotated token meanwhile.
                refresh = self._unstored
                if refresh is None:
                    assert config.refreshTokenFile is not None
                    refresh = await deferToThreadPool(
                        self.reactor, threads, _firstLine, config.refreshTokenFile
                    )
                form["refresh_token"] = refresh
        except OSError as e:
            raise TokenError(
                454, "4.7.0", f"OAuth2 for {url}: cannot read {e.filename}: {e.strerror}"
            ) from None
        if config.scope:
            form["scope"] = config.scope
        started = self.clock.seconds()
        try:
            agent = self._getAgent()
        except (OSError, ValueError) as e:
            raise TokenError(454, "4.7.0", f"OAuth2 CA file for {url}: {e}") from None
        request = agent.request(
            b"POST",
            url.encode("ascii"),
            Headers(
                {
                    b"Content-Type": [b"application/x-www-form-urlencoded"],
                    b"Accept": [b"application/json"],
                }
            ),
            _Body(urlencode(form).encode("ascii")),
        )
        timedOut: list[bool] = []

        def onTimeout(result: object, timeout: float) -> object:
            timedOut.append(True)
            return result

        request.addTimeout(config.timeout, self.reactor, onTimeoutCancel=onTimeout)
        try:
            response = await request
            finished: Deferred[bytes] = Deferred()
            response.deliverBody(_Reader(finished))
            finished.addTimeout(config.timeout, self.reactor, onTimeoutCancel=onTimeout)
            body = await finished
        except Exception as e:
            raise self._requestError(e, bool(timedOut)) from None
        return await self._accept(response.code, body, started, form.get("refresh_token"))

    def _requestError(self, e: Exception, timedOut: bool) -> TokenError:
        """The L{TokenError} for a request that got no usable response."""
        url = self.config.tokenURL
        if isinstance(e, _TooLarge):
            return TokenError(
                454, "4.7.0", f"OAuth2 token endpoint {url} sent more than {MAX_RESPONSE} octets"
            )
        if timedOut or isinstance(e, TimeoutError):
            return TokenError(
                451,
                "4.4.1",
                f"OAuth2 token endpoint {url} did not answer in {self.config.timeout:g}s",
            )
        if isinstance(e, CancelledError):
            return TokenError(
                451, "4.4.1", f"OAuth2 token fetch from {url} cancelled: relayd is stopping"
            )
        return TokenError(451, "4.4.1", f"OAuth2 token endpoint {url} unreachable: {_why(e)}")

    async def _accept(self, status: int, body: bytes, started: float, sent: str | None) -> str:
        """Read a token response (RFC 6749 sections 5.1 and 5.2)."""
        url = self.config.tokenURL
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            value = None
        if status != 200:
            if isinstance(value, dict) and isinstance(value.get("error"), str):
                code = _printable(value["error"])
                description = value.get("error_description")
                detail = f" ({_printable(description)})" if isinstance(description, str) else ""
                raise TokenError(
                    454,
                    "4.7.0",
                    f"OAuth2 token endpoint {url} refused the {self.config.grant} grant: "
                    f"{code}{detail}",
                )
            raise TokenError(454, "4.7.0", f"OAuth2 token endpoint {url} answered HTTP {status}")
        if not isinstance(value, dict) or not isinstance(value.get("access_token"), str):
            raise TokenError(
                454, "4.7.0", f"OAuth2 token endpoint {url} sent no access_token in JSON"
            )
        tokenType = value.get("token_type", "Bearer")
        if not isinstance(tokenType, str) or tokenType.lower() != "bearer":
            raise TokenError(
                454,
                "4.7.0",
                f"OAuth2 token endpoint {url} sent a token of type "
                f"{_printable(str(tokenType))}, not Bearer",
            )
        lifetime = value.get("expires_in", DEFAULT_LIFETIME)
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)  # Some endpoints send a string.
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_LIFETIME
        rotated = value.get("refresh_token")
        if (
            self.config.grant == "refresh_token"
            and isinstance(rotated, str)
            and rotated
            and rotated != sent
        ):
            await self._storeRefreshToken(rotated)
        self._token = _Token(value["access_token"], started, float(lifetime))
        log.info(
            "OAuth2 access token from {url} obtained, valid for {seconds:.0f}s",
            url=url,
            seconds=float(lifetime),
        )
        return str(value["access_token"])

    async def _storeRefreshToken(self, token: str) -> None:
        """
        Keep a rotated refresh token: in memory at once (the old one may be
        revoked already), and on disk atomically with mode 0600 so that a
        restart uses it.  A failed write is logged; delivery goes on.
        """
        self._unstored = token
        path = self.config.refreshTokenFile
        assert path is not None
        try:
            await deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                writeAtomically,
                path,
                token.encode("utf-8") + b"\n",
                0o600,
            )
        except OSError as e:
            log.error(
                "OAuth2 refresh token rotated by {url}, but {path} could not be "
                "written ({why}): the new token is only in memory",
                url=self.config.tokenURL,
                path=path,
                why=e.strerror,
            )
            return
        self._unstored = None
        log.info(
            "OAuth2 refresh token rotated by {url}: stored in {path}",
            url=self.config.tokenURL,
            path=path,
        )


class TokenSources:
    """
    One L{TokenSource} per L{OAuth2Config}, shared by every connection, so
    that hops with the same settings share their tokens.
    """

    def __init__(self, reactor: Any, clock: Any = None) -> None:
        self.reactor = reactor
        self.clock = clock
        self._sources: dict[OAuth2Config, TokenSource] = {}

    def source(self, config: OAuth2Config) -> TokenSource:
        """The token source for C{config}, made on first use."""
        found = self._sources.get(config)
        if found is None:
            found = self._sources[config] = TokenSource(config, self.reactor, self.clock)
        return found

    def stop(self) -> Deferred[None]:
        """Stop every source (L{TokenSource.stop})."""
        from twisted.internet.defer import DeferredList

        waits = [source.stop() for source in self._sources.values()]
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)


def _why(e: BaseException) -> str:
    """A short reason for a failed request."""
    if isinstance(e, internetError.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, internetError.DNSLookupError):
        return "host name lookup failed"
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(
            r.getErrorMessage() or type(r.value).__name__ for r in reasons if isinstance(r, Failure)
        )
    return str(e) or type(e).__name__


def _printable(text: str) -> str:
    """A server-given text, shortened and made safe for one log line."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned[:200]


def checkTokenURL(url: str) -> str | None:
    """The problem with a token endpoint URL, or None: C{https://} only."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return "must be an https:// URL"
    return None
