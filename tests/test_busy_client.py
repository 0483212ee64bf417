"""Issue 10, item 2, end to end: what clients see of the server's fair shares. Real server and
clients on loopback, port 0, temp folders, bounded waits. Tests that need a second client IP
(127.0.0.2) are skipped where it cannot be bound (macOS).

- A client that gets BUSY for an extra part carries on with the parts it has.
- A client that gets BUSY for everything fails with "server busy", not "not answering".
- Two clients with many parts on two IPs, more parts than the server has slots: both finish.
- 128 sockets on one IP holding every slot with slow keep-alive ACKs: a client on another IP is
  served promptly.

Run: python3 -m tests test_busy_client
"""

import io
import os
import select
import socket
import threading
import time
import unittest

import client
from tests import support
from udpxfer.errors import Failure
from udpxfer.fetch import Client
from udpxfer.partial import PartialFile
from udpxfer.planner import RangePlanner
from udpxfer.wire import (Data, Error, ProtocolError, Size, format_ack, format_download,
                          parse_server_message)

MiB = 1024 * 1024


def can_bind(host):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


class BoundClient(Client):
    """A client whose sockets send from a chosen local IP (127.0.0.2: another host)."""

    source = "127.0.0.1"

    def _socket(self):
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.bind((self.source, 0))
        sock.connect(self.server)
        sock.setblocking(False)
        return sock


def bound_client(address, out_dir, source, settings=None, stream=None):
    printer = client.Printer(quiet=stream is None, verbose=stream is not None,
                             stream=stream or io.StringIO())
    c = BoundClient(address[0], address[1], settings or support.fast_client_settings(),
                    printer, out_dir)
    c.source = source
    return c


def fetch(c, out_dir, name, parts, size_hint=None):
    target = PartialFile(out_dir, name)
    try:
        return c.fetch(name, target, parts, size_hint)
    finally:
        target.release()


class BusyClientTest(unittest.TestCase):

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)

    def serve(self, **settings):
        st = support.ServerThread(self.tmp.files, support.fast_server_settings(**settings))
        st.start()
        self.addCleanup(st.stop)
        return st

    def test_busy_for_extra_parts_carries_on_with_the_parts_it_has(self):
        # (Datagrams of 4 KiB and ranges of 1 MiB: each lane holds its slot for tens of
        # milliseconds, so the extra lanes ask while both are taken. With 64 KiB datagrams
        # and 256 KiB ranges a lane lasted a millisecond, and on a loaded machine the extra
        # lanes sometimes found a slot free every time: no BUSY.)
        data = self.tmp.make_file("f.bin", 3 * MiB, seed=31)
        st = self.serve(max_transfers=2, datagram_size=4096)
        log = io.StringIO()
        c = bound_client(st.address, self.tmp.downloads, "127.0.0.1",
                         support.fast_client_settings(first_range=MiB, give_up=5.0),
                         stream=log)
        t0 = time.monotonic()
        fetch(c, self.tmp.downloads, "f.bin", 6, len(data))
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(self.tmp.downloaded("f.bin"), data)
        self.assertGreater(st.server.dispatcher.stats["busy"], 0)
        self.assertIn("server busy; going on with", log.getvalue())
        self.assertNotIn("not answering", log.getvalue())
        # No range is cut at the end once the server said BUSY: the cut lane would keep its
        # slot until the server gave up on it, and the second half would be refused again
        # and again (14 BUSY and 2 s, where 3 or 4 come now).
        self.assertNotIn(") cut", log.getvalue())
        self.assertLessEqual(st.server.dispatcher.stats["busy"], 8)

    def test_busy_for_everything_says_server_busy(self):
        self.tmp.make_file("f.bin", 100 * 1024, seed=32)
        st = self.serve(max_transfers=0)           # no slot for anyone
        c = bound_client(st.address, self.tmp.downloads, "127.0.0.1",
                         support.fast_client_settings(give_up=1.0))
        with self.assertRaises(Failure) as caught:
            fetch(c, self.tmp.downloads, "f.bin", 2)
        self.assertIn("server busy", str(caught.exception))
        self.assertNotIn("not answering", str(caught.exception))
        self.assertGreater(st.server.dispatcher.stats["busy"], 1)
        self.assertFalse(os.path.exists(os.path.join(self.tmp.downloads, "f.bin")))

    def test_two_clients_on_two_ips_with_more_parts_than_slots_both_finish(self):
        if not can_bind("127.0.0.2"):
            self.skipTest("cannot bind 127.0.0.2 on this platform")
        data = self.tmp.make_file("f.bin", 4 * MiB, seed=33)
        st = self.serve(max_transfers=8)
        errors, times = [], {}

        def run(source):
            try:
                out = self.tmp.folder(source)
                c = bound_client(st.address, out, source,
                                 support.fast_client_settings(first_range=128 * 1024,
                                                              give_up=10.0))
                t0 = time.monotonic()
                fetch(c, out, "f.bin", 16, len(data))
                times[source] = time.monotonic() - t0
                with open(os.path.join(out, "f.bin"), "rb") as f:
                    if f.read() != data:
                        errors.append((source, "wrong content"))
            except BaseException as exc:
                errors.append((source, repr(exc)))

        threads = [threading.Thread(target=run, args=(ip,), daemon=True)
                   for ip in ("127.0.0.1", "127.0.0.2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertFalse([t for t in threads if t.is_alive()], "downloads still running")
        self.assertEqual(errors, [])
        self.assertEqual(sorted(times), ["127.0.0.1", "127.0.0.2"])
        self.assertLessEqual(len(st.server.dispatcher.active), 8)

    def test_one_ip_holding_every_slot_with_slow_acks_does_not_lock_out_another(self):
        if not can_bind("127.0.0.2"):
            self.skipTest("cannot bind 127.0.0.2 on this platform")
        data = self.tmp.make_file("f.bin", 200 * 1024, seed=34)
        self.tmp.make_file("hog.bin", 64 * MiB, seed=35)
        # Small datagrams keep the hog cheap; a generous retransmission count keeps its slow
        # ACKs from timing out on a loaded machine (then slots would free by themselves).
        st = self.serve(datagram_size=1232, max_retransmits=30, max_transfers=128)
        s = st.server.settings
        hog = Hog(st.address, "127.0.0.2", s.max_transfers)
        self.addCleanup(hog.stop)
        hog.start()
        d = st.server.dispatcher
        self.assertTrue(hog.wait_holding(s.max_transfers, 10.0),
                        "the hog holds %d slots" % len(d.active))
        time.sleep(0.3)   # a few keep-alive rounds
        self.assertEqual(len(d.active), s.max_transfers)
        t0 = time.monotonic()
        c = bound_client(st.address, self.tmp.downloads, "127.0.0.1",
                         support.fast_client_settings(give_up=8.0))
        fetch(c, self.tmp.downloads, "f.bin", 1)
        seconds = time.monotonic() - t0
        self.assertEqual(self.tmp.downloaded("f.bin"), data)
        self.assertLess(seconds, 5.0)
        self.assertGreaterEqual(d.stats["preempted"], 1)
        self.assertIsNone(hog.error)


class PieceTest(unittest.TestCase):
    """Item 5: the range size is computed in one place, for the plan and the first request."""

    def test_first_length_and_plan_agree(self):
        for size in (10 * MiB, 100 * MiB, 3 * MiB, 10 ** 12):
            for lanes in (2, 4, 16):
                with self.subTest(size=size, lanes=lanes):
                    p = RangePlanner(support.fast_client_settings(), size_hint=size)
                    p.plan(size, [])
                    first = p.first_length(lanes, 8192)
                    self.assertEqual(p.next_range(lanes, 8192, 0.0, 0), (0, first))
                    # (no lane's rate measured yet: at most first_range)
                    expect = min(max(-(-size // lanes), 2 * 8192, 128 * 1024), 64 * 1024)
                    self.assertEqual(first, expect)


def ack_datagram(size_msg, n):
    """The ACK of n for a transfer that got size_msg (its SIZE): it echoes the SIZE's token.
    The one place that builds an ACK here."""
    return format_ack(n, size_msg.token)


class Hog(threading.Thread):
    """n sockets on one IP: each asks for hog.bin until DATA flows, then acknowledges each DATA
    only `delay` after it came (slow keep-alive, about when the server would send it again)."""

    def __init__(self, address, host, n, delay=0.15):
        super().__init__(daemon=True)
        self.address, self.host, self.n, self.delay = address, host, n, delay
        self.holding = 0
        self.error = None
        self._halt = threading.Event()

    def stop(self):
        self._halt.set()
        self.join(5)

    def wait_holding(self, n, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.holding < n:
            time.sleep(0.02)
        return self.holding >= n

    def run(self):
        socks = []
        request = format_download("hog.bin", 0, 10 ** 9)
        try:
            for _ in range(self.n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((self.host, 0))
                s.connect(self.address)
                s.setblocking(False)
                socks.append(s)
            due = {}                    # sock -> (when, ack datagram)
            sizes = {}                  # sock -> the SIZE it got
            flowing = set()
            asked = {}                  # sock -> when its request was last sent
            while not self._halt.is_set():
                now = time.monotonic()
                for s in socks:         # ask (again) until data flows; a few at a time
                    if s not in flowing and now - asked.get(s, -1.0) > 0.2:
                        asked[s] = now
                        s.send(request)
                for s, (when, msg) in list(due.items()):
                    if when <= now:
                        s.send(msg)
                        del due[s]
                ready, _, _ = select.select(socks, [], [], 0.01)
                for s in ready:
                    try:
                        m = parse_server_message(s.recv(65536))
                    except (OSError, ProtocolError):
                        continue
                    if isinstance(m, Size) and s not in flowing:
                        sizes[s] = m
                        s.send(ack_datagram(m, 0))
                    elif isinstance(m, Data) and s not in due and s in sizes:
                        flowing.add(s)
                        due[s] = (time.monotonic() + self.delay,
                                  ack_datagram(sizes[s], m.offset + len(m.payload)))
                    elif isinstance(m, Error):
                        flowing.discard(s)
                        due.pop(s, None)
                self.holding = len(flowing)
        except Exception as exc:
            self.error = exc
        finally:
            for s in socks:
                s.close()


if __name__ == "__main__":
    unittest.main()
