"""The first hour of a new user (issue 20): the README's quick start works every time, and every
failure says what happened, in words.

Run: python3 -m tests test_first_hour
"""

import errno
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import unittest
import zlib
from unittest import mock

import client
import server
from tests import support
from tests.support import wait_for
from tests.impair import Impairment
from tests.test_client_lanes import TtyStream
from tests.test_end_to_end import EndToEndCase
from udpxfer.download import Download
from udpxfer.fetch import Client
from udpxfer.folder import file_version
from udpxfer.partial import PartialFile
from udpxfer.wire import crc_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def readme_block(after):
    """The first ```sh block of README.md after the line that contains `after`."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(after)
    m = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    return m.group(1).strip()


@unittest.skipIf(os.name == "nt", "the README's one-line quick start is a POSIX shell command")
class QuickStartTest(unittest.TestCase):
    """Item 1: the README's first command, as written, in a copy of the project (its own files/,
    input.txt and downloads/; only the default port is changed, to a free one), ten times in a
    row: each time every name of input.txt is downloaded, whole. (The client starts at the same
    moment as the server: a port refused in the first moments is a server still starting.)"""

    def test_the_quick_start_works_every_time(self):
        command = readme_block("## Quick start")
        self.assertIn("python3 server.py", command)
        tmp = support.TempDirs()
        self.addCleanup(tmp.cleanup)
        copy = os.path.join(tmp.root, "project")
        os.mkdir(copy)
        for name in ("server.py", "client.py", "input.txt"):
            shutil.copy(os.path.join(ROOT, name), copy)
        shutil.copytree(os.path.join(ROOT, "udpxfer"), os.path.join(copy, "udpxfer"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(os.path.join(ROOT, "files"), os.path.join(copy, "files"))
        with open(os.path.join(ROOT, "config.py"), encoding="utf-8") as f:
            conf = f.read()
        self.assertIn("\nPORT = 12345\n", conf)
        port = free_udp_port()
        with open(os.path.join(copy, "config.py"), "w", encoding="utf-8") as f:
            f.write(conf.replace("\nPORT = 12345\n", "\nPORT = %d\n" % port))
        names = client.read_names(os.path.join(copy, "input.txt"))
        self.assertGreaterEqual(len(names), 3)
        command = command.replace("python3", shlex.quote(sys.executable))
        for attempt in range(10):
            shutil.rmtree(os.path.join(copy, "downloads"), ignore_errors=True)
            started = time.monotonic()
            proc = subprocess.run(["sh", "-c", command], cwd=copy, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=60)
            out = proc.stdout.decode("utf-8", "replace")
            with self.subTest(attempt=attempt):
                self.assertEqual(proc.returncode, 0, out)
                self.assertIn("done: %d files, 0 failed" % len(names), out)
                self.assertLess(time.monotonic() - started, 10.0)
                for name in names:
                    with open(os.path.join(copy, "files", name), "rb") as a, \
                            open(os.path.join(copy, "downloads", name), "rb") as b:
                        self.assertEqual(a.read(), b.read(), name)
            # `kill $!` returns once the signal is sent: the server may hold the port a moment
            # longer (on a busy machine the next attempt found it taken).
            self.assertTrue(wait_for(lambda: udp_port_free(port), 5.0), "the server lives on")


class RateCapTest(EndToEndCase):
    """Item 2: a rate cap limits the lanes, it does not set them."""

    def test_a_high_cap_runs_the_automatic_lanes_not_rate_over_64k(self):
        data = self.tmp.make_file("big.bin", 24 * 1024 * 1024, seed=1)
        st = self.start_server()
        code, out, _ = self.run_main(["--host", st.address[0], "--port", str(st.address[1]),
                                      "--out", self.tmp.downloads, "--limit-rate", "100M",
                                      "--json", "-q", "big.bin"])
        self.assertEqual(code, 0, out)
        record = json.loads(out.splitlines()[0])
        self.assertEqual(record["result"], "ok")
        self.assertLessEqual(record["parts"], 16, "lanes: %d" % record["parts"])
        self.assertEqual(self.tmp.downloaded("big.bin"), data)

    def test_a_low_cap_runs_no_more_lanes_than_it_can_feed(self):
        # 128K: two lanes at most (each hears from the server at least about once a second),
        # however the downloads are started (names, input.txt, the listing).
        c = Client("127.0.0.1", 9, support.fast_client_settings(limit_rate=128 * 1024),
                   client.Printer(quiet=True, stream=io.StringIO()))
        self.addCleanup(c.close)
        self.assertEqual(c.control.max_window, 2)
        self.assertLessEqual(c.control.window, 2)


class UnreadableFileTest(EndToEndCase):
    """Item 3: a file the server may not read is not listed, and a request for it is refused
    with a clear error, said once, on both sides (not "the file changed" twenty times)."""

    def test_not_listed_and_refused_in_words(self):
        self.tmp.make_file("locked.txt", data=b"secret\n")
        open_data = self.tmp.make_file("open.txt", data=b"hello\n")
        real_access = os.access

        def access(path, mode, *a, **kw):   # the tests run as any user, root included
            if os.path.basename(path) == "locked.txt":
                return False
            return real_access(path, mode, *a, **kw)

        with mock.patch("os.access", access):
            st = self.start_server()
            argv = ["--host", st.address[0], "--port", str(st.address[1]),
                    "--out", self.tmp.downloads]
            code, out, _ = self.run_main(argv + ["--list"])
            self.assertEqual(code, 0, out)
            self.assertIn("open.txt", out)
            self.assertNotIn("locked.txt", out)
            code, out, _ = self.run_main(argv + ["locked.txt", "open.txt"], limit=20)
        self.assertEqual(code, 1, out)
        self.assertIn("locked.txt: FAILED: permission denied on the server", out)
        self.assertNotIn("changed", out)
        self.assertEqual(self.tmp.downloaded("open.txt"), open_data)
        self.assertFalse(os.path.exists(os.path.join(self.tmp.downloads, "locked.txt")))


class InputFileTest(EndToEndCase):
    """Items 4 and 7: a named input file that does not exist is an error; a byte-order mark
    is no part of the first name."""

    def run_client(self, *args):
        err = io.StringIO()
        with mock.patch("sys.stderr", err):
            try:
                code, out, _ = self.run_main(list(args))
            except SystemExit as exc:   # argparse: the command line is wrong
                return exc.code, err.getvalue()
        return code, out + err.getvalue()

    def test_a_missing_or_wrong_input_file_exits_2_and_says_which(self):
        missing = os.path.join(self.tmp.root, "typo.txt")
        for mode in (["--once"], []):
            code, out = self.run_client("--port", "1", "--input", missing, *mode)
            self.assertEqual(code, 2, out)
            self.assertIn("--input %s: no such file" % missing, out)
        code, out = self.run_client("--port", "1", "--input", self.tmp.root, "--once")
        self.assertEqual(code, 2, out)
        self.assertIn("is a folder, not a file of names", out)
        self.assertNotIn("Errno", out)

    def test_a_byte_order_mark_is_not_part_of_the_first_name(self):
        path = os.path.join(self.tmp.root, "input.txt")
        with open(path, "wb") as f:
            f.write("\ufeffhello.txt\r\n# a comment\r\n\r\n  café.txt \r\nhello.txt\r\n"
                    .encode("utf-8"))
        self.assertEqual(client.read_names(path), {"hello.txt": 2, "café.txt": 1})


class InWordsTest(EndToEndCase):
    """Item 8: file-system trouble said in words, with the path and what to do; a record that
    cannot be written leaves the previous one in place, and nothing of the client's behind."""

    def test_errors_in_words(self):
        cases = {errno.EACCES: "permission denied: /x/y (check who may write there)",
                 errno.ENOSPC: "no space left on the disk of /x/y",
                 errno.EEXIST: "/x/y is a file, not a folder",
                 errno.EISDIR: "/x/y is a folder, not a file",
                 errno.EROFS: "/x/y is on a read-only disk"}
        for code, words in cases.items():
            text = client.in_words(OSError(code, os.strerror(code), "/x/y"))
            self.assertIn(words, text)
            self.assertNotIn("Errno", text)

    def test_out_naming_a_file_is_said_in_words(self):
        afile = os.path.join(self.tmp.root, "README.md")
        with open(afile, "w") as f:
            f.write("x")
        err = io.StringIO()
        with mock.patch("sys.stderr", err), self.assertRaises(SystemExit) as caught:
            client.main(["--port", "1", "--out", afile, "a.txt"])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("--out %s is a file, not a folder" % afile, err.getvalue())
        self.assertNotIn("Errno", err.getvalue())

    def test_a_record_that_cannot_be_written_leaves_the_previous_one(self):
        part = PartialFile(self.tmp.downloads, "x.bin")
        self.addCleanup(part.release)
        part.size, part.version = 20, "v1"
        part.write(0, b"0123456789")
        part.keep(0, 10, zlib.crc32(b"0123456789", crc_start(0)))
        part.save()
        with open(part.record_path, "rb") as f:
            before = f.read()
        part.write(10, b"abcdefghij")
        part.keep(10, 20, zlib.crc32(b"abcdefghij", crc_start(10)))
        real_fsync = os.fsync
        calls = []

        def full_disk(fd):
            calls.append(fd)
            if len(calls) == 2:                    # the new record's own fsync: disk full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        with mock.patch("os.fsync", full_disk):
            part.save()
        with open(part.record_path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertFalse(os.path.exists(part.record_path + ".tmp"))


class SilentServerTest(EndToEndCase):
    """Item 9: a server that goes silent is said on the progress line, and the waiting is not
    counted as transfer time."""

    def test_waiting_is_said_and_not_counted(self):
        data = self.tmp.make_file("f.bin", 4 * 1024 * 1024, seed=5)
        st = self.start_server(support.fast_server_settings(client_silence=10.0,
                                                            max_retransmits=50, rto_max=0.2))
        proxy = self.start_proxy(st.address, seed=1)
        settings = support.fast_client_settings(limit_rate=4 * 1024 * 1024, idle_timeout=8.0,
                                                silence_note=0.5)
        stream = TtyStream()
        printer = client.Printer(stream=stream)
        results = []
        c = Client(st.address[0], proxy.address[1], settings, printer, self.tmp.downloads,
                   on_result=lambda job, error: results.append((job, error)))
        c.server = proxy.address
        self.addCleanup(c.close)
        target = PartialFile(self.tmp.downloads, "f.bin")
        self.addCleanup(target.release)
        c.add(Download("f.bin", target, c.s, None, None, "f.bin", printer.line,
                       printer.detail, c.server))

        def go_silent():
            time.sleep(0.3)
            proxy.to_client = Impairment(drop=1.0)
            proxy.to_server = Impairment(drop=1.0)
            time.sleep(1.5)
            proxy.to_client = Impairment()
            proxy.to_server = Impairment()

        threading.Thread(target=go_silent, daemon=True).start()
        started = time.monotonic()
        c.run()
        wall = time.monotonic() - started
        (job, error), = results
        self.assertIsNone(error)
        self.assertEqual(self.tmp.downloaded("f.bin"), data)
        self.assertIn("waiting for the server", stream.getvalue())
        self.assertLess(job.seconds(), wall - 1.0, "the silence counted as transfer time")


class HelpAndReadmeTest(unittest.TestCase):
    """Item 10: --help and the README say the same; small words right."""

    def usage(self, script):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text = f.read()
        m = re.search(r"```\npython3 %s (.*?)```" % re.escape(script), text, re.S)
        return " ".join(m.group(1).split())

    def help_text(self, parser):
        return " ".join(parser.format_help().split())

    def test_every_option_of_the_readme_is_in_help_as_written(self):
        for script, parser in (("client.py", client.build_parser()),
                               ("server.py", server.build_parser())):
            usage, helps = self.usage(script), self.help_text(parser)
            options = re.findall(r"\[(-[-a-z]+(?: [A-Z][A-Z|a-z]*)?)", usage)
            self.assertGreater(len(options), 4, script)
            for option in options:
                with self.subTest(script=script, option=option):
                    self.assertIn(option, helps)
            self.assertIn("exit status:", helps)

    def test_the_readme_names_every_test_file(self):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text = f.read()
        for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
            if name.startswith("test_") and name.endswith(".py"):
                with self.subTest(name=name):
                    self.assertTrue(name in text, "the README does not name %s" % name)

    def test_one_file_is_one_file(self):
        app = client.App.__new__(client.App)
        app.results = [{"result": "ok", "bytes": 5}]
        app.started = time.monotonic()
        self.assertRegex(app.summary(), r"^done: 1 file, 0 failed")

    def test_the_server_says_a_file_is_not_a_folder(self):
        err = io.StringIO()
        with mock.patch("sys.stderr", err):
            code = server.main(["--dir", os.path.join(ROOT, "README.md"), "--port", "0"])
        self.assertEqual(code, 2)
        self.assertIn("README.md is a file, not a folder", err.getvalue())


class DamagedKeptBytesTest(EndToEndCase):
    """Also from issue 20: kept bytes are checked against their CRC when resuming; a mismatch
    fetches that range again (and says so)."""

    def test_a_changed_byte_of_a_kept_range_is_fetched_again(self):
        data = self.tmp.make_file("f.bin", 300000, seed=7)
        st = self.start_server()
        # What an interrupted run leaves: the size and version the server sends (SIZE), the
        # first 100,000 bytes kept with their CRC.
        part = PartialFile(self.tmp.downloads, "f.bin")
        part.size = len(data)
        part.version = file_version(os.stat(os.path.join(self.tmp.files, "f.bin")))
        part.write(0, data[:100000])
        part.keep(0, 100000, zlib.crc32(data[:100000], crc_start(0)))
        part.save()
        part.release()
        with open(part.part_path, "r+b") as f:     # one byte changes on disk
            f.seek(4321)
            f.write(bytes([data[4321] ^ 0x20]))
        again = PartialFile(self.tmp.downloads, "f.bin")
        self.assertEqual(again.damaged, [(0, 100000)])
        self.assertEqual(again.resumed, 0)
        again.release()
        lines = io.StringIO()
        code, out, _ = self.run_main(["--host", st.address[0], "--port", str(st.address[1]),
                                      "--out", self.tmp.downloads, "f.bin"])
        self.assertEqual(code, 0, out)
        self.assertIn("do not match their checksum", out)
        self.assertEqual(self.tmp.downloaded("f.bin"), data)
        del lines
