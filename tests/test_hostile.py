"""Hostile input, end to end (PROTOCOL.md "Hostile input"): real sockets on loopback, port 0,
temporary folders, every wait bounded, nothing left running.

1. Fuzzing: the codecs on ~100k random and mutated inputs, and a live server under 100k random
   and mutated datagrams from 50 source ports while real downloads run and finish correct.
2. Paths: names that try to leave the served folder, hidden names, subfolders, links and control
   characters all get ERROR NOT_FOUND and not one byte of content; the listing is exact.
3. Amplification: unacknowledged requests get at most 256 bytes back (and at most 3 times what
   they sent, besides the first SIZE); garbage at most one short error, at most 3 times its size.
   The ratios are printed.
4. State exhaustion: a flood of requests that never acknowledge keeps the pools bounded and does
   not lock out a real client from the same IP (and from many IPs where the platform allows).
5. Paths that drop big datagrams: the server shrinks its payload and the download completes; on a
   normal path the datagrams stay big.
6. A hostile server: the client never writes outside its folder, never holds unbounded memory,
   never hangs and never saves a wrong file.
7. Windows' ConnectionResetError from recvfrom does not stop the server.

Run: python3 -m tests test_hostile
"""

import argparse
import io
import os
import random
import select
import socket
import sys
import threading
import time
import unittest
import zlib
from collections import Counter

import client
from tests import support
from tests.impair import ImpairProxy, Impairment
from tests.support import wait_for
from udpxfer.client_transfer import ClientTransfer
from udpxfer.errors import Failure
from udpxfer.partial import PartialFile
from udpxfer.wire import (HUGE, MAX_DATAGRAM, MAX_ERROR, Ack, Data, DownloadRequest, Error,
                          ListRequest, ProtocolError, Size, crc_start, format_ack,
                          format_data_header, format_download, format_eof, format_error,
                          format_listing, format_size, is_servable_name, parse_client_message,
                          parse_listing, parse_server_message)

MiB = 1024 * 1024
SECRET = b"TOPSECRET-do-not-serve-me\n"


def report(text):
    print("[hostile] " + text, file=sys.stderr, flush=True)


# --- Helpers ---------------------------------------------------------------------------------

def udp_socket(host="127.0.0.1", blocking=True):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:   # macOS caps a datagram at SO_SNDBUF (9216 by default); the fuzzer sends 65507
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        except OSError:
            pass
        sock.bind((host, 0))
        if not blocking:
            sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def collect(socks, seconds, until=None):
    """Everything that arrives on `socks` within `seconds`: {sock: [datagram, ...]}. Returns early
    when until(result) is true."""
    got = {s: [] for s in socks}
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (until is not None and until(got)):
            return got
        ready, _, _ = select.select(list(socks), [], [], min(left, 0.05))
        for s in ready:
            try:
                got[s].append(s.recv(65536))
            except OSError:
                pass


def drain(sock):
    n = 0
    while True:
        try:
            sock.recv(65536)
        except OSError:
            return n
        n += 1


def run_bounded(testcase, fn, timeout):
    """Run fn() in a daemon thread; fail (instead of hanging) if it does not return in time.
    Returns (result, exception, seconds)."""
    box = {}

    def target():
        t = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as exc:   # handed to the test thread
            box["error"] = exc
        box["seconds"] = time.monotonic() - t

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    testcase.assertFalse(th.is_alive(), "did not return within %.1f s (hang)" % timeout)
    return box.get("result"), box.get("error"), box["seconds"]


def pending_lifetime(s, rto=None):
    """How long the server keeps a request whose SIZE is never acknowledged: its SIZE is sent
    pending_max_sends times, each after an RTO that doubles (RFC 6298), then it expires, but
    not before pending_keep."""
    rto = min(max(s.rto_initial if rto is None else rto, s.rto_min), s.rto_max)
    total = 0.0
    for _ in range(s.pending_max_sends):
        total += rto
        rto = min(rto * 2, s.rto_max)
    return max(total, s.pending_keep)


def strangers(d):
    """Requests waiting for their SIZE's ACK in the strangers' pool (max_pending): all but
    those of client sockets with transfers running (their pool is bounded by the fair share)."""
    return len(d.pending) - d.lane_pending.size


def timers_bound(s):
    """ServerDispatcher compacts its timer heap past 4 entries per transfer plus 64."""
    return 4 * (s.max_transfers + s.max_pending) + 64 + 1


def tree(root, skip=()):
    """{relative path: size} of everything under root, except the folders in `skip`."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in dirs + files:
            path = os.path.join(folder, name)
            try:
                found[os.path.relpath(path, root)] = os.lstat(path).st_size
            except OSError:
                pass
    return found


def quiet_printer():
    return client.Printer(quiet=True, stream=io.StringIO())


# --- The fuzzer ------------------------------------------------------------------------------

CLIENT_BASES = [
    b"LIST", b"LIST\n", b"LIST\r\n",
    b"DOWNLOAD big.bin 0 1000", b"DOWNLOAD big.bin 4096 65536", b"DOWNLOAD big.bin 0 " + b"9" * 50,
    b"DOWNLOAD with space.txt 0 100", b"DOWNLOAD missing.bin 0 10",
    b"ACK 0 0123456789abcdef", b"ACK 1000 0123456789abcdef", b"ACK 4096 fedcba9876543210",
    b"ACK 65000 00000000ffffffff", b"ACK EOF 0123456789abcdef", b"ACK EOF 0123456789abcdef\n",
]
TOKEN = b"0123456789abcdef"   # what the fake servers below put in SIZE


def _server_bases():
    payload = bytes(range(256)) * 4
    bases = [b"SIZE 1000 v1 " + TOKEN, b"SIZE 0 " + b"x" * 64 + b" " + TOKEN,
             b"SIZE 18446744073709551616 a-b-c ffffffffffffffff",
             format_eof(zlib.crc32(b"x")), format_eof(0),
             format_error("NOT_FOUND"), format_error("BUSY", "try later"),
             format_error("BAD_REQUEST", "x" * 80)]
    for offset, n in ((0, 1), (0, 100), (1000, 1024), (10 ** 12, 33)):
        p = payload[:n]
        bases.append(format_data_header(offset, zlib.crc32(p)) + p)
    return bases


SERVER_BASES = _server_bases()

BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80",
            b"\x80", b"\xe2\x82", b"\xef\xbf\xbe"]
WEIRD_NUMBERS = [b"-1", b"-0", b"+5", b"007", b"00", b"1e9", b"0x10", b"1.5", b" 5", b"5 ", b"",
                 "\u0661\u0662".encode(), "\uff11".encode(), b"\xb2", b"18446744073709551616",
                 b"1" + b"0" * 40, b"1" + b"0" * 39, b"\x00", b"4\x00"]
NAMES = [b"big.bin", b"../secret.txt", b"/etc/passwd", b"..", b".", b"", b"a b c", b"sub/x",
         b"C:\\x", b"\x00", b"x\n", "caf\u00e9".encode(), b"\xff\xfe"]


class Fuzzer:
    """Seeded random and mutated datagrams: bit flips, truncations, oversized (up to 65507 bytes),
    invalid UTF-8, huge numbers of thousands of digits, negative and odd numbers, many spaces,
    NULs, concatenations, random bytes."""

    KINDS = 16

    def __init__(self, seed, bases=CLIENT_BASES):
        self.r = random.Random(seed)
        self.bases = bases
        big = random.Random(seed + 1)
        self.big = bytes(big.getrandbits(8) for _ in range(MAX_DATAGRAM))
        self.digits = {}

    def _huge(self):
        n = self.r.choice((1000, 5000, 20000, 60000))
        if n not in self.digits:
            self.digits[n] = str(self.r.randrange(1, 10)).encode() * n
        return self.digits[n]

    def one(self):
        r = self.r
        kind = r.randrange(self.KINDS)
        base = r.choice(self.bases)
        if kind == 0:     # random bytes
            n = r.randrange(0, 48)
            return r.getrandbits(8 * n).to_bytes(n, "little") if n else b""
        if kind == 1:     # bit flips
            b = bytearray(base)
            for _ in range(r.randrange(1, 4)):
                i = r.randrange(len(b) * 8)
                b[i >> 3] ^= 1 << (i & 7)
            return bytes(b)
        if kind == 2:     # truncation
            return base[:r.randrange(len(base))]
        if kind == 3:     # oversized: a few up to the 65507-byte limit, most a little longer
            if r.random() < 0.05:
                return (base + b" " + self.big)[:r.randrange(60000, MAX_DATAGRAM + 1)]
            return base + self.big[:r.randrange(0, 2000)]
        if kind == 4:     # invalid UTF-8 somewhere
            i = r.randrange(len(base) + 1)
            return base[:i] + r.choice(BAD_UTF8) + base[i:]
        if kind == 5:     # numbers of thousands of digits
            return r.choice((b"ACK ", b"DOWNLOAD big.bin 0 ", b"DOWNLOAD big.bin ", b"SIZE ",
                             b"DATA ")) + self._huge() + r.choice((b"", b" 10", b" v1",
                                                                  b" 00000000\nx"))
        if kind == 6:     # negative, signed, leading zeros, non-ASCII digits...
            w = r.choice(WEIRD_NUMBERS)
            return r.choice((b"ACK " + w, b"DOWNLOAD big.bin " + w + b" 100",
                             b"DOWNLOAD big.bin 0 " + w, b"SIZE " + w + b" v1"))
        if kind == 7:     # many spaces
            sp = b" " * r.randrange(2, 3000)
            return r.choice((b"ACK" + sp + b"0", b"DOWNLOAD" + sp + b"big.bin 0 1", b"LIST" + sp,
                             sp, b"DOWNLOAD big.bin" + sp + b"0" + sp + b"1", b"ACK EOF" + sp))
        if kind == 8:     # NULs
            i = r.randrange(len(base) + 1)
            return base[:i] + b"\x00" * r.randrange(1, 5) + base[i:]
        if kind == 9:     # odd names
            return b"DOWNLOAD " + r.choice(NAMES) + b" " + r.choice((b"0 1", b"0 99999999"))
        if kind == 10:    # two messages in one, odd separators
            return base + r.choice((b"\n", b"\r\n", b"\n\n", b"\r", b"\t", b" ", b"\x00")) + \
                r.choice(self.bases)
        if kind == 11:    # case games
            return base.lower() if r.random() < 0.5 else base.swapcase()
        if kind == 12:    # a byte replaced
            b = bytearray(base)
            b[r.randrange(len(b))] = r.randrange(256)
            return bytes(b)
        if kind == 13:
            return b""
        return base       # valid ones too, so the server has transfers to keep apart


# --- 1. Fuzzing ------------------------------------------------------------------------------

class CodecFuzzTest(unittest.TestCase):
    """The parsers only ever return a message or raise ProtocolError."""

    def check(self, parse, data, tally):
        try:
            msg = parse(data)
        except ProtocolError:
            tally["rejected"] += 1
            return None
        except Exception as exc:   # anything else is a crash of the receive loop
            self.fail("%s(%r...) raised %r" % (parse.__name__, bytes(data[:60]), exc))
        tally[type(msg).__name__] += 1
        return msg

    def test_parsers_only_return_a_message_or_raise_protocol_error(self):
        tally_c, tally_s = Counter(), Counter()
        count = 0
        for seed, bases, n in ((11, CLIENT_BASES, 50000), (12, SERVER_BASES, 50000)):
            fz = Fuzzer(seed, bases)
            for i in range(n):
                data = fz.one()
                if i & 1:
                    data = memoryview(data)   # the server hands the parser a memoryview
                count += 1
                m = self.check(parse_client_message, data, tally_c)
                if isinstance(m, DownloadRequest):
                    self.assertIsInstance(m.name, str)
                    self.assertTrue(0 <= m.offset <= HUGE)
                    self.assertTrue(0 <= m.chunk_size <= HUGE)
                elif isinstance(m, Ack):
                    self.assertTrue(m.n is None or 0 <= m.n <= HUGE)
                m = self.check(parse_server_message, data, tally_s)
                if isinstance(m, Data):
                    self.assertGreater(len(m.payload), 0)
                elif isinstance(m, Error):
                    self.assertLessEqual(len(data), MAX_ERROR)
        report("codec fuzz: %d inputs, each through both parsers; client side %s; server side %s"
               % (count, dict(tally_c), dict(tally_s)))
        self.assertGreaterEqual(count, 100000)
        # The mix really reached the parsers' accepting paths, not only their first check.
        for kind in ("ListRequest", "DownloadRequest", "Ack", "rejected"):
            self.assertGreater(tally_c[kind], 100, kind)
        for kind in ("Size", "Data", "Eof", "Error", "rejected"):
            self.assertGreater(tally_s[kind], 100, kind)

    def test_every_truncation_and_bit_flip_of_data_is_rejected(self):
        """The parser cannot check a DATA's running CRC (only the receiver knows R(offset)):
        the client transfer must refuse every damaged copy, and take the good one."""
        payload = bytes(random.Random(5).getrandbits(8) for _ in range(300))
        start = 123456
        good = format_data_header(
            start, zlib.crc32(payload, crc_start(start))) + payload

        def receiver():
            t = ClientTransfer("f", start, 1000, 0.0)
            t.receive_datagram(format_size(10 ** 6, "v", TOKEN), 0.0)
            t.datagrams_to_send()
            return t

        t = receiver()
        self.assertEqual(bytes(t.receive_datagram(good, 0.0)), payload)
        self.assertEqual(t.pos, start + 300)
        for n in range(len(good)):
            t = receiver()
            self.assertIsNone(t.receive_datagram(good[:n], 0.0), "truncated to %d" % n)
            self.assertEqual(t.pos, start)
        for bit in range(len(good) * 8):
            b = bytearray(good)
            b[bit >> 3] ^= 1 << (bit & 7)
            t = receiver()
            self.assertIsNone(t.receive_datagram(bytes(b), 0.0), "bit %d flipped" % bit)
            self.assertEqual(t.pos, start)

    def test_listing_and_name_rules_only_raise_protocol_error(self):
        fz = Fuzzer(13, [b"a.txt 10\n", b"with space.txt 0\n../evil 5\n", b"x 1\ny 2\n"])
        for _ in range(5000):
            data = fz.one()
            try:
                entries = parse_listing(data)
            except ProtocolError:
                continue
            for name, size in entries:
                self.assertIsInstance(is_servable_name(name), bool)
                self.assertGreaterEqual(size, 0)


class LiveFuzzTest(unittest.TestCase):
    DATAGRAMS = 100000
    SOURCES = 50
    WINDOW = 400        # datagrams sent ahead of what the server has taken in
    MAX_SECONDS = 12.0  # a very slow machine sends fewer (still >= 100k with the codec fuzz)

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.data = self.tmp.make_file("big.bin", 1 * MiB, seed=1)
        self.tmp.make_file("with space.txt", 100, seed=2)
        self.settings = support.fast_server_settings(recent_max=64)
        self.st = support.ServerThread(self.tmp.files, self.settings).start()
        self.addCleanup(self.st.stop)

    def test_fuzz_flood_while_downloading(self):
        st, d, s = self.st, self.st.server.dispatcher, self.settings
        socks = [udp_socket(blocking=False) for _ in range(self.SOURCES)]
        for sock in socks:
            self.addCleanup(sock.close)

        # Real downloads, one after another, for as long as the fuzzing lasts.
        stop = threading.Event()
        results = []

        def downloader():
            i = 0
            while not stop.is_set() or not results:
                out = os.path.join(self.tmp.root, "dl%d" % i)
                os.mkdir(out)
                i += 1
                t = time.monotonic()
                try:
                    support.download(st.address, "big.bin", out)
                    with open(os.path.join(out, "big.bin"), "rb") as f:
                        results.append((f.read() == self.data, time.monotonic() - t))
                except Exception as exc:
                    results.append((exc, time.monotonic() - t))
                    return

        th = threading.Thread(target=downloader, daemon=True)
        th.start()

        fz = Fuzzer(21)
        sent = send_errors = replies = 0
        samples = []
        t0 = time.monotonic()
        for i in range(self.DATAGRAMS):
            try:
                socks[i % self.SOURCES].sendto(fz.one(), st.address)
                sent += 1
            except OSError:   # a full send buffer: the datagram is lost, as on a network
                send_errors += 1
            if i % 250 == 249:
                replies += sum(drain(sock) for sock in socks)
                samples.append((strangers(d), len(d.active), len(d.recent), len(d._timers),
                                d.lane_pending.size))
                # As fast as the server takes them in (so they are parsed, not dropped by a
                # full socket buffer), but never waiting long: drops must not stall the sender.
                wait_for(lambda: sent - d.stats["datagrams_in"] < self.WINDOW, 0.02)
            if time.monotonic() - t0 > self.MAX_SECONDS:
                break
        fuzz_seconds = time.monotonic() - t0
        stop.set()
        th.join(30)
        self.assertFalse(th.is_alive(), "the downloads did not finish")
        replies += sum(drain(sock) for sock in socks)

        report("live fuzz: %d datagrams sent (%d send errors) from %d ports in %.2f s "
               "(%.0f/s); the server took in %d (with the downloads' own), "
               "%d malformed; %d replies drained; %d downloads of 1 MiB meanwhile, slowest "
               "%.2f s" % (sent, send_errors, self.SOURCES, fuzz_seconds, sent / fuzz_seconds,
                           d.stats["datagrams_in"], d.stats["malformed"], replies,
                           len(results), max(r[1] for r in results)))
        report("live fuzz: server stats %s" % d.stats)

        self.assertGreaterEqual(sent, 20000)
        self.assertGreater(d.stats["datagrams_in"], sent * 0.8)
        self.assertTrue(results)
        for ok, seconds in results:
            self.assertIs(ok, True, "a download during the fuzzing failed: %r" % (ok,))
        # The server survived and its state stayed bounded throughout.
        self.assertTrue(st.thread.is_alive())
        for pending, active, recent, timers, lanes in samples:
            self.assertLessEqual(pending, s.max_pending)
            self.assertLessEqual(lanes, s.max_transfers)
            self.assertLessEqual(active, s.max_transfers)
            self.assertLessEqual(recent, s.recent_max)
            self.assertLessEqual(timers, timers_bound(s))
        self.assertLessEqual(strangers(d), s.max_pending)
        self.assertLessEqual(len(d.active), s.max_transfers)
        self.assertLessEqual(len(d.recent), s.recent_max)
        self.assertLessEqual(len(d._timers), timers_bound(s))
        # And it still serves: a listing and a download after the storm.
        entries = support.make_client(st.address, self.tmp.downloads).listing(give_up=5)
        self.assertEqual(dict(entries), {"big.bin": len(self.data), "with space.txt": 100})
        support.download(st.address, "big.bin", self.tmp.downloads)
        self.assertEqual(self.tmp.downloaded("big.bin"), self.data)
        self.assertTrue(st.thread.is_alive())


# --- 2. Paths --------------------------------------------------------------------------------

def _try_symlink(target, link, **kw):
    try:
        os.symlink(target, link, **kw)
        return True
    except (OSError, NotImplementedError, AttributeError):
        return False


class PathTest(unittest.TestCase):
    TRAPS = ["../secret.txt", "/etc/passwd", "files/../config.py", "..", ".", ".hidden", "sub/x",
             "sub", "sub\\x", "a.txt\x00", "a\x00.txt", "\x00", "a.txt\n", "\na.txt", "x\ny",
             "..\\secret.txt", "\\secret.txt", "C:secret.txt", "C:\\x", "C:", "a" * 5000,
             "../files/a.txt", "./a.txt", "a.txt/", "a.txt/.", "sub/../a.txt", " ../secret.txt",
             "%2e%2e%2fsecret.txt", "a.txt\x7f", "a.txt\u0085", "\u2024\u2024/secret.txt",
             "secret.txt", "missing.txt", ""]
    LINK_TRAPS = ["outlink.txt", "abslink.txt", "dirlink", "rootlink", "dangling.txt",
                  "chain.txt"]

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        files = self.tmp.files
        self.a = self.tmp.make_file("a.txt", 1000, seed=3)
        self.b = self.tmp.make_file("with space.txt", 77, seed=4)
        self.tmp.make_file(".hidden", data=SECRET)
        os.mkdir(os.path.join(files, "sub"))
        with open(os.path.join(files, "sub", "x"), "wb") as f:
            f.write(SECRET)
        self.secret = os.path.join(self.tmp.root, "secret.txt")
        with open(self.secret, "wb") as f:
            f.write(SECRET)
        self.links = _try_symlink(os.path.join("..", "secret.txt"),
                                  os.path.join(files, "outlink.txt"))
        if self.links:
            _try_symlink(self.secret, os.path.join(files, "abslink.txt"))
            _try_symlink("sub", os.path.join(files, "dirlink"), target_is_directory=True)
            _try_symlink(".", os.path.join(files, "rootlink"), target_is_directory=True)
            _try_symlink("nowhere.txt", os.path.join(files, "dangling.txt"))
            _try_symlink("outlink.txt", os.path.join(files, "chain.txt"))   # link to a link
            # A link to a regular file inside the folder: PROTOCOL.md refuses only links that
            # lead outside, so this one is listed and served, with a.txt's bytes.
            _try_symlink("a.txt", os.path.join(files, "inlink.txt"))
        # A name that is not valid UTF-8 on disk (Linux allows it): never listed nor served.
        self.bad_name = False
        if sys.platform.startswith("linux"):
            try:
                with open(os.path.join(os.fsencode(files), b"bad\xff.txt"), "wb") as f:
                    f.write(SECRET)
                self.bad_name = True
            except OSError:
                pass
        self.list_path = os.path.join(self.tmp.root, "file_list.txt")
        self.st = support.ServerThread(files, list_path=self.list_path).start()
        self.addCleanup(self.st.stop)

    def expected(self):
        e = {"a.txt": len(self.a), "with space.txt": len(self.b)}
        if self.links:
            e["inlink.txt"] = len(self.a)
        return e

    def exchange(self, requests, window=0.4):
        """Send each raw request from its own socket; gather replies until each has one reply,
        then `window` more seconds (anything that follows, SIZE or DATA, would be caught)."""
        socks = []
        for data in requests:
            sock = udp_socket()
            self.addCleanup(sock.close)
            sock.sendto(data, self.st.address)
            socks.append(sock)
        got = collect(socks, 3.0, until=lambda g: all(g.values()))
        more = collect(socks, window)
        return [got[s] + more[s] for s in socks]

    def test_traps_get_not_found_and_no_content(self):
        names = list(self.TRAPS) + (self.LINK_TRAPS if self.links else [])
        requests = [format_download(n, 0, 10 ** 9) for n in names]
        replies = self.exchange(requests)
        for name, datagrams in zip(names, replies):
            with self.subTest(name=name[:40]):
                self.assertEqual(len(datagrams), 1, "expected exactly one reply: %r" % datagrams)
                msg = parse_server_message(datagrams[0])
                self.assertIsInstance(msg, Error)
                self.assertEqual(msg.code, "NOT_FOUND")
                self.assertNotIn(b"TOPSECRET", datagrams[0])
        if not self.links:
            report("paths: os.symlink is not available here; link traps skipped")

    def test_names_that_are_not_utf8_are_refused_without_content(self):
        requests = [b"DOWNLOAD \xff\xfe.txt 0 1000000000", b"DOWNLOAD a.txt\xc0\xae 0 100000000",
                    b"DOWNLOAD \xed\xa0\x80 0 1000000000"]
        if self.bad_name:
            requests.append(b"DOWNLOAD bad\xff.txt 0 1000000000")
        for datagrams in self.exchange(requests):
            self.assertEqual(len(datagrams), 1, datagrams)
            msg = parse_server_message(datagrams[0])
            self.assertIsInstance(msg, Error)
            # Not UTF-8 is a malformed request (BAD_REQUEST); never SIZE or DATA.
            self.assertIn(msg.code, ("BAD_REQUEST", "NOT_FOUND"))

    def test_listing_holds_exactly_the_servable_regular_files(self):
        expected = self.expected()
        entries = support.make_client(self.st.address, self.tmp.downloads).listing(give_up=5)
        self.assertEqual(dict(entries), expected)
        self.assertEqual(len(entries), len(expected))
        want = format_listing(expected.items())
        with open(self.list_path, "rb") as f:
            self.assertEqual(f.read(), want)
        self.assertNotIn(b"TOPSECRET", want)
        # The legitimate files are served, the inside link with a.txt's bytes.
        for name in expected:
            support.download(self.st.address, name, self.tmp.downloads)
        self.assertEqual(self.tmp.downloaded("a.txt"), self.a)
        self.assertEqual(self.tmp.downloaded("with space.txt"), self.b)
        if self.links:
            self.assertEqual(self.tmp.downloaded("inlink.txt"), self.a)


# --- 3. Amplification ------------------------------------------------------------------------

class AmplificationTest(unittest.TestCase):
    BUDGET = 256

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.tmp.make_file("big.bin", 2 * MiB, seed=5)
        for i in range(40):   # a listing long enough that data would show
            self.tmp.make_file("file-%02d-with-a-long-name.txt" % i, 10 * i + 1, seed=i)
        self.settings = support.fast_server_settings()
        # A fresh server: no RTT cached for 127.0.0.1, so pending requests use rto_initial.
        self.st = support.ServerThread(self.tmp.files, self.settings).start()
        self.addCleanup(self.st.stop)

    def test_a_blind_sender_gets_at_most_three_times_what_it_sent(self):
        """The attack of issue 10: a sender that forges a victim's address never sees the SIZE,
        so it sends DOWNLOAD and then the ACKs it would send if it could guess the token. Here
        the "victim" is a socket that only counts what arrives: at most 3x the blind sender's
        bytes, SIZEs only, and never a DATA."""
        s = self.settings
        victim = udp_socket()
        self.addCleanup(victim.close)
        rng = random.Random(11)
        sent = 0
        request = format_download("big.bin", 0, 10 ** 12)
        victim.sendto(request, self.st.address)   # the forged request (from the victim's port)
        sent += len(request)
        got = []
        t0 = time.monotonic()
        n = acks = 0
        while time.monotonic() - t0 < pending_lifetime(s) + 0.3:
            # the expected ACKs, each with a guessed token: ACK 0, then what DATA would need
            guess = ("%016x" % rng.getrandbits(64)).encode()
            ack = format_ack(n, guess)
            victim.sendto(ack, self.st.address)
            sent += len(ack)
            acks += 1
            n = 0 if n else 65000 - 16
            got += collect([victim], 0.01)[victim]
        got += collect([victim], 0.3)[victim]
        received = sum(map(len, got))
        kinds = {type(parse_server_message(g)).__name__ for g in got}
        self.assertLessEqual(kinds, {"Size", "Error"}, "no DATA ever reaches a blind sender")
        self.assertLessEqual(received, s.amplification_factor * sent)
        self.assertLessEqual(sum(len(g) for g in got if g.startswith(b"SIZE")), self.BUDGET)
        report("blind sender: %d bytes sent in %d ACKs with guessed tokens, %d bytes back (%s)"
               % (sent, acks, received, ", ".join(sorted(kinds)) or "none"))

    def test_unacknowledged_requests_and_garbage_get_little_back(self):
        s, d = self.settings, self.st.server.dispatcher
        lifetime = pending_lifetime(s)
        rng = random.Random(7)
        garbage_big = b"\xff" + bytes(rng.getrandbits(8) for _ in range(199))
        cases = {
            "LIST": [b"LIST"],
            "DOWNLOAD": [format_download("big.bin", 0, 10 ** 12)],
            # The same request again and again (a spoofer repeating itself): still one budget.
            "DOWNLOAD x30": [format_download("big.bin", 0, 10 ** 12)] * 30,
            "garbage 200 B": [garbage_big],
            "garbage text": [b"HELLO THIS IS NOT A REQUEST AT ALL"],
            "garbage 60000 B": [b"X" * 60000],
            "garbage 3 B": [b"xyz"],
            "stranger ACK 0": [b"ACK 0 " + TOKEN],
            "stranger ACK EOF": [b"ACK EOF " + TOKEN],
        }
        socks = {}
        for label in cases:
            sock = udp_socket()
            self.addCleanup(sock.close)
            socks[label] = sock
        t0 = time.monotonic()
        sent_at = {}
        for label, datagrams in cases.items():
            socks[label].sendto(datagrams[0], self.st.address)
            sent_at[label] = 1
        # Repeat the repeated request over the pending lifetime; listen for all of it and more.
        listen = lifetime + 0.5
        got = {sock: [] for sock in socks.values()}
        step = lifetime / 30
        while time.monotonic() - t0 < listen:
            for label, datagrams in cases.items():
                i = sent_at[label]
                if i < len(datagrams) and time.monotonic() - t0 >= i * step:
                    socks[label].sendto(datagrams[i], self.st.address)
                    sent_at[label] = i + 1
            for sock, more in collect(list(socks.values()), 0.02).items():
                got[sock] += more
        # The pending entries have expired within the computed lifetime: nothing is held.
        self.assertTrue(wait_for(lambda: not d.pending, 0.5), "pending entries not expired")

        # Replies to an address that has not proved it receives (it may be spoofed) are at most
        # amplification_factor times what it sent (README, config.py; RFC 9000 8.1 uses 3), the
        # first SIZE always, and never more than 256 bytes in all.
        factor = getattr(s, "amplification_factor", 1)
        ratios = {}
        for label, datagrams in cases.items():
            bytes_in = sum(map(len, datagrams[:sent_at[label]]))
            replies = got[socks[label]]
            bytes_out = sum(map(len, replies))
            ratios[label] = (bytes_in, bytes_out, len(replies), bytes_out / bytes_in)
            with self.subTest(case=label):
                if label.startswith(("LIST", "DOWNLOAD")):
                    # SIZE only (no data before the first ACK), within the byte budget.
                    self.assertGreaterEqual(len(replies), 1)
                    for r in replies:
                        self.assertIsInstance(parse_server_message(r), Size)
                    self.assertLessEqual(bytes_out, self.BUDGET)
                    self.assertLessEqual(bytes_out, s.pending_byte_budget)
                    # by timer: the first SIZE and one retransmission, or 3x what came in;
                    # plus one SIZE per repeated request
                    self.assertLessEqual(bytes_out, max(2 * len(replies[0]), factor * bytes_in))
                    # one SIZE per request received, plus timer retransmissions
                    self.assertLessEqual(len(replies), sent_at[label] + s.pending_max_sends)
                else:
                    # At most one short error, never retransmitted, at most `factor` times the
                    # datagram it answers.
                    self.assertLessEqual(len(replies), 1)
                    self.assertLessEqual(bytes_out, MAX_ERROR)
                    self.assertLessEqual(bytes_out, factor * bytes_in)
                    self.assertLessEqual(bytes_out / bytes_in, factor)
                    for r in replies:
                        msg = parse_server_message(r)
                        self.assertIsInstance(msg, Error)
                        self.assertEqual(msg.code, "BAD_REQUEST")
        self.assertEqual(len(got[socks["garbage 200 B"]]), 1, "garbage gets one error")
        for label, (i, o, n, ratio) in ratios.items():
            report("amplification %-17s in %6d B, out %4d B in %d datagrams, ratio %.3f"
                   % (label, i, o, n, ratio))
        report("amplification: listened %.2f s; pending lifetime %.2f s (rto_initial %.3f, "
               "%d sends, budget %d B, factor %d)" % (listen, lifetime, s.rto_initial,
                                                      s.pending_max_sends,
                                                      s.pending_byte_budget, factor))


# --- 4. State exhaustion ---------------------------------------------------------------------

class Flood:
    """A thread sending requests that are never acknowledged, from ever new source ports (a pool
    of sockets replaced every few sends) on the given local IPs, at about `rate` per second."""

    def __init__(self, address, hosts, dispatcher, rate=5000, pool=40, uses=2):
        self.address, self.hosts, self.d = address, hosts, dispatcher
        self.rate, self.pool, self.uses = rate, pool, uses
        self.sent = 0
        self.sources = set()
        self.max_pending = self.max_timers = self.max_recent = self.max_lane_pending = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "flood thread did not stop"
        self.seconds = time.monotonic() - self.started

    def _sample(self):
        d = self.d
        self.max_pending = max(self.max_pending, strangers(d))
        self.max_lane_pending = max(self.max_lane_pending, d.lane_pending.size)
        self.max_timers = max(self.max_timers, len(d._timers))
        self.max_recent = max(self.max_recent, len(d.recent))

    def _run(self):
        requests = [format_download("big.bin", 0, 10 ** 9), b"LIST",
                    format_download("big.bin", 4096, 10 ** 6)]
        socks = []
        try:
            t0 = time.monotonic()
            deadline = t0 + 10.0
            while not self._stop.is_set() and time.monotonic() < deadline:
                for sock in socks:
                    sock.close()
                socks = []
                for i in range(self.pool):
                    sock = udp_socket(self.hosts[i % len(self.hosts)], blocking=False)
                    socks.append(sock)
                    self.sources.add(sock.getsockname())
                for _ in range(self.uses):
                    for i, sock in enumerate(socks):
                        try:
                            sock.sendto(requests[i % len(requests)], self.address)
                            self.sent += 1
                        except OSError:
                            pass
                self._sample()
                ahead = t0 + self.sent / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except Exception as exc:
            self.error = exc
        finally:
            for sock in socks:
                sock.close()


def _can_bind(host):
    try:
        udp_socket(host).close()
        return True
    except OSError:
        return False


class ExhaustionTest(unittest.TestCase):
    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.data = self.tmp.make_file("big.bin", 1 * MiB, seed=6)
        self.settings = support.fast_server_settings()
        self.st = support.ServerThread(self.tmp.files, self.settings).start()
        self.addCleanup(self.st.stop)

    def flood_and_download(self, hosts, label):
        s, d = self.settings, self.st.server.dispatcher
        flood = Flood(self.st.address, hosts, d).start()
        self.addCleanup(lambda: flood._thread.is_alive() and flood.stop())
        # Wait until the flood has filled the pending pool and is evicting.
        self.assertTrue(wait_for(lambda: d.stats["evicted"] > 0, 5.0),
                        "the flood never filled the pending pool")
        evicted_before, sent_before = d.stats["evicted"], flood.sent
        # Real downloads from 127.0.0.1, one after another, for a second of flood.
        times = []
        t0 = time.monotonic()
        while len(times) < 3 or time.monotonic() - t0 < 1.0:
            out = os.path.join(self.tmp.root, "dl%d" % len(times))
            os.mkdir(out)
            _, error, seconds = run_bounded(
                self, lambda: support.download(self.st.address, "big.bin", out,
                                               settings=support.fast_client_settings(give_up=8)),
                15)
            self.assertIsNone(error, "the real client was locked out: %r" % (error,))
            with open(os.path.join(out, "big.bin"), "rb") as f:
                self.assertEqual(f.read(), self.data)
            times.append(seconds)
        evicted_during = d.stats["evicted"] - evicted_before
        sent_during = flood.sent - sent_before
        flood_alive = flood._thread.is_alive()
        flood.stop()
        self.assertIsNone(flood.error)
        self.assertTrue(flood_alive and sent_during >= 1000 and evicted_during > 0,
                        "the flood was not running during the downloads: %d sent, %d evicted"
                        % (sent_during, evicted_during))
        report("flood %s: %d requests from %d source addresses on %d IPs in %.2f s (%.0f/s); "
               "%d evicted (%d sent and %d evicted during the downloads); max pending %d/%d, "
               "max timers %d, max recent %d; %d downloads of 1 MiB from 127.0.0.1 meanwhile, "
               "slowest %.2f s"
               % (label, flood.sent, len(flood.sources), len(hosts), flood.seconds,
                  flood.sent / flood.seconds, d.stats["evicted"], sent_during, evicted_during,
                  flood.max_pending, s.max_pending, flood.max_timers, flood.max_recent,
                  len(times), max(times)))
        # More addresses than the pool holds, yet the pools stayed bounded.
        self.assertGreater(len(flood.sources), 2 * s.max_pending)
        self.assertLessEqual(flood.max_pending, s.max_pending)
        self.assertLessEqual(strangers(d), s.max_pending)
        self.assertLessEqual(flood.max_lane_pending, s.max_transfers)
        self.assertLessEqual(flood.max_timers, timers_bound(s))
        self.assertLessEqual(flood.max_recent, s.recent_max)
        self.assertLessEqual(len(d.active), s.max_transfers)
        # Unacknowledged entries expire: once the flood stops, nothing of it is held.
        self.assertTrue(wait_for(lambda: not d.pending,
                                   max(s.pending_max_sends * s.rto_max, s.pending_keep) + 1.0),
                        "pending entries outlived their lifetime: %d" % len(d.pending))
        self.assertTrue(self.st.thread.is_alive())

    def test_flood_from_one_ip_and_many_ports(self):
        self.flood_and_download(["127.0.0.1"], "one IP")

    def test_flood_from_many_ips(self):
        hosts = ["127.0.0.%d" % i for i in range(1, 9)]
        if not all(_can_bind(h) for h in hosts[1:]):
            self.skipTest("cannot bind 127.0.0.2-8 on this platform")
        self.flood_and_download(hosts, "8 IPs")


# --- 5. Paths that drop big datagrams --------------------------------------------------------

class BigDatagramTest(unittest.TestCase):
    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.data = self.tmp.make_file("big.bin", 1 * MiB, seed=8)
        self.st = support.ServerThread(self.tmp.files).start()
        self.addCleanup(self.st.stop)

    def proxy(self, **kw):
        proxy = ImpairProxy(self.st.address, seed=1, **kw).start()
        self.addCleanup(proxy.close)
        return proxy

    def test_download_through_a_path_that_drops_big_datagrams(self):
        sizes = []
        proxy = self.proxy(to_client=Impairment(max_size=1472,
                                                drop_if=lambda b: sizes.append(len(b))),
                           to_server=Impairment(max_size=1472))
        _, error, seconds = run_bounded(
            self, lambda: support.download(proxy.address, "big.bin", self.tmp.downloads), 20)
        self.assertIsNone(error)
        self.assertEqual(self.tmp.downloaded("big.bin"), self.data)
        down = proxy.stats["to_client"]
        report("max_size 1472 path: 1 MiB in %.2f s; %d big datagrams dropped, %d forwarded, "
               "largest forwarded %d B" % (seconds, down.oversize, down.fwd_datagrams,
                                           max(sizes)))
        self.assertGreater(down.oversize, 0)          # the server did try big ones...
        self.assertLessEqual(max(sizes), 1472)        # ...and then shrank to what passes
        self.assertLess(seconds, 15.0)
        self.assertIsNone(proxy.last_error)

    def test_normal_path_keeps_datagrams_big(self):
        sizes = []
        proxy = self.proxy(to_client=Impairment(drop_if=lambda b: sizes.append(len(b))))
        _, error, seconds = run_bounded(
            self, lambda: support.download(proxy.address, "big.bin", self.tmp.downloads), 20)
        self.assertIsNone(error)
        self.assertEqual(self.tmp.downloaded("big.bin"), self.data)
        report("normal path: 1 MiB in %.2f s, largest datagram %d B" % (seconds, max(sizes)))
        self.assertGreater(max(sizes), 60000)
        self.assertIsNone(proxy.last_error)


# --- 6. A hostile server ---------------------------------------------------------------------

class FakeServer:
    """A misbehaving server: one UDP socket in a thread; `handler(self, data, addr)` returns the
    datagrams to send back. Records everything it received."""

    def __init__(self, handler):
        self.sock = udp_socket()
        self.sock.settimeout(0.02)
        self.address = self.sock.getsockname()[:2]
        self.handler = handler
        self.received = []
        self.errors = []
        self.state = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                continue
            self.received.append((data, addr))
            try:
                replies = self.handler(self, data, addr) or ()
            except Exception as exc:
                self.errors.append(exc)
                continue
            for reply in replies:
                try:
                    self.sock.sendto(reply, addr)
                except OSError:
                    pass

    def requests(self):
        return [(d, a) for d, a in self.received if not d.startswith(b"ACK")]

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        assert not self._thread.is_alive(), "fake server did not stop"
        self.sock.close()


def range_server(contents, announce=None, wrong_content=False, wrong_digest=False,
                 silent=False, chunk=700):
    """A handler that serves `contents` (name -> bytes; None -> the listing) by the protocol,
    with the requested flaws."""
    rng = random.Random(9)

    def handler(srv, data, addr):
        try:
            msg = parse_client_message(data)
        except ProtocolError:
            return []
        if isinstance(msg, Ack):
            st = srv.state.get(addr)
            if st is None or msg.n is None or silent:
                return []
            content, start, end = st
            n = msg.n
            if start <= n < end:
                payload = content[n:min(end, n + chunk)]
                crc = zlib.crc32(payload, running_crc(content, start, n))
                if wrong_content:   # bytes that do not match the crc they come with
                    payload = bytes(rng.getrandbits(8) for _ in range(len(payload)))
                return [format_data_header(n, crc) + payload]
            if n == end:
                crc = running_crc(content, start, end)
                if wrong_digest:
                    crc ^= 1
                return [format_eof(crc)]
            return []
        name = None if isinstance(msg, ListRequest) else msg.name
        if name not in contents:
            return [format_error("NOT_FOUND")]
        content = contents[name]
        start = 0 if name is None else msg.offset
        end = len(content) if name is None else min(len(content), start + msg.chunk_size)
        srv.state[addr] = (content, start, end)
        return [format_size(len(content) if announce is None else announce, "v1", TOKEN)]

    return handler


def running_crc(content, start, n):
    """R(n) of the range that starts at `start` (PROTOCOL.md "The running CRC")."""
    return zlib.crc32(content[start:n], crc_start(start))


class HostileServerTest(unittest.TestCase):
    GIVE_UP = 2.0

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.out = self.tmp.downloads
        self.before = tree(self.tmp.root, skip=(self.out,))

    def fake(self, handler):
        srv = FakeServer(handler)
        self.addCleanup(srv.stop)
        return srv

    def client(self, srv):
        return support.make_client(srv.address, self.out,
                                   support.fast_client_settings(give_up=self.GIVE_UP))

    def assert_nothing_outside(self):
        self.assertEqual(tree(self.tmp.root, skip=(self.out,)), self.before)

    def assert_out_small(self, limit=64 * 1024):
        sizes = tree(self.out)
        self.assertLessEqual(sum(sizes.values()), limit, sizes)

    def fetch(self, srv, name, timeout):
        c = self.client(srv)
        return run_bounded(self, lambda: c.fetch(name, PartialFile(self.out, name)),
                           timeout)

    def test_a_huge_listing_is_refused_quickly(self):
        srv = self.fake(range_server({None: b"a 1\n"}, announce=10 ** 15))
        c = self.client(srv)
        _, error, seconds = run_bounded(self, lambda: c.listing(), 5)
        self.assertIsInstance(error, Failure)
        self.assertLess(seconds, 1.0)
        self.assertEqual(srv.errors, [])
        self.assert_nothing_outside()
        self.assert_out_small(0)

    def test_b_a_file_larger_than_the_disk_is_refused_without_a_huge_file(self):
        srv = self.fake(range_server({"huge.bin": b"x" * 100}, announce=10 ** 18))
        _, error, seconds = self.fetch(srv, "huge.bin", 5)
        self.assertIsInstance(error, Failure)
        self.assertIn("free", str(error))
        self.assertLess(seconds, 1.0)
        self.assertFalse(os.path.exists(os.path.join(self.out, "huge.bin")))
        self.assert_out_small()
        self.assert_nothing_outside()

    def test_c_wrong_content_and_wrong_digest_forever_is_never_saved(self):
        content = bytes(range(256)) * 20
        srv = self.fake(range_server({"f.bin": content}, wrong_content=True, wrong_digest=True))
        _, error, seconds = self.fetch(srv, "f.bin", self.GIVE_UP + 6)
        self.assertIsInstance(error, Failure)
        self.assertLess(seconds, self.GIVE_UP + 3.0)
        self.assertFalse(os.path.exists(os.path.join(self.out, "f.bin")))
        self.assertGreaterEqual(len(srv.requests()), 2, "the client did not ask again")
        self.assert_out_small()
        self.assert_nothing_outside()
        report("hostile server, wrong content and digest: Failure after %.2f s, %d requests"
               % (seconds, len(srv.requests())))

    def change_at(self, offset, replace):
        """A server whose version is coarse ("v1" always): when it is acknowledged `offset`, it
        answers ERROR CHANGED once, and serves `replace(content)` from then on. Returns the
        download's error and the offsets it asked for."""
        contents = {"f.bin": bytes(range(256)) * 40}
        serve = range_server(contents)
        changed = []

        def handler(srv, data, addr):
            if data.startswith(b"ACK %d " % offset) and not changed:
                changed.append(addr)
                contents["f.bin"] = replace(contents["f.bin"])
                return [format_error("CHANGED")]
            return serve(srv, data, addr)

        srv = self.fake(handler)
        _, error, _ = self.fetch(srv, "f.bin", 8)
        self.assertTrue(changed)
        offsets = [parse_client_message(d).offset for d, _ in srv.requests()
                   if d.startswith(b"DOWNLOAD")]
        return error, contents["f.bin"], offsets

    def test_g_error_changed_starts_over_though_the_version_stays(self):
        """The file changes under the first part at 2100 and the server's version does not
        (it is coarser than the server's check): the client must start over, not ask again for
        the rest and keep bytes of the old version (found by a clean-room server)."""
        error, content, offsets = self.change_at(2100, lambda old: bytes(255 - b for b in old))
        self.assertIsNone(error)
        with open(os.path.join(self.out, "f.bin"), "rb") as f:
            self.assertEqual(f.read(), content)
        self.assertGreaterEqual(offsets.count(0), 2, offsets)

    def test_g_a_forged_error_changed_costs_a_restart(self):
        """ERROR CHANGED carries nothing a stranger could not know: a forged one costs a
        restart of the file (PROTOCOL.md says the client starts over), and the file is right."""
        error, content, offsets = self.change_at(2100, lambda old: old)
        self.assertIsNone(error)
        with open(os.path.join(self.out, "f.bin"), "rb") as f:
            self.assertEqual(f.read(), content)
        self.assertGreaterEqual(offsets.count(0), 2, offsets)

    def test_d_silence_after_size_stalls_retries_then_fails(self):
        srv = self.fake(range_server({"f.bin": b"y" * 5000}, silent=True))
        _, error, seconds = self.fetch(srv, "f.bin", self.GIVE_UP + 6)
        self.assertIsInstance(error, Failure)
        self.assertGreaterEqual(seconds, self.GIVE_UP - 0.1)
        self.assertLess(seconds, self.GIVE_UP + 3.0)
        requests = srv.requests()
        self.assertGreaterEqual(len(requests), 2, "the client did not retry")
        self.assertGreaterEqual(len({a for _, a in requests}), 2, "retries reuse a socket")
        self.assertFalse(os.path.exists(os.path.join(self.out, "f.bin")))
        self.assert_nothing_outside()
        report("hostile server, silent after SIZE: Failure after %.2f s, %d requests"
               % (seconds, len(requests)))

    def test_f_data_outside_the_announced_range_is_never_taken(self):
        """A listing of 100 bytes, then DATA far too long, DATA at a huge offset, DATA before
        the start: nothing is accepted, memory stays small, the client gives up in time."""
        def handler(srv, data, addr):
            if data == b"LIST":
                return [format_size(100, "v1", TOKEN)]
            if data.startswith(b"ACK ") and not data.startswith(b"ACK EOF"):
                big = b"z" * 65000
                far = b"w" * 1000
                r = crc_start(0)
                return [format_data_header(0, zlib.crc32(big, r)) + big,
                        format_data_header(10 ** 15, zlib.crc32(far, r)) + far,
                        format_data_header(10 ** 60, zlib.crc32(far, r)) + far,
                        format_eof(zlib.crc32(big, r))]
            return []

        import tracemalloc
        srv = self.fake(handler)
        # Its early EOF is acknowledged and ignored (the verified bytes stay), so the part
        # stalls and is asked again: a short idle time makes that happen before give-up.
        c = support.make_client(srv.address, self.out,
                                support.fast_client_settings(give_up=1.0, idle_timeout=0.3))
        tracemalloc.start()
        try:
            _, error, seconds = run_bounded(self, lambda: c.listing(), 6)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertIsInstance(error, Failure)
        self.assertLess(seconds, 1.0 + 3.0)
        self.assertLess(peak, 4 * MiB, "the client held %d bytes" % peak)
        self.assertGreaterEqual(len(srv.requests()), 2)
        self.assert_nothing_outside()
        report("hostile server, DATA outside the range: Failure after %.2f s, peak traced memory "
               "%d KiB" % (seconds, peak // 1024))

    def test_e_listing_with_unsafe_names_is_not_followed(self):
        evil = ["../evil", "/tmp/evil-abs", "..\\evil2", "sub/evil3", ".evil4", "e\x00vil5"]
        listing = "".join("%s 5\n" % n for n in evil + ["ok.txt"]).encode()
        contents = {None: listing, "ok.txt": b"fine\n"}
        for name in evil:
            contents[name] = b"EVIL!"
        srv = self.fake(range_server(contents))
        args = argparse.Namespace(host=srv.address[0], port=srv.address[1], out=self.out)
        app = client.App(args, support.fast_client_settings(give_up=self.GIVE_UP),
                         quiet_printer())
        entries, error, _ = run_bounded(self, lambda: app.show_listing(self.GIVE_UP), 5)
        self.assertIsNone(error)
        # Names no server may serve are dropped from the listing (never shown raw: they could
        # hold terminal escape codes), and refused if asked for all the same.
        self.assertEqual(sorted(n for n, _ in entries), ["ok.txt"])
        for name in evil:
            self.assertFalse(is_servable_name(name), name)
            ok, error, _ = run_bounded(self, lambda: app.run_names([name]), 5)
            self.assertIsNone(error)
            self.assertFalse(ok, "the client accepted %r" % name)
        # The lower layer refuses on its own too any name that would leave the folder.
        leaving = ["../evil", "/tmp/evil-abs", "sub/evil3"] + (
            ["..\\evil2"] if os.sep == "\\" else [])
        for name in leaving:
            with self.assertRaises(Failure, msg=name):
                PartialFile(self.out, name)
        # The positive control: the same server's legitimate file is fetched.
        ok, error, _ = run_bounded(self, lambda: app.run_names(["ok.txt"]), 5)
        self.assertIsNone(error)
        self.assertTrue(ok)
        with open(os.path.join(self.out, "ok.txt"), "rb") as f:
            self.assertEqual(f.read(), b"fine\n")
        asked = [d for d, _ in srv.requests() if d.startswith(b"DOWNLOAD")]
        self.assertTrue(asked)
        self.assertFalse([d for d in asked if b"evil" in d], "the client asked for: %r" % asked)
        self.assert_nothing_outside()
        self.assertFalse(os.path.exists("/tmp/evil-abs"))
        self.assertEqual(sorted(os.listdir(self.out)), ["ok.txt"])


# --- 7. Windows: recvfrom raises ConnectionResetError ----------------------------------------

class ResettingSocket:
    """Delegates to a real socket; recvfrom_into raises ConnectionResetError (what Windows does
    after an ICMP port unreachable) on the first calls and then on every fourth, 40 in all."""

    def __init__(self, sock, first=5, every=4, limit=40):
        self._sock = sock
        self.first, self.every, self.limit = first, every, limit
        self.calls = self.raised = 0

    def recvfrom_into(self, *args, **kw):
        self.calls += 1
        if self.raised < self.limit and (self.calls <= self.first
                                         or self.calls % self.every == 0):
            self.raised += 1
            raise ConnectionResetError(10054, "simulated WSAECONNRESET")
        return self._sock.recvfrom_into(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class ConnectionResetTest(unittest.TestCase):
    def test_server_carries_on_after_connection_reset_errors(self):
        tmp = support.TempDirs()
        self.addCleanup(tmp.cleanup)
        data = tmp.make_file("r.bin", 300000, seed=10)
        st = support.ServerThread(tmp.files)
        wrapper = ResettingSocket(st.server.sock)
        st.server.sock = wrapper
        st.start()
        self.addCleanup(st.stop)
        _, error, seconds = run_bounded(
            self, lambda: support.download(st.address, "r.bin", tmp.downloads), 15)
        self.assertIsNone(error)
        self.assertEqual(tmp.downloaded("r.bin"), data)
        self.assertGreaterEqual(wrapper.raised, wrapper.first)
        self.assertTrue(st.thread.is_alive())
        entries = support.make_client(st.address, tmp.downloads).listing(give_up=5)
        self.assertEqual(dict(entries), {"r.bin": len(data)})
        report("ConnectionResetError: raised %d times in %d receives; download in %.2f s"
               % (wrapper.raised, wrapper.calls, seconds))


if __name__ == "__main__":
    unittest.main()
