"""
OAuth2 for smart hosts (issue 13 item 4): relayd fetches access tokens from
a real HTTPS token endpoint (twisted.web on 127.0.0.1, with a CA and
certificate made here) and authenticates to the in-process sink with AUTH
XOAUTH2 or OAUTHBEARER (RFC 7628) inside verified TLS.

Every test also checks that no log line holds the client secret, a refresh
token or an access token, and that no fault logs a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from relayd.config import _HOP, ConfigError, fromDict
from relayd.delivery.oauth2 import OAuth2Config, TokenError, TokenSources, saslResponse
from relayd.ops.relayctl import _checkUpstreams
from tests.delivery.test_attempt import DeliveryTestCase, freePort

USER = "relay@example.org"
CLIENT_ID = "relayd-client"
SECRET = "client-s3cret-DO-NOT-LOG"
REFRESH = "refresh-0-DO-NOT-LOG"


class TokenEndpoint(Resource):
    """
    An OAuth2 token endpoint (RFC 6749 sections 4.4, 5 and 6): checks the
    grant type, client id and secret (client_secret_post) and the refresh
    token, and issues C{access-N} tokens.

    @ivar rotate: issue a new refresh token with each response (the old
        one is then refused with C{invalid_grant}).
    @ivar refuse: an OAuth2 C{error} code to answer every request with.
    @ivar onIssue: called with each access token issued.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, str]] = []
        self.validRefresh = {REFRESH}
        self.rotate = False
        self.refuse: str | None = None
        self.hang = False
        self.expiresIn = 3600
        self.issued: list[str] = []
        self.onIssue: Any = None

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        form = {k: v[0] for k, v in parse_qs(request.content.read().decode()).items()}
        self.requests.append(form)
        if self.hang:
            from twisted.web.server import NOT_DONE_YET

            return NOT_DONE_YET  # type: ignore[no-any-return]

        def error(code: str, status: int = 400) -> bytes:
            request.setResponseCode(status)
            return json.dumps({"error": code, "error_description": f"test says {code}"}).encode()

        if self.refuse is not None:
            return error(self.refuse)
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != SECRET:
            return error("invalid_client", 401)
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": self.expiresIn}
        grant = form.get("grant_type")
        if grant == "refresh_token":
            if form.get("refresh_token") not in self.validRefresh:
                return error("invalid_grant")
            if self.rotate:
                new = f"refresh-{len(self.requests)}-DO-NOT-LOG"
                self.validRefresh = {new}
                body["refresh_token"] = new
        elif grant != "client_credentials":
            return error("unsupported_grant_type")
        token = f"access-{len(self.issued) + 1}-DO-NOT-LOG"
        self.issued.append(token)
        body["access_token"] = token
        if self.onIssue is not None:
            self.onIssue(token)
        return json.dumps(body).encode()


class OAuth2TestCase(DeliveryTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.options, self.caPath = self.tls()
        self.endpoint = TokenEndpoint()
        listening = reactor.listenSSL(0, Site(self.endpoint), self.options, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.tokenURL = f"https://localhost:{listening.getHost().port}/token"
        with open(self.path("secret"), "w") as f:
            f.write(SECRET + "\n")
        with open(self.path("refresh"), "w") as f:
            f.write(REFRESH + "\n")
        os.chmod(self.path("refresh"), 0o600)

    def tearDown(self) -> None:
        texts = [formatEvent(e) or "" for e in self.events]
        secrets = [SECRET, REFRESH, *self.endpoint.validRefresh, *self.endpoint.issued]
        for text in texts:
            for secret in secrets:
                self.assertNotIn(secret, text)
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(failures, [], "a fault was logged with a traceback")
        super().tearDown()

    def logText(self) -> str:
        return "\n".join(formatEvent(e) or "" for e in self.events)

    def config(self, **kwargs: Any) -> OAuth2Config:
        values: dict[str, Any] = {
            "mechanism": "xoauth2",
            "grant": "refresh_token",
            "tokenURL": self.tokenURL,
            "clientID": CLIENT_ID,
            "clientSecretFile": self.path("secret"),
            "refreshTokenFile": self.path("refresh"),
            "caFile": self.caPath,
            "timeout": 5.0,
        }
        values.update(kwargs)
        return OAuth2Config(**values)

    def oauthSink(self, mechanisms: str = "XOAUTH2 OAUTHBEARER"):
        sink = self.sink(tlsOptions=self.options)
        sink.advertise = [a for a in sink.advertise if not a.startswith("AUTH")]
        sink.advertise.append(f"AUTH {mechanisms}")
        sink.oauthTokens = {}
        return sink

    def follow(self, sink) -> None:
        """The sink accepts the endpoint's latest token, as a provider does."""

        def issued(token: str) -> None:
            sink.oauthTokens[USER] = token

        self.endpoint.onIssue = issued

    def oauthHop(self, sink, **kwargs: Any):
        return self.hop(sink.port, tls="verify", username=USER, oauth2=self.config(**kwargs))


class DeliveryTests(OAuth2TestCase):
    @defer.inlineCallbacks
    def test_xoauth2RefreshGrant(self):
        """
        The refresh grant (RFC 6749 section 6) gives a token; AUTH XOAUTH2
        carries it as C{user=..^Aauth=Bearer ..^A^A}; the mail is delivered.
        """
        sink = self.oauthSink()
        self.follow(sink)
        deliverer = self.deliverer(caFile=self.caPath)
        result = yield self.deliver(
            deliverer, self.destination(self.oauthHop(sink)), ["a@example.net"]
        )
        self.assertEqual(result.results[0].status, "delivered")
        [request] = self.endpoint.requests
        self.assertEqual(request["grant_type"], "refresh_token")
        self.assertEqual(request["refresh_token"], REFRESH)
        self.assertEqual(request["client_id"], CLIENT_ID)
        [(mechanism, user, token, _)] = sink.oauthSeen
        self.assertEqual((mechanism, user, token), ("XOAUTH2", USER, "access-1-DO-NOT-LOG"))
        self.assertEqual(sink.messages[0].user, USER)

    @defer.inlineCallbacks
    def test_oauthbearerClientCredentials(self):
        """
        The client-credentials grant (section 4.4, as Microsoft 365 uses),
        and OAUTHBEARER's GS2 header, host and port (RFC 7628 section 3.1).
        """
        sink = self.oauthSink()
        self.follow(sink)
        hop = self.oauthHop(
            sink,
            mechanism="oauthbearer",
            grant="client_credentials",
            refreshTokenFile=None,
            scope="https://outlook.office365.com/.default",
        )
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath), self.destination(hop), ["a@example.net"]
        )
        self.assertEqual(result.results[0].status, "delivered")
        [request] = self.endpoint.requests
        self.assertEqual(request["grant_type"], "client_credentials")
        self.assertEqual(request["scope"], "https://outlook.office365.com/.default")
        self.assertNotIn("refresh_token", request)
        [(mechanism, user, token, fields)] = sink.oauthSeen
        self.assertEqual((mechanism, user), ("OAUTHBEARER", USER))
        self.assertEqual(fields["host"], "localhost")
        self.assertEqual(fields["port"], str(sink.port))

    @defer.inlineCallbacks
    def test_tokenCachedAcrossConnections(self):
        """Two deliveries on two connections use one fetched token."""
        sink = self.oauthSink()
        self.follow(sink)
        deliverer = self.deliverer(caFile=self.caPath, maxMessagesPerConnection=1)
        hop = self.oauthHop(sink)
        for _ in range(2):
            result = yield self.deliver(deliverer, self.destination(hop), ["a@example.net"])
            self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.connections, 2)
        self.assertEqual(len(self.endpoint.requests), 1)
        self.assertEqual(len(sink.oauthSeen), 2)

    @defer.inlineCallbacks
    def test_rotatedRefreshTokenStored(self):
        """
        A response with a new refresh token replaces the file atomically,
        mode 0600, and the next fetch uses the new one (the old one is
        revoked at the endpoint).
        """
        self.endpoint.rotate = True
        source = TokenSources(reactor).source(self.config())
        self.addCleanup(source.stop)
        yield source.token()
        [rotated] = self.endpoint.validRefresh
        with open(self.path("refresh")) as f:
            self.assertEqual(f.read().strip(), rotated)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("refresh")).st_mode), 0o600)
        token = yield source.refresh()
        self.assertEqual(token, "access-2-DO-NOT-LOG")
        self.assertEqual(self.endpoint.requests[1]["refresh_token"], rotated)
        # A restart reads the stored token: a new source works too.
        other = TokenSources(reactor).source(self.config())
        self.addCleanup(other.stop)
        token = yield other.token()
        self.assertEqual(token, "access-3-DO-NOT-LOG")
        self.assertIn("rotated", self.logText())

    @defer.inlineCallbacks
    def test_535OnceRefreshAndRetry(self):
        """
        The server refuses the first token with 535: relayd fetches a new
        one and tries AUTH once more in the same session, which succeeds.
        """
        sink = self.oauthSink()
        sink.oauthRefusal = "535"
        sink.oauthTokens = {USER: "access-2-DO-NOT-LOG"}
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath),
            self.destination(self.oauthHop(sink)),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(len(self.endpoint.requests), 2)
        self.assertEqual([t for _, _, t, _ in sink.oauthSeen], self.endpoint.issued)
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_errorChallengeXOAUTH2(self):
        """
        A 334 error challenge to XOAUTH2 is answered with an empty line;
        the 535 that follows refreshes the token and AUTH is retried.
        """
        sink = self.oauthSink()
        sink.oauthTokens = {USER: "access-2-DO-NOT-LOG"}
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath),
            self.destination(self.oauthHop(sink)),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.oauthChallengeAnswers, [""])
        self.assertIn('"status":"401"', self.logText())

    @defer.inlineCallbacks
    def test_errorChallengeOAUTHBEARER(self):
        """RFC 7628 section 3.2.3: the client answers the error challenge with ^A."""
        sink = self.oauthSink()
        sink.oauthTokens = {USER: "access-2-DO-NOT-LOG"}
        hop = self.oauthHop(sink, mechanism="oauthbearer")
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath), self.destination(hop), ["a@example.net"]
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.oauthChallengeAnswers, [base64.b64encode(b"\x01").decode()])

    @defer.inlineCallbacks
    def test_refusedTwiceDefers(self):
        """A fresh token refused too: one retry only, then 454 4.7.0."""
        sink = self.oauthSink()
        sink.oauthTokens = {USER: "never"}
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath),
            self.destination(self.oauthHop(sink)),
            ["a@example.net"],
        )
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 454, "4.7.0"))
        self.assertIn("fresh token", r.text)
        self.assertEqual(len(sink.oauthSeen), 2)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_invalidGrantDefers(self):
        """
        The endpoint answers C{invalid_grant}: the mail is deferred with
        454 4.7.0, the log says why, nothing is sent to the smart host.
        """
        sink = self.oauthSink()
        self.endpoint.validRefresh = {"some other token"}
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath),
            self.destination(self.oauthHop(sink)),
            ["a@example.net"],
        )
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 454, "4.7.0"))
        self.assertIn("invalid_grant", r.text)
        self.assertIn(f"OAuth2 token endpoint {self.tokenURL} refused", self.logText())
        self.assertIn("invalid_grant", self.logText())
        self.assertEqual(sink.oauthSeen, [])

    @defer.inlineCallbacks
    def test_endpointDownDefers(self):
        """The token endpoint is not listening: 451 4.4.1, said in the log."""
        sink = self.oauthSink()
        url = f"https://localhost:{freePort()}/token"
        result = yield self.deliver(
            self.deliverer(caFile=self.caPath),
            self.destination(self.oauthHop(sink, tokenURL=url)),
            ["a@example.net"],
        )
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.4.1"))
        self.assertIn(f"OAuth2 token endpoint {url} unreachable", self.logText())

    @defer.inlineCallbacks
    def test_untrustedEndpointDefers(self):
        """The endpoint's certificate is not from the configured CA: no token."""
        _, otherCA = self.tls(otherCA=True)
        source = TokenSources(reactor).source(self.config(caFile=otherCA))
        self.addCleanup(source.stop)
        with self.assertRaises(TokenError) as caught:
            yield source.token()
        self.assertEqual(caught.exception.enhanced, "4.4.1")
        self.assertEqual(self.endpoint.requests, [])

    @defer.inlineCallbacks
    def test_endpointSilentDefers(self):
        """An endpoint that accepts the request and never answers: 451 4.4.1 after the timeout."""
        self.endpoint.hang = True
        source = TokenSources(reactor).source(self.config(timeout=0.5))
        self.addCleanup(source.stop)
        with self.assertRaises(TokenError) as caught:
            yield source.token()
        self.assertEqual((caught.exception.code, caught.exception.enhanced), (451, "4.4.1"))
        self.assertIn("did not answer in 0.5s", caught.exception.text)

    @defer.inlineCallbacks
    def test_rotatedTokenKeptWhenFileCannotBeWritten(self):
        """
        The refresh token file cannot be replaced (its directory is gone):
        the error is logged and the rotated token is used from memory.
        """
        directory = self.path("tokens")
        os.mkdir(directory)
        path = os.path.join(directory, "refresh")
        with open(path, "w") as f:
            f.write(REFRESH + "\n")
        self.endpoint.rotate = True
        self.endpoint.onIssue = lambda token: shutil.rmtree(directory)
        source = TokenSources(reactor).source(self.config(refreshTokenFile=path))
        self.addCleanup(source.stop)
        yield source.token()
        self.endpoint.onIssue = None
        [rotated] = self.endpoint.validRefresh
        token = yield source.refresh()
        self.assertEqual(token, "access-2-DO-NOT-LOG")
        self.assertEqual(self.endpoint.requests[1]["refresh_token"], rotated)
        self.assertIn("the new token is only in memory", self.logText())


class ExpiryTests(OAuth2TestCase):
    @defer.inlineCallbacks
    def test_cachedUntilShortlyBeforeExpiry(self):
        """
        A token is reused while it has more than its margin (60 s, or a
        tenth of its life) left; then a new one is fetched.
        """
        clock = Clock()
        self.endpoint.expiresIn = 600
        source = TokenSources(reactor, clock).source(self.config())
        self.addCleanup(source.stop)
        first = yield source.token()
        clock.advance(400)
        again = yield source.token()
        self.assertEqual((first, again, len(self.endpoint.requests)), (first, first, 1))
        clock.advance(600 - 60 - 400)
        fresh = yield source.token()
        self.assertEqual(fresh, "access-2-DO-NOT-LOG")
        self.assertEqual(len(self.endpoint.requests), 2)

    @defer.inlineCallbacks
    def test_refreshedInBackground(self):
        """
        In the last fifth of its life the cached token is still handed out
        at once while a new one is fetched in the background.
        """
        clock = Clock()
        self.endpoint.expiresIn = 1000
        source = TokenSources(reactor, clock).source(self.config())
        self.addCleanup(source.stop)
        first = yield source.token()
        clock.advance(800)
        d = source.token()
        self.assertTrue(d.called)
        self.assertEqual((yield d), first)
        while source.fetches < 2:
            yield self.sleepBriefly()
        self.assertEqual((yield source.token()), "access-2-DO-NOT-LOG")
        self.assertIn("refreshing it in the background", self.logText())

    def sleepBriefly(self):
        from twisted.internet.task import deferLater

        return deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def test_failureHeldBriefly(self):
        """
        After a refused grant, callers get the same error without a new
        request for L{TokenSource.failureHold} seconds; then it is asked again.
        """
        clock = Clock()
        self.endpoint.refuse = "invalid_grant"
        source = TokenSources(reactor, clock).source(self.config())
        self.addCleanup(source.stop)
        for _ in range(3):
            with self.assertRaises(TokenError) as caught:
                yield source.token()
            self.assertIn("invalid_grant", caught.exception.text)
        self.assertEqual(len(self.endpoint.requests), 1)
        self.endpoint.refuse = None
        clock.advance(source.failureHold)
        self.assertEqual((yield source.token()), "access-1-DO-NOT-LOG")
        self.assertEqual(len(self.endpoint.requests), 2)

    @defer.inlineCallbacks
    def test_concurrentCallersShareOneFetch(self):
        source = TokenSources(reactor).source(self.config())
        self.addCleanup(source.stop)
        tokens = yield defer.gatherResults([source.token() for _ in range(5)])
        self.assertEqual(set(tokens), {"access-1-DO-NOT-LOG"})
        self.assertEqual(len(self.endpoint.requests), 1)


class CheckConfigLiveTests(OAuth2TestCase):
    def loaded(self, sink, **hop: Any):
        values = {
            "host": "127.0.0.1",
            "port": sink.port,
            "tls": "required",
            "auth": "xoauth2",
            "username": USER,
            "oauth2_token_url": self.tokenURL,
            "oauth2_client_id": CLIENT_ID,
            "oauth2_client_secret_file": self.path("secret"),
            "oauth2_refresh_token_file": self.path("refresh"),
            "oauth2_ca_file": self.caPath,
        }
        values.update(hop)
        raw = {
            "spool": {"directory": self.path("spool")},
            "listeners": [{"endpoint": "tcp:port=0:interface=127.0.0.1", "mode": "relay"}],
            "routes": [{"domains": ["*"], "hops": [values]}],
        }
        return fromDict(raw, self.path("relayd.toml"))

    @defer.inlineCallbacks
    def test_liveShowsTokenAndAuth(self):
        sink = self.oauthSink()
        self.follow(sink)
        config = self.loaded(sink)
        [report] = yield defer.Deferred.fromCoroutine(_checkUpstreams(config, reactor))
        steps = {label: (status, text) for label, status, text in report.steps}
        self.assertTrue(report.ok, report.steps)
        self.assertEqual(steps["token"][0], "ok")
        self.assertIn("expires in 59m", steps["token"][1])
        self.assertEqual(steps["AUTH"], ("ok", f"XOAUTH2 as {USER}"))
        self.assertIn("with XOAUTH2 (refresh_token grant)", report.title)

    @defer.inlineCallbacks
    def test_liveShowsTokenError(self):
        sink = self.oauthSink()
        self.endpoint.refuse = "invalid_grant"
        config = self.loaded(sink)
        [report] = yield defer.Deferred.fromCoroutine(_checkUpstreams(config, reactor))
        self.assertFalse(report.ok)
        [(label, status, text)] = report.steps
        self.assertEqual((label, status), ("token", "FAILED"))
        self.assertIn("454 4.7.0", text)
        self.assertIn("invalid_grant", text)
        self.assertEqual(sink.connections, 0)


# --- pure units -----------------------------------------------------------------


def test_xoauth2String() -> None:
    raw = base64.b64decode(saslResponse("xoauth2", "u@example.org", "tok", "h", 587))
    assert raw == b"user=u@example.org\x01auth=Bearer tok\x01\x01"


def test_oauthbearerString() -> None:
    """RFC 7628 section 3.1, with the GS2 escapes of RFC 5801 for , and =."""
    raw = base64.b64decode(saslResponse("oauthbearer", "a,b=c@x", "tok", "smtp.x", 587))
    assert raw == b"n,a=a=2Cb=3Dc@x,\x01host=smtp.x\x01port=587\x01auth=Bearer tok\x01\x01"


def _raw(tmp: Any, **hop: Any) -> dict[str, Any]:
    values = {
        "host": "smtp.example.net",
        "port": 587,
        "tls": "verify",
        "auth": "xoauth2",
        "username": USER,
        "oauth2_token_url": "https://login.example.net/token",
        "oauth2_client_id": CLIENT_ID,
        "oauth2_client_secret_file": str(tmp / "secret"),
        "oauth2_refresh_token_file": str(tmp / "refresh"),
    }
    values.update(hop)
    for key in [k for k, v in values.items() if v is None]:
        del values[key]
    return {
        "spool": {"directory": str(tmp / "spool")},
        "listeners": [{"endpoint": "tcp:port=0:interface=127.0.0.1", "mode": "relay"}],
        "routes": [{"domains": ["*"], "hops": [values]}],
    }


@pytest.fixture
def files(tmp_path: Any) -> Any:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "refresh").write_text(REFRESH + "\n")
    return tmp_path


def test_configLoads(files: Any) -> None:
    config = fromDict(_raw(files), str(files / "relayd.toml"))
    [hop] = config.routes[0].hops
    assert hop.oauth2 is not None
    assert hop.oauth2.grant == "refresh_token"
    assert hop.oauth2.refreshTokenFile == str(files / "refresh")
    assert hop.password is None
    assert SECRET not in repr(config) and REFRESH not in repr(config)


CONFIG_ERRORS = {
    "inline-secret": ({"oauth2_client_secret": SECRET}, "oauth2_client_secret", "never"),
    "inline-refresh": ({"oauth2_refresh_token": REFRESH}, "oauth2_refresh_token", "never"),
    "password-too": ({"password": "x"}, "password", "not a password"),
    "no-username": ({"username": None}, "username", "required"),
    "plain-text": ({"tls": "none"}, "tls", "never sent in plain text"),
    "http-url": ({"oauth2_token_url": "http://t.example/token"}, "oauth2_token_url", "https"),
    "no-url": ({"oauth2_token_url": None}, "oauth2_token_url", "required"),
    "no-client-id": ({"oauth2_client_id": None}, "oauth2_client_id", "required"),
    "no-refresh-file": (
        {"oauth2_grant": "refresh_token", "oauth2_refresh_token_file": None},
        "oauth2_refresh_token_file",
        "required",
    ),
    "cc-no-secret": (
        {
            "oauth2_grant": "client_credentials",
            "oauth2_refresh_token_file": None,
            "oauth2_client_secret_file": None,
        },
        "oauth2_client_secret_file",
        "required",
    ),
    "missing-secret-file": (
        {"oauth2_client_secret_file": "/nonexistent/secret"},
        "oauth2_client_secret_file",
        "file not found",
    ),
    "bad-grant": ({"oauth2_grant": "password"}, "oauth2_grant", "must be one of"),
    "bad-auth": ({"auth": "cram-md5"}, "auth", "must be one of"),
    "oauth-keys-without-auth": (
        {"auth": None, "password": "x"},
        "oauth2_token_url",
        "only with auth",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_configErrors(files: Any, case: str) -> None:
    """Each mistake is refused with the key named, and no secret in the text."""
    hop, key, words = CONFIG_ERRORS[case]
    with pytest.raises(ConfigError) as caught:
        fromDict(_raw(files, **hop), str(files / "relayd.toml"))
    assert caught.value.key == f"routes[0].hops[0].{key}"
    assert words in caught.value.problem
    assert SECRET not in str(caught.value)


def test_sampleDescribesEveryHopKey() -> None:
    """etc/relayd.toml describes every [[routes.hops]] key, the OAuth2 ones included."""
    text = (Path(__file__).resolve().parents[2] / "etc" / "relayd.toml").read_text()
    for key in _HOP:
        assert re.search(rf"^#\s+{key}\s", text, re.M), f"hop key {key} not described"


def test_codecCarriesOAuth2() -> None:
    """
    The queue manager hands hops to delivery processes as JSON lines: a
    hop's OAuth2 settings (file names only) survive the trip.
    """
    from relayd.delivery.processes import DeliverRequest, decode, encode
    from relayd.delivery.routing import Destination, Hop

    oauth2 = OAuth2Config(
        "oauthbearer", "client_credentials", "https://t.example/token", "cid", "/etc/s"
    )
    hop = Hop("smtp.example.net", "192.0.2.1", 587, "verify", USER, None, oauth2)
    request = DeliverRequest(Destination("route:0", (hop,)), "s@x", ("r@y",), "/p", 1, "Q")
    line = encode(3, request)
    assert SECRET.encode() not in line
    assert decode(line) == (3, request)


class RelaydTests(OAuth2TestCase):
    """
    The whole of relayd (in process): mail received over SMTP goes out
    through an C{auth = "xoauth2"} route; a refused grant leaves it queued
    with a log line that names its queue id and the reason.
    """

    @defer.inlineCallbacks
    def startRelayd(self, sink):
        from relayd.testing import InProcessRelayd, TestSetup

        setup = TestSetup(
            self.path("relayd"),
            modes=("relay",),
            sections={
                "delivery": {
                    "enabled": True,
                    "retry_initial": 60,
                    "connect_timeout": 5,
                    "command_timeout": 5,
                },
            },
        )
        hop = {
            "host": "127.0.0.1",
            "port": sink.port,
            "tls": "required",
            "auth": "xoauth2",
            "username": USER,
            "oauth2_token_url": self.tokenURL,
            "oauth2_client_id": CLIENT_ID,
            "oauth2_client_secret_file": self.path("secret"),
            "oauth2_refresh_token_file": self.path("refresh"),
            "oauth2_ca_file": self.caPath,
            "oauth2_timeout": 5,
        }
        with open(setup.configPath, "a") as f:
            f.write('\n[[routes]]\ndomains = ["*"]\n[[routes.hops]]\n')
            for key, value in hop.items():
                f.write(f"{key} = {json.dumps(value)}\n")
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        return relayd

    def send(self, relayd):
        import smtplib

        from twisted.internet.threads import deferToThread

        def send():
            with smtplib.SMTP("127.0.0.1", relayd.port("relay")) as s:
                s.sendmail("a@example.org", ["b@example.net"], b"Subject: t\r\n\r\nhi\r\n")

        return deferToThread(send)

    @defer.inlineCallbacks
    def waitFor(self, condition):
        from twisted.internet.task import deferLater

        for _ in range(400):
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("condition not met in time")

    @defer.inlineCallbacks
    def test_deliveredWithToken(self):
        sink = self.oauthSink()
        self.follow(sink)
        self.endpoint.rotate = True
        relayd = yield self.startRelayd(sink)
        yield self.send(relayd)
        yield self.waitFor(lambda: sink.messages)
        self.assertEqual(sink.messages[0].user, USER)
        [rotated] = self.endpoint.validRefresh
        with open(self.path("refresh")) as f:
            self.assertEqual(f.read().strip(), rotated)

    @defer.inlineCallbacks
    def test_invalidGrantQueued(self):
        sink = self.oauthSink()
        self.endpoint.refuse = "invalid_grant"
        relayd = yield self.startRelayd(sink)
        yield self.send(relayd)
        yield self.waitFor(lambda: relayd.spool.entries("deferred"))
        [queueId] = relayd.spool.entries("deferred")
        lines = [line for line in self.logText().splitlines() if queueId in line]
        self.assertTrue(
            any("invalid_grant" in line and "454 4.7.0" in line for line in lines), lines
        )
        self.assertEqual(sink.oauthSeen, [])
