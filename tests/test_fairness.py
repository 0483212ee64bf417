"""Issue 10, items 2 and 5: the server's slots are shared fairly between client IPs, a transfer
that is merely kept alive does not hold its slot forever, the pending pool evicts the flooder,
and a client that went quiet is given up about when it gives up itself.

Protocol-level tests drive ServerDispatcher on a virtual clock (no sockets, no sleeps).
Every acknowledgement goes through ack() below: the one place that knows how an ACK is built.

Run: python3 -m tests test_fairness
"""

import logging
import unittest

import config
from udpxfer.dispatcher import ServerDispatcher
from udpxfer.limits import IpCounts, client_of
from udpxfer.server_transfer import MemoryEntry
from udpxfer.wire import (Data, Eof, Error, Size, format_ack, format_ack_eof, format_download,
                          parse_server_message)

QUIET = logging.getLogger("udpxfer.tests.test_fairness")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False
QUIET.setLevel(logging.CRITICAL)

FILE = bytes(range(256)) * 40          # 10240 bytes
NAME = "a.bin"


class Catalog:
    def __init__(self, files):
        self.files = files
        self.list_entry = MemoryEntry(b"", "list-1")

    def listing(self):
        return self.list_entry

    def lookup(self, name):
        return self.files.get(name)


class Harness:
    """A ServerDispatcher on an in-memory file; every verb returns [(bytes, addr)] sent."""

    def __init__(self, **settings):
        settings.setdefault("datagram_size", 200)
        self.s = config.ServerSettings(**settings)
        self.d = ServerDispatcher(Catalog({NAME: MemoryEntry(FILE, "v1")}), self.s, QUIET)

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
        return self.recv(format_download(NAME, offset, length), addr, now)

    def transfer(self, addr):
        return self.d.active.get((addr, None)) or self.d.pending.get((addr, None))


def ack(h, addr, n, now):
    """The client at addr acknowledges n (the next byte it needs; None: EOF). The one place
    that builds an ACK: adapt it here if ACKs carry more."""
    t = h.transfer(addr)
    token = t.token if t is not None else b"0" * 16   # no transfer: any well-formed token
    return h.recv(format_ack_eof(token) if n is None else format_ack(n, token),
                  addr, now)


def parsed(out, addr):
    return [parse_server_message(b) for b, a in out if a == addr]


def start(h, addr, now, rtt=0.01, offset=0):
    """Request and acknowledge SIZE (rtt later); returns the first DATA (or what came instead)."""
    size = parsed(h.request(addr, now, offset), addr)
    assert len(size) == 1 and isinstance(size[0], Size), size
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
        self.assertNotIn((addr, None), h.d.active)
        self.assertAlmostEqual(times[-1], when)
        self.assertIsNone(h.d.get_timer())

    def test_quiet_client_given_up_after_client_silence_from_the_first_rto(self):
        h = Harness()
        self.assertEqual(h.s.client_silence, config.ClientSettings().idle_timeout)
        addr = ("192.0.2.1", 1000)
        h.request(addr, 0.0)
        h.request(addr, 0.05)     # SIZE sent twice: Karn, no sample, the RTO stays 0.25 s
        self.assertTrue(parsed(ack(h, addr, 0, 0.1), addr))
        self.assertIsNone(h.d.active[addr, None].rtt.srtt)
        self.check_given_up_at(h, addr, 0.1 + h.s.client_silence)

    def test_quiet_client_given_up_after_client_silence_with_a_loopback_rtt(self):
        h = Harness()
        addr = ("192.0.2.1", 1000)
        msg = start(h, addr, 0.0, rtt=0.0002)
        for i in range(5):        # a few quick round trips: the RTO is at its 2 ms floor
            msg = next_ack(h, addr, msg, 0.001 * (i + 1))[0]
        self.assertLess(h.d.active[addr, None].rtt.rto, 0.01)
        self.check_given_up_at(h, addr, 0.005 + h.s.client_silence)

    def test_slow_but_acknowledging_client_is_kept(self):
        h = Harness()
        addr = ("192.0.2.1", 1000)
        msg = start(h, addr, 0.0)
        now = 0.0
        for _ in range(3):        # an ACK every 4.5 s (retransmissions in between) keeps it
            now += 4.5
            self.run_timers(h, now)
            self.assertIn((addr, None), h.d.active)
            msg = next_ack(h, addr, msg, now)[0]
            self.assertIsInstance(msg, Data)
        self.run_timers(h, now + h.s.client_silence - 0.01)
        self.assertIn((addr, None), h.d.active)
        self.run_timers(h, now + h.s.client_silence)
        self.assertNotIn((addr, None), h.d.active)


# --- Item 2: a fair share of the slots per client IP ------------------------------------------

X = "203.0.113.1"       # a host with many sockets
Y = "198.51.100.9"      # another host


def ports(ip, n, first=1000):
    return [(ip, first + i) for i in range(n)]


def is_busy(msgs):
    return len(msgs) == 1 and isinstance(msgs[0], Error) and msgs[0].code == "BUSY"


class Clients:
    """Transfers on the virtual clock: start them, acknowledge their DATA when told to. Every
    datagram the server sends, to whichever address, goes through feed()."""

    def __init__(self, test, h):
        self.test, self.h = test, h
        self.last = {}          # addr -> the DATA it holds (to acknowledge next)
        self.got = {}           # addr -> payload bytes received
        self.busy = []          # addrs told BUSY
        self.done = []

    def feed(self, out, now):
        mine = []
        for b, addr in out:
            m = parse_server_message(b)
            mine.append((m, addr))
            if isinstance(m, Data):
                self.last[addr] = m
                self.got[addr] = self.got.get(addr, 0) + len(m.payload)
            elif is_busy([m]):
                self.busy.append(addr)
                self.last.pop(addr, None)
            elif isinstance(m, Eof):
                self.last.pop(addr, None)
                self.done.append(addr)
                self.feed(ack(self.h, addr, None, now), now)
        return mine

    def start(self, addr, now, rtt=0.01):
        """Request, and acknowledge SIZE rtt later: what addr got for its ACK."""
        got = self.feed(self.h.request(addr, now), now)
        if not (got and isinstance(got[0][0], Size)):
            return [m for m, a in got if a == addr]
        return [m for m, a in self.feed(ack(self.h, addr, 0, now + rtt), now + rtt) if a == addr]

    def step(self, addrs, now):
        """Timers up to now, then each of addrs acknowledges the DATA it holds."""
        self.feed(self.h.timer(now), now)
        for addr in addrs:
            if addr in self.last:
                m = self.last[addr]
                self.feed(ack(self.h, addr, m.offset + len(m.payload), now), now)


def slots_taken(test, addrs):
    """A server with 4 transfer slots, and a transfer started at 0.0 from each of `addrs`."""
    h = Harness(max_transfers=4)
    c = Clients(test, h)
    for addr in addrs:
        c.start(addr, 0.0)
    return h, c


class FairShareTest(unittest.TestCase):

    def test_one_ip_holding_every_slot_with_slow_keep_alive_acks_then_another_ip_is_served(self):
        h = Harness()
        c = Clients(self, h)
        hogs = ports(X, h.s.max_transfers)            # 128 sockets on one IP
        for addr in hogs:
            c.start(addr, 0.0)
        self.assertEqual(len(h.d.active), h.s.max_transfers)
        for second in range(1, 11):                   # one DATA acknowledged per second each
            c.step(hogs, float(second))
        self.assertEqual(len(h.d.active), h.s.max_transfers)
        # A client on another IP, 300 ms away: its request gets SIZE, its ACK gets DATA.
        y = (Y, 5000)
        first = c.start(y, 10.2, rtt=0.3)
        self.assertIsInstance(first[0], Data)
        self.assertIn((y, None), h.d.active)
        self.assertEqual(h.d.stats["preempted"], 1)
        self.assertEqual(len(c.busy), 1)              # the preempted one was told
        victims = [a for a in hogs if (a, None) not in h.d.active]
        self.assertEqual(len(victims), 1)
        # The hog asks again (a client uses a new port for that): BUSY, while Y is served.
        self.assertTrue(is_busy(parsed(h.request((X, 9999), 10.6), (X, 9999))))
        msg = first[0]
        for i in range(5):
            msg = next_ack(h, y, msg, 10.8 + 0.3 * i)[0]
            self.assertIsInstance(msg, Data)

    def test_preempted_transfer_is_told_busy(self):
        h = Harness(max_transfers=2)
        c = Clients(self, h)
        for addr in ports(X, 2):
            c.start(addr, 0.0)
        y = (Y, 5000)
        h.request(y, 1.0)
        out = ack(h, y, 0, 1.1)
        told = [(parse_server_message(b), a) for b, a in out]
        busy = [a for m, a in told if is_busy([m])]
        self.assertEqual(len(busy), 1)
        self.assertEqual(busy[0][0], X)
        self.assertIsInstance([m for m, a in told if a == y][0], Data)
        self.assertEqual(h.d.stats["busy"], 1)

    def test_an_ip_holding_many_slots_gets_busy_for_more_while_another_is_served(self):
        xs = ports(X, 3)
        h, c = slots_taken(self, xs + [(Y, 5000)])
        self.assertEqual(len(h.d.active), 4)
        # X holds 3 of 4 and Y 1; the fair share of two IPs is 2.
        self.assertTrue(is_busy(parsed(h.request((X, 2000), 1.0), (X, 2000))))
        # Y may have a second: it takes the slot of X's slowest.
        c.step(xs[1:], 0.5)                           # xs[0] moved least lately
        msg = c.start((Y, 5001), 1.0)[0]
        self.assertIsInstance(msg, Data)
        self.assertEqual(c.busy, [xs[0]])
        self.assertEqual((h.d.by_ip.held(X), h.d.by_ip.held(Y)), (2, 2))
        # Now both hold their share: more from either is BUSY, and nobody is preempted.
        for addr in ((X, 2001), (Y, 5002)):
            self.assertTrue(is_busy(parsed(h.request(addr, 1.5), addr)))
        self.assertEqual(h.d.stats["preempted"], 1)

    def test_free_slots_are_used_when_nobody_waits(self):
        h = Harness(max_transfers=4)
        c = Clients(self, h)
        for addr in ports(X, 4):                      # one IP may take every idle slot
            self.assertIsInstance(c.start(addr, 0.0)[0], Data)
        self.assertEqual(h.d.stats["busy"], 0)

    def test_two_clients_with_many_parts_both_progress(self):
        h = Harness(max_transfers=8)
        c = Clients(self, h)
        xs, ys = ports(X, 8), ports(Y, 8)
        for addr in xs:
            c.start(addr, 0.0)
        for addr in ys:
            c.start(addr, 0.1)
        now = 0.2
        for _ in range(20):                           # both keep acknowledging
            c.step(xs + ys, now)
            now += 0.02
        self.assertEqual((h.d.by_ip.held(X), h.d.by_ip.held(Y)), (4, 4))
        moving_x = [a for a in xs if (a, None) in h.d.active and c.got.get(a, 0) > 1000]
        moving_y = [a for a in ys if (a, None) in h.d.active and c.got.get(a, 0) > 1000]
        self.assertEqual((len(moving_x), len(moving_y)), (4, 4))

    def test_kept_alive_transfers_of_many_ips_give_way_to_a_waiting_client(self):
        slow = [("192.0.2.%d" % i, 1000) for i in range(1, 5)]
        h, c = slots_taken(self, slow)
        z = (Y, 5000)
        # Young transfers are never judged: within the first window Z waits.
        self.assertTrue(is_busy(c.start(z, 2.0)))
        for second in (2, 4, 6, 8, 10, 12):           # an ACK every 2 s: kept alive, no more
            c.step(slow, float(second))
        self.assertEqual(len(h.d.active), 4)
        self.assertIsInstance(c.start(z, 12.5)[0], Data)
        self.assertEqual(h.d.stats["preempted"], 1)
        self.assertEqual(c.busy[0], z)
        self.assertEqual([a in slow for a in c.busy[1:]], [True])   # one slow one gave way

    def test_transfers_that_move_keep_their_slots(self):
        quick = [("192.0.2.%d" % i, 1000) for i in range(1, 5)]
        h, c = slots_taken(self, quick)
        now = 0.0
        while now < 7.0:                              # 5 ACKs a second each
            now += 0.2
            c.step(quick, now)
        z = (Y, 5000)
        self.assertTrue(is_busy(c.start(z, now)))
        self.assertEqual(h.d.stats["preempted"], 0)
        self.assertEqual(c.busy, [z])
        # Z now waits for a slot: the first one free is kept for it.
        self.assertIn(Y, h.d.waiting)


class Ipv6ClientTest(unittest.TestCase):
    """An IPv6 host usually has a whole /64: its addresses are one client for fair shares."""

    def test_client_of(self):
        self.assertEqual(client_of(("192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(client_of(("::ffff:192.0.2.1", 1, 0, 0)), "192.0.2.1")
        self.assertEqual(client_of(("2001:db8:1:2::5", 1, 0, 0)),
                         client_of(("2001:db8:1:2:ffff:1:2:3", 9, 0, 0)))
        self.assertNotEqual(client_of(("2001:db8:1:2::5", 1, 0, 0)),
                            client_of(("2001:db8:1:3::5", 1, 0, 0)))

    def test_one_64_with_many_addresses_gets_one_share(self):
        hogs = [("2001:db8:1:2::%x" % (i + 1), 1000, 0, 0) for i in range(4)]
        h, c = slots_taken(self, hogs)
        y = ("2001:db8:9:9::1", 5000, 0, 0)
        self.assertIsInstance(c.start(y, 1.0)[0], Data)
        self.assertEqual(h.d.stats["preempted"], 1)
        self.assertTrue(is_busy(c.start(("2001:db8:1:2::99", 7, 0, 0), 1.5)))

    def test_pending_flood_from_one_64_evicts_itself(self):
        h = Harness(max_pending=16)
        real = ("2001:db8:9:9::1", 5000, 0, 0)
        self.assertIsInstance(parsed(h.request(real, 0.0), real)[0], Size)
        for i in range(1000):
            h.request(("2001:db8:1:2::%x" % (i + 1), 4000, 0, 0), 0.3 * i / 1000)
        self.assertIsInstance(parsed(ack(h, real, 0, 0.3), real)[0], Data)


# --- Item 5: BUSY sent in one place; the dispatcher uses public properties --------------------

class OnePlaceForBusyTest(unittest.TestCase):

    def test_busy_for_mere_requests_is_rate_limited(self):
        h = Harness(max_transfers=1, error_rate=0.001, error_burst=2)
        Clients(self, h).start((X, 1), 0.0)
        answers = [h.request((X, 2 + i), 1.0) for i in range(5)]   # X holds its share
        self.assertEqual([len(a) for a in answers], [1, 1, 0, 0, 0])
        self.assertTrue(all(is_busy(parsed(a, a[0][1])) for a in answers[:2]))
        self.assertEqual(h.d.stats["busy"], 5)
        self.assertEqual(h.d.stats["errors_suppressed"], 3)

    def test_busy_for_a_proven_address_always_goes(self):
        h = Harness(max_transfers=1, error_rate=0.001, error_burst=1)
        Clients(self, h).start((X, 1), 0.0)
        h.recv(b"garbage", ("192.0.2.99", 9), 0.5)    # the error budget is spent
        self.assertEqual(h.d.errors.tokens, 0)
        y = (Y, 5000)
        self.assertIsInstance(parsed(h.request(y, 1.0), y)[0], Size)
        self.assertTrue(is_busy(parsed(ack(h, y, 0, 1.1), y)))   # X's one transfer is young

    def test_tries_and_ceiling_are_public(self):
        h = Harness()
        addr = (X, 1)
        start(h, addr, 0.0)
        t = h.d.active[addr, None]
        self.assertEqual((t.tries, t.ceiling), (1, h.s.datagram_size))
        h.timer(h.d.get_timer())
        self.assertEqual(t.tries, 2)


# --- Item 2: the pending pool -----------------------------------------------------------------

class PendingPoolTest(unittest.TestCase):

    def test_ip_counts(self):
        counts = IpCounts()
        for addr in [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("c", 1)]:
            counts.add(addr, addr[0])
        self.assertEqual((counts.size, counts.most(), counts.heaviest()), (6, 3, "b"))
        self.assertEqual(counts.oldest_of_heaviest(), ("b", 1))
        counts.discard(("b", 1), "b")
        counts.discard(("b", 1), "b")                 # twice: no harm
        self.assertEqual((counts.size, counts.most(), counts.heaviest()), (5, 2, "a"))
        self.assertEqual(counts.oldest_of_heaviest(), ("a", 1))
        for addr in [("a", 1), ("a", 2), ("b", 2), ("b", 3)]:
            counts.discard(addr, addr[0])
        self.assertEqual((counts.size, counts.most(), counts.heaviest()), (1, 1, "c"))
        counts.discard(("c", 1), "c")
        self.assertEqual((counts.size, counts.most(), counts.heaviest()), (0, 0, None))

    def flood_then_ack(self, h, real, flood_addrs, rtt=0.3, t0=1.0):
        """real asks at t0; the flood's requests arrive during its round trip; real's ACK
        comes rtt later. Returns what real got for its ACK."""
        self.assertIsInstance(parsed(h.request(real, t0), real)[0], Size)
        for i, addr in enumerate(flood_addrs):
            h.request(addr, t0 + rtt * i / len(flood_addrs))
            self.assertLessEqual(len(h.d.pending), h.s.max_pending)
        return parsed(ack(h, real, 0, t0 + rtt), real)

    def test_flood_from_one_ip_evicts_itself_not_a_long_rtt_client(self):
        h = Harness(max_pending=16)
        real = (Y, 5000)
        got = self.flood_then_ack(h, real, ports(X, 2000))
        self.assertIsInstance(got[0], Data)
        self.assertIn((real, None), h.d.active)
        self.assertGreater(h.d.stats["evicted"], 1900)
        self.assertEqual({a[0] for a, _ in h.d.pending}, {X})

    def test_the_flooders_oldest_is_dropped(self):
        h = Harness(max_pending=4, pending_reserved=0.0)
        h.request((Y, 1), 0.0)
        h.request((X, 1), 0.1)
        h.request((X, 2), 0.2)
        h.request((Y, 2), 0.3)
        h.request((X, 3), 0.4)          # full: X holds most, its oldest goes
        self.assertEqual([a for a, _ in h.d.pending], [(Y, 1), (X, 2), (Y, 2), (X, 3)])

    def test_flood_from_forged_ips_does_not_evict_a_returning_client(self):
        h = Harness(max_pending=16)
        real = (Y, 5000)
        h.recv(b"LIST", real, 0.0)                    # it completed a transfer before
        ack(h, real, 0, 0.3)
        ack(h, real, None, 0.6)
        self.assertIn(Y, h.d.known)
        forged = [("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 4000) for i in range(2000)]
        got = self.flood_then_ack(h, (Y, 5001), forged)
        self.assertIsInstance(got[0], Data)
        strangers = [a for a, _ in h.d.pending if a[0] != Y]
        reserved = int(h.s.max_pending * h.s.pending_reserved)
        self.assertLessEqual(len(strangers), h.s.max_pending - reserved)

    def test_known_ips_give_way_beyond_their_reserve(self):
        h = Harness(max_pending=8)
        h.d.known[Y] = None
        for addr in ports(Y, 8):
            h.request(addr, 0.0)
        self.assertEqual(len(h.d.pending), 8)
        # Strangers from one IP: that IP and Y end up holding the same number.
        for addr in ports(X, 8):
            h.request(addr, 0.1)
        self.assertEqual(sum(a[0] == X for a, _ in h.d.pending), 4)
        self.assertEqual(sum(a[0] == Y for a, _ in h.d.pending), 4)
        # From forged IPs, one each: Y gives way down to its reserve (8 // 4 = 2), no further.
        for i in range(100):
            h.request(("10.0.0.%d" % i, 1), 0.2)
        self.assertEqual(sum(a[0] == Y for a, _ in h.d.pending), 2)
        self.assertEqual(len(h.d.pending), 8)


if __name__ == "__main__":
    unittest.main()
