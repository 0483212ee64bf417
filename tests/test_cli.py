"""The command lines as a person or a script meets them: no server yet, a port in use, IPv6,
--limit-rate, the closing summary line and --json.

Everything goes through the public entry points (client.main, server.py in a subprocess,
support.served / support.download), never hand-made datagrams, so these tests hold across
protocol versions. Servers bind port 0 in temporary folders; every wait is bounded.
"""

import contextlib
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import client
from tests import support
from udpxfer.ratelimit import Pacer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    """A UDP port nothing listens on (bound and released at once)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Case(unittest.TestCase):
    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)

    def argv(self, address, *more):
        return ["--host", address[0], "--port", str(address[1]), "--out", self.tmp.downloads,
                "--input", os.path.join(self.tmp.root, "input.txt")] + list(more)

    def run_main(self, argv, limit=20.0):
        """client.main(argv) -> (exit code, stdout, stderr, seconds)."""
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = client.main(argv)
        seconds = time.monotonic() - started
        self.assertLess(seconds, limit, "client.main took too long")
        return code, out.getvalue(), err.getvalue(), seconds

    def write_input(self, *names):
        with open(os.path.join(self.tmp.root, "input.txt"), "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in names))

    def popen(self, script, *args):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script)] + list(args),
                                cwd=self.tmp.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def stop():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        self.addCleanup(stop)
        return proc


def read_lines(stream):
    """A queue fed with the lines of a pipe by a daemon thread (bounded reads in tests)."""
    q = queue.Queue()

    def pump():
        for line in iter(stream.readline, b""):
            q.put(line.decode("utf-8", "replace"))
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return q


# --- No server yet ----------------------------------------------------------------------------

class NoServerTest(Case):

    def assert_no_server_line(self, out, port):
        self.assertEqual(len(out.splitlines()), 1, out)
        self.assertRegex(out, r"^no server at 127\.0\.0\.1:%d \(" % port)
        self.assertIn("start server.py first", out)
        self.assertIn("--host", out)
        self.assertIn("--port", out)

    def test_list_once_and_names_with_nothing_listening_fail_at_once(self):
        port = free_port()
        self.write_input("a.txt", "b.txt")
        for mode in (["--list"], ["--once"], ["a.txt", "b.txt"]):
            code, out, err, seconds = self.run_main(self.argv(("127.0.0.1", port), *mode))
            self.assertEqual(code, 1, out)
            self.assert_no_server_line(out, port)
            # The OS reports the closed port (ICMP) at once on Linux, macOS and Windows;
            # where it is filtered, no_answer_timeout (4 s) still ends it early.
            self.assertLess(seconds, 5.0, mode)
        self.assertEqual(os.listdir(self.tmp.downloads), [])

    def test_silent_address_is_reported_within_the_no_answer_time(self):
        # A bound socket that never reads: no ICMP refusal, just silence (a firewall that
        # drops). --give-up below no_answer_timeout shortens the wait, to keep the test short.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            port = silent.getsockname()[1]
            code, out, err, seconds = self.run_main(
                self.argv(("127.0.0.1", port), "--list", "--give-up", "1.5"))
        self.assertEqual(code, 1, out)
        self.assert_no_server_line(out, port)
        self.assertIn("no answer in 1.5 s", out)
        self.assertGreaterEqual(seconds, 1.4)
        self.assertLess(seconds, 4.0)

    def test_watch_mode_says_it_once_and_starts_when_the_server_comes(self):
        port = free_port()
        data = self.tmp.make_file("w.bin", 100000, seed=3)
        self.write_input("w.bin")
        proc = self.popen("client.py", *self.argv(("127.0.0.1", port)))
        lines = read_lines(proc.stdout)
        first = lines.get(timeout=10)
        self.assertRegex(first, r"^no server at 127\.0\.0\.1:%d \(" % port)
        self.assertIn("waiting for it", first)
        time.sleep(1.0)   # a few quiet retries (0.25 s, 0.5 s, 1 s apart)
        with support.ServerThread(self.tmp.files, port=port):
            path = os.path.join(self.tmp.downloads, "w.bin")
            deadline = time.monotonic() + 15
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertTrue(os.path.exists(path), "not downloaded once the server came")
            proc.kill()
            proc.communicate(timeout=10)
        later = []
        while True:
            line = lines.get(timeout=10)
            if line is None:
                break
            later.append(line)
        self.assertEqual([l for l in later if "no server" in l], [], "said more than once")
        self.assertEqual(self.tmp.downloaded("w.bin"), data)


# --- The server's command line ----------------------------------------------------------------

def _default_sigint():
    # A test runner started in the background has SIGINT ignored, and a child inherits that;
    # Python then never raises KeyboardInterrupt. Ctrl-C is what is being tested: restore it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerCommandLineTest(Case):

    def server_args(self, *more):
        return ["--dir", self.tmp.files, "--file-list", os.path.join(self.tmp.root, "list.txt"),
                "--quiet"] + list(more)

    def test_port_in_use_says_what_it_means_and_what_to_do(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            proc = self.popen("server.py", *self.server_args("--port", str(port)))
            out, err = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 2, err)
        self.assertEqual(out, b"")
        err = err.decode("utf-8", "replace")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("port %d is already in use" % port, err)
        self.assertIn("another server.py", err)
        self.assertIn("--port 0", err)
        self.assertNotIn("Errno", err)

    @unittest.skipIf(os.name == "nt", "Ctrl-C cannot be sent to one process on Windows")
    def test_ctrl_c_prints_what_was_served(self):
        data = self.tmp.make_file("s.bin", 300000, seed=4)
        self.tmp.make_file("t.bin", 300000, seed=5)
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "server.py"), "--port", "0"]
            + self.server_args(), cwd=self.tmp.root, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)

        def stop():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        self.addCleanup(stop)
        lines = read_lines(proc.stdout)
        m = re.match(r"listening on (\S+):(\d+)\s*$", lines.get(timeout=10) or "")
        self.assertTrue(m)
        address = (m.group(1), int(m.group(2)))
        support.download(address, "s.bin", self.tmp.downloads)
        again = os.path.join(self.tmp.root, "again")
        os.mkdir(again)
        support.download(address, "t.bin", again)   # two files: 2 x 300000 bytes served
        self.assertEqual(self.tmp.downloaded("s.bin"), data)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        self.assertEqual(proc.returncode, 0)
        last = lines.get(timeout=5)
        self.assertRegex(last, r"^stopped after 0:00:\d\d: served 2 files, 585\.9 KiB\s*$")
        self.assertIsNone(lines.get(timeout=5), "one line only")


# --- IPv6 -------------------------------------------------------------------------------------

@unittest.skipUnless(support.ipv6_loopback(), "this machine has no IPv6 loopback")
class IPv6Test(Case):

    def check(self, server_host):
        data = self.tmp.make_file("six.bin", 200000, seed=6)
        with support.served(self.tmp, host=server_host) as st:
            address = ("::1", st.address[1])
            code, out, err, _ = self.run_main(self.argv(address, "--list"))
            self.assertEqual(code, 0, out + err)
            self.assertIn("1 file on [::1]:%d" % address[1], out)
            code, out, err, _ = self.run_main(self.argv(address, "six.bin", "--parts", "2"))
            self.assertEqual(code, 0, out + err)
        self.assertEqual(self.tmp.downloaded("six.bin"), data)

    def test_server_on_ipv6_loopback(self):
        self.check("::1")

    def test_server_on_every_ipv6_address(self):
        self.check("::")

    def test_nothing_listening_on_ipv6_is_said_at_once(self):
        port = free_port(socket.AF_INET6, "::1")
        code, out, err, seconds = self.run_main(self.argv(("::1", port), "--list"))
        self.assertEqual(code, 1, out)
        self.assertRegex(out, r"^no server at \[::1\]:%d \(" % port)
        self.assertLess(seconds, 5.0)


# --- --limit-rate -----------------------------------------------------------------------------

class RateParsingTest(unittest.TestCase):

    def test_rates_like_curl_and_wget(self):
        for text, value in (("500K", 500 * 1024), ("500k", 500 * 1024), ("10M", 10 * MiB),
                            ("10m", 10 * MiB), ("1G", 1024 ** 3), ("1g", 1024 ** 3),
                            ("250000", 250000), ("1.5M", int(1.5 * MiB)), (" 64K ", 65536)):
            self.assertEqual(client.parse_rate(text), value, text)
        for text in ("", "K", "-5M", "10MB", "10 MiB", "1e6", "ten"):
            with self.assertRaises(ValueError, msg=text):
                client.parse_rate(text)

    def test_command_line_refuses_nonsense_and_tiny_caps(self):
        for bad in ("fast", "10K", "65535"):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                client.main(["--limit-rate", bad, "--list"])
            self.assertEqual(cm.exception.code, 2)
            self.assertIn("--limit-rate", err.getvalue())

    def test_pacer_schedule(self):
        """On a virtual clock: ACKs are spaced len / rate from the first datagram on; a late
        wake-up within the slack is caught up; idle time is not saved up for a burst; parts
        are limited so that a held ACK stays short."""
        rate, n = 4 * MiB, 65536
        p = Pacer(rate)
        self.assertEqual(p.max_parts, 64)
        self.assertEqual(Pacer(65536).max_parts, 1)
        self.assertEqual(Pacer(500 * 1024).max_parts, 7)
        now = 100.0
        dues = [p.take(n, now) for _ in range(10)]   # ten datagrams arrive together
        self.assertAlmostEqual(dues[0], now + n / rate)
        for a, b in zip(dues, dues[1:]):
            self.assertAlmostEqual(b - a, n / rate)
        # The next one arrives 10 ms after the last ACK was due (a late wake-up): no pace lost.
        self.assertAlmostEqual(p.take(n, dues[-1] + 0.010), dues[-1] + n / rate)
        # 9 s of silence: the schedule starts afresh, nothing goes through early.
        now = 110.0
        self.assertAlmostEqual(p.take(n, now), now + n / rate)
        with self.assertRaises(ValueError):
            Pacer(1000)


class RateLimitTest(Case):
    """Measured on loopback, whose speed without a cap is a hundred times this one. The rate is
    taken from the client's own --json seconds (start of the request to the last byte; the
    fsync of the finished file is excluded, so a slow disk under other tests does not count):
    the files run at once, so the run took as long as the longest of them. The wall clock
    around client.main must not show a higher rate either. At 4 MiB/s a
    datagram is due every 16 ms and the pacer absorbs a late wake-up of up to 31 ms without
    losing pace, so a loaded machine does not fall below 0.9x; each ACK is charged the DATA
    it brings (the largest payload lately, or what is left of the range), so the rate stays at
    about 1.0x (1.005 to 1.015 here; charging the last payload's size, a DATA cut short at a
    read-ahead block's end made the next one cheap: 1.11)."""

    CAP = "4M"

    def check(self, names, parts):
        total = sum(os.path.getsize(os.path.join(self.tmp.files, n)) for n in names)
        with support.served(self.tmp) as st:
            started = time.monotonic()
            code, out, err, _ = self.run_main(self.argv(
                st.address, "--limit-rate", self.CAP, "--parts", str(parts), "--json",
                *names))
            wall = time.monotonic() - started
        self.assertEqual(code, 0, out + err)
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["result"] for r in records], ["ok"] * len(names))
        self.assertEqual(sum(r["bytes"] for r in records), total)
        cap = client.parse_rate(self.CAP)
        measured = total / max(r["seconds"] for r in records) / cap
        self.assertGreaterEqual(measured, 0.9, "%.3f x the cap" % measured)
        self.assertLessEqual(measured, 1.1, "%.3f x the cap" % measured)
        self.assertLessEqual(total / wall / cap, 1.1)
        if os.environ.get("UDPXFER_TEST_REPORT"):
            print("\n  --limit-rate %s, %d part(s): %.3f x the cap (wall clock %.3f x)"
                  % (self.CAP, parts, measured, total / wall / cap), file=sys.stderr)
        return records

    def test_one_part(self):
        self.tmp.make_file("one.bin", 4 * MiB, seed=11)
        records = self.check(["one.bin"], 1)
        self.assertEqual(records[0]["parts"], 1)

    def test_four_parts_and_two_files_share_one_cap(self):
        self.tmp.make_file("a.bin", 2 * MiB + 1000, seed=12)
        self.tmp.make_file("b.bin", 2 * MiB - 1000, seed=13)
        records = self.check(["a.bin", "b.bin"], 4)
        for r in records:   # the two files at once, four transfers between them
            self.assertIn(r["parts"], (1, 2, 3, 4))
        self.assertGreaterEqual(sum(r["parts"] for r in records), 4)


# --- The last line and --json -----------------------------------------------------------------

class ResultsTest(Case):

    def setUp(self):
        super().setUp()
        self.data = {"x.bin": self.tmp.make_file("x.bin", 300000, seed=21),
                     "y.txt": self.tmp.make_file("y.txt", data=b"why\n")}

    def test_summary_line_after_names_and_once(self):
        with support.served(self.tmp) as st:
            code, out, err, _ = self.run_main(self.argv(st.address, "x.bin", "nope.bin",
                                                        "y.txt"))
            self.assertEqual(code, 1, out)
            self.assertRegex(out.splitlines()[-1],
                             r"^done: 2 files, 1 failed, 293\.0 KiB in \d+\.\d\d s, "
                             r"\S+ \S*B/s$")
            self.write_input("x.bin", "y.txt")
            code, out, err, _ = self.run_main(self.argv(st.address, "--once", "-q"))
            self.assertEqual(code, 0, out)
            self.assertRegex(out.splitlines()[-1],
                             r"^done: 2 files \(2 already here\), 0 failed, 0 B in ")

    def test_json_lines_on_stdout_and_the_rest_on_stderr(self):
        self.write_input("x.bin", "nope.bin", "y.txt")
        with support.served(self.tmp) as st:
            code, out, err, _ = self.run_main(self.argv(st.address, "--once", "--json"))
        self.assertEqual(code, 1)
        records = [json.loads(line) for line in out.splitlines()]   # nothing else on stdout
        # One per file, as each ends (the files run at once).
        self.assertEqual(sorted((r["name"], r["result"]) for r in records),
                         [("nope.bin", "failed"), ("x.bin", "ok"), ("y.txt", "ok")])
        by_name = {r["name"]: r for r in records}
        x, nope = by_name["x.bin"], by_name["nope.bin"]
        self.assertEqual((x["size"], x["bytes"], x["resumed"]), (300000, 300000, 0))
        for r in records:
            self.assertEqual(set(r) - {"error"}, {"name", "result", "size", "bytes", "resumed",
                                                  "seconds", "rate", "parts",
                                                  "retransmissions"})
            self.assertIsInstance(r["retransmissions"], int)
            self.assertGreaterEqual(r["parts"], 1)
        self.assertGreater(x["rate"], 0)
        self.assertIn("not on the server", nope["error"])
        self.assertNotIn("error", x)
        self.assertIn("x.bin: ", err)                      # the lines for people: on stderr
        self.assertRegex(err.splitlines()[-1], r"^done: 2 files, 1 failed, ")
        self.assertEqual(self.tmp.downloaded("x.bin"), self.data["x.bin"])

    def test_list_json(self):
        with support.served(self.tmp) as st:
            code, out, err, _ = self.run_main(self.argv(st.address, "--list", "--json"))
        self.assertEqual(code, 0, err)
        self.assertEqual([json.loads(line) for line in out.splitlines()],
                         [{"name": "x.bin", "size": 300000}, {"name": "y.txt", "size": 4}])

    def test_retransmissions_seen_are_counted(self):
        from tests.impair import ImpairProxy, Impairment
        with support.served(self.tmp) as st, \
                ImpairProxy(st.address, to_client=Impairment(duplicate=1.0)) as proxy:
            proxy.start()
            code, out, err, _ = self.run_main(self.argv(proxy.address, "--json", "--parts",
                                                        "1", "x.bin"))
        self.assertEqual(code, 0, err)
        record = json.loads(out.splitlines()[0])
        # Every DATA came twice: 300000 bytes are 5 datagrams, so at least 5 copies brought
        # nothing new.
        self.assertGreaterEqual(record["retransmissions"], 5)
        self.assertEqual(self.tmp.downloaded("x.bin"), self.data["x.bin"])


if __name__ == "__main__":
    unittest.main()
