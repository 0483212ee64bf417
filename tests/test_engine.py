"""The transfer engine's adaptive parts, on a virtual clock: the client's lane controller (on a
fluid model of a bottleneck) and range planner, the server's Path (path MTU, datagram size under
loss and on long paths), and the retransmission rules that keep a lossy path moving (a resend
re-cut to the path's size; early resends are not silence). Also the server loop's order of
work: queued datagrams before due timers (a real socket).

Run: `python3 -m tests test_engine`.
"""

import logging
import os
import random
import socket
import threading
import types
import unittest
import zlib

import config
import server
from tests import support
from udpxfer.client_transfer import RECEIVING, ClientTransfer
from udpxfer.dispatcher import ServerDispatcher
from udpxfer.folder import Folder
from udpxfer.netpath import Path, SendOrder, fragment_payload, fragments, size_ladder
from udpxfer.lanes import LaneController
from udpxfer.planner import RangePlanner
from udpxfer.server_transfer import MemoryEntry
from udpxfer.wire import (HUGE, Data, DownloadRequest, ListRequest, Size, crc_start, format_ack,
                          format_ack_eof, format_data_header, format_download, format_eof,
                          format_listing, format_size, parse_server_message, token_maker)

QUIET = logging.getLogger("udpxfer.tests.test_engine")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False

A = ("192.0.2.10", 40001)
FOUR, THREE = 4 * 1480 - 8, 3 * 1480 - 8   # datagrams of four and three IPv4 fragments
B = ("192.0.2.10", 40002)


class Catalog:
    """Files in memory for the dispatcher."""

    def __init__(self, files):
        self.files = {name: MemoryEntry(data) for name, data in files.items()}

    def lookup(self, name):
        return self.files.get(name)

    def listing(self):
        return MemoryEntry(format_listing(
            (n, e.size) for n, e in self.files.items()))


class Server:
    """A dispatcher and what it sent, by address; tokens taken from the SIZEs it sent."""

    def __init__(self, files, mtu=1500, **settings):
        self.s = config.ServerSettings(**settings)
        self.d = ServerDispatcher(Catalog(files), self.s, QUIET, path_mtu=lambda ip: mtu)
        self.tokens = {}

    def recv(self, data, addr, now):
        self.d.receive_datagram(data, addr, now)
        return self.drain()

    def drain(self):
        out = []
        for datagram, addr in self.d.datagrams_to_send():
            data = b"".join(bytes(p) for p in datagram)
            msg = parse_server_message(data)
            if isinstance(msg, Size):
                self.tokens[addr] = msg.token
            out.append((msg, addr))
        return out

    def timer(self, now):
        self.d.handle_timer(now)
        return self.drain()

    def ack(self, n, addr, now):
        return self.recv(format_ack(n, self.tokens[addr]), addr, now)


def blob(n, seed=0):
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little")


class Bottleneck:
    """A fluid model of one path for the lane controller, on a virtual clock: `rate` bytes per
    second at the bottleneck, `rtt` seconds of propagation, a queue of `queue` bytes in front of
    it (what overflows is lost), datagrams of `dgram` bytes. Every lane carries one datagram
    per round trip (propagation plus queueing); a lane opened now carries data two round trips
    later (request, SIZE; ACK, DATA); the pace, if any, caps what the lanes send."""

    def __init__(self, rate, rtt, queue=None, dgram=6000, loss=0.0, seed=3):
        self.rate, self.rtt, self.dgram, self.loss = rate, rtt, dgram, loss
        self.queue_max = queue if queue is not None else 2 * rate * rtt
        self.queue = 0.0
        self.rng = random.Random(seed)
        self.lost = 0
        self.carry = 0.0       # delivered bytes short of a whole datagram
        self.now = 0.0

    def run(self, control, seconds, on_step=None):
        """`seconds` more on the path's clock (which goes on from one run to the next)."""
        now, step = self.now, self.rtt / 4
        end = now + seconds
        # (when, lanes) as the lanes to run grew; those in flight are at most the window
        opened = [(now - 2 * self.rtt, control.lanes_to_run())]
        while now < end:
            now += step
            lanes = max((n for at, n in opened if at <= now - 2 * self.rtt), default=0)
            lanes = min(lanes, control.window)
            delay = self.rtt + self.queue / self.rate
            offered = lanes * self.dgram / delay
            if control.pacing_rate is not None:
                offered = min(offered, control.pacing_rate)
            into = offered * step
            out = min(self.rate * step, self.queue + into)
            self.queue += into - out
            if self.queue > self.queue_max:
                self.lost += self.queue - self.queue_max
                self.queue = self.queue_max
            self.carry += out
            while self.carry >= self.dgram:
                self.carry -= self.dgram
                if self.rng.random() >= self.loss:
                    control.delivered(self.dgram, now - delay)
            control.rtt_sample(self.rtt + self.queue / self.rate)
            control.update(now, limited=False)
            run = control.lanes_to_run()
            if run != opened[-1][1]:   # (fewer: ranges end, none start)
                opened.append((now, run))
            if on_step is not None:
                on_step(now, self)
        self.now = now
        return now


class LaneControllerTest(unittest.TestCase):
    """The lanes follow the bandwidth-delay product (lanes.py), on a virtual clock."""

    def settings(self, **kw):
        return config.ClientSettings(**kw)

    def test_a_long_fat_path_gets_its_lanes_within_a_few_round_trips(self):
        # 200 Mbit/s, 50 ms, 6 KB datagrams: a BDP of 1.25 MB is about 210 lanes.
        path = Bottleneck(25e6, 0.05)
        control = LaneController(self.settings(), 0.0)
        seen = []
        path.run(control, 3.0, lambda now, p: seen.append((now, control.window,
                                                           control.phase)))
        bdp = path.rate * path.rtt / path.dgram
        first_full = next(now for now, window, _ in seen if window >= bdp)
        self.assertLess(first_full, 0.6, "more than twelve round trips to fill the path")
        self.assertNotEqual(control.phase, "startup")
        self.assertGreaterEqual(control.window, bdp)
        self.assertLessEqual(control.window, 3 * bdp)
        self.assertAlmostEqual(control.bw / path.rate, 1.0, delta=0.15)
        self.assertIsNotNone(control.pacing_rate)
        self.assertLess(control.pacing_rate, 1.3 * path.rate)
        self.assertLess(path.lost / (path.rate * 3.0), 0.02, "the startup overflowed the queue")

    def test_random_loss_is_not_congestion(self):
        clean, lossy = Bottleneck(25e6, 0.05), Bottleneck(25e6, 0.05, loss=0.01)
        a, b = LaneController(self.settings(), 0.0), LaneController(self.settings(), 0.0)
        clean.run(a, 3.0)
        lossy.run(b, 3.0)
        self.assertGreater(b.bw, 0.9 * a.bw)
        self.assertGreater(b.window, 0.85 * a.window)

    def test_loopback_keeps_few_lanes_and_no_pace(self):
        path = Bottleneck(500e6, 0.0001, dgram=65000)
        control = LaneController(self.settings(), 0.0)
        path.run(control, 0.5)
        self.assertIsNone(control.pacing_rate)
        self.assertLessEqual(control.window, 8)

    def test_fixed_parts_and_a_cap(self):
        control = LaneController(self.settings(), 0.0, fixed=16)
        path = Bottleneck(25e6, 0.05)
        path.run(control, 1.0)
        self.assertEqual((control.window, control.pacing_rate), (16, None))
        control.fix(0)
        path.run(control, 2.0)
        self.assertGreater(control.window, 16)
        control.cap(20)                      # the server had no slot for more
        path.run(control, 1.0)
        self.assertLessEqual(control.window, 20)

    def test_one_sample_that_timed_the_wrong_ack_is_not_the_paths_round_trip(self):
        # A DATA that answered an earlier ACK than the one timed (0.0 s on a 50 ms path) must
        # not become the round trip: the window would follow a fifth of the path's
        # bandwidth-delay product down, and the rate with it. A path that really got shorter
        # is believed at once (its samples are many).
        path = Bottleneck(25e6, 0.05)
        control = LaneController(self.settings(), 0.0)
        path.run(control, 2.0)
        before = control.window
        bogus = [True]

        def once(now, p):
            if bogus:
                control.rtt_sample(0.0001)
                bogus.pop()

        path.run(control, 2.0, once)
        self.assertAlmostEqual(control.min_rtt, 0.05, delta=0.005)
        self.assertGreater(control.window, 0.8 * before)
        path.rtt = 0.03
        path.run(control, 1.0)
        self.assertLess(control.min_rtt, 0.035)

    def test_a_sudden_drop_in_rate_brings_the_window_down(self):
        # Another flow takes half the bottleneck: within the max filter's ten rounds the rate
        # falls, and the window with it.
        path = Bottleneck(25e6, 0.05)
        control = LaneController(self.settings(), 0.0)
        path.run(control, 3.0)
        before = control.window
        path.rate = 12.5e6
        path.run(control, 2.0)
        self.assertLess(control.window, 0.75 * before)

    def test_on_a_lan_lanes_double_while_the_rate_grows_and_stay_there(self):
        # A LAN at 5% loss: the round trip is 0.2 ms, but every lane stalls now and then for a
        # retransmission, so the rate grows with the lanes (2 MB/s each) up to what the two
        # ends can do (48 MB/s): startup doubles them while that pays, and they stay.
        control = LaneController(self.settings(), 0.0)
        now, dgram = 0.0, 4000
        seen = []
        for _ in range(400):                  # 2 s of 5 ms rounds, in 1 ms ticks
            rate = min(control.window * 2e6, 48e6)
            for _ in range(int(rate * 0.001 / dgram)):
                control.delivered(dgram, now - 0.0002)
                control.rtt_sample(0.0002)
            now += 0.001
            control.update(now)
            seen.append(control.window)
        self.assertIsNone(control.pacing_rate)
        self.assertGreaterEqual(control.window, 24)
        self.assertLessEqual(max(seen), control.s.lan_lanes_max)
        self.assertLessEqual(control.window, 64)

    def test_the_window_is_bytes_counted_in_lanes_of_the_servers_datagram_size(self):
        path = Bottleneck(25e6, 0.05, dgram=12000)
        control = LaneController(self.settings(), 0.0)
        path.run(control, 3.0)
        lanes, cwnd = control.window, control.cwnd
        self.assertAlmostEqual(control.dgram, 12000, delta=1)
        self.assertAlmostEqual(lanes * 12000 / cwnd, 1.0, delta=0.05)
        # The server's datagrams grow fourfold: fewer lanes within a quarter round trip (the
        # lanes waiting to send their ACK would bring the bigger ones).
        path.dgram = 48000
        path.run(control, 0.03)
        self.assertLessEqual(control.window, lanes // 3)
        # ... and shrink eightfold: more lanes, but at most twice as many each round (smaller
        # datagrams may be back to their size within a round trip; lanes cannot be taken back).
        before = control.window
        path.dgram = 6000
        seen = []
        path.run(control, 0.5, lambda now, p: seen.append(control.window))
        self.assertGreater(control.window, 4 * before)
        grew = [b / a for a, b in zip(seen, seen[1:]) if b > a]
        self.assertLessEqual(max(grew), 2.0)

    def test_a_burst_delivered_at_once_is_not_the_paths_rate(self):
        # A round's bytes came in 20 ms (a token bucket let them through together), but the
        # ACKs that brought them went over 50 ms: the rate is theirs over 50 ms.
        control = LaneController(self.settings(), 0.0)
        now = 0.0
        for r in range(4):                    # a few rounds at 10 MB/s
            for i in range(50):
                control.delivered(10000, now - 0.05)
                control.rtt_sample(0.05)
                now += 0.001
            control.update(now)
        sent = now - 0.05
        now += 0.03                           # nothing comes for 30 ms ...
        for i in range(50):                   # ... then 500 KB in 20 ms, sent over 50 ms
            control.delivered(10000, sent + i * 0.001)
            control.rtt_sample(0.05)
            now += 0.0004
        control.update(now)
        self.assertLess(control.bw, 11e6)

    def test_a_lane_stops_counting_as_in_flight_when_its_answer_is_overdue(self):
        control = LaneController(self.settings(), 0.0)
        self.assertEqual(control.flight_limit(), control.s.request_timeout)   # nothing known
        for _ in range(20):
            control.rtt_sample(0.05)
        control.update(0.06)
        self.assertAlmostEqual(control.flight_limit(), 0.1 + control.s.flight_limit_min,
                               delta=0.001)   # twice the round trip
        for _ in range(40):                   # a queue: the smoothed round trip grows
            control.rtt_sample(0.2)
        self.assertAlmostEqual(control.flight_limit(), 1.5 * control.srtt + 0.002, delta=0.001)


class RangePlannerTest(unittest.TestCase):
    """Which range comes next (planner.py): a lane's share of what is left."""

    SIZE = 256 << 20

    def plan(self, busy=(), **kw):
        p = RangePlanner(config.ClientSettings(**kw))
        p.plan(self.SIZE, list(busy))
        return p

    def test_each_range_is_a_lanes_share_of_what_is_left(self):
        p = self.plan()
        a, n = p.next_range(8, 65000, None, 0)
        self.assertEqual((a, n), (0, 32 << 20))           # 256 MiB / 8
        a, n = p.next_range(8, 65000, None, n)            # what runs counts as left
        self.assertEqual((a, n), (32 << 20, 32 << 20))
        a, n = p.next_range(8, 65000, None, 32 << 20)     # 192 + 32 left, / 8
        self.assertEqual((a, n), (64 << 20, 28 << 20))

    def test_a_range_lasts_at_most_range_seconds_at_a_lanes_rate(self):
        # 50 ms, 80 lanes of 24 KB datagrams: a lane moves 480 KB/s, a range at most 240 KB;
        # before any rate is measured (startup), first_range.
        self.assertEqual(self.plan().next_range(8, 24000, 480e3, 0), (0, int(0.5 * 480e3)))
        self.assertEqual(self.plan().next_range(8, 24000, 0.0, 0), (0, 64 << 10))
        self.assertEqual(self.plan().next_range(8, 24000, 400e6, 0), (0, 32 << 20))  # loopback

    def test_no_range_shorter_than_the_floor_nor_a_shorter_gap_left_behind(self):
        p = self.plan()
        floor = p.min_piece(6000, 0.0)
        self.assertEqual(floor, p.s.tail_min_size)
        self.assertEqual(p.min_piece(7000, 0.0), 16 * 1024)
        self.assertEqual(p.min_piece(66000, 0.0), 2 * 66000)
        p.gaps = [(0, 3 * floor)]
        self.assertEqual(p.next_range(100, 6000, 0.0, 0), (0, floor))
        p.gaps = [(0, floor + floor // 2)]
        self.assertEqual(p.next_range(100, 6000, 0.0, 0), (0, floor + floor // 2))
        self.assertEqual(p.gaps, [])
        # ... and part_seconds at a lane's rate (each range costs a request).
        self.assertEqual(p.min_piece(6000, 200e6), int(200e6 * p.s.part_seconds))

    def test_at_most_max_part_size_and_one_lane_takes_each_gap_whole(self):
        p = self.plan()
        self.assertEqual(p.next_range(2, 65000, None, 0), (0, 64 << 20))
        p = self.plan(busy=[(10, 20)])
        self.assertEqual(p.next_range(1, 65000, None, 0), (0, 10))
        self.assertEqual(p.next_range(1, 65000, None, 0), (20, self.SIZE - 20))

    def test_the_first_range_before_the_size_is_known(self):
        p = RangePlanner(config.ClientSettings())
        self.assertEqual(p.first_length(32, 65000), 64 << 10)
        self.assertEqual(p.first_length(1, 65000), HUGE)
        p.size_hint = 1 << 20                             # from the listing: a lane's share
        self.assertEqual(p.first_length(32, 1000), 32 << 10)
        p.size_hint = 32 << 20                            # ... at most first_range
        self.assertEqual(p.first_length(32, 8192), 64 << 10)
        p.size_hint = 64 << 10                            # a small file: whole
        self.assertEqual(p.first_length(32, 66000), 2 * 66000)
        self.assertIsNone(RangePlanner(config.ClientSettings(), listing=True).first_length(8, 1))

    def test_what_was_not_finished_goes_first_in_line(self):
        p = self.plan()
        p.next_range(8, 65000, 0.0, 0)
        p.put_back(1000, 5000)
        self.assertEqual(p.gaps[0], (1000, 5000))
        p.put_back(7, 7)                                  # nothing: ignored
        self.assertEqual(p.gaps[0], (1000, 5000))


class PathMtuTest(unittest.TestCase):

    def test_loopback_mtu_is_large_where_the_os_tells(self):
        mtu = server.path_mtu("127.0.0.1")
        if mtu is None:
            self.skipTest("this OS does not report a route's MTU")
        self.assertGreater(mtu, 1500)

    def test_unknown_address_family_or_error_gives_none_not_an_exception(self):
        self.assertIn(server.path_mtu("256.1.1.1"), (None,))


class Sending:
    """A stand-in for a transfer sending data (hashable, unlike a SimpleNamespace)."""


class PathSizeTest(unittest.TestCase):

    def test_nothing_fragments_on_loopback_so_loss_keeps_big_datagrams(self):
        p = Path(config.ServerSettings(), 65507, mtu=65536)
        for i in range(2000):
            p.outcome(65507, lost=(i % 10 == 0))
        self.assertEqual(p.size, 65507)

    def test_a_lossy_fragmenting_path_gets_few_fragment_datagrams_then_big_ones_again(self):
        p = Path(config.ServerSettings(), 65507, mtu=1500)
        rng = random.Random(3)
        for _ in range(300):
            p.outcome(p.size, lost=rng.random() > 0.99 ** fragments(p.size, 1480))
        self.assertEqual(p.size, FOUR)
        self.assertEqual(fragments(FOUR, 1480, 1480), 4)
        for _ in range(20000):
            p.outcome(p.size, lost=False)
        self.assertEqual(p.size, 44 * 1480 - 8)   # 44 full fragments (65507 would be 45)

    def downloading(self, p, size, pos=0, name="f.bin"):
        """A stand-in for a transfer of the IP with a DATA outstanding at pos of a file."""
        t = Sending()
        t.entry, t.pos, t.name = types.SimpleNamespace(size=size), pos, name
        p.sending.add(t)
        return t

    def lossy(self, p, seconds, now=0.0, seed=6, t=None, loss=0.01):
        """A datagram every 0.2 ms, `loss` per packet; returns the time and the fragments of
        each size chosen then. Each datagram that arrives moves the stand-in t on."""
        rng, seen = random.Random(seed), []
        for _ in range(int(seconds / 0.0002)):
            now += 0.0002
            lost = rng.random() > (1 - loss) ** fragments(p.size, 1480)
            if t is not None and not lost:
                t.pos += p.size
            p.outcome(p.size, lost, now)
            if lost and p.loss_rate() > p.s.fragment_loss_limit:   # the size was chosen again
                seen.append(p.fragments(p.size))
        return now, seen

    def test_four_fragments_while_the_orphans_they_leave_fit_the_budget(self):
        # Each lost datagram of k fragments leaves k - 1 in the client's reassembly buffer for
        # 30 s. A 32 MiB download fits the budget at three fragments, so it gets four; a 512
        # MiB one does not even at two, and gets two (which move twice the bytes before the
        # buffer is full) until the end of it is near.
        s = config.ServerSettings()
        for size, want, end in ((32 << 20, {4}, 4), (512 << 20, {2}, 4)):
            with self.subTest(size=size):
                p = Path(s, 65507, mtu=1500)
                t = self.downloading(p, size)
                _, seen = self.lossy(p, 0.2)
                self.assertEqual(set(seen[20:]), want)    # (once the estimate settled)
                t.pos = size - (4 << 20)
                _, seen = self.lossy(p, 0.05, now=0.2)
                self.assertEqual(seen[-1], end, "4 MiB to go fit in what is left")

    def test_the_most_fragments_while_one_fewer_would_still_fit_the_rest(self):
        # 256 MiB fits the budget at two fragments, not at three: four while three would
        # still fit the rest, three while two would, then two.
        p = Path(config.ServerSettings(), 65507, mtu=1500)
        t = self.downloading(p, 256 << 20)
        _, seen = self.lossy(p, 4.0, t=t)
        self.assertEqual(seen[0], 4)
        self.assertIn(3, seen)
        self.assertEqual(set(seen[-200:]), {2})     # with most of the file still to come
        self.assertGreater((256 << 20) - t.pos, 128 << 20)

    def test_the_choice_depends_on_the_state_now_not_on_an_earlier_download(self):
        s = config.ServerSettings()
        paths = [Path(s, 65507, mtu=1500) for _ in range(2)]
        for p in paths:
            p.loss_rate = lambda: 0.015
        old, fresh = paths
        t = self.downloading(old, 256 << 20)
        old._choose_size(0.0)
        self.assertEqual(old.fragments(old.size), 2)     # 256 MiB fit at none but two
        t.entry.size = 0
        old._choose_size(1.0)
        self.assertEqual(old.fragments(old.size), 4)     # nothing to come
        for p in paths:
            self.downloading(p, 20 << 20, name="g.bin")
            p._orphan(p.s.orphan_budget - 300, 1.0)   # room for two fragments, not three
            p._choose_size(2.0)
        self.assertEqual(fresh.fragments(fresh.size), 3)
        self.assertEqual(old.fragments(old.size), 3)

    def test_two_parts_of_one_file_count_once_and_two_files_add_up(self):
        p = Path(config.ServerSettings(), 65507, mtu=1500)
        self.downloading(p, 100, 10)
        self.downloading(p, 100, 60)
        self.assertEqual(p.bytes_to_come(), 90)
        self.downloading(p, 50, 0, name="g.bin")
        self.assertEqual(p.bytes_to_come(), 140)

    def test_two_fragments_once_the_budget_is_spent_and_four_when_the_orphans_expire(self):
        # With nothing known to come (the listing, a client between files), four fragments
        # until the orphans counted pass the budget, then two on a LAN (a full buffer is found
        # by most datagrams lost, see below); once they expire, four again.
        s = config.ServerSettings()
        p = Path(s, 65507, mtu=1500)
        now, seen = self.lossy(p, 10.0)
        self.assertGreater(p.orphans(now), s.orphan_budget)
        first = seen.index(2)
        self.assertEqual(set(seen[:first]), {4})
        self.assertEqual(set(seen[first:]), {2})
        now += s.reassembly_backoff + 1      # later: the orphans are gone
        self.assertEqual(p.orphans(now), 0)
        for _ in range(32):                  # (the size is chosen again every 32 datagrams)
            p.outcome(p.size, False, now)
        self.assertGreater(p.loss_rate(), s.fragment_loss_limit)
        self.assertEqual(p.size, FOUR)

    def test_a_long_path_goes_unfragmented_once_the_budget_is_spent(self):
        # On a long path (the fragment cap follows bursts of losses and grows back within a
        # round trip) none fragmented once the orphans counted pass the budget: three 64 MiB
        # downloads in a row at 1% loss filled the receiver's buffer with two.
        s = config.ServerSettings()
        p = Path(s, 65507, mtu=1500)
        p.sample(0.05)
        now, seen = self.lossy(p, 10.0)
        self.assertGreater(p.orphans(now), s.orphan_budget)
        first = seen.index(1)
        self.assertLessEqual(set(seen[:first]), {2, 3, 4})
        self.assertEqual(set(seen[first:]), {1})
        self.assertLessEqual(p.orphans(now), s.orphan_budget + 200)

    def test_three_fragments_where_losses_are_heavy(self):
        # At 5% loss four-fragment datagrams are lost too often (16 MiB: 0.317 s against 0.308).
        # (A budget that holds all the orphans: this is about the loss rate.)
        s = config.ServerSettings(orphan_budget=10 ** 6)
        p = Path(s, 65507, mtu=1500)
        self.lossy(p, 0.6, seed=5, loss=0.05)
        self.assertGreater(p.loss_rate(), s.heavy_loss)
        self.assertEqual(p.size, THREE)

    def test_a_full_reassembly_buffer_means_unfragmented_datagrams_for_a_while(self):
        s = config.ServerSettings()
        p = Path(s, 65507, mtu=1500)
        rng = random.Random(4)
        now = 0.0
        for _ in range(300):                 # 1% loss: four-fragment datagrams
            now += 0.0001
            p.outcome(p.size, rng.random() > 0.99 ** fragments(p.size, 1480), now)
        self.assertEqual(p.size, FOUR)
        for _ in range(200):                 # now every fragmented datagram is lost
            now += 0.0001
            k = fragments(p.size, 1480, 1480)
            p.outcome(p.size, k > 1 or rng.random() > 0.99, now)
        self.assertEqual(p.size, 1472)
        for ban in (1.0, 2.0, 4.0):          # the buffer stays full: longer each time
            until = now + ban
            while now < until - 0.01:        # unfragmented ones keep working meanwhile
                now += 0.01
                p.outcome(p.size, rng.random() > 0.99, now)
                self.assertEqual(p.size, 1472)
            for _ in range(100):
                now += 0.01
                p.outcome(p.size, rng.random() > 0.99, now)
            self.assertIn(p.size, (THREE, FOUR), "fragments are tried again after %g s" % ban)
            while p.size != 1472:            # ... and lost again
                now += 0.0001
                p.outcome(p.size, fragments(p.size, 1480, 1480) > 1 or rng.random() > 0.99, now)
        now += 2 * s.reassembly_backoff      # a long spell without: short again
        p.outcome(p.size, False, now)
        for _ in range(100):
            now += 0.0001
            p.outcome(p.size, fragments(p.size, 1480, 1480) > 1, now)
        self.assertEqual(p.size, 1472)
        self.assertAlmostEqual(p._unfragmented_until - now, 1.0, delta=0.01, msg="short again")

    def test_a_few_lost_fragmented_datagrams_are_not_a_full_buffer(self):
        p = Path(config.ServerSettings(orphan_budget=10 ** 6), 65507, mtu=1500)
        now = 0.0
        for i in range(3000):                # 10% of datagrams lost, in bursts of 8
            now += 0.0001
            p.outcome(p.size, i % 80 < 8, now)
        self.assertEqual(p.size, FOUR)

    def test_a_long_path_starts_with_few_fragments_and_halves_them_on_a_burst(self):
        s = config.ServerSettings()
        p = Path(s, 65507, mtu=1500)
        self.assertEqual(fragments(p.size, 1480, 1480), 44)   # a LAN: the largest
        p.sample(0.05)                                         # a WAN: start_fragments
        self.assertEqual(p.fragment_cap, s.start_fragments)
        eight = fragments(p.size, 1480, 1480)
        self.assertEqual(eight, 8)
        now = 1.0
        for i in range(500):                 # a lost one now and then: nothing changes
            now += 0.001
            p.outcome(p.size, i % 250 == 0, now)
        self.assertEqual(p.fragment_cap, 8)
        for i in range(40):                  # a queue overflowed: many lost together
            now += 0.0005
            p.outcome(p.size, i % 2 == 0, now)
        self.assertEqual(p.fragment_cap, 4, "halved once a round trip, not once a loss")
        self.assertLessEqual(fragments(p.size, 1480, 1480), 4)
        p.spurious()                         # ... but if that was not a loss: undone
        self.assertEqual(p.fragment_cap, 8)

    def test_a_burst_of_timeouts_is_not_a_burst_of_losses_on_a_long_path(self):
        # A client that holds its lanes' ACKs (in the order their DATAs came) makes timeouts
        # with no later DATA acknowledged: that does not halve the fragments. The same losses
        # shown by evidence (later DATAs acknowledged) do. Both count in the loss rate.
        for timed_out in (True, False):
            with self.subTest(timed_out=timed_out):
                s = config.ServerSettings()
                p = Path(s, 65507, mtu=1500)
                p.sample(0.05)
                now = 1.0
                for i in range(500):
                    now += 0.001
                    p.outcome(p.size, False, now)
                before = p.loss_rate()
                for i in range(40):
                    now += 0.0005
                    p.outcome(p.size, i % 2 == 0, now, timed_out and i % 2 == 0)
                self.assertGreater(p.loss_rate(), before)
                self.assertEqual(p.fragment_cap, 8 if timed_out else 4)

    def test_a_long_path_grows_its_fragments_back_after_clean_round_trips(self):
        s = config.ServerSettings(start_fragments=2, wan_max_fragments=8)
        p = Path(s, 65507, mtu=1500)
        p.sample(0.05)
        now = 1.0
        caps = []
        while now < 2.0:
            now += 0.002
            p.outcome(p.size, False, now)
            caps.append(p.fragment_cap)
        self.assertEqual(sorted(set(caps)), [2, 4, 8])
        self.assertEqual(fragments(p.size, 1480, 1480), 8)
        # ... each step a round trip (or more) after the last
        self.assertGreaterEqual(caps.index(8) - caps.index(4), 0.05 / 0.002)

    def test_random_loss_on_a_long_path_is_sized_by_its_rate_not_the_burst_rule(self):
        s = config.ServerSettings(orphan_budget=10 ** 6)   # (this is not about the budget)
        p = Path(s, 65507, mtu=1500)
        p.sample(0.05)
        rng = random.Random(5)
        now = 1.0
        cuts = 0
        for _ in range(20000):               # 1% per packet, 10 s
            now += 0.0005
            before = p.fragment_cap
            p.outcome(p.size, rng.random() > 0.99 ** (fragments(p.size, 1480, 1480) + 1), now)
            cuts += p.fragment_cap < before
        self.assertLessEqual(cuts, 1)        # (the first losses, before the rate is known)
        self.assertIn(fragments(p.size, 1480, 1480), (2, 3, 4))

    def test_ipv6_fragments_carry_less(self):
        self.assertEqual(fragment_payload(1500), 1480)
        self.assertEqual(fragment_payload(1500, ipv6=True), 1448)
        self.assertEqual(size_ladder(1480, 65507, 1480)[0], 1472)
        self.assertIn(65507, size_ladder(65512, 65507, 65516))
        self.assertEqual(fragments(65507, 65512, 65516), 1)
        self.assertEqual(fragments(65507, 1480, 1480), 45)
        self.assertEqual(fragments(1472, 1480, 1480), 1)
        self.assertEqual(fragments(1473, 1480, 1480), 2)


class RetransmissionTest(unittest.TestCase):

    def start(self, srv, addr, now=0.0, name="f"):
        srv.recv(format_download(name, 0, 10 ** 9), addr, now)
        return srv.ack(0, addr, now + 0.001)

    def test_a_resend_is_recut_to_the_paths_size_when_it_came_down(self):
        data = blob(300000)
        srv = Server({"f": data}, mtu=1500)
        out = self.start(srv, A)
        first = out[0][0]
        self.assertEqual(len(first.payload) + len(b"DATA 0 00000000\n"), 44 * 1480 - 8)
        path = srv.d.paths[A[0]]
        for _ in range(3):                     # the path turns out lossy meanwhile
            path.outcome(65507, lost=True)
        self.assertEqual(path.size, FOUR)
        out = srv.timer(srv.d.get_timer())
        again = out[0][0]
        self.assertEqual(again.offset, 0)
        self.assertLessEqual(len(again.payload) + len(b"DATA 0 00000000\n"), FOUR)
        self.assertEqual(again.crc, zlib.crc32(bytes(again.payload), crc_start(0)))
        # Either copy's ACK is good.
        out = srv.ack(len(again.payload), A, srv.d.get_timer())
        self.assertEqual(out[0][0].offset, len(again.payload))

    def test_early_resends_of_a_silent_datagram_back_off_and_do_not_count_towards_giving_up(self):
        # A long retransmission timer: every resend here is an early one. B keeps being
        # acknowledged while A's DATA is never answered (A's client is gone, B's is not: two
        # clients behind one IP): A is resent early at once, then only after a whole RTO,
        # backed off each time as after a timeout, and it lives until the silence limit.
        srv = Server({"f": blob(200000), "g": blob(64 << 20)}, mtu=65536, rto_initial=0.5,
                     rto_min=0.5)
        self.start(srv, A, 0.0, "f")
        out_b = self.start(srv, B, 0.0005, "g")
        t = srv.d.active[A, None]
        now, pos, resends = 0.002, len(out_b[0][0].payload), []
        while now < 4.5:
            now += 0.005
            before = t.retransmissions
            srv.timer(now)
            out = srv.ack(pos, B, now)
            pos += len(out[0][0].payload)
            if t.retransmissions != before:
                resends.append(now)
        self.assertIsNone(t.outcome)
        self.assertEqual(t.early_retransmissions, len(resends))
        self.assertEqual(len(resends), 4)                       # not one per evidence
        gaps = [b - a for a, b in zip(resends, resends[1:])]
        for gap, rto in zip(gaps, (0.5, 1.0, 2.0)):
            self.assertAlmostEqual(gap, rto, delta=0.01)
        self.assertLess(t.early_retransmissions, srv.s.max_retransmits)
        srv.timer(5.1)                                          # the silence limit, as ever
        self.assertEqual(t.outcome, "timeout")

    def test_no_sample_when_the_first_copy_was_lost_and_two_resends_arrived(self):
        srv = Server({"f": blob(4 << 20)}, mtu=65536)
        out = self.start(srv, A, 0.0, "f")
        now = 0.001
        for _ in range(10):
            out = srv.ack(out[0][0].offset + len(out[0][0].payload), A, now + 0.001)
            now += 0.001
        t = srv.d.active[A, None]
        pos = out[0][0].offset + len(out[0][0].payload)
        srv.timer(srv.d.get_timer())                  # the first copy is lost: resend
        srv.timer(srv.d.get_timer())                  # and again
        srtt, lost = t.path.rtt.srtt, t.path.loss_rate()
        srv.ack(pos, A, now + 0.05)                   # the second copy's ACK
        srv.ack(pos, A, now + 0.051)                  # the third copy's: not a needless resend
        self.assertEqual(t.path.rtt.srtt, srtt)
        self.assertEqual(t.path.loss_rate(), lost)

    def test_a_finished_transfer_is_not_forgotten_twice_by_later_evidence(self):
        # A's last DATA is acknowledged after B's DATA was sent, so A's entry is still in the
        # path's send order when A finishes; B's ACK then reveals it, and it must be skipped.
        srv = Server({"f": blob(1000), "g": blob(4 << 20)}, mtu=65536)
        out_a = self.start(srv, A, 0.0, "f")
        out_b = self.start(srv, B, 0.0001, "g")
        srv.ack(len(out_a[0][0].payload), A, 0.0002)          # A: EOF comes back
        srv.recv(format_ack_eof(srv.tokens[A]), A, 0.0003)
        self.assertEqual(srv.d.stats["finished"], 1)
        srv.ack(len(out_b[0][0].payload), B, 0.01)
        self.assertEqual(srv.d.stats["finished"], 1)
        self.assertEqual(srv.d.stats["bytes_served"], 1000)

    def test_a_needless_timeout_teaches_the_timer_the_longer_round_trip(self):
        # Round trips of 1 ms, then one of 20 ms (a queue on the path): the timer fires, the
        # client gets both copies and acknowledges the first one twice. That second ACK proves
        # the timeout needless, and the 20 ms the first copy took becomes a sample (RFC 4015).
        srv = Server({"f": blob(4 << 20)}, mtu=65536)
        out = self.start(srv, A, 0.0, "f")
        now, pos = 0.001, 0
        for _ in range(20):                               # settle at 1 ms
            pos = out[0][0].offset + len(out[0][0].payload)
            out = srv.ack(pos, A, now + 0.001)
            now += 0.001
        t = srv.d.active[A, None]
        sent = now
        deadline = srv.d.get_timer()
        self.assertLess(deadline - sent, 0.02)
        again = srv.timer(deadline)                       # needless retransmission
        self.assertEqual(again[0][0].offset, out[0][0].offset)
        pos = out[0][0].offset + len(out[0][0].payload)
        srtt_before = t.path.rtt.srtt
        srv.ack(pos, A, sent + 0.02)                      # the first copy's ACK, late
        self.assertEqual(t.path.rtt.srtt, srtt_before, "Karn: no sample yet")
        srv.ack(pos, A, sent + 0.021)                     # the second copy's: proof
        self.assertGreater(t.path.rtt.srtt, srtt_before)
        self.assertGreater(t.rtt.rto, 0.02)

    def test_a_needless_early_resend_widens_the_window_and_it_stays_wide_without_loss(self):
        # A and B share an IP. B's DATA is acknowledged before A's older one: A is resent
        # early, and then both copies of A's DATA are acknowledged, so the resend was needless:
        # the reordering window doubles. Hundreds of DATAs acknowledged at their first try
        # afterwards (nothing is lost) leave it doubled.
        srv = Server({"f": blob(1 << 20), "g": blob(24 << 20)}, mtu=65536, rto_initial=0.5,
                     rto_min=0.5)
        out_a = self.start(srv, A, 0.0, "f")
        out_b = self.start(srv, B, 0.0005, "g")
        t, order = srv.d.active[A, None], srv.d.orders[A[0]]
        pos_b = len(out_b[0][0].payload)
        out = srv.ack(pos_b, B, 0.002)
        pos_b += len(out[0][0].payload)
        srv.timer(0.01)
        self.assertEqual(t.early_retransmissions, 1)
        pos_a = len(out_a[0][0].payload)
        srv.ack(pos_a, A, 0.011)
        srv.ack(pos_a, A, 0.0111)                 # the second copy's ACK: proof
        self.assertEqual(order.reorder_mult, 2)
        now = 0.012
        for _ in range(300):
            now += 0.001
            out = srv.ack(pos_b, B, now)
            pos_b += len(out[0][0].payload)
        self.assertEqual(order.reorder_mult, 2)
        self.assertEqual(t.early_retransmissions, 1)


class ReorderWindowTest(unittest.TestCase):

    def test_narrowed_again_only_after_reorder_persist_early_resends_none_needless(self):
        s = config.ServerSettings()
        p = SendOrder(s, Path(s, 65507))
        p.widen(0.0)
        self.assertEqual(p.reorder_mult, 2)
        for _ in range(s.reorder_persist - 1):
            p.early_resent()
        self.assertEqual(p.reorder_mult, 2)
        p.widen(0.0)                                 # needless again: wider, count starts over
        self.assertEqual(p.reorder_mult, 4)
        for _ in range(s.reorder_persist - 1):
            p.early_resent()
        self.assertEqual(p.reorder_mult, 4)
        p.early_resent()
        self.assertEqual(p.reorder_mult, 1)
        p.early_resent()                          # at 1 it stays 1
        self.assertEqual(p.reorder_mult, 1)
        for _ in range(10):
            p.widen(0.0)
        self.assertEqual(p.reorder_mult, s.reorder_mult_max)

    def test_it_widens_once_a_round_trip_at_most(self):
        # One burst of out-of-order answers proves several early resends needless within a
        # round trip: the window doubles once for them. Each proof still restarts the count
        # towards narrowing.
        s = config.ServerSettings()
        path = Path(s, 65507)
        path.rtt.sample(0.05)
        p = SendOrder(s, path)
        for i in range(12):
            p.widen(1.0 + i * 0.002)
        self.assertEqual(p.reorder_mult, 2)
        for _ in range(s.reorder_persist - 1):
            p.early_resent()
        p.widen(1.049)                            # still within the round trip: as it was
        self.assertEqual(p.reorder_mult, 2)
        for _ in range(s.reorder_persist - 1):
            p.early_resent()
        self.assertEqual(p.reorder_mult, 2)       # (the count started over)
        p.widen(1.051)                            # a round trip later: wider
        self.assertEqual(p.reorder_mult, 4)

    def test_an_early_resend_counts_towards_narrowing(self):
        srv = Server({"f": blob(200000), "g": blob(4 << 20)}, mtu=65536, rto_initial=0.5,
                     rto_min=0.5)
        srv.recv(format_download("f", 0, 10 ** 9), A, 0.0)
        srv.ack(0, A, 0.001)
        srv.recv(format_download("g", 0, 10 ** 9), B, 0.0005)
        out_b = srv.ack(0, B, 0.0015)
        order = srv.d.orders[A[0]]
        order.reorder_mult, order._persist = 2, 1
        srv.ack(len(out_b[0][0].payload), B, 0.002)
        srv.timer(0.02)                           # A resent early: the last one it waited for
        self.assertEqual(srv.d.active[A, None].early_retransmissions, 1)
        self.assertEqual(order.reorder_mult, 1)


class ServerLoopTest(unittest.TestCase):
    """server.Server.serve_forever on a real socket with a stand-in dispatcher whose timer is
    always due: datagrams already queued are handled before the timers (one of them may be the
    very ACK a timer is about), but timers wait for DRAIN_LIMIT datagrams at most."""

    class Dispatcher:
        def __init__(self):
            self.calls = []
            self.active = {}
            self.due = True

        def receive_datagram(self, data, addr, now):
            self.calls.append("rx")

        def datagrams_to_send(self):
            return []

        def read_ahead(self):
            pass

        def get_timer(self):
            return 0.0 if self.due else None

        def handle_timer(self, now):   # the timer fires once (the loop also calls it idle)
            if self.due:
                self.calls.append("timer")
                self.due = False

        def close(self):
            pass

    def run_loop(self, queued):
        tmp = support.TempDirs()
        self.addCleanup(tmp.cleanup)
        srv = server.Server(Folder(tmp.files, os.path.join(tmp.root, "list.txt")),
                            "127.0.0.1", 0)
        self.addCleanup(srv.close)
        fake = srv.dispatcher = self.Dispatcher()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            for i in range(queued):              # all waiting before the loop starts
                c.sendto(b"ACK %d" % i, srv.server_address)
        loop = threading.Thread(target=srv.serve_forever, daemon=True)
        loop.start()
        self.assertTrue(support.wait_for(
            lambda: fake.calls.count("rx") == queued and "timer" in fake.calls, 5))
        srv.shutdown()
        loop.join(5)
        self.assertFalse(loop.is_alive())
        return fake.calls

    def test_queued_datagrams_first(self):
        self.assertEqual(self.run_loop(3), ["rx", "rx", "rx", "timer"])

    def test_a_flood_holds_timers_off_for_drain_limit_datagrams_at_most(self):
        n = server.Server.DRAIN_LIMIT
        calls = self.run_loop(n + 5)
        self.assertEqual(calls, ["rx"] * n + ["timer"] + ["rx"] * 5)


class ForgottenRequestTest(unittest.TestCase):
    """A request whose SIZE is never acknowledged (its ACK lost) is forgotten after a few timer
    expiries; the client's repeated request makes it anew. Its ACK must still fit."""

    def test_a_request_made_anew_gets_the_same_token(self):
        srv = Server({"f": blob(100000)})
        first = srv.recv(format_download("f", 0, 10 ** 9), A, 0.0)[0][0]
        now = 0.0
        while srv.d.pending and now < 10:
            now = srv.d.get_timer()
            srv.timer(now)
        self.assertFalse(srv.d.pending, "the unacknowledged request was forgotten")
        again = srv.recv(format_download("f", 0, 10 ** 9), A, now + 0.1)[0][0]
        self.assertEqual(again.token, first.token)
        out = srv.recv(format_ack(0, first.token), A, now + 0.2)
        self.assertIsInstance(out[0][0], Data)

    def test_tokens_differ_by_address_and_request_and_server(self):
        make = token_maker(b"k" * 32)
        req = DownloadRequest("f", 0, 10)
        tokens = {make(A, None, req), make(B, None, req),
                  make(A, None, DownloadRequest("f", 1, 10)), make(A, None, ListRequest()),
                  token_maker()(A, None, req), make(A, 1, req), make(A, 2, req)}
        self.assertEqual(len(tokens), 7)
        self.assertEqual(make(A, 7, req), make(A, 7, req))
        self.assertTrue(all(len(t) == 16 and t == t.lower() for t in tokens))

    def test_the_client_takes_the_token_of_a_transfer_made_anew_before_data(self):
        t = ClientTransfer("f", 0, 100, 0.0)
        t.datagrams_to_send()
        t.receive_datagram(format_size(100, "v", b"1" * 16), 0.01)
        self.assertEqual(t.datagrams_to_send(), [format_ack(0, b"1" * 16)])
        # Another token before we asked again: not ours (forged, or a stray): not answered.
        t.receive_datagram(format_size(100, "v", b"9" * 16), 0.02)
        self.assertEqual(t.datagrams_to_send(), [])
        t.handle_timer(t.get_timer())                 # no data: the request is repeated
        self.assertEqual(t.datagrams_to_send(), [t.request])
        t.receive_datagram(format_size(100, "v", b"2" * 16), 0.2)
        self.assertEqual(t.datagrams_to_send(), [format_ack(0, b"2" * 16)])
        payload = b"x" * 100
        crc = zlib.crc32(payload, crc_start(0))
        self.assertEqual(bytes(t.receive_datagram(
            format_data_header(0, crc) + payload, 0.3)), payload)
        t.datagrams_to_send()
        # Once data flows the token is fixed: a SIZE with another one is not answered.
        t.receive_datagram(format_size(100, "v", b"3" * 16), 0.4)
        self.assertEqual(t.datagrams_to_send(), [])

    def test_an_eof_before_the_end_is_ignored(self):
        # (PROTOCOL.md "Reliability": EOF comes last; one before the end gets no answer.)
        t = ClientTransfer("f", 0, 100, 0.0)
        t.receive_datagram(format_size(100, "v", b"1" * 16), 0.01)
        payload = b"y" * 40
        crc = zlib.crc32(payload, crc_start(0))
        t.receive_datagram(format_data_header(0, crc) + payload, 0.02)
        t.datagrams_to_send()
        t.receive_datagram(format_eof(crc), 0.03)
        self.assertEqual(t.datagrams_to_send(), [])
        self.assertEqual((t.state, t.pos), (RECEIVING, 40))


class ForgedRequestTest(unittest.TestCase):

    def test_a_forged_request_from_the_victims_address_does_not_end_its_transfer(self):
        srv = Server({"f": blob(300000), "g": blob(10)})
        out = srv.recv(format_download("f", 0, 10 ** 9), A, 0.0)
        token = out[0][0].token
        data = srv.ack(0, A, 0.001)[0][0]
        victim = srv.d.active[A, None]
        srv.recv(b"LIST", A, 0.002)                                  # forged: a stranger
        srv.recv(format_download("g", 0, 10), A, 0.003)     # ... and again
        srv.recv(format_ack(0, b"0" * 16), A, 0.004)         # without the token
        # Refused ones get no answer while the victim's transfer runs: a version 2 client ends
        # its transfer on any ERROR.
        self.assertEqual(srv.recv(format_download("nosuch", 0, 10), A, 0.0041), [])
        self.assertEqual(srv.recv(format_download("g", 99, 10), A, 0.0042), [])
        self.assertIs(srv.d.active[A, None], victim)
        self.assertIsNone(victim.outcome)
        out = srv.recv(format_ack(len(data.payload), token), A, 0.005)
        self.assertEqual(out[0][0].offset, len(data.payload), "the victim's ACKs still count")


class PathMemoryTest(unittest.TestCase):

    def test_send_order_stays_bounded_when_nothing_is_acknowledged_at_first_try(self):
        s = config.ServerSettings()
        p = SendOrder(s, Path(s, 65507))
        for _ in range(100000):
            p.sent(None)
        self.assertLessEqual(len(p.outstanding), 2 * 4 * s.max_transfers + 64)
        self.assertEqual(p.outstanding[-1][0], 100000)


if __name__ == "__main__":
    unittest.main()
