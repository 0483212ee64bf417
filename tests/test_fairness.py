"""Issue 10, items 2 and 5: the server's slots are shared fairly between client IPs, a transfer
that is merely kept alive does not hold its slot forever, the pending pool evicts the flooder,
and a client that went quiet is given up about when it gives up itself.

Protocol-level tests drive protocol.ServerDispatcher on a virtual clock (no sockets, no sleeps).
Every acknowledgement goes through ack() below: the one place that knows how an ACK is built.

Run: python3 -m tests test_fairness
"""

import logging
import unittest

import config
import protocol

QUIET = logging.getLogger("udpxfer.tests.test_fairness")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False
QUIET.setLevel(logging.CRITICAL)

FILE = bytes(range(256)) * 40          # 10240 bytes
NAME = "a.bin"


class Catalog:
    def __init__(self, files):
        self.files = files
        self.list_entry = protocol.MemoryEntry(b"", "list-1")

    def listing(self):
        return self.list_entry

    def lookup(self, name):
        return self.files.get(name)


class Harness:
    """A ServerDispatcher on an in-memory file; every verb returns [(bytes, addr)] sent."""

    def __init__(self, **settings):
        settings.setdefault("datagram_size", 200)
        self.s = config.ServerSettings(**settings)
        self.d = protocol.ServerDispatcher(Catalog({NAME: protocol.MemoryEntry(FILE, "v1")}),
                                           self.s, QUIET)

    def _drain(self):
        return [(b"".join(bytes(b) for b in dg), addr)
                for dg, addr in self.d.datagrams_to_send()]

    def recv(self, data, addr, now):
        self.d.receive_datagram(data, addr, now)
        return self._drain()

    def timer(self, now):
        self.d.handle_timer(now)
        return self._drain()

    def request(self, addr, now, offset=0, length=10 ** 9):
        return self.recv(protocol.format_download(NAME, offset, length), addr, now)

    def transfer(self, addr):
        return self.d.active.get(addr) or self.d.pending.get(addr)


def ack(h, addr, n, now):
    """The client at addr acknowledges n (the next byte it needs). The one place that builds an
    ACK: adapt it here if ACKs carry more."""
    return h.recv(protocol.format_ack(n), addr, now)


def parsed(out, addr):
    return [protocol.parse_server_message(b) for b, a in out if a == addr]


def start(h, addr, now, rtt=0.01, offset=0):
    """Request and acknowledge SIZE (rtt later); returns the first DATA (or what came instead)."""
    size = parsed(h.request(addr, now, offset), addr)
    assert len(size) == 1 and isinstance(size[0], protocol.Size), size
    out = parsed(ack(h, addr, offset, now + rtt), addr)
    assert len(out) == 1, out
    return out[0]


def next_ack(h, addr, msg, now):
    """Acknowledge the DATA msg; returns what came back (a list of messages)."""
    return parsed(ack(h, addr, msg.offset + len(msg.payload), now), addr)


# --- Item 5: a quiet client is given up about when it gives up itself -------------------------

class ClientSilenceTest(unittest.TestCase):

    def run_timers(self, h, until):
        times = []
        while h.d.get_timer() is not None and h.d.get_timer() <= until:
            when = h.d.get_timer()
            times.append(when)
            h.timer(when)
        return times

    def check_given_up_at(self, h, addr, when):
        t = h.transfer(addr)
        times = self.run_timers(h, 1000.0)
        self.assertEqual(t.outcome, "timeout")
        self.assertNotIn(addr, h.d.active)
        self.assertAlmostEqual(times[-1], when)
        self.assertIsNone(h.d.get_timer())

    def test_quiet_client_given_up_after_client_silence_from_the_first_rto(self):
        h = Harness()
        self.assertEqual(h.s.client_silence, config.ClientSettings().idle_timeout)
        addr = ("192.0.2.1", 1000)
        h.request(addr, 0.0)
        h.request(addr, 0.05)     # SIZE sent twice: Karn, no sample, the RTO stays 0.25 s
        self.assertTrue(parsed(ack(h, addr, 0, 0.1), addr))
        self.assertIsNone(h.d.active[addr].rtt.srtt)
        self.check_given_up_at(h, addr, 0.1 + h.s.client_silence)

    def test_quiet_client_given_up_after_client_silence_with_a_loopback_rtt(self):
        h = Harness()
        addr = ("192.0.2.1", 1000)
        msg = start(h, addr, 0.0, rtt=0.0002)
        for i in range(5):        # a few quick round trips: the RTO is at its 2 ms floor
            msg = next_ack(h, addr, msg, 0.001 * (i + 1))[0]
        self.assertLess(h.d.active[addr].rtt.rto, 0.01)
        self.check_given_up_at(h, addr, 0.005 + h.s.client_silence)

    def test_slow_but_acknowledging_client_is_kept(self):
        h = Harness()
        addr = ("192.0.2.1", 1000)
        msg = start(h, addr, 0.0)
        now = 0.0
        for _ in range(3):        # an ACK every 4.5 s (retransmissions in between) keeps it
            now += 4.5
            self.run_timers(h, now)
            self.assertIn(addr, h.d.active)
            msg = next_ack(h, addr, msg, now)[0]
            self.assertIsInstance(msg, protocol.Data)
        self.run_timers(h, now + h.s.client_silence - 0.01)
        self.assertIn(addr, h.d.active)
        self.run_timers(h, now + h.s.client_silence)
        self.assertNotIn(addr, h.d.active)


if __name__ == "__main__":
    unittest.main()
