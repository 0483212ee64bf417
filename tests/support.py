"""Shared fixtures for the tests: a real server in a thread, a quiet client, fast timers.

Everything binds port 0 on loopback and lives in temporary folders; every wait is bounded.
"""

import contextlib
import io
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time

import client
import config
import server
from udpxfer.fetch import Client
from udpxfer.folder import Folder
from udpxfer.partial import PartialFile

# The server logs to "udpxfer"; tests check behaviour, not log lines, so keep the output clean
# (set UDPXFER_TEST_LOG=DEBUG to see them).
_level = os.environ.get("UDPXFER_TEST_LOG")
logging.getLogger("udpxfer").addHandler(logging.NullHandler())
logging.getLogger("udpxfer").propagate = bool(_level)
if _level:
    logging.basicConfig(level=_level)


def fast_server_settings(**overrides):
    """Server timers scaled down so failure paths finish in a test's time."""
    values = dict(rto_initial=0.05, rto_max=0.4, max_retransmits=8,
                  pending_keep=0.75)   # 0.05 + 0.1 + 0.2 + 0.4, as 3.75 s is for the defaults
    values.update(overrides)
    return config.ServerSettings(**values)


def fast_client_settings(**overrides):
    values = dict(request_timeout=0.05, request_timeout_max=0.3, idle_timeout=1.0,
                  retry_initial=0.05, retry_max=0.3, give_up=15.0, watch_give_up=15.0,
                  record_interval=0.2)
    values.update(overrides)
    return config.ClientSettings(**values)


def wait_for(predicate, timeout=2.0, interval=0.01):
    """Poll predicate until it is true or `timeout` seconds have passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class ServerThread:
    """server.Server on 127.0.0.1:0 serving `files_dir`, run by serve_forever in a thread."""

    def __init__(self, files_dir, settings=None, host="127.0.0.1", list_path=None, port=0):
        self.files_dir = files_dir
        self.folder = Folder(files_dir, list_path, settings)
        self.server = server.Server(self.folder, host, port, settings or fast_server_settings())
        self.address = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.thread.join(5)
        assert not self.thread.is_alive(), "server thread did not stop"
        self.server.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class TempDirs:
    """A temporary folder with files/ and downloads/ inside; removed by cleanup()."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="udpxfer-test-")
        self.files = os.path.join(self.root, "files")
        self.downloads = os.path.join(self.root, "downloads")
        os.mkdir(self.files)
        os.mkdir(self.downloads)

    def make_file(self, name, size=None, data=None, seed=0):
        """Write a file into files/: given bytes, or `size` seeded random bytes."""
        if data is None:
            data = random.Random(seed).getrandbits(8 * size).to_bytes(size, "little") \
                if size else b""
        path = os.path.join(self.files, name)
        with open(path, "wb") as f:
            f.write(data)
        return data

    def folder(self, name):
        """A new empty folder inside the temporary one (another client's downloads)."""
        path = os.path.join(self.root, name)
        os.mkdir(path)
        return path

    def downloaded(self, name):
        with open(os.path.join(self.downloads, name), "rb") as f:
            return f.read()

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


def split_tag(datagram):
    """A datagram as (its lane tag, the message after it): (b"#7 ", b"ACK 0 ..."), or
    (b"", datagram) untagged. For impairment hooks that look at the message, lanes or not."""
    datagram = bytes(datagram)
    if datagram[:1] == b"#" and b" " in datagram[:12]:
        cut = datagram.index(b" ") + 1
        return datagram[:cut], datagram[cut:]
    return b"", datagram


def ipv6_loopback():
    """Whether this machine can bind ::1 (IPv6 tests are skipped where it cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def make_client(address, out_dir, settings=None):
    """A Client (udpxfer/fetch.py) that prints nothing."""
    printer = client.Printer(quiet=True, stream=io.StringIO())
    return Client(address[0], address[1], settings or fast_client_settings(), printer, out_dir)


def download(address, name, out_dir, parts=1, settings=None, size_hint=None):
    """Download one name into out_dir, as `client.py NAME` does. Raises Failure."""
    c = make_client(address, out_dir, settings)
    target = PartialFile(out_dir, name)
    try:
        c.fetch(name, target, parts, size_hint)
    finally:
        target.release()
        c.close()
    return c


@contextlib.contextmanager
def served(tmp, settings=None, **kw):
    with ServerThread(tmp.files, settings, **kw) as st:
        yield st
