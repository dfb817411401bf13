"""
A real, authoritative DNS server on the loopback interface, for tests.

Routing code talks to DNS through dnspython, over real sockets; mocking
dnspython would test our idea of what it does, not what it does.  L{DNSServer}
answers from records held in memory, on UDP and TCP on the same port of
127.0.0.1, and gives the answers a stub resolver must be able to tell apart
(RFC 1035 section 4.1.1, RFC 2308 sections 2.1 and 2.2):

  - a name it holds records for, asked for a type it holds: NOERROR with the
    records in the answer section;
  - a name that exists (it, or a name below it, holds records: an empty
    non-terminal exists too, RFC 8020 section 2) but not with the asked type:
    NOERROR, no answer, an SOA in the authority section (NODATA);
  - any other name: NXDOMAIN with an SOA in the authority section;
  - a name marked with L{DNSServer.setServfail}: SERVFAIL.

Zones marked with L{DNSServer.setSecure} answer with the AD bit set (RFC
4035 section 3.2.3), to a query that sets AD or DO (RFC 6840 section 5.7),
as a validating resolver on the host would for a signed zone: what DANE
(RFC 7672, L{relayd.delivery.dane}) trusts.  L{DNSServer.setTLSA} publishes
TLSA records (RFC 6698).

L{relayd.testing} re-exports it for plugin authors (a policy checking SPF or
DNSBLs can be tested against it with L{DNSServer.setTXT} and
L{DNSServer.setA}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.names import dns
from twisted.names.server import DNSServerFactory

__all__ = ["DNSServer", "TLSA"]

TLSA = 52
"""The TLSA record type (RFC 6698 section 7.1), unknown to twisted.names."""


def _normalize(name: str) -> str:
    """
    Lower-case C{name} and drop a final dot: the form names are held in.
    DNS names compare case-insensitively (RFC 4343 section 3).
    """
    return name.strip().rstrip(".").lower()


class _Zone:
    """
    The records a L{DNSServer} holds, and the answer to one question.

    @ivar records: name to query type to C{(ttl or None, payloads)}; a TTL
        of L{None} means the server's default at answer time.
    @ivar servfail: names answered with SERVFAIL whatever the type.
    """

    def __init__(self, ttl: int, negativeTTL: int | None) -> None:
        self.ttl = ttl
        self.negativeTTL = negativeTTL
        self.records: dict[str, dict[int, tuple[int | None, list[Any]]]] = {}
        self.servfail: set[str] = set()
        self.secure: set[str] = set()

    def isSecure(self, name: str) -> bool:
        """Whether C{name} is in a zone marked secure (it or a parent)."""
        return any(name == zone or name.endswith("." + zone) for zone in self.secure)

    def exists(self, name: str) -> bool:
        """
        Whether C{name} exists: it holds records, or some name below it does
        (an empty non-terminal exists and answers NODATA, not NXDOMAIN:
        RFC 8020 section 2).
        """
        if name in self.records:
            return True
        suffix = "." + name
        return any(known.endswith(suffix) for known in self.records)

    def soa(self, name: str) -> dns.RRHeader:
        """
        The SOA record that goes in the authority section of a negative
        answer about C{name}.  Its owner is the last two labels of the name
        (a stand-in zone apex, always a superdomain of the name, which is
        all a resolver checks) and its TTL and MINIMUM are the negative TTL,
        so the resolver caches the negative answer for that long (RFC 2308
        section 5).
        """
        labels = name.split(".")
        apex = ".".join(labels[-2:]) if name else ""
        negative = self.ttl if self.negativeTTL is None else self.negativeTTL
        payload = dns.Record_SOA(
            mname=b"ns." + apex.encode("ascii") if apex else b"ns",
            rname=b"hostmaster." + apex.encode("ascii") if apex else b"hostmaster",
            serial=1,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=negative,
            ttl=negative,
        )
        return dns.RRHeader(
            name=apex.encode("ascii"),
            type=dns.SOA,
            cls=dns.IN,
            ttl=negative,
            payload=payload,
            auth=True,
        )

    def answer(self, name: str, qtype: int) -> tuple[int, list[dns.RRHeader], list[dns.RRHeader]]:
        """
        Answer one question: C{(rCode, answers, authority)}.
        """
        if name in self.servfail:
            return dns.ESERVER, [], []
        if not self.exists(name):
            return dns.ENAME, [], [self.soa(name)]
        rrsets = self.records.get(name, {})
        if qtype == dns.ALL_RECORDS:
            wanted = list(rrsets.items())
        else:
            wanted = [(qtype, rrsets[qtype])] if qtype in rrsets else []
        answers = []
        for rrtype, (ttl, payloads) in wanted:
            for payload in payloads:
                answers.append(
                    dns.RRHeader(
                        name=name.encode("ascii"),
                        type=rrtype,
                        cls=dns.IN,
                        ttl=self.ttl if ttl is None else ttl,
                        payload=payload,
                        auth=True,
                    )
                )
        if not answers:
            return dns.OK, [], [self.soa(name)]
        return dns.OK, answers, []


class _AuthorityFactory(DNSServerFactory):
    """
    A L{DNSServerFactory} that answers every query itself from a L{_Zone}
    instead of through a resolver chain: the chain cannot say SERVFAIL
    without logging an error, nor NODATA with an SOA.

    @ivar queries: every question received, as C{(name, type)}, e.g.
        C{("example.test", "MX")}.
    """

    def __init__(self, zone: _Zone) -> None:
        DNSServerFactory.__init__(self)
        self.zone = zone
        self.queries: list[tuple[str, str]] = []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        """
        Answer the first question of C{message} from the zone (a message
        carries one question in practice: RFC 9619).
        """
        query = message.queries[0]
        name = _normalize(query.name.name.decode("ascii", "replace"))
        self.queries.append((name, dns.QUERY_TYPES.get(query.type, str(query.type))))
        answers: list[dns.RRHeader] = []
        authority: list[dns.RRHeader] = []
        if query.cls != dns.IN:
            rCode = dns.EREFUSED
        else:
            rCode, answers, authority = self.zone.answer(name, query.type)
        # AD only to a query asking for it (AD, or DO in its OPT record:
        # RFC 6840 section 5.7) about a name of a secure zone.
        wantsAD = bool(message.authenticData) or any(
            r.type == dns.OPT and r.ttl & 0x8000 for r in message.additional
        )
        secure = wantsAD and rCode in (dns.OK, dns.ENAME) and self.zone.isSecure(name)
        response = dns.Message(
            id=message.id,
            answer=1,
            opCode=message.opCode,
            recDes=message.recDes,
            recAv=False,
            auth=rCode in (dns.OK, dns.ENAME),
            rCode=rCode,
            authenticData=int(secure),
            # Over UDP, truncate past 512 octets and set TC so the client
            # asks again over TCP (RFC 1035 section 4.2.1, RFC 7766 section
            # 5); over TCP there is no limit but the 16-bit length.
            maxSize=512 if address is not None else 0,
        )
        response.queries = list(message.queries)
        response.answers = answers
        response.authority = authority
        if address is None:
            protocol.writeMessage(response)
        else:
            protocol.writeMessage(response, address)


class DNSServer:
    """
    An authoritative DNS server on 127.0.0.1, UDP and TCP on one port, that
    answers from records set by the test.

    Example::

        server = DNSServer()
        port = server.start(reactor)
        self.addCleanup(server.stop)
        server.setMX("example.test", [(10, "mx.example.test")])
        server.setA("mx.example.test", ["127.0.0.1"])
        resolver = MXResolver(reactor, nameservers=["127.0.0.1"], port=port)

    @ivar ttl: TTL of records set without one, and (unless C{negativeTTL}
        is set) of negative answers; read when answering, so changing it
        affects records already set.
    @ivar negativeTTL: TTL and SOA MINIMUM of negative answers, or L{None}
        for C{ttl}.
    @ivar port: the port number once started.
    """

    def __init__(self, ttl: int = 60, negativeTTL: int | None = None) -> None:
        self._zone = _Zone(ttl, negativeTTL)
        self._factory = _AuthorityFactory(self._zone)
        self._listening: list[Any] = []
        self.port: int | None = None
        # The root zone is signed, so a validating resolver answers for
        # "." itself with AD (C{relayctl route} asks, to tell a validating
        # resolver from one that is not); names below it only when marked.
        # setSecure(".", False) plays a resolver that does not validate.
        self.setSecure(".")

    @property
    def ttl(self) -> int:
        return self._zone.ttl

    @ttl.setter
    def ttl(self, value: int) -> None:
        self._zone.ttl = value

    @property
    def negativeTTL(self) -> int | None:
        return self._zone.negativeTTL

    @negativeTTL.setter
    def negativeTTL(self, value: int | None) -> None:
        self._zone.negativeTTL = value

    @property
    def queries(self) -> list[tuple[str, str]]:
        """
        Every question received so far, oldest first, as C{(name, type)}
        with the name lower-case and without a final dot.
        """
        return self._factory.queries

    def queryCount(self, name: str | None = None, type: str | None = None) -> int:
        """
        How many questions were received, optionally only those for C{name}
        and/or of C{type} (e.g. C{"MX"}, C{"AAAA"}).
        """
        wanted = None if name is None else _normalize(name)
        return sum(
            1
            for qname, qtype in self._factory.queries
            if (wanted is None or qname == wanted) and (type is None or qtype == type)
        )

    def start(self, reactor: Any, attempts: int = 20) -> int:
        """
        Listen on UDP and TCP on the same free port of 127.0.0.1 (TCP for
        answers too long for UDP: RFC 7766 section 5) and return the port.

        @param reactor: provides C{listenUDP} and C{listenTCP}.
        @param attempts: how many UDP ports to try before giving up when the
            TCP port of the same number is taken.
        @raise CannotListenError: no port was free on both transports.
        """
        if self._listening:
            raise RuntimeError("DNSServer already started")
        error: Exception | None = None
        for _ in range(attempts):
            udp = reactor.listenUDP(
                0, dns.DNSDatagramProtocol(self._factory), interface="127.0.0.1"
            )
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, self._factory, interface="127.0.0.1")
            except CannotListenError as e:
                error = e
                udp.stopListening()
                continue
            self._listening = [udp, tcp]
            self.port = int(port)
            return self.port
        assert error is not None
        raise error

    def stop(self) -> Deferred[None]:
        """
        Stop listening and drop any open TCP connection; the Deferred fires
        once the sockets are closed.
        """
        listening, self._listening = self._listening, []
        stopped = [maybeDeferred(port.stopListening) for port in listening]
        for protocol in list(self._factory.connections):
            protocol.transport.abortConnection()
        return gatherResults(stopped).addCallback(lambda _: None)

    def _set(self, name: str, qtype: int, payloads: list[Any], ttl: int | None) -> None:
        name = _normalize(name)
        if payloads:
            self._zone.records.setdefault(name, {})[qtype] = (ttl, payloads)
        else:
            rrsets = self._zone.records.get(name, {})
            rrsets.pop(qtype, None)
            if not rrsets:
                self._zone.records.pop(name, None)

    def setMX(self, domain: str, records: list[tuple[int, str]], ttl: int | None = None) -> None:
        """
        Replace the MX records of C{domain} with C{(preference, exchange)}
        pairs; an exchange of C{"."} is the root (RFC 7505 null MX).  An
        empty list removes them.
        """
        self._set(
            domain,
            dns.MX,
            [dns.Record_MX(pref, _normalize(host).encode("ascii")) for pref, host in records],
            ttl,
        )

    def setNullMX(self, domain: str, ttl: int | None = None) -> None:
        """
        Publish the RFC 7505 null MX for C{domain}: one MX, preference 0,
        exchange the root, meaning "this domain accepts no mail".
        """
        self.setMX(domain, [(0, ".")], ttl)

    def setA(self, host: str, addresses: list[str], ttl: int | None = None) -> None:
        """Replace the A records of C{host}; an empty list removes them."""
        self._set(host, dns.A, [dns.Record_A(a) for a in addresses], ttl)

    def setAAAA(self, host: str, addresses: list[str], ttl: int | None = None) -> None:
        """Replace the AAAA records of C{host}; an empty list removes them."""
        self._set(host, dns.AAAA, [dns.Record_AAAA(a) for a in addresses], ttl)

    def setPTR(self, address: str, names: list[str], ttl: int | None = None) -> None:
        """
        Replace the PTR records of C{address} (an IPv4 or IPv6 address,
        published under C{in-addr.arpa} or C{ip6.arpa}: RFC 1035 section
        3.5, RFC 3596 section 2.5); an empty list removes them.
        """
        owner = ipaddress.ip_address(address).reverse_pointer
        self._set(
            owner, dns.PTR, [dns.Record_PTR(_normalize(n).encode("ascii")) for n in names], ttl
        )

    def setTXT(
        self, name: str, texts: Sequence[str | Sequence[str]], ttl: int | None = None
    ) -> None:
        """
        Replace the TXT records of C{name} (e.g. an SPF policy or a DKIM
        public key); an empty list removes them.

        Each item is one record: a string, or a list of the record's
        character-strings as they are to be sent (as publishers split a
        long SPF record: C{["v=spf1 ip4:192.0.2.1 ", "include:a.test -all"]};
        readers join them without a space, RFC 7208 section 3.3).  A string
        longer than 255 octets is stored as several character-strings of at
        most 255 octets in one record (RFC 1035 section 3.3.14), which
        readers of SPF and DKIM records join again (RFC 6376 section
        3.6.2.2): a 2048-bit RSA key does not fit in one.

        @raise ValueError: a character-string given in a list is longer
            than 255 octets.
        """
        records = []
        for text in texts:
            if isinstance(text, str):
                data = text.encode("utf-8")
                chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
            else:
                chunks = [part.encode("utf-8") for part in text]
                if not chunks or any(len(chunk) > 255 for chunk in chunks):
                    raise ValueError("a TXT record holds 1 or more strings of at most 255 octets")
            records.append(dns.Record_TXT(*chunks))
        self._set(name, dns.TXT, records, ttl)

    def setTLSA(
        self,
        name: str,
        records: Sequence[tuple[int, int, int, bytes]],
        ttl: int | None = None,
    ) -> None:
        """
        Replace the TLSA records of C{name} (e.g. C{_25._tcp.mx.example.test})
        with C{(usage, selector, matching type, data)} tuples (RFC 6698
        section 2.1); an empty list removes them.  The data is sent as
        given, so a test can publish a digest of the wrong length.
        """
        payloads = [
            dns.UnknownRecord(bytes([usage, selector, mtype]) + data)
            for usage, selector, mtype, data in records
        ]
        self._set(name, TLSA, payloads, ttl)

    def setSecure(self, zone: str, secure: bool = True) -> None:
        """
        Mark C{zone} and every name below it as DNSSEC-validated: answers
        about them carry the AD bit (when the query asks for it), as from
        a validating resolver; or stop doing so.
        """
        zone = _normalize(zone)
        if secure:
            self._zone.secure.add(zone)
        else:
            self._zone.secure.discard(zone)

    def setServfail(self, name: str, servfail: bool = True) -> None:
        """
        Answer every question about C{name} with SERVFAIL (RFC 1035 section
        4.1.1 "server failure"), as a broken authority would, or stop doing
        so.  Records of the name are kept and answered again afterwards.
        """
        name = _normalize(name)
        if servfail:
            self._zone.servfail.add(name)
        else:
            self._zone.servfail.discard(name)

    def remove(self, name: str) -> None:
        """
        Forget every record of C{name} and its SERVFAIL mark: it answers
        NXDOMAIN again unless a name below it still holds records.
        """
        name = _normalize(name)
        self._zone.records.pop(name, None)
        self._zone.servfail.discard(name)
