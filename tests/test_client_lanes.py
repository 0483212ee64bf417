"""The version 3 client (udpxfer/fetch.py) end to end on loopback: all transfers over one socket,
the fall back to a version 2 server (both ways such a server may answer a tagged request), a
late EOF of a finished lane answered at once, many files at once, and the progress line of the
whole run.

Run: python3 -m tests test_client_lanes
"""

import io
import os
import time
import unittest

import client
from tests import support
from tests.support import wait_for
from tests.test_end_to_end import EndToEndCase, RewritingProxy
from udpxfer.client_transfer import ClientTransfer
from udpxfer.download import Download, Part
from udpxfer.errors import Failure
from udpxfer.fetch import Client
from udpxfer.partial import MemoryTarget
from udpxfer.wire import Data, Size, format_error, parse_server_datagram

TOKEN = b"0123456789abcdef"


class Version2Shim(RewritingProxy):
    """A relay in front of our server that knows only protocol version 2: an untagged datagram
    goes through, a tagged one is answered with an untagged ERROR BAD_REQUEST (`answer`: what a
    server written from the version 2 contract does) or dropped (`answer` False: a server that
    ignores what it cannot parse). Counts what it saw."""

    def __init__(self, upstream, answer=True):
        self.tagged = self.untagged = 0
        self.bad_request = answer
        super().__init__(upstream, self._through, answer=self._refuse)

    def _refuse(self, data):
        if data.startswith(b"#"):
            self.tagged += 1
            return format_error("BAD_REQUEST", "malformed") if self.bad_request else b""
        self.untagged += 1
        return None

    def _through(self, data):
        return data


class TtyStream(io.StringIO):
    """What a terminal gets: the progress line is drawn on it."""

    def isatty(self):
        return True


class LanesTest(EndToEndCase):

    def shim(self, st, answer):
        shim = Version2Shim(st.address, answer)
        self.addCleanup(shim.close)
        return shim

    def test_sixteen_lanes_run_over_one_socket(self):
        data = self.tmp.make_file("big.bin", 6 * 1024 * 1024, seed=1)
        st = self.start_server()
        senders = set()

        def seen(datagram):
            return datagram

        proxy = RewritingProxy(st.address, seen)
        self.addCleanup(proxy.close)
        c = support.download(proxy.address, "big.bin", self.tmp.downloads, parts=16,
                             settings=support.fast_client_settings(first_range=128 * 1024))
        self.assert_downloaded(self.tmp.downloads, "big.bin", data)
        senders.update(proxy.upstreams)
        self.assertEqual(len(senders), 1, "one client socket for every lane")
        self.assertEqual(c.stats["sockets"], 1)
        self.assertGreaterEqual(c.last_fetch.most_lanes, 8, "the lanes really ran at once")
        self.assertLessEqual(c.last_fetch.most_lanes, 16, "--parts 16: 16 at once, no more")
        self.assertIs(c.lanes, True)

    def test_a_version_2_server_that_says_bad_request_gets_one_socket_per_transfer(self):
        data = self.tmp.make_file("f.bin", 700000, seed=2)
        st = self.start_server()
        shim = self.shim(st, answer=True)
        c = support.download(shim.address, "f.bin", self.tmp.downloads, parts=4,
                             settings=support.fast_client_settings(first_range=64 * 1024))
        self.assert_downloaded(self.tmp.downloads, "f.bin", data)
        self.assertIs(c.lanes, False)
        self.assertGreaterEqual(shim.tagged, 1)
        self.assertLessEqual(shim.tagged, 2, "it fell back at the first answer")
        self.assertGreaterEqual(c.stats["sockets"], 3, "untagged: a socket per transfer")

    def test_a_version_2_server_that_drops_tagged_requests_is_found_by_an_untagged_probe(self):
        data = self.tmp.make_file("f.bin", 300000, seed=3)
        st = self.start_server()
        shim = self.shim(st, answer=False)
        settings = support.fast_client_settings(first_range=64 * 1024)
        started = time.monotonic()
        c = support.download(shim.address, "f.bin", self.tmp.downloads, parts=2,
                             settings=settings)
        self.assert_downloaded(self.tmp.downloads, "f.bin", data)
        self.assertIs(c.lanes, False)
        # probe_after tagged tries (request_timeout, doubling up to its max) before the probe
        self.assertGreaterEqual(shim.tagged, settings.probe_after)
        self.assertLess(time.monotonic() - started, 5.0)

    def test_a_late_eof_of_a_finished_lane_is_answered_at_once(self):
        # The first ACK EOF of one lane is lost: the server sends EOF again, and the client,
        # whose lane has ended, answers it from the lane's token (it need not wait for the
        # server's retransmission limit, nor hold the server's slot that long).
        data = self.tmp.make_file("f.bin", 3 * 1024 * 1024, seed=4)
        st = self.start_server(support.fast_server_settings(rto_max=2.0))
        acks = []

        def rewrite(datagram):
            tag, msg = support.split_tag(datagram)
            if msg.startswith(b"ACK EOF "):
                acks.append(tag)
                if len(acks) == 1:
                    return None          # lost
            return datagram

        proxy = RewritingProxy(st.address, rewrite)
        self.addCleanup(proxy.close)
        # (--limit-rate: the other lanes run on for a while after the first one ends)
        support.download(proxy.address, "f.bin", self.tmp.downloads, parts=4,
                         settings=support.fast_client_settings(first_range=128 * 1024,
                                                               limit_rate=10 * 1024 * 1024))
        self.assert_downloaded(self.tmp.downloads, "f.bin", data)
        self.assertIn(acks[0], acks[1:], "the lost ACK EOF was said again")
        # ... so the server's transfer ended then, not at its retransmission limit (eight
        # timeouts, backed off up to 2 s: seconds).
        self.assertTrue(wait_for(lambda: not st.server.dispatcher.active, 0.5),
                        "the server's transfers all ended")

    def test_acks_leave_in_the_order_their_datas_came(self):
        # ACKs held back (here by --limit-rate; on a long path by the pace) leave in the order
        # their DATAs came, the ACK of a range's last DATA too (it brings only EOF, so nothing
        # holds it but its turn): the server takes an ACK out of its send order as evidence that
        # the DATAs sent before it are lost (PROTOCOL.md "Early retransmission").
        data = self.tmp.make_file("f.bin", 3 * 1024 * 1024, seed=5)
        st = self.start_server()
        came, went = [], []

        def reply(datagram):
            lane, msg = parse_server_datagram(datagram)
            if isinstance(msg, Data):
                came.append((lane, msg.offset + len(msg.payload)))
            return datagram

        def rewrite(datagram):
            tag, msg = support.split_tag(datagram)
            if msg.startswith(b"ACK ") and not msg.startswith(b"ACK EOF"):
                went.append((int(tag[1:]), int(msg.split()[1])))
            return datagram

        proxy = RewritingProxy(st.address, rewrite, reply)
        self.addCleanup(proxy.close)
        support.download(proxy.address, "f.bin", self.tmp.downloads, parts=6,
                         settings=support.fast_client_settings(first_range=96 * 1024,
                                                               limit_rate=12 * 1024 * 1024))
        self.assert_downloaded(self.tmp.downloads, "f.bin", data)
        answers = set(came)
        acks = list(dict.fromkeys(a for a in went if a in answers))   # first of each
        order = {a: i for i, a in enumerate(dict.fromkeys(came))}
        self.assertGreater(len(acks), 40)
        self.assertEqual(acks, sorted(acks, key=order.__getitem__))

    def test_a_repeated_request_that_waited_is_counted_once_its_ack_brings_a_data(self):
        # Lane 2's request goes again while lane 1's ACK is held (here by --limit-rate): it
        # waits its turn, as something that brings nothing. Then lane 2's SIZE comes and its
        # ACK joins the wait: from then on it waits for the window and the pace, and goes as
        # one that brings a DATA (in flight, timed). Sent with the repeated request, uncounted,
        # it went past the window and the pace, and its DATA, answering the first copy, timed
        # the second: a round trip of 0.0 s on a 50 ms path.
        c = Client("127.0.0.1", 9, support.fast_client_settings(limit_rate=256 * 1024),
                   client.Printer(quiet=True, stream=io.StringIO()))
        self.addCleanup(c.close)
        sent = []
        c._send = lambda part, datagram: sent.append((part.lane, datagram))
        job = Download("f.bin", MemoryTarget(), c.s)
        parts = []
        for lane in (1, 2):
            t = ClientTransfer("f.bin", 0, 100000, 0.0, c.s, request_rto=0.015, lane=lane)
            t.datagrams_to_send()
            parts.append(Part(t, job, lane=lane))
        one, two = parts
        one.t.receive(Size(10 ** 6, "v", TOKEN), 0.01)
        c._ack(one, 0.01, 60000)            # due at 0.24 (60000 bytes at 256 KiB/s)
        two.t.handle_timer(0.02)            # its request again, while one's ACK waits
        c._ack(two, 0.02, 0)
        two.t.receive(Size(10 ** 6, "v", TOKEN), 0.03)
        c._ack(two, 0.03, 60000)
        self.assertEqual((len(c.held), sent), (2, []))
        c._release(0.3)
        self.assertEqual([lane for lane, _ in sent], [1])
        self.assertEqual((two.flying, c.inflight), (False, 1), "two waits for the pace")
        c._release(0.5)                     # (due at 0.47)
        self.assertEqual([lane for lane, _ in sent], [1, 2, 2])
        self.assertEqual((two.flying, two.acked_at, c.inflight), (True, 0.5, 2))

    def test_an_ack_held_for_hold_max_goes_whatever_the_pace_says(self):
        # The controller's pace (64 KiB/s here) would hold lane 1's ACK until 0.92 s, lane
        # 2's after it; past hold_max (0.5 s here) each goes, in flight, and the rest keep
        # waiting their turn. Under --limit-rate nothing goes before the cap allows it.
        for cap in (None, 64 * 1024):
            with self.subTest(cap=cap):
                settings = support.fast_client_settings(limit_rate=cap, hold_max=0.5)
                c = Client("127.0.0.1", 9, settings,
                           client.Printer(quiet=True, stream=io.StringIO()))
                self.addCleanup(c.close)
                if cap is None:
                    c.pace.set(64 * 1024)
                sent = []
                c._send = lambda part, datagram: sent.append(part.lane)
                job = Download("f.bin", MemoryTarget(), c.s)
                parts = []
                for lane in (1, 2, 3):
                    t = ClientTransfer("f.bin", 0, 100000, 0.0, c.s, lane=lane)
                    t.datagrams_to_send()
                    parts.append(Part(t, job, lane=lane))
                    t.receive(Size(10 ** 6, "v", TOKEN), 0.01 * lane)
                    c._ack(parts[-1], 0.01 * lane, 60000)
                c._release(0.4)
                self.assertEqual(sent, [])
                c._release(0.52)
                if cap is not None:
                    self.assertEqual((sent, c.stats["overdue"]), ([], 0))
                    continue
                self.assertEqual(sent, [1, 2])
                self.assertEqual((parts[0].flying, parts[1].flying, c.inflight), (True, True, 2))
                self.assertEqual(c.stats["overdue"], 2)
                self.assertEqual(len(c.held), 1)

    def test_a_request_the_server_refuses_is_said_so_and_not_a_changed_file(self):
        # A server that cannot take our request (one that read numbers into 64 bits refused
        # "to the end" as 10**40) answers BAD_REQUEST before any SIZE: that is the answer, said
        # in its words, not "the file changed on the server" twenty times.
        self.tmp.make_file("f.bin", 1000)
        st = self.start_server()

        def answer(datagram):
            tag, msg = support.split_tag(datagram)
            if msg.startswith(b"DOWNLOAD "):
                return tag + b"ERROR BAD_REQUEST number too big"
            return None

        proxy = RewritingProxy(st.address, lambda data: data, answer=answer)
        self.addCleanup(proxy.close)
        started = time.monotonic()
        with self.assertRaises(Failure) as caught:
            support.download(proxy.address, "f.bin", self.tmp.downloads, parts=1,
                             settings=support.fast_client_settings(give_up=10.0))
        self.assertIn("the server says BAD_REQUEST (number too big)", str(caught.exception))
        self.assertNotIn("changed", str(caught.exception))
        self.assertLess(time.monotonic() - started, 5.0)

    def test_many_files_run_at_once_each_saved_whole(self):
        names = ["small%02d.bin" % i for i in range(30)] + ["big.bin"]
        expected = {n: self.tmp.make_file(n, 20000 + 1000 * i, seed=10 + i)
                    for i, n in enumerate(names[:-1])}
        expected["big.bin"] = self.tmp.make_file("big.bin", 4 * 1024 * 1024, seed=9)
        st = self.start_server()
        most = []
        original = Client._housekeeping

        def spy(c, now):
            most.append(sum(1 for j in c.jobs if j.name is not None))
            return original(c, now)

        Client._housekeeping = spy
        self.addCleanup(setattr, Client, "_housekeeping", original)
        lines = TtyStream()
        printer = client.Printer(stream=lines)
        results = []
        c = Client(st.address[0], st.address[1], support.fast_client_settings(), printer,
                   self.tmp.downloads, on_result=lambda job, error: results.append(
                       (job.name, error)))
        from udpxfer.download import Download
        from udpxfer.partial import PartialFile
        for name in names:
            target = PartialFile(self.tmp.downloads, name)
            self.addCleanup(target.release)
            c.add(Download(name, target, c.s, None, None, name, printer.line, printer.detail,
                           c.server))
        c.run()
        self.assertEqual(sorted(results), sorted((n, None) for n in names))
        for name, data in expected.items():
            self.assert_downloaded(self.tmp.downloads, name, data)
        self.assertGreater(max(most), 4, "files ran at once")
        self.assertEqual(c.stats["sockets"], 1)
        # One progress line for the whole run: files done of all, not a file's name.
        self.assertRegex(lines.getvalue(), r"\d+/31 files ")


class ProgressLineTest(unittest.TestCase):

    def test_the_line_fits_sixty_columns_and_the_name_gives_way(self):
        stream = TtyStream()
        printer = client.Printer(stream=stream)
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "60"
        self.addCleanup(lambda: os.environ.pop("COLUMNS") if old is None
                        else os.environ.__setitem__("COLUMNS", old))
        printer.progress("a very long file name that goes on and on.bin", 5 << 20, 10 << 20,
                         2 << 20, 1.0, force=True)
        line = stream.getvalue().split("\r\033[K")[-1]
        self.assertLessEqual(len(line), 59)
        self.assertIn("50.0%", line)
        self.assertIn("ETA", line)
        self.assertIn("~", line)          # the name was cut, not the figures
        printer.progress("3/20 files", 1 << 20, None, 0, 2.0, note="waiting for the server",
                         force=True)
        self.assertIn("3/20 files", stream.getvalue())
        self.assertIn("waiting for the server", stream.getvalue())


if __name__ == "__main__":
    unittest.main()
