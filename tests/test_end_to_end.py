"""End-to-end tests: the real server and the real client over real UDP sockets on loopback.

Every server binds port 0 in a temporary folder (support.TempDirs), every wait is bounded, and
every server, proxy, socket and subprocess is stopped in a cleanup. Hostile networks come from the
seeded impairment proxy (tests/impair.py); hostile strangers are plain sockets sending garbage.
"""

import contextlib
import hashlib
import io
import os
import queue
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import unittest
import zlib

import client
from tests import support
from tests.impair import ImpairProxy, Impairment
from tests.support import wait_for
from udpxfer.fetch import Client
from udpxfer.ranges import RangeSet
from udpxfer.wire import (MAX_DATAGRAM, MAX_ERROR, RECV_BUFSIZE, Data, Eof, Error, Size, crc_start,
                          format_ack, format_ack_eof, format_download, format_listing,
                          parse_server_message)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024

# The server's DATA payload on loopback: the largest datagram minus the DATA header, whose length
# depends on the number of digits of the offset. The first chunk (offset 0) carries BLOCK bytes,
# the second one (offset BLOCK, five digits) four bytes fewer.
BLOCK = MAX_DATAGRAM - len(b"DATA 0 00000000\n")                  # 65491
BLOCK2 = MAX_DATAGRAM - len(b"DATA %d 00000000\n" % BLOCK)        # 65487


def payload(size, seed):
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little") if size else b""


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def visible(folder):
    """Names in a folder that are not temporary (temporary names start with ".")."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


class RawClient:
    """A client made of protocol's format and parse functions and one plain socket: exactly
    the datagrams of PROTOCOL.md, nothing of client.py. Loopback only (no loss handling beyond
    re-asking for SIZE), every receive bounded."""

    def __init__(self, address, timeout=2.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.datagrams = []        # every datagram received, raw

    def close(self):
        self.sock.close()

    def recv(self):
        data = self.sock.recv(RECV_BUFSIZE)
        self.datagrams.append(data)
        return parse_server_message(data)

    def request(self, request):
        """Send a request; return the first SIZE or ERROR (asking again up to 3 times)."""
        for _ in range(3):
            self.sock.send(request)
            try:
                msg = self.recv()
            except socket.timeout:
                continue
            if isinstance(msg, (Size, Error)):
                return msg
        raise AssertionError("no SIZE nor ERROR for %r" % request[:60])

    def transfer(self, request, start, deadline=20.0):
        """One whole transfer: -> (Size, [(offset, payload bytes)], Eof). Raises on ERROR.
        Checks every DATA's running CRC, and that EOF carries the CRC of the whole range."""
        size = self.request(request)
        if isinstance(size, Error):
            raise AssertionError("ERROR %s %s" % (size.code, size.text))
        pos, chunks, r = start, [], crc_start(start)
        self.sock.send(format_ack(pos, size.token))
        end_by = time.monotonic() + deadline
        while time.monotonic() < end_by:
            msg = self.recv()
            if isinstance(msg, Data):
                if msg.offset == pos:
                    if zlib.crc32(msg.payload, r) != msg.crc:
                        raise AssertionError("bad running CRC at %d" % pos)
                    r = msg.crc
                    chunks.append((msg.offset, bytes(msg.payload)))
                    pos += len(msg.payload)
                self.sock.send(format_ack(pos, size.token))
            elif isinstance(msg, Size):
                self.sock.send(format_ack(pos, size.token))
            elif isinstance(msg, Eof):
                self.sock.send(format_ack_eof(size.token))
                if msg.crc != r:
                    raise AssertionError("EOF crc %08x, expected %08x" % (msg.crc, r))
                return size, chunks, msg
            elif isinstance(msg, Error):
                raise AssertionError("ERROR %s during transfer" % msg.code)
        raise AssertionError("transfer did not end in %s s" % deadline)


class DownloadsWatcher:
    """Looks into downloads/ every few milliseconds while downloads run: any name that does not
    start with "." must be an expected one and hold exactly the expected bytes, at every moment."""

    def __init__(self, folder, expected):
        self.folder, self.expected = folder, expected
        self.violations = []
        self.checks = 0
        self._seen = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.check()   # one last look

    def _run(self):
        while not self._stop.wait(0.003):
            self.check()

    def check(self):
        self.checks += 1
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            self.violations.append("cannot list downloads: %s" % exc)
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.name not in self.expected:
                self.violations.append("unexpected file %r" % e.name)
                continue
            try:
                st = e.stat()
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._seen.get(e.name) == stamp:
                    continue
                data = read_bytes(e.path)
            except OSError:
                continue   # replaced or removed meanwhile: looked at again next time
            self._seen[e.name] = stamp
            if data != self.expected[e.name]:
                self.violations.append("%r under its real name with wrong content (%d bytes)"
                                       % (e.name, len(data)))


class RewritingProxy:
    """A plain UDP proxy whose hooks see every datagram, `rewrite(data)` those to the server and
    `rewrite_reply(data)` those to the client, and return what to forward instead (or None to
    drop it): a bit flip chosen by the test, not by chance. One upstream socket per client
    address, like ImpairProxy; one thread; stopped by close()."""

    def __init__(self, upstream, rewrite, rewrite_reply=None, answer=None):
        self.upstream, self.rewrite = upstream, rewrite
        self.rewrite_reply = rewrite_reply or (lambda data: data)
        # answer(data): what the proxy itself says back to the client instead of forwarding it
        # (None: forward it, rewritten; b"": neither)
        self.answer = answer or (lambda data: None)
        self.listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listen.bind(("127.0.0.1", 0))
        self.listen.setblocking(False)
        self.address = self.listen.getsockname()[:2]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listen, selectors.EVENT_READ, None)
        self.upstreams = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.05):
                try:
                    data, addr = key.fileobj.recvfrom(RECV_BUFSIZE)
                except OSError:
                    continue
                try:
                    if key.data is None:   # from a client
                        reply = self.answer(data)
                        if reply is not None:
                            if reply:
                                self.listen.sendto(reply, addr)
                            continue
                        up = self.upstreams.get(addr)
                        if up is None:
                            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            up.bind(("127.0.0.1", 0))
                            up.setblocking(False)
                            self.upstreams[addr] = up
                            self.sel.register(up, selectors.EVENT_READ, addr)
                        data = self.rewrite(data)
                        if data is not None:
                            up.sendto(data, self.upstream)
                    else:                  # from the server, back to its client
                        data = self.rewrite_reply(data)
                        if data is not None:
                            self.listen.sendto(data, key.data)
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for s in self.upstreams.values():
            s.close()
        self.listen.close()
        self.sel.close()


class EndToEndCase(unittest.TestCase):
    """Temporary folders, and helpers that start things which cleanups stop."""

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)

    def start_server(self, settings=None, list_path=None):
        st = support.ServerThread(self.tmp.files, settings or support.fast_server_settings(),
                                  list_path=list_path).start()
        self.addCleanup(st.stop)
        return st

    def start_proxy(self, upstream, **kw):
        proxy = ImpairProxy(upstream, **kw).start()
        self.addCleanup(proxy.close)
        return proxy

    def assert_downloaded(self, out_dir, name, data):
        self.assertEqual(hashlib.sha256(read_bytes(os.path.join(out_dir, name))).hexdigest(),
                         hashlib.sha256(data).hexdigest(), "%s differs" % name)

    def run_main(self, argv, limit=30.0):
        """client.main(argv) with stdout captured -> (exit code, output, seconds)."""
        out = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(out):
            code = client.main(argv)
        seconds = time.monotonic() - started
        self.assertLess(seconds, limit, "client.main took too long")
        return code, out.getvalue(), seconds


# --- 1. A hostile network ------------------------------------------------------------------------

class ImpairedNetworkTest(EndToEndCase):
    SEED = 20240601

    def test_downloads_through_lossy_duplicating_reordering_corrupting_network(self):
        # Names one bit apart ("0" 0x30, "1" 0x31, "2" 0x32, "3" 0x33): a bit flip in a request
        # can name another file that exists, which must never end up under the asked name.
        files = {"f0.bin": 500000, "f1.bin": 2 * BLOCK + 3, "f2.bin": 1, "f3.bin": 0,
                 "f7 x.bin": 800001}
        expected = {name: self.tmp.make_file(name, size, seed=i)
                    for i, (name, size) in enumerate(sorted(files.items()))}
        st = self.start_server()
        lossy = dict(drop=0.10, duplicate=0.05, jitter=0.002, reorder=0.05, corrupt=0.04)
        proxy = self.start_proxy(st.address, seed=self.SEED,
                                 to_server=Impairment(**lossy), to_client=Impairment(**lossy))
        settings = support.fast_client_settings(first_range=32 * 1024, give_up=20.0)

        for parts in (1, 4):
            with self.subTest(parts=parts):
                out = self.tmp.folder("downloads-%d" % parts)
                watcher = DownloadsWatcher(out, expected).start()
                self.addCleanup(watcher.stop)
                done = []
                for name in sorted(expected):
                    support.download(proxy.address, name, out, parts=parts, settings=settings)
                    done.append(name)
                    self.assertEqual(visible(out), sorted(done))
                    for n in done:
                        self.assert_downloaded(out, n, expected[n])
                watcher.stop()
                self.assertEqual(watcher.violations, [])
                self.assertGreater(watcher.checks, 2)
                self.assertEqual(sorted(os.listdir(out)), sorted(expected),
                                 "temporary files left behind")

        # The network really was hostile, both ways.
        for direction in ("to_server", "to_client"):
            s = proxy.stats[direction]
            self.assertGreater(s.dropped, 0, direction)
            self.assertGreater(s.duplicated, 0, direction)
            self.assertGreater(s.corrupted, 0, direction)
        self.assertTrue(st.thread.is_alive())

    def test_requests_turned_into_another_name_never_save_that_file(self):
        """Requests carry no checksum: a bit flip can turn "DOWNLOAD f0.bin ..." into
        "DOWNLOAD f1.bin ...". Here the 2nd and 3rd requests are so changed, and f1.bin has
        the same size as f0.bin (only the version token tells them apart). f1's bytes must never
        be saved as f0.bin: each saved file needs two requests that got the same SIZE."""
        f0 = self.tmp.make_file("f0.bin", 100000, seed=0)
        self.tmp.make_file("f1.bin", 100000, seed=1)
        st = self.start_server()
        seen = []

        def rewrite(data):
            tag, msg = support.split_tag(data)
            if msg.startswith(b"DOWNLOAD f0.bin "):
                seen.append(msg)
                if len(seen) in (2, 3):
                    return tag + b"DOWNLOAD f1.bin " + msg[len(b"DOWNLOAD f0.bin "):]
            return data

        proxy = RewritingProxy(st.address, rewrite)
        self.addCleanup(proxy.close)
        watcher = DownloadsWatcher(self.tmp.downloads, {"f0.bin": f0}).start()
        self.addCleanup(watcher.stop)
        support.download(proxy.address, "f0.bin", self.tmp.downloads,
                         settings=support.fast_client_settings(give_up=5.0))
        watcher.stop()
        self.assertGreaterEqual(len(seen), 3)
        self.assertEqual(watcher.violations, [])
        self.assert_downloaded(self.tmp.downloads, "f0.bin", f0)

    def test_two_corrupted_names_during_one_download_are_not_not_found(self):
        """A bit flip turns the 1st and the 3rd request for f0.bin into g0.bin ("f" 0x66, "g"
        0x67), which the server does not have; the 2nd request got f0.bin's SIZE and all its
        bytes in between. Two NOT_FOUND that are not in a row, for a name the server has just
        served, must not make the client report "not on the server"."""
        f0 = self.tmp.make_file("f0.bin", 200000, seed=0)
        st = self.start_server()
        seen = []

        def rewrite(data):
            tag, msg = support.split_tag(data)
            if msg.startswith(b"DOWNLOAD f0.bin "):
                seen.append(msg)
                if len(seen) in (1, 3):
                    return tag + b"DOWNLOAD g0.bin " + msg[len(b"DOWNLOAD f0.bin "):]
            return data

        proxy = RewritingProxy(st.address, rewrite)
        self.addCleanup(proxy.close)
        support.download(proxy.address, "f0.bin", self.tmp.downloads,
                         settings=support.fast_client_settings(give_up=5.0))
        self.assertGreaterEqual(len(seen), 3)
        self.assert_downloaded(self.tmp.downloads, "f0.bin", f0)

    def test_a_bit_flip_in_an_error_code_does_not_end_the_download(self):
        """The first request is damaged ("DOWNLOAE", one bit) so the server answers
        ERROR BAD_REQUEST, and that answer is damaged too: "BAD_REQQEST" ("U" 0x55, "Q" 0x51).
        ERROR carries no checksum and PROTOCOL.md lists the only five codes, so an unknown code
        is line noise, not a reason to give the file up."""
        f0 = self.tmp.make_file("f0.bin", 200000, seed=0)
        st = self.start_server()
        seen, replies = [], []

        def rewrite(data):
            tag, msg = support.split_tag(data)
            if msg.startswith(b"DOWNLOAD f0.bin "):
                seen.append(msg)
                if len(seen) == 1:
                    return tag + b"DOWNLOAE" + msg[len(b"DOWNLOAD"):]
            return data

        def rewrite_reply(data):
            tag, msg = support.split_tag(data)
            if msg.startswith(b"ERROR BAD_REQUEST"):
                replies.append(msg)
                return tag + msg.replace(b"BAD_REQUEST", b"BAD_REQQEST")
            return data

        proxy = RewritingProxy(st.address, rewrite, rewrite_reply)
        self.addCleanup(proxy.close)
        support.download(proxy.address, "f0.bin", self.tmp.downloads,
                         settings=support.fast_client_settings(give_up=5.0))
        self.assertTrue(replies, "the damaged request got no ERROR BAD_REQUEST")
        self.assert_downloaded(self.tmp.downloads, "f0.bin", f0)

    def test_a_lost_size_or_ack_of_size_costs_a_retransmission_not_a_stall(self):
        """PROTOCOL.md: the client retransmits its request while no SIZE comes back, the server
        answers a repeated request still waiting for its ACK with SIZE again, and the server
        retransmits SIZE when its ACK does not come. So one lost SIZE, or one lost ACK of SIZE,
        costs a retransmission (tens of ms here), not the client's idle timeout (2 s here) and a
        new socket. The short requests matter most: LIST (4 bytes) and the empty range that
        confirms a finished file ("DOWNLOAD a.bin 0 0")."""
        data = self.tmp.make_file("a.bin", 100000, seed=5)
        st = self.start_server()
        settings = support.fast_client_settings(idle_timeout=2.0, give_up=8.0)
        cases = [
            # (what, direction, the datagram to lose, which occurrence of it)
            ("LIST, SIZE lost", "to_client", b"SIZE ", 1),
            ("LIST, ACK of SIZE lost", "to_server", b"ACK 0 ", 1),
            ("DOWNLOAD, SIZE lost", "to_client", b"SIZE ", 1),
            ("DOWNLOAD, ACK of SIZE lost", "to_server", b"ACK 0 ", 1),
            # The confirming empty range is asked for once the first SIZE is in: its SIZE is the
            # second, and its ACK of SIZE the second "ACK 0".
            ("confirmation, SIZE lost", "to_client", b"SIZE ", 2),
            ("confirmation, ACK of SIZE lost", "to_server", b"ACK 0 ", 2),
        ]
        for what, direction, prefix, nth in cases:
            with self.subTest(what):
                seen, lost = [], []

                def lose_one(datagram, prefix=prefix, nth=nth, seen=seen, lost=lost):
                    if support.split_tag(datagram)[1].startswith(prefix):
                        seen.append(datagram)
                        if len(seen) == nth:
                            lost.append(datagram)
                            return True
                    return False

                impairment = {direction: Impairment(drop_if=lose_one)}
                proxy = self.start_proxy(st.address, **impairment)
                out = self.tmp.folder("out-%d" % len(os.listdir(self.tmp.root)))
                started = time.monotonic()
                if what.startswith("LIST"):
                    entries = support.make_client(proxy.address, out, settings).listing()
                    self.assertEqual(entries, [("a.bin", len(data))])
                else:
                    support.download(proxy.address, "a.bin", out, settings=settings)
                    self.assert_downloaded(out, "a.bin", data)
                seconds = time.monotonic() - started
                self.assertEqual(len(lost), 1, "nothing was lost")
                self.assertLess(seconds, 1.0, "the transfer waited for the client's idle "
                                              "timeout instead of a retransmission")

    def test_file_changed_during_a_four_part_download(self):
        """The file is rewritten in place (same size) while four parts run: every part gets
        ERROR CHANGED at about the same time; the client starts over and saves only the new
        content, never a mix."""
        size = 6 * MiB
        self.tmp.make_file("x.bin", size, seed=1)
        new = payload(size, 2)
        path = os.path.join(self.tmp.files, "x.bin")
        st = self.start_server()
        acks = []

        def change_at_40th_ack(data):   # runs in the proxy thread, before forwarding the ACK
            msg = support.split_tag(data)[1]
            if msg.startswith(b"ACK ") and not msg.startswith(b"ACK EOF"):
                acks.append(data)
                if len(acks) == 40:
                    with open(path, "r+b") as f:
                        f.write(new)
                    st_ = os.stat(path)
                    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10 ** 9))
            return False

        proxy = self.start_proxy(st.address, to_server=Impairment(drop_if=change_at_40th_ack))
        watcher = DownloadsWatcher(self.tmp.downloads, {"x.bin": new}).start()
        self.addCleanup(watcher.stop)
        c = support.download(proxy.address, "x.bin", self.tmp.downloads, parts=4,
                             settings=support.fast_client_settings(first_range=512 * 1024))
        watcher.stop()
        self.assertGreaterEqual(len(acks), 40)
        self.assertGreaterEqual(c.stats["restarts"], 1)
        self.assertEqual(watcher.violations, [])
        self.assert_downloaded(self.tmp.downloads, "x.bin", new)
        self.assertEqual(os.listdir(self.tmp.downloads), ["x.bin"])


# --- 2. Sizes around the datagram payload --------------------------------------------------------

class SizesTest(EndToEndCase):

    SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, BLOCK + BLOCK2 - 1, BLOCK + BLOCK2,
             BLOCK + BLOCK2 + 1, 5 * MiB + 7]

    def test_sizes_around_one_and_two_datagrams_and_several_mib(self):
        expected = {"s%d.bin" % size: self.tmp.make_file("s%d.bin" % size, size, seed=size)
                    for size in self.SIZES}
        st = self.start_server()
        for parts in (1, 4):
            out = self.tmp.folder("downloads-%d" % parts)
            settings = support.fast_client_settings(first_range=1 * MiB)
            for name, data in sorted(expected.items()):
                with self.subTest(parts=parts, size=len(data)):
                    support.download(st.address, name, out, parts=parts, settings=settings)
                    self.assert_downloaded(out, name, data)
            self.assertEqual(sorted(os.listdir(out)), sorted(expected))

    @unittest.skipIf(sys.platform == "darwin",
                     "macOS refuses UDP datagrams over 9216 bytes by default, so the server "
                     "shrinks its payload there")
    def test_payload_per_datagram_on_loopback(self):
        """The sizes above straddle the real boundaries: check that BLOCK and BLOCK2 are what the
        server puts in its first two DATA datagrams, and that DATA never exceeds 65507 bytes."""
        for size in (BLOCK - 1, BLOCK, BLOCK + 1, BLOCK + BLOCK2, BLOCK + BLOCK2 + 1):
            self.tmp.make_file("b%d" % size, size, seed=size)
        st = self.start_server()
        cases = {BLOCK - 1: [BLOCK - 1], BLOCK: [BLOCK], BLOCK + 1: [BLOCK, 1],
                 BLOCK + BLOCK2: [BLOCK, BLOCK2], BLOCK + BLOCK2 + 1: [BLOCK, BLOCK2, 1]}
        for size, lengths in cases.items():
            with self.subTest(size=size):
                raw = RawClient(st.address)
                self.addCleanup(raw.close)
                sz, chunks, eof = raw.transfer(format_download("b%d" % size, 0, 10 ** 12),
                                               0)
                self.assertEqual(sz.size, size)
                self.assertEqual([len(p) for _, p in chunks], lengths)
                data = b"".join(p for _, p in chunks)
                self.assertEqual(data, payload(size, size))
                self.assertEqual(eof.crc, zlib.crc32(data, crc_start(0)))
                self.assertLessEqual(max(len(d) for d in raw.datagrams), MAX_DATAGRAM)
                if size >= BLOCK:
                    self.assertIn(MAX_DATAGRAM, [len(d) for d in raw.datagrams])


# --- 3. Offsets past 4 GiB -----------------------------------------------------------------------

class SparseTarget:
    """A download target for client.Client.fetch that keeps only the bytes written (no 5 GiB in
    memory) and starts as a resume: everything below `have` is already here."""

    def __init__(self, size, version, have):
        self.size, self.version = size, version
        self.done = RangeSet([(0, have)])
        self.resumed = have
        self.chunks = {}
        self.finished = False

    def write(self, offset, data):
        self.chunks[offset] = bytes(data)

    def bytes_from(self, start):
        pos, out = start, bytearray()
        for offset in sorted(self.chunks):
            if offset + len(self.chunks[offset]) <= start:
                continue
            if offset != pos:
                raise AssertionError("gap or overlap at %d (expected %d)" % (offset, pos))
            out += self.chunks[offset]
            pos += len(self.chunks[offset])
        return bytes(out)

    def keep(self, start, end, crc):
        self.done.add(start, end)

    def reset(self, size=None, version=None):
        raise AssertionError("the file did not change: no restart expected")

    def save(self, extra=(), wait=True):
        pass

    def close(self):
        pass

    def finish(self):
        self.finished = True


class PastFourGiBTest(EndToEndCase):
    OFFSET = 5 * 2 ** 30            # 5368709120, past 2**32
    TAIL = b"tail past the 4 GiB mark \xe2\x9c\x93\n" * 3

    def setUp(self):
        super().setUp()
        if sys.platform == "win32":
            self.skipTest("NTFS files are not sparse unless marked so; writing 5 GiB of zeros "
                          "is too slow for a unit test")
        path = os.path.join(self.tmp.files, "big")
        try:
            with open(path, "wb") as f:
                f.seek(self.OFFSET)
                f.write(self.TAIL)
            st = os.stat(path)
        except (OSError, OverflowError) as exc:
            self.skipTest("the filesystem refuses a sparse file over 4 GiB: %s" % exc)
        if st.st_size != self.OFFSET + len(self.TAIL):
            self.skipTest("the filesystem did not make a %d-byte file" % (self.OFFSET +
                                                                           len(self.TAIL)))
        if hasattr(st, "st_blocks") and st.st_blocks * 512 > 64 * MiB:
            self.skipTest("the filesystem does not store sparse files sparsely")
        self.size = st.st_size
        self.st = self.start_server()

    def raw(self):
        raw = RawClient(self.st.address)
        self.addCleanup(raw.close)
        return raw

    def test_range_at_5_gib_raw(self):
        raw = self.raw()
        size, chunks, eof = raw.transfer(b"DOWNLOAD big 5368709120 1000", self.OFFSET)
        self.assertEqual(size.size, self.size)
        self.assertEqual([o for o, _ in chunks], [self.OFFSET])
        self.assertEqual(b"".join(p for _, p in chunks), self.TAIL)
        self.assertEqual(eof.crc, zlib.crc32(self.TAIL, crc_start(self.OFFSET)))
        # The header really carries the 10-digit offset, and the crc covers it.
        self.assertTrue(raw.datagrams[1].startswith(b"DATA 5368709120 "), raw.datagrams[1][:40])

    def test_range_across_holes_past_4_gib_raw(self):
        start, length = self.OFFSET - 150000, 150000 + 10   # zeros, then the tail's start
        raw = self.raw()
        size, chunks, eof = raw.transfer(format_download("big", start, length), start)
        data = b"".join(p for _, p in chunks)
        want = bytes(150000) + self.TAIL[:10]
        self.assertEqual(data, want)
        self.assertEqual(eof.crc, zlib.crc32(want, crc_start(start)))
        self.assertGreater(len(chunks), 1)
        self.assertTrue(all(o > 2 ** 32 for o, _ in chunks))

    def test_empty_range_at_end_and_range_past_end(self):
        raw = self.raw()
        _, chunks, eof = raw.transfer(format_download("big", self.size, 5), self.size)
        self.assertEqual((chunks, eof.crc), ([], crc_start(self.size)))
        err = self.raw().request(format_download("big", self.size + 1, 5))
        self.assertIsInstance(err, Error)
        self.assertEqual(err.code, "BAD_REQUEST")

    def test_client_resumes_past_4_gib(self):
        """client.Client.fetch, told that all but the last bytes are here, fetches only them."""
        sz = self.raw().request(format_download("big", self.size, 0))
        self.assertIsInstance(sz, Size)
        have = self.OFFSET + 7
        target = SparseTarget(sz.size, sz.version, have)
        c = support.make_client(self.st.address, self.tmp.downloads)
        c.fetch("big", target, parts=1)
        self.assertTrue(target.finished)
        self.assertEqual(target.bytes_from(have), self.TAIL[7:])
        self.assertEqual(min(target.chunks), have)


class SparseishFileTest(EndToEndCase):

    def test_parts_4_of_a_file_with_holes(self):
        path = os.path.join(self.tmp.files, "holes.img")
        with open(path, "wb") as f:
            f.write(b"head" * 1000)
            f.seek(3 * MiB)
            f.write(b"middle" * 1000)
            f.seek(6 * MiB + 11)
            f.write(b"end")
        want = read_bytes(path)
        st = self.start_server()
        settings = support.fast_client_settings(first_range=512 * 1024)
        support.download(st.address, "holes.img", self.tmp.downloads, parts=4, settings=settings)
        self.assert_downloaded(self.tmp.downloads, "holes.img", want)
        self.assertEqual(os.listdir(self.tmp.downloads), ["holes.img"])


# --- 4. Names ------------------------------------------------------------------------------------

class NamesTest(EndToEndCase):
    NAMES = ["my notes.txt", "café.txt", "東京.bin", "report 2024 12", "two  spaces .txt",
             "Ünïcödé ñ 😀.dat"]

    def test_names_with_spaces_and_non_ascii_letters(self):
        expected = {n: self.tmp.make_file(n, 1000 + i * 777, seed=i)
                    for i, n in enumerate(self.NAMES)}
        st = self.start_server()
        listing = support.make_client(st.address, self.tmp.downloads).listing()
        self.assertEqual(listing, sorted((n, len(d)) for n, d in expected.items()))
        for i, (name, data) in enumerate(sorted(expected.items())):
            with self.subTest(name=name):
                support.download(st.address, name, self.tmp.downloads, parts=1 + i % 2)
                self.assert_downloaded(self.tmp.downloads, name, data)
        self.assertEqual(sorted(os.listdir(self.tmp.downloads)), sorted(expected))


# --- 5. A listing of many datagrams --------------------------------------------------------------

class LargeListingTest(EndToEndCase):

    def test_list_of_5000_files(self):
        sizes = {}
        for i in range(5000):
            name = "f%04d.txt" % i
            size = (i * 7919) % 1000
            with open(os.path.join(self.tmp.files, name), "wb") as f:
                f.write(b"x" * size)
            sizes[name] = size
        want = sorted(sizes.items())
        list_path = os.path.join(self.tmp.root, "file_list.txt")
        # Every LIST rescans the folder (as one does a second after the last scan by default).
        st = self.start_server(support.fast_server_settings(list_rescan_interval=0.0),
                               list_path=list_path)
        proxy = self.start_proxy(st.address, seed=5000,
                                 to_server=Impairment(drop=0.1, duplicate=0.05, corrupt=0.03),
                                 to_client=Impairment(drop=0.1, duplicate=0.05, corrupt=0.03))
        settings = support.fast_client_settings(give_up=6.0)
        # A download first, as a person would: the server now knows this host's round-trip
        # time (fast on loopback), so its timers for the next transfer are short.
        support.download(st.address, "f0001.txt", self.tmp.downloads, settings=settings)
        self.assertEqual(self.tmp.downloaded("f0001.txt"), b"x" * sizes["f0001.txt"])

        entries = Client(st.address[0], st.address[1], settings,
                         client.Printer(quiet=True, stream=io.StringIO()),
                         self.tmp.downloads).listing()
        self.assertEqual(len(entries), 5000)
        self.assertEqual(entries, want)
        text = format_listing(entries)
        self.assertGreater(len(text), MAX_DATAGRAM, "the listing must need several DATA")
        self.assertEqual(read_bytes(list_path), text)

        # And through a lossy, duplicating, corrupting network.
        entries = support.make_client(proxy.address, self.tmp.downloads, settings).listing()
        self.assertEqual(entries, want)
        self.assertEqual(read_bytes(list_path), text)


# --- 6. Many clients at once ---------------------------------------------------------------------

class ConcurrentClientsTest(EndToEndCase):

    def test_20_clients_at_once(self):
        files = {"c%d.bin" % i: self.tmp.make_file("c%d.bin" % i, MiB + i * 1001, seed=100 + i)
                 for i in range(5)}
        st = self.start_server()
        names = sorted(files)
        jobs = []
        for i in range(20):
            out = self.tmp.folder("client-%02d" % i)
            jobs.append((names[i % len(names)], out, 1 + i % 3))
        errors, barrier = [], threading.Barrier(len(jobs), timeout=10)

        def run(name, out, parts):
            try:
                barrier.wait()
                support.download(st.address, name, out, parts=parts,
                                 settings=support.fast_client_settings(first_range=256 * 1024))
            except BaseException as exc:   # reported by the main thread
                errors.append((name, out, repr(exc)))

        threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        end_by = time.monotonic() + 40
        for t in threads:
            t.join(max(0.0, end_by - time.monotonic()))
        self.assertFalse([t for t in threads if t.is_alive()], "downloads still running")
        self.assertEqual(errors, [])
        for name, out, _ in jobs:
            self.assert_downloaded(out, name, files[name])
            self.assertEqual(os.listdir(out), [name])


# --- 7. Garbage from strangers during a transfer -------------------------------------------------

def garbage_datagrams():
    rnd = random.Random(7)
    nines = b"9" * 60000
    items = [
        b"", b"x", b"\n", b"\r\n", b"\x00", b"\xff\xfe\xfd", b"LIST extra", b"list", b"LIST\n\n",
        b"HELLO", b"DOWNLOAD", b"DOWNLOAD ", b"DOWNLOAD g.bin", b"DOWNLOAD g.bin 0",
        b"DOWNLOAD g.bin -1 10", b"DOWNLOAD g.bin 00 10", b"DOWNLOAD g.bin 1e3 10",
        b"DOWNLOAD g.bin +5 10", b"DOWNLOAD g.bin 0x10 10",
        b"DOWNLOAD g.bin " + b"9" * 100 + b" 1", b"DOWNLOAD g.bin 1 " + nines,
        b"DOWNLOAD g.bin 18446744073709551616 1", b"DOWNLOAD g.bin 4294967296 1",
        b"DOWNLOAD ../../etc/passwd 0 10", b"DOWNLOAD /etc/passwd 0 10",
        b"DOWNLOAD .hidden 0 1", b"DOWNLOAD g.bin\x00 0 1", b"DOWNLOAD \xff\xfe 0 1",
        b"DOWNLOAD nosuchfile 0 10",
        # No ACK here acknowledges the one valid request above (its SIZE wants "ACK 1" and a
        # token nobody here has seen), so no stranger ever starts a real transfer.
        b"ACK", b"ACK ", b"ACK EOF", b"ACK -5", b"ACK 3", b"ACK %d" % BLOCK, b"ACK " + nines,
        b"ACK 18446744073709551616", b"ACK EOF EOF", b"ACK 1 0000000000000000",
        b"ACK 1 " + b"f" * 16, b"ACK EOF " + b"0" * 16, b"ACK 1 " + b"0" * 15,
        b"DATA 0 00000000\nxyz", b"SIZE 1 v " + b"0" * 16, b"EOF 00000000", b"ERROR BUSY",
        b"\x00" * MAX_DATAGRAM,
    ]
    for n in (1, 2, 7, 64, 1500, 9000, MAX_DATAGRAM):
        items.append(bytes(rnd.getrandbits(8) for _ in range(min(n, 2000)))
                     + bytes(max(0, n - 2000)))
    return items


class GarbageTest(EndToEndCase):

    def test_garbage_from_strangers_does_not_disturb_a_transfer(self):
        data = self.tmp.make_file("g.bin", 4 * MiB + 5, seed=3)
        other = self.tmp.make_file("after.bin", 300000, seed=4)
        st = self.start_server()
        # A little delay makes the transfer last long enough for many rounds of garbage.
        proxy = self.start_proxy(st.address, seed=1, to_server=Impairment(delay=0.002),
                                 to_client=Impairment(delay=0.002))
        items = garbage_datagrams()
        socks = []
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(s.close)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)   # macOS: big sends
            except OSError:
                pass
            socks.append(s)
        replies, rounds, stop = [], [0], threading.Event()

        def drain():
            for s in socks:
                while True:
                    try:
                        replies.append(s.recv(RECV_BUFSIZE))
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break

        def spray():
            while not stop.is_set():
                for i, item in enumerate(items):
                    try:
                        socks[i % len(socks)].sendto(item, st.address)
                    except OSError:
                        pass   # e.g. a buffer full or a size the OS refuses
                drain()
                rounds[0] += 1
                stop.wait(0.003)

        sprayer = threading.Thread(target=spray, daemon=True)
        self.addCleanup(lambda: (stop.set(), sprayer.join(5)))
        sprayer.start()
        self.assertTrue(wait_for(lambda: rounds[0] >= 2, 5))
        before = rounds[0]
        support.download(proxy.address, "g.bin", self.tmp.downloads, parts=1)
        during = rounds[0] - before
        self.assertEqual(self.tmp.downloaded("g.bin"), data)

        # The server is still up and serves a fresh request, while the garbage goes on.
        support.download(st.address, "after.bin", self.tmp.downloads, parts=2)
        self.assertEqual(self.tmp.downloaded("after.bin"), other)
        stop.set()
        sprayer.join(5)
        self.assertFalse(sprayer.is_alive())
        drain()
        self.assertGreaterEqual(during, 3, "garbage must overlap the transfer")
        self.assertTrue(st.thread.is_alive(), "server thread died")
        listing = support.make_client(st.address, self.tmp.downloads).listing()
        self.assertEqual(listing, [("after.bin", len(other)), ("g.bin", len(data))])
        self.assertGreater(st.server.dispatcher.stats["malformed"], 0)
        # Strangers got a SIZE (for the one valid request) or a small ERROR, never data.
        self.assertTrue(replies)
        for r in replies:
            msg = parse_server_message(r)
            self.assertIsInstance(msg, (Size, Error), r[:80])
            if isinstance(msg, Error):
                self.assertLessEqual(len(r), MAX_ERROR, r[:80])


# --- 8. The command lines ------------------------------------------------------------------------

class CommandLineTest(EndToEndCase):

    def setUp(self):
        super().setUp()
        self.files = {
            "hello.txt": self.tmp.make_file("hello.txt", data=b"hello, world\n"),
            "my notes.txt": self.tmp.make_file("my notes.txt", 5000, seed=1),
            "café.txt": self.tmp.make_file("café.txt", 70000, seed=2),
            "blob.bin": self.tmp.make_file("blob.bin", 2 * MiB + 1, seed=3),
        }

    def argv(self, address, *more):
        return ["--host", address[0], "--port", str(address[1]), "--out", self.tmp.downloads] \
            + list(more)

    def test_list(self):
        st = self.start_server()
        code, out, _ = self.run_main(self.argv(st.address, "--list"))
        self.assertEqual(code, 0, out)
        self.assertIn("4 files on", out)
        for name in self.files:
            self.assertRegex(out, r"(?m)^  %s +\S" % re.escape(name))
        self.assertEqual(visible(self.tmp.downloads), [], "--list downloads nothing")

    def test_once_with_input_file(self):
        st = self.start_server()
        input_path = os.path.join(self.tmp.root, "input.txt")
        with open(input_path, "w", encoding="utf-8") as f:
            f.write("# files to fetch\n"
                    "\n"
                    "   hello.txt   \n"
                    "my notes.txt\n"
                    "\t\n"
                    "  # an indented comment\n"
                    "hello.txt\n"
                    "missing.bin\n"
                    "café.txt\n"
                    "\n")
        code, out, _ = self.run_main(self.argv(st.address, "--once", "--input", input_path))
        self.assertEqual(code, 1, out)
        for name in ("hello.txt", "my notes.txt", "café.txt"):
            self.assert_downloaded(self.tmp.downloads, name, self.files[name])
        self.assertEqual(visible(self.tmp.downloads), sorted(["café.txt", "hello.txt",
                                                              "my notes.txt"]))
        self.assertEqual(sorted(os.listdir(self.tmp.downloads)), visible(self.tmp.downloads),
                         "temporary files left behind")
        missing = [line for line in out.splitlines() if "missing.bin" in line]
        self.assertEqual(len(missing), 1, out)
        self.assertIn("FAILED", missing[0])
        results = [line for line in out.splitlines() if line.startswith("hello.txt:")]
        self.assertEqual(len(results), 1, "a duplicate name is fetched once:\n" + out)
        self.assertNotIn("comment", out)

    def test_names_mode_and_already_complete_file_not_fetched_again(self):
        st = self.start_server()
        requests = []
        proxy = self.start_proxy(st.address, to_server=Impairment(
            drop_if=lambda d: requests.append(support.split_tag(d)[1])
            if support.split_tag(d)[1].startswith(b"DOWNLOAD ") else False))
        code, out, _ = self.run_main(self.argv(proxy.address, "my notes.txt", "blob.bin"))
        self.assertEqual(code, 0, out)
        for name in ("my notes.txt", "blob.bin"):
            self.assert_downloaded(self.tmp.downloads, name, self.files[name])
            self.assertIn("verified", [l for l in out.splitlines() if l.startswith(name)][0])
        path = os.path.join(self.tmp.downloads, "blob.bin")
        stamp = os.stat(path)

        # Again, with names mode and --once: the complete file is not asked for again.
        del requests[:]
        code, out, _ = self.run_main(self.argv(proxy.address, "blob.bin", "hello.txt"))
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"(?m)^blob\.bin: already")
        input_path = os.path.join(self.tmp.root, "input.txt")
        with open(input_path, "w", encoding="utf-8") as f:
            f.write("blob.bin\nmy notes.txt\ncafé.txt\n")
        code, out, _ = self.run_main(self.argv(proxy.address, "--once", "--input", input_path))
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"(?m)^blob\.bin: already")
        self.assertRegex(out, r"(?m)^my notes\.txt: already")
        self.assertEqual([r for r in requests if r.startswith(b"DOWNLOAD blob.bin ")
                          or r.startswith(b"DOWNLOAD my notes.txt ")], [])
        after = os.stat(path)
        self.assertEqual((after.st_ino, after.st_mtime_ns), (stamp.st_ino, stamp.st_mtime_ns))
        for name in self.files:
            self.assert_downloaded(self.tmp.downloads, name, self.files[name])

    def test_server_not_answering_gives_up(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            address = s.getsockname()
        # Nothing listens on `address` now: said in one line, at once where the OS reports the
        # closed port, else within --give-up (tests/test_cli.py has more).
        code, out, seconds = self.run_main(
            self.argv(address, "--give-up", "2", "hello.txt", "my notes.txt"), limit=10)
        self.assertEqual(code, 1, out)
        self.assertLess(seconds, 3.0)
        self.assertEqual(len(out.splitlines()), 1, out)
        self.assertRegex(out, r"^no server at 127\.0\.0\.1:%d \(" % address[1])
        self.assertEqual(visible(self.tmp.downloads), [])

    def test_server_command_line(self):
        list_path = os.path.join(self.tmp.root, "list.txt")
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "server.py"), "--port", "0", "--dir",
             self.tmp.files, "--file-list", list_path, "--quiet"],
            cwd=self.tmp.root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            proc.stdout.close()
        self.addCleanup(stop)

        lines = queue.Queue()
        reader = threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True)
        reader.start()
        try:
            first = lines.get(timeout=10).decode("utf-8", "replace")
        except queue.Empty:
            self.fail("server.py printed no 'listening on' line within 10 s")
        m = re.match(r"listening on (\S+):(\d+)\s*$", first)
        self.assertTrue(m, first)
        host, port = m.group(1).strip("[]"), int(m.group(2))
        self.assertNotEqual(port, 0)

        code, out, _ = self.run_main(self.argv((host, port), "--list"))
        self.assertEqual(code, 0, out)
        self.assertIn("4 files on", out)
        code, out, _ = self.run_main(self.argv((host, port), "café.txt", "blob.bin"))
        self.assertEqual(code, 0, out)
        self.assert_downloaded(self.tmp.downloads, "café.txt", self.files["café.txt"])
        self.assert_downloaded(self.tmp.downloads, "blob.bin", self.files["blob.bin"])
        self.assertEqual(read_bytes(list_path), format_listing(
            (n, len(d)) for n, d in self.files.items()))
        stop()
        self.assertIsNotNone(proc.poll())


# --- 9. The folder changes while the server runs -------------------------------------------------

class FolderChangesTest(EndToEndCase):

    def setUp(self):
        super().setUp()
        self.list_path = os.path.join(self.tmp.root, "file_list.txt")
        self.first = self.tmp.make_file("first.txt", data=b"first\n")
        self.outside = os.path.join(self.tmp.root, "new file.bin")
        self.new = payload(200000, 9)
        with open(self.outside, "wb") as f:
            f.write(self.new)

    def listing_text(self, names):
        return format_listing((n, os.path.getsize(os.path.join(self.tmp.files, n)))
                              for n in names)

    def test_list_file_rewritten_by_periodic_scan(self):
        st = self.start_server(support.fast_server_settings(scan_interval=0.2),
                               list_path=self.list_path)
        self.assertTrue(wait_for(lambda: os.path.exists(self.list_path), 5))
        self.assertEqual(read_bytes(self.list_path), self.listing_text(["first.txt"]))
        shutil.copy(self.outside, os.path.join(self.tmp.files, "new file.bin"))
        want = self.listing_text(["first.txt", "new file.bin"])
        self.assertTrue(wait_for(lambda: read_bytes(self.list_path) == want, 5),
                        "file_list.txt not rewritten after a file was added")
        support.download(st.address, "new file.bin", self.tmp.downloads)
        self.assertEqual(self.tmp.downloaded("new file.bin"), self.new)
        # A file removed from the folder disappears from the list file too.
        os.remove(os.path.join(self.tmp.files, "first.txt"))
        want = self.listing_text(["new file.bin"])
        self.assertTrue(wait_for(lambda: read_bytes(self.list_path) == want, 5))

    def test_list_file_rewritten_on_list_and_new_file_downloadable(self):
        st = self.start_server(support.fast_server_settings(scan_interval=3600.0,
                                                            list_rescan_interval=0.0),
                               list_path=self.list_path)
        c = support.make_client(st.address, self.tmp.downloads)
        self.assertEqual(c.listing(), [("first.txt", 6)])
        shutil.copy(self.outside, os.path.join(self.tmp.files, "new file.bin"))
        # Downloadable at once, without a restart (and before any rescan).
        support.download(st.address, "new file.bin", self.tmp.downloads, parts=2)
        self.assertEqual(self.tmp.downloaded("new file.bin"), self.new)
        self.assertEqual(read_bytes(self.list_path), self.listing_text(["first.txt"]))
        self.assertEqual(c.listing(), [("first.txt", 6), ("new file.bin", len(self.new))])
        self.assertEqual(read_bytes(self.list_path),
                         self.listing_text(["first.txt", "new file.bin"]))

    def test_a_list_right_after_a_new_name_shows_it(self):
        # LIST rescans at most every list_rescan_interval, but a name that came since (the
        # folder's mtime moved) is listed at once: a file dropped in just before a client
        # starts must not be missing from its listing.
        st = self.start_server(support.fast_server_settings(scan_interval=3600.0,
                                                            list_rescan_interval=3600.0),
                               list_path=self.list_path)
        c = support.make_client(st.address, self.tmp.downloads)
        self.assertEqual(c.listing(), [("first.txt", 6)])
        shutil.copy(self.outside, os.path.join(self.tmp.files, "new file.bin"))
        self.assertEqual(c.listing(), [("first.txt", 6), ("new file.bin", len(self.new))])

    def test_file_shrinking_right_after_its_last_byte_is_started_over(self):
        """The file is cut short on the server just as the client acknowledges its EOF: the
        client's confirming request (at the old size) is now past the end. The client must
        start that file over (PROTOCOL.md: a file that changes) and save the new content, or
        at worst give up after --give-up; never loop forever."""
        old = self.tmp.make_file("a.bin", 300000, seed=1)
        path = os.path.join(self.tmp.files, "a.bin")
        result, where = {}, {}

        def run():
            try:
                support.download(where["address"], "a.bin", self.tmp.downloads,
                                 settings=support.fast_client_settings(give_up=2.0))
                result["ok"] = True
            except Exception as exc:   # reported by the test thread
                result["error"] = repr(exc)

        thread = threading.Thread(target=run, daemon=True)
        # Registered first, so it runs after the proxy and server are stopped.
        self.addCleanup(thread.join, 10)
        st = self.start_server()
        shrunk = []

        def shrink_at_ack_eof(data):
            if support.split_tag(data)[1].startswith(b"ACK EOF ") and not shrunk:
                shrunk.append(True)
                with open(path, "r+b") as f:
                    f.truncate(100000)
            return False

        proxy = self.start_proxy(st.address, to_server=Impairment(drop_if=shrink_at_ack_eof))
        where["address"] = proxy.address
        thread.start()
        thread.join(6)
        self.assertTrue(shrunk)
        self.assertFalse(thread.is_alive(),
                         "the client neither finished nor gave up within 6 s (give-up 2 s)")
        self.assertEqual(result, {"ok": True})
        self.assertEqual(self.tmp.downloaded("a.bin"), old[:100000])


if __name__ == "__main__":
    unittest.main()
