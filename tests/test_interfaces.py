"""
The seams between relayd's rooms (L{relayd.interfaces}): each
implementation provides the interface the next room is typed by, and the
interfaces module needs none of the rooms to import.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyClass, verifyObject

from relayd.delivery.attempt import Deliverer
from relayd.delivery.processes import DeliveryPool
from relayd.delivery.routing import MXResolver, Router
from relayd.interfaces import IDeliverer, IIncomingSpool, IMXResolver, IQueue, IRouter, ISpool
from relayd.queue.spool import Spool


class SeamTests(TestCase):
    """Every implementation of a seam provides its interface, completely."""

    def test_spoolToSession(self):
        """The spool is what the SMTP session writes to (L{IIncomingSpool})."""
        spool = Spool(self.mktemp(), 0, Clock())
        self.assertTrue(verifyObject(IIncomingSpool, spool))
        self.assertIs(ISpool, IIncomingSpool)

    def test_spoolToScheduler(self):
        """The spool is the queue the scheduler and the control service use (L{IQueue})."""
        spool = Spool(self.mktemp(), 0, Clock())
        self.assertTrue(verifyObject(IQueue, spool))

    def test_router(self):
        """L{Router} provides L{IRouter}, and its resolver L{IMXResolver}."""
        resolver = MXResolver(Clock(), ["127.0.0.1"], clock=Clock())
        self.assertTrue(verifyObject(IMXResolver, resolver))
        self.assertTrue(verifyObject(IRouter, Router(resolver)))

    def test_deliverer(self):
        """The in-process L{Deliverer} provides L{IDeliverer}."""
        self.assertTrue(verifyObject(IDeliverer, Deliverer(Clock(), "relay.test")))

    def test_deliveryPool(self):
        """The delivery processes stand in for a deliverer (L{IDeliverer})."""
        self.assertTrue(verifyClass(IDeliverer, DeliveryPool))
        pool = DeliveryPool(configPath="relayd.toml", count=1, reactor=Clock(), stopDeadline=1.0)
        self.assertTrue(verifyObject(IDeliverer, pool))

    def test_noCircle(self):
        """
        L{relayd.interfaces} imports none of the rooms that implement it
        (they import it), only the record types of L{relayd.queue.record}.
        """
        code = (
            "import sys, relayd.interfaces\n"
            "rooms = [m for m in sys.modules if m.startswith(('relayd.queue.spool',"
            " 'relayd.queue.scheduler', 'relayd.delivery', 'relayd.smtp', 'relayd.ops'))]\n"
            "print(rooms)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out.strip(), "[]")
