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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    """A UDP port nothing listens on (bound and released at once)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


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
        support.download(address, "s.bin", again)   # twice: 2 x 300000 bytes served
        self.assertEqual(self.tmp.downloaded("s.bin"), data)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        self.assertEqual(proc.returncode, 0)
        last = lines.get(timeout=5)
        self.assertRegex(last, r"^stopped after 0:00:\d\d: \d+ transfers finished, "
                               r"585\.9 KiB served\s*$")
        self.assertIsNone(lines.get(timeout=5), "one line only")


# --- IPv6 -------------------------------------------------------------------------------------

@unittest.skipUnless(ipv6_loopback(), "this machine has no IPv6 loopback")
class IPv6Test(Case):

    def check(self, server_host):
        data = self.tmp.make_file("six.bin", 200000, seed=6)
        with support.served(self.tmp, host=server_host) as st:
            address = ("::1", st.address[1])
            code, out, err, _ = self.run_main(self.argv(address, "--list"))
            self.assertEqual(code, 0, out + err)
            self.assertIn("1 files on [::1]:%d" % address[1], out)
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


if __name__ == "__main__":
    unittest.main()
