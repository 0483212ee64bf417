"""Protocol version 3, lanes (PROTOCOL.md "Lanes"), on the server's side, on a virtual clock: the
codec's tags, the dispatcher keyed by (address, lane), a lane's rules (one transfer in its life,
a tagged answer to everything), evidence of loss from the same client socket only, the pool of
a proven socket's new lanes, one open file for all lanes of a file, a byte budget for payload
buffers, a sent payload read again (and checked) to resend it, and one log line per file served.

Run: python3 -m tests test_lanes
"""

import logging
import unittest

import config
from tests.test_protocol import (A, B, FakeCatalog, FakeEntry, FakeSource, blob, joined,
                                 range_crc)
from udpxfer.dispatcher import ServerDispatcher
from udpxfer.server_transfer import MemoryEntry
from udpxfer.wire import (MAX_ERROR, NO_LANE, Ack, Data, DownloadRequest, Eof, Error,
                          ListRequest, ProtocolError, Size, format_ack, format_ack_eof,
                          format_data_header, format_download, format_eof, format_error,
                          format_list, format_size, lane_tag, parse_client_datagram,
                          parse_client_message, parse_server_datagram, parse_server_message)

QUIET = logging.getLogger("udpxfer.tests.test_lanes")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False
TOKEN = b"0123456789abcdef"


class TagCodecTest(unittest.TestCase):

    def test_every_message_round_trips_with_a_tag(self):
        for lane in (None, 1, 7, 4294967295):
            tag = lane_tag(lane)
            with self.subTest(lane=lane):
                self.assertEqual(parse_client_datagram(format_list(tag)), (lane, ListRequest()))
                self.assertEqual(parse_client_datagram(format_download("a b", 5, 9, tag)),
                                 (lane, DownloadRequest("a b", 5, 9)))
                self.assertEqual(parse_client_datagram(format_ack(12, TOKEN, tag)),
                                 (lane, Ack(12, TOKEN)))
                self.assertEqual(parse_client_datagram(format_ack_eof(TOKEN, tag)),
                                 (lane, Ack(None, TOKEN)))
                self.assertEqual(parse_server_datagram(format_size(10, "v", TOKEN, tag)),
                                 (lane, Size(10, "v", TOKEN)))
                got_lane, data = parse_server_datagram(format_data_header(3, 0xabc, tag) + b"xy")
                self.assertEqual((got_lane, data.offset, data.crc, bytes(data.payload)),
                                 (lane, 3, 0xabc, b"xy"))
                self.assertEqual(parse_server_datagram(format_eof(0x1234, tag)),
                                 (lane, Eof(0x1234)))
                self.assertEqual(parse_server_datagram(format_error("BUSY", "full", tag)),
                                 (lane, Error("BUSY", "full")))

    def test_an_error_is_64_bytes_after_its_tag(self):
        msg = format_error("INTERNAL", "x" * 100, lane_tag(4294967295))
        self.assertEqual(len(msg), len(b"#4294967295 ") + MAX_ERROR)
        self.assertEqual(parse_server_datagram(msg)[0], 4294967295)

    def test_malformed_tags_name_no_lane(self):
        for bad in (b"#07 LIST", b"#0 LIST", b"#4294967296 LIST", b"#5LIST", b"# 5 LIST", b"#",
                    b"#x ACK 0 " + TOKEN, b"#99999999999 LIST"):
            for parse in (parse_client_datagram, parse_server_datagram):
                with self.subTest(datagram=bad, parse=parse.__name__):
                    with self.assertRaises(ProtocolError) as caught:
                        parse(bad)
                    self.assertIs(caught.exception.lane, NO_LANE)

    def test_a_good_tag_on_a_bad_message_names_its_lane(self):
        for bad in (b"#3 ACK 1", b"#3 DOWNLOAD x", b"#3 HELLO", b"#3 ACK 01 " + TOKEN):
            with self.subTest(datagram=bad):
                with self.assertRaises(ProtocolError) as caught:
                    parse_client_datagram(bad)
                self.assertEqual(caught.exception.lane, 3)
        with self.assertRaises(ProtocolError) as caught:
            parse_server_datagram(b"#8 DATA 5 00000000\n")          # empty payload
        self.assertEqual(caught.exception.lane, 8)

    def test_a_version_2_parser_refuses_a_tag(self):
        # What a server written from the version 2 contract does with "#1 LIST": malformed.
        for tagged in (b"#1 LIST", b"#1 ACK 0 " + TOKEN, b"#1 DOWNLOAD a 0 1"):
            with self.assertRaises(ProtocolError):
                parse_client_message(tagged)
        for tagged in (format_size(1, "v", TOKEN, b"#1 "), format_eof(0, b"#1 ")):
            with self.assertRaises(ProtocolError):
                parse_server_message(tagged)


class LaneServer:
    """A dispatcher on a fake catalog, talked to with lanes; every verb returns
    [(lane, parsed message, address)]."""

    def __init__(self, files, **settings):
        self.catalog = FakeCatalog(files)
        self.s = config.ServerSettings(**settings)
        self.d = ServerDispatcher(self.catalog, self.s, QUIET)
        self.tokens = {}

    def drain(self, after_send=True):
        out = []
        for datagram, addr in self.d.datagrams_to_send():
            lane, msg = parse_server_datagram(joined(datagram))
            if isinstance(msg, Data):
                msg = msg._replace(payload=bytes(msg.payload))
            if isinstance(msg, Size):
                self.tokens[addr, lane] = msg.token
            out.append((lane, msg, addr))
        if after_send:
            self.d.read_ahead()
        return out

    def recv(self, data, addr=A, now=0.0):
        self.d.receive_datagram(data, addr, now)
        return self.drain()

    def ask(self, lane, name, offset=0, chunk=10 ** 9, addr=A, now=0.0):
        return self.recv(format_download(name, offset, chunk, lane_tag(lane)), addr, now)

    def ack(self, lane, n, addr=A, now=0.0):
        return self.recv(format_ack(n, self.tokens[addr, lane], lane_tag(lane)), addr, now)

    def ack_eof(self, lane, addr=A, now=0.0):
        return self.recv(format_ack_eof(self.tokens[addr, lane], lane_tag(lane)), addr, now)

    def timer(self, now):
        self.d.handle_timer(now)
        return self.drain()

    def fetch(self, lane, name, offset=0, chunk=10 ** 9, addr=A, now=0.0):
        """A whole transfer on one lane: -> (bytes, EOF crc)."""
        (lane_, size, _), = self.ask(lane, name, offset, chunk, addr, now)
        assert lane_ == lane and isinstance(size, Size), size
        got, pos = [], offset
        (_, msg, _), = self.ack(lane, offset, addr, now)
        while isinstance(msg, Data):
            got.append(msg.payload)
            pos = msg.offset + len(msg.payload)
            (_, msg, _), = self.ack(lane, pos, addr, now)
        assert isinstance(msg, Eof), msg
        self.ack_eof(lane, addr, now)
        return b"".join(got), msg.crc


class LanesOnTheServerTest(unittest.TestCase):

    def test_lanes_of_one_socket_run_at_once_each_answered_on_its_own(self):
        data = blob(100000, 1)
        srv = LaneServer({"f": MemoryEntry(data)}, datagram_size=2000)
        sizes = {}
        for lane in (1, 2, 3):
            (got_lane, size, addr), = srv.ask(lane, "f", (lane - 1) * 40000, 40000)
            self.assertEqual((got_lane, addr), (lane, A))
            sizes[lane] = size
        self.assertEqual(len({s.token for s in sizes.values()}), 3, "a token per lane")
        firsts = {lane: srv.ack(lane, (lane - 1) * 40000)[0] for lane in (1, 2, 3)}
        self.assertEqual({lane: m[0] for lane, m in firsts.items()}, {1: 1, 2: 2, 3: 3})
        self.assertEqual(len(srv.d.active), 3)
        pieces = {}
        for lane in (1, 2, 3):
            _, msg, _ = firsts[lane]
            got = []
            while isinstance(msg, Data):
                got.append(msg.payload)
                (got_lane, msg, _), = srv.ack(lane, msg.offset + len(msg.payload))
                self.assertEqual(got_lane, lane)
            self.assertEqual(msg.crc, range_crc(data, (lane - 1) * 40000,
                                                min(lane * 40000, len(data))))
            srv.ack_eof(lane)
            pieces[lane] = b"".join(got)
        self.assertEqual(pieces[1] + pieces[2] + pieces[3], data)
        self.assertEqual(srv.d.active, {})

    def test_an_ack_on_a_lane_without_a_transfer_gets_a_tagged_bad_request(self):
        srv = LaneServer({"f": MemoryEntry(b"x")})
        out = srv.recv(format_ack(0, TOKEN, b"#9 "))
        self.assertEqual([(lane, msg.code) for lane, msg, _ in out], [(9, "BAD_REQUEST")])
        out = srv.recv(b"#9 HELLO", B)                      # malformed, on a readable lane
        self.assertEqual([(lane, msg.code) for lane, msg, _ in out], [(9, "BAD_REQUEST")])
        for bad in (b"#09 LIST", b"#0 ACK 0 " + TOKEN, b"#4294967296 LIST", b"#1LIST"):
            self.assertEqual(srv.recv(bad, ("192.0.2.99", 1)), [], bad)   # no lane to name
        out = srv.recv(format_download("nope", 0, 1, b"#4 "))
        self.assertEqual([(lane, msg.code) for lane, msg, _ in out], [(4, "NOT_FOUND")])

    def test_a_lane_carries_one_transfer_in_its_life(self):
        data = blob(30000, 2)
        srv = LaneServer({"f": MemoryEntry(data), "g": MemoryEntry(b"g" * 10)},
                         datagram_size=2000)
        (_, size, _), = srv.ask(5, "f")
        # The same request again before SIZE is acknowledged: SIZE again, same token.
        (_, again, _), = srv.ask(5, "f")
        self.assertEqual(again, size)
        (_, first, _), = srv.ack(5, 0)
        t = srv.d.active[A, 5]
        # A different request on the running lane: a forgery or garbage: nothing happens.
        self.assertEqual(srv.ask(5, "g"), [])
        self.assertEqual(srv.ask(5, "f", 100, 10), [])
        self.assertIs(srv.d.active[A, 5], t)
        self.assertIsNone(t.outcome)
        (_, msg, _), = srv.ack(5, first.offset + len(first.payload))
        self.assertIsInstance(msg, Data)
        # The untagged lane of the same address is a lane of its own (version 2).
        (lane, size_g, _), = srv.recv(format_download("g", 0, 10))
        self.assertEqual((lane, size_g.size), (None, 10))
        srv.recv(format_ack(0, size_g.token))
        self.assertEqual(set(srv.d.active), {(A, 5), (A, None)})
        # Once lane 5 ended, a request on it, old or new, is not served again.
        while isinstance(msg, Data):
            (_, msg, _), = srv.ack(5, msg.offset + len(msg.payload))
        srv.ack_eof(5)
        self.assertNotIn((A, 5), srv.d.active)
        self.assertEqual(srv.ask(5, "f"), [])
        self.assertEqual(srv.ask(5, "g"), [])

    def test_evidence_of_loss_comes_from_the_same_client_socket_only(self):
        # Two clients behind one IP, each with two lanes. The second client's ACKs are no
        # evidence against the first's lane (it may simply be busy, or gone); the first's own
        # other lane is.
        a2 = (A[0], A[1] + 1)
        files = {"f": MemoryEntry(blob(400000, 3))}
        srv = LaneServer(files, rto_initial=0.5, rto_min=0.5)
        for addr in (A, a2):
            for lane in (1, 2):
                srv.ask(lane, "f", 0, 10 ** 9, addr, 0.0)
        srv.ack(1, 0, A, 0.001)                       # A's lane 1: DATA 0 at 0.001, unanswered
        other = srv.ack(1, 0, a2, 0.002)[0][1]        # the neighbour's DATA 0 at 0.002
        t = srv.d.active[A, 1]
        deadline = t.deadline
        srv.ack(1, len(other.payload), a2, 0.012)     # the neighbour's later DATA acknowledged
        self.assertEqual(t.deadline, deadline, "another socket's ACK is no evidence")
        srv.timer(0.05)
        self.assertEqual(t.retransmissions, 0)
        own = srv.ack(2, 0, A, 0.06)[0][1]            # A's lane 2: DATA 0 at 0.06
        srv.ack(2, len(own.payload), A, 0.07)         # ... acknowledged: evidence against lane 1
        srv.timer(0.0715)
        self.assertEqual((t.retransmissions, t.early_retransmissions), (1, 1))
        self.assertIsNot(srv.d.orders[A], srv.d.orders[a2])

    def test_a_lane_waits_at_least_one_and_a_half_round_trips_before_a_timeout(self):
        # A client that runs lanes paces them by holding its ACKs back: on a steady path the
        # RTO (srtt + 4 rttvar) would be barely above the round trip, and a client that slows
        # down by a third would see every DATA resent. An untagged transfer keeps the RTO.
        files = {"f": MemoryEntry(blob(400000, 4))}
        for lane in (5, None):
            srv = LaneServer(files, rto_min=0.002, datagram_size=1000)
            now = 0.0
            srv.ask(lane, "f", 0, 10 ** 9, A, now)
            (_, msg, _), = srv.ack(lane, 0, A, now)
            for _ in range(40):                       # a steady 50 ms round trip
                now += 0.05
                (_, msg, _), = srv.ack(lane, msg.offset + len(msg.payload), A, now)
            t = srv.d.active[A, lane]
            srtt = t.rtt.srtt
            self.assertAlmostEqual(srtt, 0.05, delta=0.001)
            srv.timer(now + 1.2 * srtt)               # the next ACK held back 20% longer
            with self.subTest(lane=lane):
                if lane is None:
                    self.assertEqual(t.retransmissions, 1)
                else:
                    self.assertEqual(t.retransmissions, 0)
                    srv.timer(now + 1.51 * srtt)
                    self.assertEqual(t.retransmissions, 1)

    def test_a_lane_whose_size_went_twice_starts_from_the_paths_round_trip(self):
        # Lane 1's SIZE is lost twice (its timer backs off to 1 s); lane 2 measures the path at
        # 10 ms meanwhile. Lane 1's first DATA, lost too, is resent after about the path's RTO,
        # not after a timer doubled for the lost SIZE.
        files = {"f": MemoryEntry(blob(200000, 5))}
        srv = LaneServer(files, rto_initial=0.25, datagram_size=1000)
        srv.ask(1, "f", 0, 100000, A, 0.0)
        srv.timer(0.25)
        srv.timer(0.75)                               # SIZE sent three times
        srv.ask(2, "f", 100000, 100000, A, 0.8)
        (_, msg, _), = srv.ack(2, 100000, A, 0.81)    # a 10 ms round trip
        for i in range(5):
            now = 0.82 + 0.01 * i
            (_, msg, _), = srv.ack(2, msg.offset + len(msg.payload), A, now)
        (_, first, _), = srv.ack(1, 0, A, 0.9)        # lane 1 goes: its DATA 0 is lost
        t = srv.d.active[A, 1]
        self.assertLess(t.deadline - 0.9, 0.1, "the data's timer is the path's, not 1 s")

    def test_a_proven_socket_may_open_hundreds_of_lanes_at_once(self):
        # Strangers' requests share a pool of 8 here; a socket that has a transfer running asks
        # for 300 more lanes: none is evicted, and a flood of strangers cannot evict them.
        srv = LaneServer({"f": MemoryEntry(blob(5000, 4))}, max_pending=8)
        srv.ask(1, "f")
        srv.ack(1, 0)
        for lane in range(2, 302):
            (got_lane, size, _), = srv.ask(lane, "f", 0, 10)
            self.assertEqual(got_lane, lane)
        for i in range(50):
            srv.recv(format_download("f", 0, 10), ("198.51.100.%d" % (i % 5), 2000 + i), 0.01)
        self.assertEqual(srv.d.lane_pending.size, 300)
        self.assertLessEqual(len(srv.d.pending) - srv.d.lane_pending.size, 8)
        for lane in range(2, 302):
            self.assertIsInstance(srv.ack(lane, 0, now=0.02)[0][1], Data)
        self.assertEqual(len(srv.d.active), 301)
        self.assertEqual(srv.d.lane_pending.size, 0)

    def test_a_proven_socket_keeps_to_its_fair_share_of_waiting_lanes(self):
        srv = LaneServer({"f": MemoryEntry(b"abc")}, max_transfers=16)
        srv.ask(1, "f")
        srv.ack(1, 0)
        answers = [srv.ask(lane, "f", 0, 1)[0][1] for lane in range(2, 40)]
        self.assertEqual(sum(isinstance(m, Size) for m in answers), 16)
        self.assertTrue(all(m.code == "BUSY" for m in answers if isinstance(m, Error)))

    def test_all_lanes_of_a_file_read_one_open_file(self):
        opened = []

        class Entry(FakeEntry):
            key = ("f", 1)

            def open(self):
                opened.append(1)
                return FakeSource(self)

        entry = Entry(blob(50000, 5))
        srv = LaneServer({"f": entry}, datagram_size=1000)
        for lane in range(1, 11):
            srv.ask(lane, "f", (lane - 1) * 5000, 5000)
            srv.ack(lane, (lane - 1) * 5000)
        self.assertEqual(len(opened), 1)
        for lane in range(1, 11):
            srv.d.active[A, lane].finish("shutdown")
            srv.d._forget(srv.d.active[A, lane], 0.1)
        self.assertEqual(entry.closed, 1)
        self.assertEqual(srv.d.files.files, {})
        srv.ask(11, "f")
        srv.ack(11, 0)
        self.assertEqual(len(opened), 2, "opened again once closed")


class Readable:
    """A file entry with readinto (like the real one), counting its reads; its content can be
    changed in place under the transfers (same identity: only the CRC can tell)."""

    def __init__(self, data):
        self.data = bytearray(data)
        self.size, self.version, self.key = len(data), "v1", ("r", 1)
        self.reads = 0

    def open(self):
        return self

    def read(self, offset, n):
        self.reads += 1
        return bytes(self.data[offset:offset + n])

    def readinto(self, offset, view):
        self.reads += 1
        chunk = self.data[offset:offset + len(view)]
        view[:len(chunk)] = chunk
        return view[:len(chunk)]

    def unchanged(self):
        return True

    def close(self):
        pass


class PayloadMemoryTest(unittest.TestCase):

    def test_buffers_stay_within_the_budget_whatever_the_lanes(self):
        data = blob(400000, 6)
        size = 4000
        srv = LaneServer({"f": Readable(data)}, datagram_size=size, read_ahead_bytes=5 * size)
        got = {}
        for lane in range(1, 41):
            srv.ask(lane, "f", (lane - 1) * 10000, 10000)
        pending = {lane: srv.ack(lane, (lane - 1) * 10000)[0][1] for lane in range(1, 41)}
        while pending:
            for lane, msg in list(pending.items()):
                if isinstance(msg, Data):
                    self.assertEqual(msg.payload, data[msg.offset:msg.offset + len(msg.payload)])
                    got.setdefault(lane, []).append(msg.payload)
                    pending[lane] = srv.ack(lane, msg.offset + len(msg.payload))[0][1]
                else:
                    srv.ack_eof(lane)
                    del pending[lane]
            self.assertLessEqual(srv.d.pool.made, srv.d.pool.limit)
        self.assertEqual(b"".join(b"".join(got[lane]) for lane in range(1, 41)), data)
        self.assertEqual(len(srv.d.pool.free), srv.d.pool.made, "every buffer came back")
        for t in list(srv.d.active.values()):
            self.assertIsNone(t._payload)

    def test_a_sent_payload_is_read_again_to_resend_it_and_checked(self):
        entry = Readable(blob(50000, 7))
        srv = LaneServer({"f": entry}, datagram_size=4000)
        srv.ask(1, "f")
        (_, first, _), = srv.ack(1, 0)
        t = srv.d.active[A, 1]
        self.assertIsNone(t._payload, "let go once sent")
        (_, again, _), = srv.timer(t.deadline)
        self.assertEqual((again.offset, again.payload, again.crc),
                         (first.offset, first.payload, first.crc))
        # The bytes change in place, the identity does not: the resend's CRC would differ
        # from what the DATA carried: the transfer ends with CHANGED instead.
        entry.data[10] ^= 1
        out = srv.timer(t.deadline)
        self.assertEqual([(lane, m.code) for lane, m, _ in out], [(1, "CHANGED")])
        self.assertEqual(t.outcome, "changed")

    def test_an_eof_never_acknowledged_ends_as_delivered(self):
        srv = LaneServer({"f": MemoryEntry(b"abc")}, rto_initial=0.05, rto_max=0.4)
        srv.ask(1, "f")
        srv.ack(1, 0)
        (_, eof, _), = srv.ack(1, 3)
        self.assertIsInstance(eof, Eof)
        t = srv.d.active[A, 1]
        now = 0.0
        while t.outcome is None and now < 10:
            now += 0.05
            srv.timer(now)
        self.assertEqual(t.outcome, "done")


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


class ServeLogTest(unittest.TestCase):
    """Item 6 of issue 20: one line per file served, per-range detail at debug level."""

    def server(self, **settings):
        log = logging.getLogger("udpxfer.tests.servelog.%d" % id(self))
        log.propagate = False
        log.setLevel(logging.DEBUG)
        cap = Capture()
        log.addHandler(cap)
        srv = LaneServer({"f.bin": MemoryEntry(blob(60000, 8))}, datagram_size=4000, **settings)
        srv.d = ServerDispatcher(srv.catalog, srv.s, log)
        return srv, cap

    def info(self, cap):
        return [r.getMessage() for r in cap.records if r.levelno >= logging.INFO]

    def test_one_line_for_a_file_fetched_in_three_ranges_and_a_check(self):
        srv, cap = self.server()
        for lane, start in ((1, 0), (2, 20000), (3, 40000)):
            srv.fetch(lane, "f.bin", start, 20000, now=0.1 * lane)
        srv.fetch(4, "f.bin", 60000, 0, now=0.35)           # the empty range at the end
        srv.timer(0.5)
        self.assertEqual(self.info(cap), [])                 # not yet: more may come
        srv.timer(1.4)
        lines = self.info(cap)
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"^192\.0\.2\.10:\d+: sent f\.bin, 58\.6 KiB in 0\.\d\d s, "
                                   r"[0-9.]+ [KM]iB/s$")
        debug = [r for r in cap.records if r.levelno == logging.DEBUG and " start " in
                 r.getMessage()]
        self.assertEqual(len(debug), 4)

    def test_a_client_that_vanished_is_one_quiet_line(self):
        srv, cap = self.server(rto_initial=0.05, rto_max=0.4, client_silence=1.0)
        srv.ask(1, "f.bin")
        srv.ack(1, 0)
        now = 0.0
        while srv.d.active and now < 5:
            now += 0.05
            srv.timer(now)
        srv.timer(now + 2)
        lines = self.info(cap)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("f.bin stopped after 0 B of 58.6 KiB (the client went quiet)", lines[0])
        self.assertFalse([r for r in cap.records if r.levelno >= logging.WARNING])


if __name__ == "__main__":
    unittest.main()
