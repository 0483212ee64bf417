#!/usr/bin/env python3
"""Benchmark of the UDP file-transfer tool: `python3 tests/bench.py [--quick]`, from the project.

Not a unittest. It prints one row per loopback scenario, a side-by-side table per path scenario,
then the targets, each marked PASS, MISS or SKIP (not measurable here).

How it measures
- The server runs in a child process (server.Server on 127.0.0.1:0, default ServerSettings) and
  the client in another (udpxfer.fetch.Client(...).fetch(), default ClientSettings but for the
  parts, which each row names: 1, 4, or "default": 0 = automatic, the lane controller, the
  default of client.py), so the two sides use the two cores as they do in real use. Children
  are this script run with --child-*; they talk JSON lines over stdout and are told to start
  over stdin, so interpreter start-up is never timed. The impairment proxy (tests/impair.py),
  when used, runs in a thread of this process.
- seconds: the client's wall time around fetch(), from its request until the file has its real
  name (the final fsync and rename included). MB/s uses 1 MB = 10^6 bytes.
- sent / retx: datagrams the server's dispatcher handed to the socket, and the sum of its
  transfers' retransmissions (ServerTransfer.retransmissions, summed when each transfer ends;
  the notes say how many were early ones). Where nothing is lost (loopback without the lossy
  proxy, paths A and B), the targets add them up over every run, against the issue's limit of
  0.2% of what the server sent.
- srvRSS / cliRSS: peak resident memory of each child in MB (10^6 bytes). On Linux VmHWM from
  /proc/self/status, because ru_maxrss there keeps the parent's peak across fork+exec; elsewhere
  getrusage(RUSAGE_SELF).ru_maxrss (bytes on macOS); n/a where `resource` is missing (Windows).
- CPU per datagram (1-part row, and in the targets' notes): each child's process_time() over the
  transfer divided by the datagrams the server sent (the client receives about as many).
- Baselines, same file, same run: shutil.copyfile, and a bare stop-and-wait floor: one child
  sends datagrams of ServerSettings().datagram_size bytes of the file (read with readinto into
  one preallocated buffer) and waits for a 1-byte ACK after each; the other receives with
  recv_into, ACKs, writes. No header, CRC, fsync or state machine.
  vs floor = MB/s / floor MB/s, for the rows that run directly over loopback.
  As root with atftp and tftp-hpa installed, also atftp (--option "blksize 65464") against
  in.tftpd on loopback (target F); otherwise that row is skipped with a note.
- Runs are repeated (--repeat, default 3): the floor, 1 part, 4 parts, default (automatic parts)
  and atftp (interleaved), one client alone and 20 clients show the best run; the proxy runs,
  lossless and 5% loss (each lossy run with its own seed), the median one. The notes list every
  run. Scenario 4 (10 ms round trip through the proxy, 32 MiB, 1 part and default) runs once.
- Every download is compared with its source by SHA-256; a mismatch stops the run (exit 1).

Path scenarios A-D (root only; --paths-only runs only them, --no-paths skips them)
- A real two-host path: two network namespaces joined by a veth pair with MTU 1500, 198.18.7.1
  (server) and 198.18.7.2 (client), from the benchmarking range 198.18.0.0/15: they exist only
  inside the namespaces, which are deleted at the end (also on Ctrl-C or SIGTERM). Segmentation
  offloads are off (ethtool -K tso/gso/gro off: TCP crosses as MTU-sized packets, as on a
  wire); loss is per packet at each end's netdev ingress (nftables numgen random), so a lost IP
  fragment loses its whole datagram; B limits each end's egress with htb (1gbit, burst 256k;
  its ceil bucket is tc's default unless --path-cburst sets it: that default holds less than one
  1514-byte frame, so each wait for the qdisc's timer loses time, which costs a burst of IP
  fragments far more than TCP's spaced packets).
  A: no loss, 64 MiB; B: 1 Gbit/s, 64 MiB; C: 1% loss each way, 32 MiB; D: 5%, 16 MiB.
- Tools, side by side on the same random file, run after run (--path-runs, default 3, median
  shown; a failed run counts as 0 MB/s): ours with default settings (client.py ... -q f.bin,
  automatic parts) and with --parts 1, each against a fresh server child in the server
  namespace; atftp against tftp-hpa (in.tftpd -B 65464); HTTP over TCP (python3 -m http.server
  and curl). Every run gets a path of its own, built anew: on one path for all, the orphans of
  one run's lost fragments (30 s in the client's reassembly buffer; atftp's 45-fragment blocks
  fill it at 1% loss) would slow the next tool's run. Each time is the wall time of the client
  command run with `ip netns exec`: process start-up included (for ours that of Python,
  printed as a note). Client CPU comes from getrusage(RUSAGE_CHILDREN); for ours also server
  and client CPU per datagram the server sent (the server's time in the kernel in brackets:
  with B's rate limit it holds the qdisc's work).
- Each download is compared with its source byte for byte; a timeout (--path-timeout, default
  60 s), an error exit or a mismatch is shown as "fails (...)" and that tool is not run again in
  that path after a timeout. Our client exiting 0 with wrong bytes makes the exit status 1.
- Skipped with one line when not root, when ip/nft/tc/ethtool are missing; the atftp column when
  atftp or in.tftpd are missing, the HTTP column without curl. Nothing is ever installed.

Long paths L1-L4 (root only; --long-only runs only them; skipped by --no-paths)
- The same two namespaces, with a long path's parts: the server's egress rate-limited (htb, ceil
  bucket 256k) in front of a pfifo queue of 1,000 or 200 packets, and a round trip added to the
  client's outgoing packets (requests and ACKs of every tool): by netem where the kernel has it,
  else by a TUN device whose reader, this script run with --child-delay, hands every packet back
  that much later (it takes CPU from the tools on a two-core machine: about 8,000 TCP ACKs a
  second at 200 Mbit/s). TCP's congestion control is set in both namespaces per run (BBR, Reno).
  A new path, and a new server, for every run.
  L1: 200 Mbit/s, +50 ms, 64 MiB: ours, HTTP with BBR, HTTP with Reno. L2: the same at 1% loss.
  L3: 200 files of 20 KiB, 200 Mbit/s, +20 ms: ours (--once over a list), curl 16 at once, curl
  one at a time. L4: 100 Mbit/s, +20 ms, 200-packet queue: a long TCP download (curl of a
  sparse 4 GiB file) runs for 3 s, its rate alone is taken over the next 2 s, then ours fetches
  32 MiB beside it: what TCP kept of its rate, and our share of the two, with Reno and with BBR.
  Ours runs with --json: the table shows the most lanes each file ran.
Everything lives in one tempfile.mkdtemp() folder, removed at the end; children are killed on exit.
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import config  # noqa: E402

SCRIPT = os.path.abspath(__file__)
MB = 1e6
MiB = 1024 * 1024
GiB = 1024 * MiB
LOOPBACK = "127.0.0.1"
SOCK_BUF = 4 * 1024 * 1024


class BenchError(Exception):
    """Something went wrong that makes the numbers meaningless: stop loudly."""


# --- Used by every process ------------------------------------------------------------------

def peak_rss_mb():
    """Peak RSS of this process in MB (10^6 bytes), or None where it cannot be known."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / MB
        except (OSError, ValueError, IndexError):
            pass
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r * 1024 / MB


def kernel_seconds():
    """CPU time this process has spent in the kernel (getrusage: microseconds, where os.times()
    counts clock ticks)."""
    try:
        import resource
    except ImportError:
        return os.times().system
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go():
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit("child: expected 'go', got %r" % line)


def sha256_file(path):
    h = hashlib.sha256()
    buf = bytearray(1024 * 1024)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


# --- Child: server --------------------------------------------------------------------------

def child_server(folder_path, host=LOOPBACK):
    """server.Server on host:0 (127.0.0.1, or the server address of a path scenario); counts
    what its dispatcher sends and its transfers' retransmissions; stops on 'stop' (or EOF) on
    stdin and prints its stats."""
    import logging

    import server
    from udpxfer.folder import Folder

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="server %(levelname)s %(message)s")
    settings = config.ServerSettings()
    folder = Folder(folder_path, None, settings)
    srv = server.Server(folder, host, 0, settings)
    d = srv.dispatcher
    c = {"datagrams": 0, "bytes": 0, "retransmissions": 0, "early": 0, "payload_bytes": 0,
         "shrinks": 0, "transfers": 0, "outcomes": {}}

    def count(t):
        if getattr(t, "_bench_counted", False):
            return
        t._bench_counted = True
        c["transfers"] += 1
        c["retransmissions"] += t.retransmissions
        c["early"] += t.early_retransmissions
        c["payload_bytes"] += t.bytes_sent
        c["shrinks"] += t.shrinks
        outcome = t.outcome or "unfinished"
        c["outcomes"][outcome] = c["outcomes"].get(outcome, 0) + 1

    to_send = d.datagrams_to_send

    def datagrams_to_send():
        out = to_send()
        c["datagrams"] += len(out)
        for datagram, _ in out:
            for piece in datagram:
                c["bytes"] += len(piece)
        return out

    forget = d._forget

    def _forget(t, now):
        forget(t, now)
        count(t)

    close = d.close

    def close_all():
        left = list(d.active.values()) + list(d.pending.values())
        close()
        for t in left:
            count(t)

    d.datagrams_to_send, d._forget, d.close = datagrams_to_send, _forget, close_all

    def watch_stdin():
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        srv.shutdown()

    emit({"port": srv.server_address[1]})
    cpu0, sys0 = time.process_time(), kernel_seconds()
    threading.Thread(target=watch_stdin, daemon=True).start()
    srv.serve_forever()
    srv.close()
    emit({"server": c, "dispatcher": d.stats, "send_errors": srv.send_errors,
          "rss_mb": peak_rss_mb(), "cpu": time.process_time() - cpu0,
          "cpu_sys": kernel_seconds() - sys0})
    return 0


# --- Child: client(s) -----------------------------------------------------------------------

def child_client(spec_text):
    """Runs the jobs of the spec (one thread each when there are several), all started at once
    on 'go'. A job downloads one name with Client.fetch, or fetches the listing."""
    import client
    from udpxfer.fetch import Client
    from udpxfer.partial import PartialFile
    from udpxfer.wire import format_listing

    spec = json.loads(spec_text)
    prepared = []
    for job in spec["jobs"]:
        # Default settings, automatic parts (0) included, unless the job names its parts.
        settings = config.ClientSettings(parts=job.get("parts", config.ClientSettings().parts))
        printer = client.Printer(quiet=True, stream=sys.stderr)
        c = Client(spec["host"], spec["port"], settings, printer, job.get("out_dir"))
        target = PartialFile(job["out_dir"], job["name"]) if job.get("name") else None
        if target is not None:
            _time_calls(target, ("save", "finish"))
        prepared.append((job, c, target, settings))
    results = [None] * len(prepared)

    def run(i):
        job, c, target, settings = prepared[i]
        t0w, t0 = time.time(), time.perf_counter()
        try:
            if job.get("listing"):
                times = []
                for pause in job["pauses"]:
                    time.sleep(pause)
                    a = time.perf_counter()
                    entries = c.listing()
                    times.append(time.perf_counter() - a)
                data = format_listing(entries)
                results[i] = {"ok": True, "times": times, "count": len(entries),
                              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                return
            fetch_s = c.fetch(job["name"], target, settings.parts, job.get("size_hint"))
            t1 = time.perf_counter()
            final = os.path.join(job["out_dir"], job["name"])
            results[i] = {"ok": True, "seconds": t1 - t0, "fetch_seconds": fetch_s,
                          "bytes": os.path.getsize(final), "start": t0w, "end": t0w + (t1 - t0),
                          "stats": c.stats, "spent": target.bench_spent}
        except BaseException as exc:   # reported to the parent, which fails loudly
            results[i] = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}

    emit({"ready": True})
    wait_go()
    cpu0 = time.process_time()
    if len(prepared) == 1:
        run(0)
    else:
        threads = [threading.Thread(target=run, args=(i,), daemon=True)
                   for i in range(len(prepared))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    emit({"results": results, "rss_mb": peak_rss_mb(), "cpu": time.process_time() - cpu0})
    return 0


def _time_calls(obj, names):
    """Wrap methods of one object to add up the seconds spent in each (obj.bench_spent)."""
    obj.bench_spent = {}
    for name in names:
        def timed(*a, _f=getattr(obj, name), _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                spent = obj.bench_spent
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0
                if _name == "save":
                    spent["save_max"] = max(spent.get("save_max", 0.0),
                                            time.perf_counter() - t0)
        setattr(obj, name, timed)


# --- Children: the bare stop-and-wait floor -------------------------------------------------

def _floor_socket(rcvbuf):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt, size in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, SOCK_BUF)):
        try:   # as the server does (macOS caps a datagram at SO_SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass
    return sock


def child_floor_send(path, datagram_size):
    """Waits for one request datagram, then: readinto, send, wait for the ACK; to the end."""
    sock = _floor_socket(SOCK_BUF)
    sock.bind((LOOPBACK, 0))
    emit({"port": sock.getsockname()[1]})
    sock.settimeout(60)
    _, addr = sock.recvfrom(64)
    sock.connect(addr)
    sock.settimeout(5)
    buf = bytearray(datagram_size)
    view = memoryview(buf)
    ack = bytearray(64)
    sent = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sock.send(view[:n])
            sent += 1
            sock.recv_into(ack)   # socket.timeout ends the child: the parent fails loudly
    emit({"datagrams": sent, "seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb(),
          "cpu": time.process_time()})
    return 0


def child_floor_recv(path, size, port):
    """On 'go': one request datagram, then recv_into, ACK, write; until `size` bytes."""
    sock = _floor_socket(1024 * 1024)   # the client's receive buffer
    sock.connect((LOOPBACK, port))
    sock.settimeout(10)
    buf = bytearray(65536)
    view = memoryview(buf)
    got = 0
    with open(path, "wb", buffering=0) as f:
        emit({"ready": True})
        wait_go()
        t0 = time.perf_counter()
        sock.send(b"GO")
        while got < size:
            n = sock.recv_into(buf)
            sock.send(b"A")
            chunk = view[:n]
            while chunk:
                chunk = chunk[f.write(chunk):]
            got += n
    seconds = time.perf_counter() - t0
    emit({"seconds": seconds, "bytes": got, "rss_mb": peak_rss_mb(), "cpu": time.process_time()})
    return 0


# --- Parent: children -----------------------------------------------------------------------
# queue, signal, subprocess and tempfile are imported by main() for the parent only: every module
# a child imports adds to the peak RSS it reports.
queue = signal = subprocess = tempfile = None

class _Live:
    """Instances still running are in the subclass's `live` list; kill_all() kills them (on
    Ctrl-C and at the end: Bench.cleanup)."""

    @classmethod
    def kill_all(cls):
        for obj in list(cls.live):
            obj.kill()


class Child(_Live):
    """A child process of this script; JSON lines from its stdout, read by a thread so that
    every wait has a timeout."""

    live = []
    _n = 0

    def __init__(self, tag, args, log_dir, prefix=()):
        Child._n += 1
        self.tag = tag
        self.err_path = os.path.join(log_dir, "%03d-%s.stderr" % (Child._n, tag))
        self._err = open(self.err_path, "wb")
        self.p = subprocess.Popen(list(prefix) + [sys.executable, SCRIPT] + args, cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._err, universal_newlines=True, bufsize=1)
        Child.live.append(self)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in self.p.stdout:
                self.q.put(line)
        except (OSError, ValueError):
            pass
        self.q.put(None)

    def recv(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("%s: nothing within %.0f s%s" % (self.tag, timeout, self.tail()))
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.p.wait(5)
                raise BenchError("%s exited with code %s%s" % (self.tag, self.p.returncode,
                                                               self.tail()))
            try:
                return json.loads(line)
            except ValueError:
                continue   # not ours: ignore

    def send(self, text):
        try:
            self.p.stdin.write(text + "\n")
            self.p.stdin.flush()
        except OSError:
            pass   # it died: recv() says so

    def tail(self, n=1500):
        try:
            if not self._err.closed:
                self._err.flush()
            with open(self.err_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return ("\n--- %s stderr ---\n%s" % (self.tag, text[-n:])) if text.strip() else ""

    def log_lines(self):
        if not self._err.closed:
            self._err.flush()
        try:
            with open(self.err_path, "rb") as f:
                return [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln]
        except OSError:
            return []

    def finish(self, timeout=10):
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError("%s did not exit%s" % (self.tag, self.tail()))
        self._close()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._close()

    def _close(self):
        for stream in (self.p.stdin, self.p.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        self._err.close()
        if self in Child.live:
            Child.live.remove(self)



# --- Parent: formatting ---------------------------------------------------------------------

def fmt_mb(v):
    return "n/a" if v is None else "%.1f" % v


def fmt_ratio(v):
    return "" if v is None else "%.2f" % v


def human(n):
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return ("%d %s" % (v, unit)) if v == int(v) else ("%.1f %s" % (v, unit))
    return "%d B" % n


def load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):   # Windows
        return None


PRODUCT_FILES = ("server.py", "client.py", "config.py", "udpxfer")


def product_sources():
    """The product's source files: the three scripts and the engine package."""
    names = [n for n in PRODUCT_FILES if n.endswith(".py")]
    try:
        package = os.listdir(os.path.join(ROOT, "udpxfer"))
        names += sorted(os.path.join("udpxfer", n) for n in package if n.endswith(".py"))
    except OSError:
        pass
    return names


def product_fingerprint():
    """SHA-256 of the product's source files: a change during the run mixes versions."""
    h = hashlib.sha256()
    for name in product_sources():
        try:
            with open(os.path.join(ROOT, name), "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    return h.hexdigest()


def source_version():
    """The git commit of the project, '+dirty' if the product files differ from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              universal_newlines=True, timeout=5)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--"]
                               + list(PRODUCT_FILES), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, universal_newlines=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


def make_check(name, value, op, limit, detail=""):
    """One target line: (name, value, target, PASS/MISS/SKIP, detail); value None: SKIP."""
    if value is None:
        return (name, "n/a", "%s %s" % (op, limit), "SKIP", detail)
    ok = {">=": value >= limit, ">": value > limit, "<=": value <= limit,
          "<": value < limit}[op]
    if not ok:
        miss = abs(value - limit) / limit * 100
        detail = ("%.0f%% short" % miss if op in (">=", ">") else "%.0f%% over" % miss) \
            + ("; " + detail if detail else "")
    return (name, "%.2f" % value, "%s %s" % (op, limit), "PASS" if ok else "MISS", detail)


def print_checks(checks, indent="  "):
    if not checks:
        return
    w = max(len(c[0]) for c in checks)
    for name, value, target, verdict, detail in checks:
        print("%s%-*s  %7s  (target %-6s)  %s%s" % (indent, w, name, value, target, verdict,
                                                  "  " + detail if detail else ""))


# --- Parent: a two-host path in network namespaces (root only) --------------------------------
# Addresses of the benchmarking range 198.18.0.0/15 (RFC 2544): they exist only inside the two
# namespaces this script makes and deletes.
PATH_SRV, PATH_CLI = "198.18.7.1", "198.18.7.2"
HTTP_PORT, TFTP_PORT = 8080, 6969
TFTP_BLKSIZE = 65464                 # the largest TFTP block (RFC 2348): datagrams as big as ours
TFTPD_CANDIDATES = ("/usr/sbin/in.tftpd",)
ATFTP_HINT = "atftp not installed (apt-get install atftp tftpd-hpa)"
# Path scenarios: (key, title, loss % per packet at each end's ingress, egress rate, MiB).
PATH_SCENARIOS = (
    ("A", "MTU 1500, no loss", 0.0, None, 64),
    ("B", "MTU 1500, 1 Gbit/s each way", 0.0, "1gbit", 64),
    ("C", "MTU 1500, 1% loss each way", 1.0, None, 32),
    ("D", "MTU 1500, 5% loss each way", 5.0, None, 16),
)
# Targets: path key -> [(ours default / which tool, at least)].
PATH_TARGETS = {"A": [("atftp", 0.8), ("http", 0.4)], "B": [("http", 0.85)],
                "C": [("http", 0.25)], "D": [("http", 0.25)]}
PATH_TOOLS = (("ours", "ours (auto)"), ("ours1", "ours --parts 1"),
              ("atftp", "atftp+tftp-hpa"), ("http", "HTTP (curl)"))
# Long paths (L1-L4): (key, title, loss %, egress rate, queue in packets, added round trip in
# ms, MiB or (files, KiB each)). Each with --cburst 256k: tc's default ceiling bucket is one frame.
LONG_SCENARIOS = (
    ("L1", "200 Mbit/s, +50 ms, 1,000-packet queue", 0.0, "200mbit", 1000, 50, 64),
    ("L2", "200 Mbit/s, +50 ms, 1,000-packet queue, 1% loss each way", 1.0, "200mbit", 1000,
     50, 64),
    ("L3", "200 files of 20 KiB, 200 Mbit/s, +20 ms", 0.0, "200mbit", 1000, 20, (200, 20)),
    ("L4", "100 Mbit/s, +20 ms, 200-packet queue, beside one long TCP download", 0.0,
     "100mbit", 200, 20, 32),
)
LONG_TOOLS = {"L1": ("ours", "http-bbr", "http-reno"), "L2": ("ours", "http-bbr", "http-reno"),
              "L3": ("ours", "curl16-bbr", "curl1-bbr"), "L4": ("tcp-reno", "tcp-bbr")}
LONG_NAMES = {"ours": "ours (auto)", "http-bbr": "HTTP, TCP BBR", "http-reno": "HTTP, TCP Reno",
              "curl16-bbr": "HTTP, 16 at once (BBR)", "curl1-bbr": "HTTP, one at a time (BBR)",
              "tcp-reno": "ours beside TCP Reno", "tcp-bbr": "ours beside TCP BBR"}


def run_cmd(args, timeout=30, input=None):
    """A short command, bounded: (exit code or None, output). Never raises."""
    try:
        r = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=timeout)
        return r.returncode, r.stdout
    except subprocess.TimeoutExpired:
        return None, "no answer within %s s" % timeout
    except OSError as exc:
        return None, str(exc)


class Spawned(_Live):
    """A background process (in.tftpd, http.server) in its own session, so that killing its
    process group also kills what it forked. Every live one is killed by Bench.cleanup()."""

    live = []

    def __init__(self, args, log_path):
        with open(log_path, "ab") as log:
            self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        Spawned.live.append(self)

    def kill(self):
        kill_group(self.p)
        if self in Spawned.live:
            Spawned.live.remove(self)


def kill_group(p):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass


def timed_command(args, timeout, log_path):
    """Runs one download command; (exit code, or None on timeout; wall seconds; CPU seconds of
    the command and what it waited for). Where the OS has wait4() the wait blocks in it and ends
    the moment the command exits: Popen.wait(timeout) polls, every 50 ms once 0.1 s have passed,
    and so rounded every time up to the next poll (0.164, 0.214, 0.264 s, ...)."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "ab") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        if not hasattr(os, "wait4"):
            try:
                rc = p.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
            except BaseException:   # Ctrl-C: do not leave it running
                kill_group(p)
                raise
            seconds = time.perf_counter() - t0
            kill_group(p)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            return rc, seconds, ((after.ru_utime + after.ru_stime)
                                 - (before.ru_utime + before.ru_stime))
        expired = threading.Event()

        def expire():
            expired.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:   # Ctrl-C: do not leave it running
            timer.cancel()
            kill_group(p)
            raise
        seconds = time.perf_counter() - t0
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    return (None if expired.is_set() else p.returncode), seconds, usage.ru_utime + usage.ru_stime


def compare_files(src, dst):
    """None if dst has the very bytes of src; else what is wrong."""
    if not os.path.isfile(dst):
        return "no file"
    a, b = os.path.getsize(src), os.path.getsize(dst)
    if a != b:
        return "size %d, expected %d" % (b, a)
    with open(src, "rb") as f, open(dst, "rb") as g:
        offset = 0
        while True:
            x, y = f.read(MiB), g.read(MiB)
            if x != y:
                at = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
                return "differs from byte %d" % (offset + at)
            if not x:
                return None
            offset += len(x)


def wait_listening(prefix, proto, port, timeout=10.0):
    """Until something listens on port (`ss` run with prefix); False if not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, out = run_cmd(list(prefix) + ["ss", "-Hln" + proto, "sport = :%d" % port], 5)
        if rc is None or rc != 0:   # no ss: give it a moment
            time.sleep(1.0)
            return True
        if out.strip():
            return True
        time.sleep(0.05)
    return False


def atftp_missing():
    """Why atftp against tftp-hpa cannot run here, or None."""
    if shutil.which("atftp") is None or tftpd_path() is None:
        return ATFTP_HINT
    return None


def tftpd_path():
    found = shutil.which("in.tftpd")
    if found:
        return found
    return next((p for p in TFTPD_CANDIDATES if os.access(p, os.X_OK)), None)


PATH_MACS = ("02:00:c6:12:07:01", "02:00:c6:12:07:02")   # locally administered, per side


class NetPath:
    """Two network namespaces (server, client) joined by a veth pair with the given MTU;
    segmentation offloads off (TCP crosses as MTU-sized packets, as on a wire: otherwise a
    dropped "packet" would be a 64 KB super-packet); per-packet random loss at each end's
    netdev ingress (nftables), so a lost IP fragment loses its whole datagram, as on a real
    network; optional htb egress rate limit at each end; fixed MAC addresses and permanent
    neighbour entries, so no run waits for ARP (lost like any packet here). close() deletes
    both namespaces."""

    def __init__(self, tag, mtu, loss, rate, cburst=None):
        self.ns = ("ubS%s" % tag, "ubC%s" % tag)
        self.cburst = cburst
        self.devs = ("ubs%s" % tag, "ubc%s" % tag)
        self.made = []
        try:
            self._setup(mtu, loss, rate)
        except BaseException:
            self.close()
            raise

    def prefix(self, side):
        return ["ip", "netns", "exec", self.ns[side]]

    def _must(self, args, input=None):
        rc, out = run_cmd(args, input=input)
        if rc != 0:
            raise BenchError("path setup failed: %s: %s" % (" ".join(args), out.strip()))

    def _setup(self, mtu, loss, rate):
        for ns in self.ns:
            self._must(["ip", "netns", "add", ns])
            self.made.append(ns)
        self._must(["ip", "link", "add", self.devs[0], "netns", self.ns[0], "type", "veth",
                    "peer", "name", self.devs[1], "netns", self.ns[1]])
        for side, addr in ((0, PATH_SRV), (1, PATH_CLI)):
            ns, dev, ex = self.ns[side], self.devs[side], self.prefix(side)
            self._must(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._must(["ip", "-n", ns, "link", "set", dev, "address", PATH_MACS[side]])
            self._must(["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu), "up"])
            self._must(["ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev])
            # A permanent neighbour entry: with packet loss, ARP itself gets lost and costs
            # whichever tool runs next a 1 s resolution retry, which would measure ARP.
            self._must(["ip", "-n", ns, "neigh", "add", (PATH_CLI, PATH_SRV)[side], "lladdr",
                        PATH_MACS[1 - side], "dev", dev, "nud", "permanent"])
            self._must(ex + ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"])
            if loss > 0:
                self._must(ex + ["nft", "-f", "-"], input=(
                    "table netdev udpxfer_bench {\n chain c {\n  type filter hook ingress device"
                    " %s priority 0; policy accept;\n  numgen random mod 100000 < %d counter "
                    "drop\n }\n}\n" % (dev, round(loss * 1000))))
            if rate:
                self._must(ex + ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                                 "default", "1"])
                self._must(ex + ["tc", "class", "add", "dev", dev, "parent", "1:", "classid",
                                 "1:1", "htb", "rate", rate, "burst", "256k"]
                           + (["cburst", self.cburst] if self.cburst else []))

    def dropped(self):
        """Packets the nftables rules dropped, (at the server, at the client)."""
        out = []
        for side in (0, 1):
            _, text = run_cmd(self.prefix(side) + ["nft", "list", "ruleset"], 10)
            out.append(sum(int(t.split()[0]) for t in text.split("packets ")[1:]
                           if t.split() and t.split()[0].isdigit()))
        return tuple(out)

    def close(self):
        for ns in self.made:
            run_cmd(["ip", "netns", "del", ns], 30)
        self.made = []



def child_delay(name, delay_us, mtu):
    """The round trip of a long path, where the kernel has no netem: a TUN device whose every
    packet is written back to it delay_us later, in order (the client namespace routes its
    outgoing packets into it and forwards what comes back). Linux only (/dev/net/tun)."""
    import collections
    import fcntl
    import select
    import struct
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    tunsetiff, iff_tun, iff_no_pi = 0x400454ca, 0x0001, 0x1000
    fcntl.ioctl(fd, tunsetiff, struct.pack("16sH22x", name.encode(), iff_tun | iff_no_pi))
    print("ready", flush=True)
    delay, held = delay_us / 1e6, collections.deque()
    buf = max(mtu, 2048)
    while True:
        wait = max(held[0][0] - time.monotonic(), 0.0) if held else 1.0
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            now = time.monotonic()
            for _ in range(512):
                try:
                    packet = os.read(fd, buf)
                except BlockingIOError:
                    break
                if len(held) < 65536:   # (more waiting: dropped, as by a full queue)
                    held.append((now + delay, packet))
        now = time.monotonic()
        while held and held[0][0] <= now:
            try:
                os.write(fd, held.popleft()[1])
            except OSError:
                pass


class LongPath(NetPath):
    """A NetPath with a long path's parts: a bottleneck queue of `queue` packets (pfifo under
    the htb rate limit), an added round trip on the client's outgoing packets (requests and
    ACKs of every tool alike: netem where the kernel has it, else child_delay's TUN device,
    which costs CPU per packet in Python: about 8,000 TCP ACKs a second at 200 Mbit/s), and
    TCP's congestion control in both namespaces."""

    def __init__(self, tag, loss, rate, queue, rtt_ms, tcp_cc):
        self.delay = None
        self.netem = False     # the round trip by netem (where the kernel has it), not the TUN
        NetPath.__init__(self, tag, 1500, loss, rate, "256k")
        try:
            for side in (0, 1):
                ex, dev = self.prefix(side), self.devs[side]
                self._must(ex + ["sysctl", "-qw", "net.ipv4.tcp_congestion_control=" + tcp_cc])
                if side == 1 and rtt_ms:   # the client's egress: requests and ACKs
                    rc, _ = run_cmd(ex + ["tc", "qdisc", "add", "dev", dev, "parent", "1:1",
                                          "handle", "10:", "netem", "delay", "%gms" % rtt_ms,
                                          "limit", "100000"])
                    self.netem = rc == 0
                    if self.netem:
                        continue
                if queue:
                    self._must(ex + ["tc", "qdisc", "add", "dev", dev, "parent", "1:1",
                                     "handle", "10:", "pfifo", "limit", str(queue)])
            if rtt_ms and not self.netem:
                self._delay(tag, rtt_ms)
        except BaseException:
            self.close()
            raise

    def _delay(self, tag, rtt_ms):
        dev, ex, ns = "ubd%s" % tag, self.prefix(1), self.ns[1]
        self.delay = subprocess.Popen(ex + [sys.executable, SCRIPT, "--child-delay", dev,
                                            str(int(rtt_ms * 1000)), "1500"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        if self.delay.stdout.readline().strip() != b"ready":
            raise BenchError("path setup failed: the delay line did not start (no TUN?)")
        for key in ("ip_forward=1", "conf.all.rp_filter=0", "conf.%s.rp_filter=0" % dev,
                    "conf.%s.accept_local=1" % dev, "conf.%s.rp_filter=0" % self.devs[1]):
            self._must(ex + ["sysctl", "-qw", "net.ipv4." + key])
        self._must(["ip", "-n", ns, "link", "set", dev, "mtu", "1500", "up"])
        self._must(["ip", "-n", ns, "route", "add", PATH_SRV, "dev", dev, "table", "100"])
        self._must(["ip", "-n", ns, "rule", "add", "iif", "lo", "to", PATH_SRV, "lookup", "100",
                    "pref", "100"])

    def close(self):
        if self.delay is not None:
            kill_group(self.delay)
            self.delay.stdout.close()
            self.delay = None
        NetPath.close(self)


# --- Parent: the benchmark ------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        scale = 16 if args.quick else 1
        self.big_size = 256 * MiB // scale
        self.mid_size = 16 * MiB // scale
        self.each_size = 8 * MiB // scale
        self.clients = 20
        self.list_count = 5000 // scale
        self.sparse_size = 2 * GiB // scale
        self.rtt_size = 32 * MiB // scale
        self.repeat = args.repeat if args.repeat else (1 if args.quick else 3)
        # Path scenarios A-D: 8 MiB, 1 run and 10 s per download with --quick.
        self.path_runs = args.path_runs or (1 if args.quick else 3)
        self.path_timeout = args.path_timeout or (10.0 if args.quick else 60.0)
        self.path_size = args.path_size_mib * MiB if args.path_size_mib else (
            8 * MiB if args.quick else None)
        self.netpaths = []     # NetPath objects alive: closed by cleanup()
        self.path_checks = []  # target lines of the path scenarios
        self.mismatches = []   # our client said it succeeded with wrong bytes (exit status 1)
        self.datagram_size = config.ServerSettings().datagram_size
        self.root = tempfile.mkdtemp(prefix="udpxfer-bench-")
        self.logs = self._mkdir("logs")
        self.files = self._mkdir("files")
        self.rows = []
        self.r = {}            # results by key, for the targets
        self.hashes = {}
        self.floor_mbps = None
        self.warnings = []
        # Retransmissions on paths that lose nothing (the issue: at most 0.2% of what the
        # server sends), over every run: group -> [datagrams sent, retransmitted, runs].
        self.lossless = {}
        self.one_client = "loopback, 1 client (scenarios 1-3, 5)"   # one of its groups

    def _mkdir(self, name):
        path = os.path.join(self.root, name)
        os.mkdir(path)
        return path

    def tmpdir(self, prefix):
        return tempfile.mkdtemp(prefix=prefix, dir=self.root)

    def cleanup(self):
        Child.kill_all()
        Spawned.kill_all()
        for path in list(self.netpaths):
            path.close()   # the processes inside are dead: the veth pair goes with them
        self.netpaths = []
        shutil.rmtree(self.root, ignore_errors=True)

    # -- files

    def make_random(self, folder, name, size):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, MiB)
                f.write(os.urandom(n))
                left -= n
        self.hashes[path] = sha256_file(path)
        return path

    def verify(self, src, dst, what):
        if not os.path.isfile(dst):
            raise BenchError("%s: %s is missing" % (what, dst))
        if os.path.getsize(dst) != os.path.getsize(src):
            raise BenchError("%s: size %d, expected %d" % (what, os.path.getsize(dst),
                                                           os.path.getsize(src)))
        expected = self.hashes.get(src) or sha256_file(src)
        self.hashes[src] = expected
        got = sha256_file(dst)
        if got != expected:
            raise BenchError("%s: SHA-256 MISMATCH: %s is not %s" % (what, dst, src))

    # -- children

    def start_server(self, folder):
        srv = Child("server", ["--child-server", folder], self.logs)
        return srv, srv.recv(30)["port"]

    def stop_server(self, srv):
        srv.send("stop")
        stats = srv.recv(30)
        srv.finish()
        stats["log"] = srv.log_lines()
        return stats

    def run_clients(self, port, jobs, timeout, procs=False):
        """Start the jobs (one child, or one child per job), all at once; their results."""
        groups = [[j] for j in jobs] if procs else [jobs]
        children = []
        for i, group in enumerate(groups):
            spec = json.dumps({"host": LOOPBACK, "port": port, "jobs": group})
            children.append(Child("client%d" % i, ["--child-client", spec], self.logs))
        for child in children:
            child.recv(60)   # ready
        for child in children:
            child.send("go")
        results, rss, cpu = [], [], 0.0
        for child in children:
            msg = child.recv(timeout)
            child.finish()
            results += msg["results"]
            rss.append(msg["rss_mb"])
            cpu += msg["cpu"]
        for job, res in zip(jobs, results):
            if not res or not res.get("ok"):
                raise BenchError("client job %r failed: %s" % (job, res and res.get("error")))
        return results, max_or_none(rss), cpu

    def timeout_for(self, size):
        return 60 + size / 5e6

    # -- rows

    def add_row(self, key, label, nbytes, seconds, sent=None, retx=None, srv_rss=None,
                cli_rss=None, floor=False, notes=""):
        mbps = nbytes / seconds / MB if seconds else None
        row = {"key": key, "label": label, "bytes": nbytes, "seconds": seconds, "mbps": mbps,
               "sent": sent, "retx": retx, "srv_rss": srv_rss, "cli_rss": cli_rss,
               "floor": floor, "notes": notes}
        self.rows.append(row)
        self.r[key] = row
        if self.args.verbose:
            print("  %-34s %8.3f s %9.1f MB/s  %s" % (label, seconds, mbps or 0, notes),
                  flush=True)
        return row

    def count_lossless(self, group, runs):
        totals = self.lossless.setdefault(group, [0, 0, 0])
        for x in runs:
            if x.get("sent") and not x.get("fail"):
                totals[0] += x["sent"]
                totals[1] += x["retx"]
                totals[2] += 1

    def summarize(self, key, label, runs, pick, floor=False, what=""):
        """One row for several runs of a scenario: the best or the median one (by seconds);
        the notes list every run's MB/s. Peak RSS is the highest of all runs."""
        ordered = sorted(runs, key=lambda x: x["seconds"])
        chosen = ordered[0] if pick == "best" else ordered[(len(ordered) - 1) // 2]
        notes = list(chosen["notes"])
        if len(runs) > 1:
            notes.insert(0, "%s of %d%s: %s MB/s" % (
                pick, len(runs), " " + what if what else "",
                "/".join("%.0f" % (x["bytes"] / x["seconds"] / MB) for x in runs)))
        row = self.add_row(key, label, chosen["bytes"], chosen["seconds"], chosen["sent"],
                     chosen["retx"], max_or_none(x["srv_rss"] for x in runs),
                     max_or_none(x["cli_rss"] for x in runs), floor=floor,
                     notes=", ".join(notes))
        row["finish"] = chosen.get("finish", 0.0)
        return chosen

    def fetch(self, folder, name, parts, impair=None, seed=1, label=None, key=None,
              add=True):
        """One client downloads `name` from a fresh server (through the proxy if `impair`)."""
        src = os.path.join(folder, name)
        size = os.path.getsize(src)
        srv, port = self.start_server(folder)
        proxy = None
        out = self.tmpdir("dl-")
        try:
            if impair is not None:
                from tests.impair import ImpairProxy
                proxy = ImpairProxy((LOOPBACK, port), seed=seed, to_server=impair[0],
                                    to_client=impair[1]).start()
                port_used = proxy.address[1]
            else:
                port_used = port
            job = {"name": name, "out_dir": out, "parts": parts, "size_hint": size}
            results, cli_rss, cli_cpu = self.run_clients(port_used, [job],
                                                         self.timeout_for(size))
        except BaseException:
            srv.kill()
            raise
        finally:
            if proxy is not None:
                proxy.close()
        stats = self.stop_server(srv)
        self.verify(src, os.path.join(out, name), label or name)
        shutil.rmtree(out, ignore_errors=True)
        res = results[0]
        notes = []
        if proxy is not None:
            st_s, st_c = proxy.stats["to_server"], proxy.stats["to_client"]
            if st_s.dropped or st_c.dropped:
                notes.append("dropped %d/%d" % (st_s.dropped, st_c.dropped))
            if proxy.last_error is not None:
                notes.append("proxy error %r" % proxy.last_error)
        notes += self.server_notes(stats)
        spent = res.get("spent", {})
        if spent.get("save", 0) >= 0.01:
            notes.append("client in save() %.2f s (longest %.3f s)" % (spent["save"],
                                                                       spent["save_max"]))
        if spent.get("finish", 0) >= 0.01:
            notes.append("client in finish() %.2f s" % spent["finish"])
        if res["stats"].get("stalls") or res["stats"].get("restarts"):
            notes.append("client stalls %d restarts %d" % (res["stats"]["stalls"],
                                                          res["stats"]["restarts"]))
        run = {"bytes": res["bytes"], "seconds": res["seconds"],
               "finish": spent.get("finish", 0.0),
               "sent": stats["server"]["datagrams"],
               "retx": stats["server"]["retransmissions"], "srv_rss": stats["rss_mb"],
               "cli_rss": cli_rss, "notes": notes, "srv_cpu": stats["cpu"], "cli_cpu": cli_cpu}
        if add:
            self.add_row(key, label, run["bytes"], run["seconds"], run["sent"], run["retx"],
                         run["srv_rss"], run["cli_rss"], floor=impair is None,
                         notes=", ".join(notes))
        return run

    def server_notes(self, stats):
        notes = []
        s, d = stats["server"], stats["dispatcher"]
        if s["early"]:
            notes.append("%d of the retx early" % s["early"])
        if s["shrinks"]:
            notes.append("shrinks %d" % s["shrinks"])
        if d.get("busy"):
            notes.append("BUSY %d" % d["busy"])
        if stats["send_errors"]:
            notes.append("send errors %d" % stats["send_errors"])
        bad = {k: v for k, v in s["outcomes"].items() if k != "done"}
        if bad:
            notes.append("outcomes " + " ".join("%s=%d" % kv for kv in sorted(bad.items())))
        if stats["log"]:
            notes.append("%d server log lines" % len(stats["log"]))
            self.warnings += ["server: " + ln for ln in stats["log"][:5]]
        return notes

    # -- baselines

    def copy_baseline(self, src):
        dst = os.path.join(self.root, "copy.bin")
        t0 = time.perf_counter()
        shutil.copyfile(src, dst)
        seconds = time.perf_counter() - t0
        self.verify(src, dst, "copyfile")
        os.remove(dst)
        return seconds

    def floor_run(self, src):
        size = os.path.getsize(src)
        out = os.path.join(self.root, "floor.bin")
        snd = Child("floor-send", ["--child-floor-send", src, str(self.datagram_size)],
                    self.logs)
        rcv = None
        try:
            port = snd.recv(30)["port"]
            rcv = Child("floor-recv", ["--child-floor-recv", out, str(size), str(port)],
                        self.logs)
            rcv.recv(30)
            rcv.send("go")
            r = rcv.recv(self.timeout_for(size))
            s = snd.recv(30)
            rcv.finish()
            snd.finish()
        finally:
            for child in (snd, rcv):
                if child is not None:
                    child.kill()
        self.verify(src, out, "floor")
        os.remove(out)
        return {"bytes": r["bytes"], "seconds": r["seconds"], "sent": s["datagrams"], "retx": 0,
                "srv_rss": s["rss_mb"], "cli_rss": r["rss_mb"], "notes": []}

    # -- scenarios

    def run(self):
        a = self.args
        version = source_version()
        fingerprint = product_fingerprint()
        print("udpxfer benchmark%s%s: Python %s on %s, %d CPUs; temp %s" % (
            " (--quick)" if self.quick else "", " of " + version if version else "",
            sys.version.split()[0], sys.platform, os.cpu_count() or 0, self.root), flush=True)
        self.load_before = load_average()
        if self.load_before is not None and self.load_before > 0.5:
            self.warnings.append(
                "load average %.2f at the start: other processes are using the CPUs, so the "
                "numbers are lower (and noisier) than on an idle machine" % self.load_before)
        t_start = time.perf_counter()
        if not a.paths_only and not a.long_only:
            self.loopback_scenarios()
        if a.no_paths:
            self.warnings.append("path scenarios A-D and long paths L1-L4 skipped (--no-paths)")
        else:
            if not a.long_only:
                self.path_scenarios()
            self.long_path_scenarios()

        if product_fingerprint() != fingerprint:
            self.warnings.append("the product's source files changed during the run: the rows "
                                 "may measure different versions")
        if self.quick:
            self.warnings.append("--quick: sizes are 1/16 of the real run (path scenarios "
                                 "8 MiB, once), too small for the targets to mean much")
        if self.rows:
            self.print_table()
        else:
            print()
            for w in self.warnings:
                print("note: " + w)
        self.print_targets()
        for m in self.mismatches:
            print("MISMATCH: " + m)
        load = load_average()
        print("total %.0f s%s" % (time.perf_counter() - t_start, "" if load is None else
                                  "; load average (1 min) %.2f at the start, %.2f at the end"
                                  % (self.load_before, load)))

    def loopback_scenarios(self):
        a = self.args
        big = self.make_random(self.files, "big.bin", self.big_size)
        self.make_random(self.files, "mid.bin", self.mid_size)
        self.make_random(self.files, "rtt.bin", self.rtt_size)
        self.make_random(self.files, "each.bin", self.each_size)

        # Baselines and loopback scenarios 1 and 2, interleaved, best of --repeat; with them
        # (target F) default settings (automatic parts) and atftp against tftp-hpa.
        copy_s = min(self.copy_baseline(big) for _ in range(self.repeat))
        self.add_row("copy", "baseline: shutil.copyfile", self.big_size, copy_s, floor=True,
                     notes="best of %d" % self.repeat)
        why_no_atftp = ("not root" if not is_root() else atftp_missing())
        tftpd = None if why_no_atftp else self.start_tftpd(self.files, LOOPBACK, [])
        runs = {"floor": [], "p1": [], "p4": [], "auto": [], "atftp": []}
        try:
            for _ in range(self.repeat):
                runs["floor"].append(self.floor_run(big))
                runs["p1"].append(self.fetch(self.files, "big.bin", 1, add=False))
                runs["p4"].append(self.fetch(self.files, "big.bin", 4, add=False))
                runs["auto"].append(self.fetch(self.files, "big.bin", 0, add=False))
                if tftpd is not None:
                    runs["atftp"].append(self.atftp_loopback(big, tftpd[1]))
        finally:
            if tftpd is not None:
                tftpd[0].kill()
        big_h = human(self.big_size)
        for key, label in (("floor", "baseline: stop-and-wait floor"),
                           ("p1", "1. %s loopback, 1 part" % big_h),
                           ("p4", "2. %s loopback, 4 parts" % big_h),
                           ("auto", "2. %s loopback, default (auto parts)" % big_h),
                           ("atftp", "2. %s loopback, atftp+tftp-hpa" % big_h)):
            if not runs[key]:
                self.warnings.append("loopback atftp+tftp-hpa skipped: %s" % why_no_atftp)
                continue
            best = self.summarize(key, label, runs[key], "best", floor=True)
            if key in ("p1", "p4", "auto"):
                self.count_lossless(self.one_client, runs[key])
            rates = sorted(x["bytes"] / x["seconds"] / MB for x in runs[key])
            self.r[key]["median_mbps"] = rates[(len(rates) - 1) // 2]
            if key == "floor":
                self.floor_mbps = self.r["floor"]["mbps"]
            elif key != "atftp":   # CPU per datagram explains the distance to the floor
                self.r[key]["srv_us"] = best["srv_cpu"] / best["sent"] * 1e6
                self.r[key]["cli_us"] = best["cli_cpu"] / best["sent"] * 1e6
                self.r[key]["cpu"] = "per datagram: server CPU %.0f us, client CPU %.0f us" % (
                    self.r[key]["srv_us"], self.r[key]["cli_us"])

        # 3. Loss (a different loss pattern each run), and the same through a lossless proxy.
        # The median run of each is shown: one unlucky drop (the first SIZE) costs 0.25 s.
        from tests.impair import Impairment
        mid = human(self.mid_size)
        for parts in (4, 1):
            plural = "s" * (parts > 1)
            clean = [self.fetch(self.files, "mid.bin", parts, add=False,
                                impair=(Impairment(), Impairment()))
                     for _ in range(self.repeat)]
            self.summarize("clean%d" % parts, "3. %s proxy lossless, %d part%s" % (
                mid, parts, plural), clean, "median")
            self.count_lossless(self.one_client, clean)
            lossy = [self.fetch(self.files, "mid.bin", parts, seed=a.seed + i, add=False,
                                impair=(Impairment(drop=0.05), Impairment(drop=0.05)))
                     for i in range(self.repeat)]
            self.summarize("loss%d" % parts, "3. %s proxy 5%% loss, %d part%s" % (
                mid, parts, plural), lossy, "median", what="seeds %d..%d" % (
                a.seed, a.seed + self.repeat - 1))

        # 4. (target E) 10 ms round trip, 1 part and default settings (automatic parts);
        # timing dominated by the delay: one run each.
        rtt = human(self.rtt_size)
        for parts, what, key in ((1, "1 part", "rtt1"), (0, "default (auto parts)", "rttauto")):
            self.fetch(self.files, "rtt.bin", parts,
                       impair=(Impairment(delay=0.005), Impairment(delay=0.005)),
                       label="4. %s 10 ms RTT, %s" % (rtt, what), key=key)

        # 5. One client alone, and 20 clients at once (best of --repeat: one alone is short).
        ones, manys = [], []
        for _ in range(self.repeat):
            ones.append(self.fetch(self.files, "each.bin", 4, add=False))
            manys.append(self.many_clients())
        self.summarize("one", "5. %s, 1 client alone, 4 parts" % human(self.each_size), ones,
                       "best", floor=True)
        best = self.summarize("many", "5. %d clients x %s, 4 parts" % (
            self.clients, human(self.each_size)), manys, "best", floor=True)
        self.r["many"]["slow_fast"] = best["slow_fast"]
        self.count_lossless(self.one_client, ones)
        self.count_lossless("loopback, %d clients on one IP (scenario 5)" % self.clients,
                            manys)

        # 6. LIST.
        self.listing()

        # 7. A sparse 2 GiB file, for memory.
        if a.skip_sparse:
            self.warnings.append("scenario 7 skipped (--skip-sparse)")
        else:
            self.sparse()
        for name in ("big.bin", "mid.bin", "rtt.bin", "each.bin"):
            os.remove(os.path.join(self.files, name))   # room for the path scenarios' files

    def many_clients(self):
        src = os.path.join(self.files, "each.bin")
        size = os.path.getsize(src)
        srv, port = self.start_server(self.files)
        outs = [self.tmpdir("dl%02d-" % i) for i in range(self.clients)]
        try:
            jobs = [{"name": "each.bin", "out_dir": o, "parts": 4, "size_hint": size}
                    for o in outs]
            results, cli_rss, _ = self.run_clients(port, jobs, self.timeout_for(
                size * self.clients), procs=self.args.clients_procs)
        except BaseException:
            srv.kill()
            raise
        stats = self.stop_server(srv)
        for i, o in enumerate(outs):
            self.verify(src, os.path.join(o, "each.bin"), "client %d" % i)
            shutil.rmtree(o, ignore_errors=True)
        total = sum(r["bytes"] for r in results)
        span = max(r["end"] for r in results) - min(r["start"] for r in results)
        secs = [r["seconds"] for r in results]
        notes = ["%s" % ("%d processes" % self.clients if self.args.clients_procs
                         else "%d threads in 1 process" % self.clients),
                 "each %.2f..%.2f s" % (min(secs), max(secs))]
        stalls = sum(r["stats"]["stalls"] for r in results)
        if stalls:
            notes.append("client stalls %d" % stalls)
        notes += self.server_notes(stats)
        return {"bytes": total, "seconds": span, "sent": stats["server"]["datagrams"],
                "retx": stats["server"]["retransmissions"], "srv_rss": stats["rss_mb"],
                "cli_rss": cli_rss, "notes": notes, "slow_fast": max(secs) / min(secs)}

    def listing(self):
        folder = self._mkdir("listing")
        expected = []
        for i in range(self.list_count):
            name = "file %05d%s.dat" % (i, "-\u00e9t\u00e9" if i % 7 == 0 else "")
            data = b"x" * (i % 997)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            expected.append((name, len(data)))
        from udpxfer.wire import format_listing
        want = format_listing(expected)
        srv, port = self.start_server(folder)
        pause = config.ServerSettings().list_rescan_interval + 0.1
        try:
            results, cli_rss, _ = self.run_clients(
                port, [{"listing": True, "pauses": [0, pause, 0]}], 60)
        except BaseException:
            srv.kill()
            raise
        stats = self.stop_server(srv)
        res = results[0]
        if res["count"] != len(expected) or res["sha256"] != hashlib.sha256(want).hexdigest():
            raise BenchError("LIST: got %d entries, not the %d expected (or different ones)"
                             % (res["count"], len(expected)))
        notes = ["%d entries; 3 runs %s s (the 2nd %.1f s later: the server rescans the folder)"
                 % (res["count"], "/".join("%.3f" % t for t in res["times"]), pause)]
        notes += self.server_notes(stats)
        self.add_row("list", "6. LIST of %d files" % self.list_count, res["bytes"],
                     max(res["times"]), stats["server"]["datagrams"],
                     stats["server"]["retransmissions"], stats["rss_mb"], cli_rss,
                     notes=", ".join(notes))
        shutil.rmtree(folder, ignore_errors=True)

    def sparse(self):
        size = self.sparse_size
        free = shutil.disk_usage(self.root).free
        need = 2 * size + 512 * MiB   # the download is real; the source too where not sparse
        if free < need:
            self.warnings.append("scenario 7 skipped: %s free, %s needed" % (human(free),
                                                                            human(need)))
            return
        folder = self._mkdir("sparse")
        path = os.path.join(folder, "sparse.bin")
        with open(path, "wb") as f:   # holes, with a few random marks so it is not all zeros
            for off in range(0, size, max(size // 8, 1)):
                f.seek(off)
                f.write(os.urandom(4096))
            f.seek(size - 4096)
            f.write(os.urandom(4096))
        self.hashes[path] = sha256_file(path)
        try:
            # Writing this much is slower than writing 256 MiB (page cache, write-back), so
            # the floor of this very file is measured too and shown in the notes.
            floor = self.floor_run(path)
            self.fetch(folder, "sparse.bin", 4, key="sparse",
                       label="7. %s sparse, 4 parts" % human(size))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = self.r["sparse"]
        floor_mbps = floor["bytes"] / floor["seconds"] / MB
        row["notes"] = ", ".join(x for x in ("floor of this file %.0f MB/s (%.2f of it)" % (
            floor_mbps, row["mbps"] / floor_mbps), row["notes"]) if x)

    # -- atftp against tftp-hpa, and the path scenarios A-D (root only)

    def start_tftpd(self, folder, host, prefix):
        """in.tftpd (tftp-hpa) serving folder (chroot) on host, in the namespace of prefix;
        (the process, its port)."""
        if prefix:
            port = TFTP_PORT
        else:   # a free port on loopback
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        proc = Spawned(list(prefix) + [tftpd_path(), "-L", "-s", folder, "-a", "%s:%d" % (
            host, port), "-B", str(TFTP_BLKSIZE), "-u", "root"],
            os.path.join(self.logs, "tftpd-%s.log" % host))
        if not wait_listening(prefix, "u", port):
            proc.kill()
            raise BenchError("in.tftpd did not listen on %s:%d within 10 s" % (host, port))
        return proc, port

    def atftp_loopback(self, src, port):
        """One atftp download of src over loopback (target F); None if it fails."""
        out = self.tmpdir("atftp-")
        dst = os.path.join(out, os.path.basename(src))
        size = os.path.getsize(src)
        try:
            rc, seconds, cpu = timed_command(
                [shutil.which("atftp"), "--get", "-r", os.path.basename(src), "-l", dst,
                 "--option", "blksize %d" % TFTP_BLKSIZE, LOOPBACK, str(port)],
                self.timeout_for(size), os.path.join(self.logs, "atftp-loopback.log"))
            wrong = compare_files(src, dst) if rc == 0 else None
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if rc != 0 or wrong:
            self.warnings.append("loopback atftp run failed: %s" % (
                "timeout" if rc is None else "exit %d" % rc if rc else "MISMATCH, " + wrong))
            return None
        return {"bytes": size, "seconds": seconds, "sent": None, "retx": None,
                "srv_rss": None, "cli_rss": None, "notes": ["client CPU %.2f s" % cpu]}

    def path_scenarios(self):
        """A-D: each tool downloads the same random file over a two-namespace path."""
        why = None if is_root() else "not root"
        if why is None:
            missing = [t for t in ("ip", "nft", "tc", "ethtool") if shutil.which(t) is None]
            if missing:
                why = "ip/nft/tc/ethtool missing (%s not found)" % ", ".join(missing)
        if why:
            print("\npath scenarios A-D: skipped: %s" % why, flush=True)
            return
        skips = {}
        if atftp_missing():
            skips["atftp"] = atftp_missing()
        if shutil.which("curl") is None:
            skips["http"] = "curl not installed"
        for tool, why in skips.items():
            print("\npath scenarios, %s column: skipped: %s" % (dict(PATH_TOOLS)[tool], why),
                  flush=True)
        # Our client is a Python program: its times include starting Python and imports.
        _, py_start, py_cpu = timed_command([sys.executable, os.path.join(ROOT, "client.py"),
                                             "--help"], 30, os.devnull)
        py_start = (py_start, py_cpu)
        for key, title, loss, rate, mib in PATH_SCENARIOS:
            size = self.path_size or mib * MiB
            if rate and self.args.path_cburst:
                title += ", htb cburst %s" % self.args.path_cburst
            try:
                self.path_scenario(key, title, loss, rate, size, skips, py_start)
            except BenchError as exc:
                if not str(exc).startswith("path setup failed"):
                    raise
                print("path scenarios A-D: skipped: cannot build the path: %s" % exc,
                      flush=True)
                self.warnings.append("path scenarios skipped: %s" % exc)
                return

    def path_scenario(self, key, title, loss, rate, size, skips, py_start):
        folder = self.tmpdir("path%s-" % key)
        files = os.path.join(folder, "files")   # tftpd's chroot and http.server's folder
        os.mkdir(files)
        src = os.path.join(files, "f.bin")
        with open(src, "wb") as f:
            for off in range(0, size, MiB):
                f.write(os.urandom(min(MiB, size - off)))
        results = {tool: [] for tool, _ in PATH_TOOLS}
        dropped = [0, 0] if loss else None
        try:
            for i in range(self.path_runs):   # the tools side by side, run after run
                for tool, _ in PATH_TOOLS:
                    if tool in skips or any(r["fail"] == "timeout" for r in results[tool]):
                        continue   # a timeout is not repeated: the run stays bounded
                    run = self.path_run_on_new_path(key, tool, loss, rate, files, src, i,
                                                    dropped)
                    results[tool].append(run)
                    if self.args.verbose:
                        print("  %s %-16s run %d: %s" % (
                            key, tool, i + 1, run["fail"] or "%.3f s %.1f MB/s" % (
                                run["seconds"], size / run["seconds"] / MB)), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.print_path(key, title, rate, size, results, skips, dropped, py_start)
        if not loss:
            self.count_lossless("paths without loss (A, B), ours", results["ours"]
                                + results["ours1"])

    def path_run_on_new_path(self, key, tool, loss, rate, files, src, i, dropped):
        """path_run on a path of its own, with the tool's server started on it. One path for
        every run would let one run slow the next: a lost fragment's siblings wait in the
        client's reassembly buffer for 30 s, and atftp's 45-fragment blocks fill it on a lossy
        path (after which every fragmented datagram is dropped)."""
        path = NetPath("%d%s" % (os.getpid() % 1000000, key), 1500, loss, rate,
                       self.args.path_cburst)
        self.netpaths.append(path)
        procs = []
        try:
            srv_ns = path.prefix(0)
            tftpd_port = None
            if tool == "atftp":
                proc, tftpd_port = self.start_tftpd(files, PATH_SRV, srv_ns)
                procs.append(proc)
            elif tool == "http":
                procs.append(Spawned(srv_ns + [sys.executable, "-m", "http.server",
                                               str(HTTP_PORT), "--bind", PATH_SRV,
                                               "--directory", files],
                                     os.path.join(self.logs, "http-%s.log" % key)))
                if not wait_listening(srv_ns, "t", HTTP_PORT):
                    raise BenchError("http.server did not listen within 10 s")
            run = self.path_run(key, tool, path, files, src, i, tftpd_port)
            if dropped is not None:
                for side, n in enumerate(path.dropped()):
                    dropped[side] += n
            return run
        finally:
            for proc in procs:
                proc.kill()
            path.close()
            self.netpaths.remove(path)

    def path_run(self, key, tool, path, files, src, i, tftpd_port):
        """One download by one tool over the path; a dict with "fail" None or why."""
        srv_ns, cli_ns = path.prefix(0), path.prefix(1)
        out = self.tmpdir("pdl-")
        dst = os.path.join(out, "f.bin")
        srv = stats = None
        try:
            if tool in ("ours", "ours1"):
                srv = Child("path-server", ["--child-server", files, "--child-host", PATH_SRV],
                            self.logs, prefix=srv_ns)
                port = srv.recv(30)["port"]
                cmd = cli_ns + [sys.executable, os.path.join(ROOT, "client.py"),
                                "--host", PATH_SRV, "--port", str(port), "--out", out, "-q"]
                cmd += (["--parts", "1"] if tool == "ours1" else []) + ["f.bin"]
            elif tool == "atftp":
                cmd = cli_ns + [shutil.which("atftp"), "--get", "-r", "f.bin", "-l", dst,
                                "--option", "blksize %d" % TFTP_BLKSIZE, PATH_SRV,
                                str(tftpd_port)]
            else:
                cmd = cli_ns + [shutil.which("curl"), "-s", "-o", dst,
                                "http://%s:%d/f.bin" % (PATH_SRV, HTTP_PORT)]
            log = os.path.join(self.logs, "path-%s-%s-%d.log" % (key, tool, i + 1))
            rc, seconds, cpu = timed_command(cmd, self.path_timeout, log)
            if srv is not None:
                stats = self.stop_server(srv)
                srv = None
            wrong = compare_files(src, dst) if rc == 0 else None
        finally:
            if srv is not None:
                srv.kill()
            shutil.rmtree(out, ignore_errors=True)
        run = {"seconds": seconds, "cpu": cpu, "fail": None}
        if rc is None:
            run["fail"] = "timeout"
        elif rc != 0:
            run["fail"] = "exit %d" % rc
            self.warnings.append("%s. %s run %d: exit %d (log %s)" % (key, tool, i + 1, rc,
                                                                       log))
        elif wrong:
            run["fail"] = "MISMATCH"
            what = "%s. %s run %d: exit 0 but the file %s" % (key, tool, i + 1, wrong)
            self.warnings.append(what)
            if tool.startswith("ours"):
                self.mismatches.append(what)
        if stats is not None:
            run.update(sent=stats["server"]["datagrams"],
                       retx=stats["server"]["retransmissions"], srv_cpu=stats["cpu"],
                       srv_sys=stats.get("cpu_sys", 0.0))
        return run

    # -- long paths (L1-L4) ----------------------------------------------------------------

    def long_path_scenarios(self):
        """L1-L4: long paths with a bottleneck queue, side by side with HTTP over TCP (BBR and
        Reno), many small files, and a bottleneck shared with a TCP download."""
        why = None if is_root() else "not root"
        if why is None:
            missing = [t for t in ("ip", "nft", "tc", "ethtool", "sysctl", "curl")
                       if shutil.which(t) is None]
            if missing:
                why = "%s not found" % ", ".join(missing)
            elif not os.path.exists("/dev/net/tun"):
                why = "no /dev/net/tun for the added round trip"
        if why:
            print("\nlong paths L1-L4: skipped: %s" % why, flush=True)
            return
        for key, title, loss, rate, queue, rtt_ms, work in LONG_SCENARIOS:
            if self.quick and key in ("L2", "L4"):
                continue
            try:
                self.long_path_scenario(key, title, loss, rate, queue, rtt_ms, work)
            except BenchError as exc:
                if not str(exc).startswith("path setup failed"):
                    raise
                print("long paths: skipped: cannot build the path: %s" % exc, flush=True)
                self.warnings.append("long paths skipped: %s" % exc)
                return

    def long_path_scenario(self, key, title, loss, rate, queue, rtt_ms, work):
        folder = self.tmpdir("long%s-" % key)
        files = os.path.join(folder, "files")
        os.mkdir(files)
        if isinstance(work, tuple):
            count, kib = work
            names = ["f%03d.bin" % i for i in range(count)]
            size = count * kib * 1024
        else:
            names, size = ["f.bin"], (8 if self.quick else work) * MiB
        for name in names:
            with open(os.path.join(files, name), "wb") as f:
                f.write(os.urandom(size // len(names)))
        with open(os.path.join(folder, "names.txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
        if key == "L4":   # what TCP downloads meanwhile: longer than any run (sparse)
            with open(os.path.join(files, "tcp.bin"), "wb") as f:
                f.truncate(4 * GiB)
        results = {tool: [] for tool in LONG_TOOLS[key]}
        try:
            for i in range(self.path_runs):
                for tool in LONG_TOOLS[key]:
                    run = self.long_run(key, tool, loss, rate, queue, rtt_ms, folder, names, i)
                    results[tool].append(run)
                    if self.args.verbose:
                        print("  %s %-12s run %d: %s" % (
                            key, tool, i + 1, run["fail"] or "%.3f s" % run["seconds"]),
                            flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.print_long(key, title, size, len(names), results)

    def long_run(self, key, tool, loss, rate, queue, rtt_ms, folder, names, i):
        """One run of one tool on a long path of its own (built anew: no run inherits another's
        queue, reassembly buffer or the server's memory of the path)."""
        cc = "reno" if tool.endswith("reno") else "bbr"
        path = LongPath("%d%s" % (os.getpid() % 100000, key[1]), loss, rate, queue, rtt_ms, cc)
        self.netpaths.append(path)
        self.long_delay = ("netem" if path.netem else "a TUN delay line in Python (no netem "
                           "here; it takes CPU from the tools)")
        files = os.path.join(folder, "files")
        out = self.tmpdir("ldl-")
        srv = http = bg = None
        run = {"fail": None, "seconds": float("inf")}
        try:
            srv_ns, cli_ns = path.prefix(0), path.prefix(1)
            if tool != "ours":
                http = Spawned(srv_ns + [sys.executable, "-m", "http.server", str(HTTP_PORT),
                                         "--bind", PATH_SRV, "--directory", files],
                               os.path.join(self.logs, "long-http-%s.log" % key))
                if not wait_listening(srv_ns, "t", HTTP_PORT):
                    raise BenchError("http.server did not listen within 10 s")
            if tool == "ours" or tool.startswith("tcp-"):
                srv = Child("long-server", ["--child-server", files, "--child-host", PATH_SRV],
                            self.logs, prefix=srv_ns)
                port = srv.recv(30)["port"]
                cmd = cli_ns + [sys.executable, os.path.join(ROOT, "client.py"), "--host",
                                PATH_SRV, "--port", str(port), "--out", out, "--json", "-q"]
                cmd += (["--once", "--input", os.path.join(folder, "names.txt")]
                        if len(names) > 1 else names)
            else:
                urls = []
                for name in names:
                    urls += ["-o", os.path.join(out, name),
                             "http://%s:%d/%s" % (PATH_SRV, HTTP_PORT, name)]
                cmd = cli_ns + [shutil.which("curl"), "-s"] + (
                    ["-Z", "--parallel-immediate", "--parallel-max", "16"]
                    if tool.startswith("curl16") else []) + urls
            if tool.startswith("tcp-"):   # a long TCP download first, past its start-up
                tcp_out = os.path.join(out, "tcp.out")
                bg = Spawned(cli_ns + [shutil.which("curl"), "-s", "-o", tcp_out,
                                       "http://%s:%d/tcp.bin" % (PATH_SRV, HTTP_PORT)],
                             os.path.join(self.logs, "long-tcp-%s.log" % key))

                def got():
                    return os.path.getsize(tcp_out) if os.path.exists(tcp_out) else 0

                time.sleep(3.0)
                s0, t0 = got(), time.monotonic()
                time.sleep(2.0)
                s1, t1 = got(), time.monotonic()
            log = os.path.join(self.logs, "long-%s-%s-%d.log" % (key, tool, i + 1))
            rc, seconds, _ = timed_command(cmd, self.path_timeout, log)
            if bg is not None:
                s2, t2 = got(), time.monotonic()
                bg.kill()
                bg = None
                run["tcp_alone"] = (s1 - s0) / (t1 - t0)
                run["tcp_beside"] = (s2 - s1) / (t2 - t1)
            run["seconds"] = seconds
            if rc != 0:
                run["fail"] = "timeout" if rc is None else "exit %d" % rc
            else:
                for name in names:
                    wrong = compare_files(os.path.join(files, name), os.path.join(out, name))
                    if wrong:
                        run["fail"] = "MISMATCH"
                        what = "%s. %s run %d: exit 0 but %s %s" % (key, tool, i + 1, name,
                                                                   wrong)
                        self.warnings.append(what)
                        if tool == "ours" or tool.startswith("tcp-"):
                            self.mismatches.append(what)
                        break
            if tool == "ours" or tool.startswith("tcp-"):
                lanes = []
                with open(log, errors="replace") as f:
                    for line in f:
                        if line.startswith("{"):
                            lanes.append(json.loads(line).get("parts", 0))
                run["lanes"] = max(lanes or [0])
        finally:
            for proc in (bg, http):
                if proc is not None:
                    proc.kill()
            if srv is not None:
                srv.kill()
            shutil.rmtree(out, ignore_errors=True)
            path.close()
            self.netpaths.remove(path)
        return run

    def print_long(self, key, title, size, count, results):
        print("\n%s. %s: %s, %d run%s each, median; round trip by %s" % (
            key, title, "%d files, %s" % (count, human(size)) if count > 1 else human(size),
            self.path_runs, "" if self.path_runs == 1 else "s", self.long_delay), flush=True)

        def med(tool, field="seconds"):
            values = [r[field] for r in results[tool] if not r["fail"] and field in r]
            return statistics.median(values) if values else None

        shares = {}
        for tool, runs in results.items():
            fails = [r["fail"] for r in runs if r["fail"]]
            seconds = med(tool)
            line = "  %-28s " % LONG_NAMES[tool]
            if seconds is None:
                if fails and all(f == "timeout" for f in fails):
                    print(line + "not done in %.0f s (under %.1f MB/s)" % (
                        self.path_timeout, size / self.path_timeout / MB), flush=True)
                else:
                    print(line + "fails (%s)" % ", ".join(fails), flush=True)
                continue
            line += "%7.2f s %8.1f MB/s" % (seconds, size / seconds / MB)
            if med(tool, "lanes") is not None:
                lanes = "/".join(str(r.get("lanes", "-")) for r in runs)
                line += "  lanes (most, per file) %s" % lanes
            if tool.startswith("tcp-"):
                alone, beside = med(tool, "tcp_alone"), med(tool, "tcp_beside")
                mine = size / seconds
                line += "  TCP alone %.1f, beside ours %.1f MB/s (kept %.0f%%); our share " \
                        "%.2f" % (alone / MB, beside / MB,
                                  100.0 * beside / alone if alone else 0.0, mine / (mine + beside))
                shares[tool + "-share"] = mine / (mine + beside)
                shares[tool + "-kept"] = beside / alone if alone else 0.0
            if fails:
                line += "  (%d failed: %s)" % (len(fails), ", ".join(fails))
            print(line, flush=True)

        def check(name, value, op, limit, detail=""):
            self.path_checks.append(make_check("%s. %s" % (key, name), value, op, limit, detail))

        if key in ("L1", "L2"):
            ours, bbr = med("ours"), med("http-bbr")
            check("ours vs HTTP with BBR", bbr / ours if ours and bbr else None, ">=",
                  0.8 if key == "L1" else 0.7)
        elif key == "L3":
            ours, c16 = med("ours"), med("curl16-bbr")
            check("curl 16 at once / ours, seconds", c16 / ours if ours and c16 else None,
                  ">=", 1.0)
        elif key == "L4":
            check("Reno TCP keeps of its rate alone", shares.get("tcp-reno-kept"), ">=", 0.4)
            check("our share beside BBR TCP", shares.get("tcp-bbr-share"), ">=", 0.25)

    def print_path(self, key, title, rate, size, results, skips, dropped, py_start):
        print()
        print("%s. %s%s: %s of random data, median of %d, at most %.0f s per download" % (
            key, title, "" if rate else ", no rate limit", human(size), self.path_runs,
            self.path_timeout))
        med = {}
        for tool, _ in PATH_TOOLS:
            rs = results[tool]
            if rs:   # the median run by MB/s, a failed run counting as 0
                rs_sorted = sorted(rs, key=lambda r: 0.0 if r["fail"] else -size / r["seconds"])
                med[tool] = rs_sorted[(len(rs_sorted) - 1) // 2]

        def cell(tool, f):
            if tool in skips:
                return "skipped"
            if tool not in med:
                return ""
            return f(med[tool], results[tool])

        def mbps_med(m, rs):
            return "fails (%s)" % m["fail"] if m["fail"] else "%.1f" % (size / m["seconds"] / MB)

        def mbps_runs(m, rs):
            text = "/".join(r["fail"] or "%.0f" % (size / r["seconds"] / MB) for r in rs)
            return text + ("/-" * (self.path_runs - len(rs)))

        def ours_only(f):
            return lambda m, rs: f(m) if "sent" in m and not m["fail"] and m["sent"] else ""

        lines = [
            ("MB/s, median", mbps_med),
            ("MB/s, every run", mbps_runs),
            ("seconds, median", lambda m, rs: "" if m["fail"] else "%.2f" % m["seconds"]),
            ("client CPU s, median", lambda m, rs: "" if m["fail"] else "%.2f" % m["cpu"]),
            ("server CPU us/datagram (in the kernel)", ours_only(lambda m: "%.0f (%.0f)" % (
                m["srv_cpu"] / m["sent"] * 1e6, m["srv_sys"] / m["sent"] * 1e6))),
            ("client CPU us/datagram, start-up incl.", ours_only(lambda m: "%.0f" % (
                m["cpu"] / m["sent"] * 1e6))),
            ("datagrams sent / retx", ours_only(lambda m: "%d/%d" % (m["sent"], m["retx"]))),
        ]
        head = [""] + [name for _, name in PATH_TOOLS]
        table = [head] + [[label] + [cell(tool, f) for tool, _ in PATH_TOOLS]
                          for label, f in lines]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())

        def rate_of(tool):
            if tool in skips or tool not in med:
                return None
            return 0.0 if med[tool]["fail"] else size / med[tool]["seconds"] / MB

        ours = rate_of("ours")
        ratios = {}
        for tool, name in (("atftp", "ours/atftp"), ("http", "ours/HTTP")):
            other = rate_of(tool)
            ratios[tool] = (None if ours is None or other is None else
                            float("inf") if other == 0 else ours / other)
        print("  ours/atftp %s, ours/HTTP %s (ours: default settings, automatic parts)" % tuple(
            "n/a" if ratios[t] is None else "%.2f" % ratios[t] for t in ("atftp", "http")))
        notes = ["ours' times and client CPU include starting Python and importing client.py "
                 "(client.py --help here: %.2f s, %.2f s of CPU)" % py_start]
        if rate:
            notes.append("with a rate limit, the qdisc's work (htb's timer interrupts, its "
                         "dequeues and the delivery of what they release) runs in whichever "
                         "process is on the CPU, mostly the server: that is most of its time in "
                         "the kernel here")
            a, h = rate_of("atftp"), rate_of("http")
            if a and h:
                notes.append("atftp vs HTTP on this path: %.2f (it sends 45-fragment datagrams "
                             "as ours does, from C, with no start-up to speak of)" % (a / h))
        if dropped is not None:
            notes.append("nftables dropped %d packets at the server, %d at the client"
                         % tuple(dropped))
        not_repeated = [dict(PATH_TOOLS)[t] for t, rs in results.items()
                        if t not in skips and len(rs) < self.path_runs]
        if not_repeated:
            notes.append("not repeated after a timeout: " + ", ".join(not_repeated))
        for n in notes:
            print("  note: " + n)
        checks = []
        for tool, limit in PATH_TARGETS.get(key, ()):
            other = "atftp" if tool == "atftp" else "HTTP"
            detail = ""
            if tool in skips:
                detail = skips[tool]
            elif tool in med and med[tool]["fail"]:
                detail = "%s fails (%s)" % (other, med[tool]["fail"])
            checks.append(make_check("%s. %s: ours vs %s" % (key, title, other), ratios[tool],
                                     ">=", limit, detail))
        print_checks(checks, indent="  ")
        self.path_checks += checks
        sys.stdout.flush()

    # -- output

    def print_table(self):
        head = ("scenario", "bytes", "seconds", "MB/s", "sent", "retx", "srvRSS", "cliRSS",
                "vs floor", "notes")
        lines = []
        for r in self.rows:
            vs = r["mbps"] / self.floor_mbps if (r["floor"] and self.floor_mbps
                                                 and r["mbps"]) else None
            r["vs_floor"] = vs
            lines.append((r["label"], str(r["bytes"]), "%.3f" % r["seconds"],
                          "%.1f" % r["mbps"] if r["mbps"] else "",
                          "" if r["sent"] is None else str(r["sent"]),
                          "" if r["retx"] is None else str(r["retx"]),
                          fmt_mb(r["srv_rss"]) if r["key"] != "copy" else "",
                          fmt_mb(r["cli_rss"]) if r["key"] != "copy" else "",
                          fmt_ratio(vs), r["notes"]))
        widths = [max(len(x[i]) for x in lines + [head]) for i in range(len(head) - 1)]

        def fmt(cols):
            out = []
            for i, (c, w) in enumerate(zip(cols, widths)):
                out.append(c.ljust(w) if i == 0 else c.rjust(w))
            return "  ".join(out + [cols[-1]]).rstrip()

        print()
        print(fmt(head))
        print("-" * (sum(widths) + 2 * len(widths) + 5))
        for x in lines:
            print(fmt(x))
        print("(MB = 10^6 bytes; RSS = peak resident memory of the server / client process)")
        if "srv_us" in self.r.get("p1", {}):
            print("%s (best run): server CPU us/datagram %.0f, client CPU us/datagram %.0f "
                  "(per datagram the server sent: the client receives about as many)" % (
                      self.r["p1"]["label"], self.r["p1"]["srv_us"], self.r["p1"]["cli_us"]))
        for w in self.warnings:
            print("note: " + w)

    def print_targets(self):
        r = self.r
        checks = []

        def ratio(a, b):
            return r[a]["mbps"] / r[b]["mbps"] if a in r and b in r else None

        def check(name, value, op, limit, detail=""):
            checks.append(make_check(name, value, op, limit, detail))

        def no_finish(key):
            """The ratio without the client's finish() (final fsync and rename), which the
            floor does not do."""
            if key not in r or "floor" not in r or not r[key].get("finish"):
                return ""
            x = r[key]
            return "; %.2f without the client's final fsync (%.2f s)" % (
                x["bytes"] / (x["seconds"] - x["finish"]) / MB / r["floor"]["mbps"],
                x["finish"])

        if self.rows:   # the loopback scenarios ran (not --paths-only)
            floor_rt = (r["floor"]["seconds"] / r["floor"]["sent"] * 1e6) if "floor" in r else 0
            check("1 part vs floor", ratio("p1", "floor"), ">=", 0.9,
                  "%s; floor %.0f us per round trip%s" % (r["p1"].get("cpu", ""), floor_rt,
                                                         no_finish("p1")) if "p1" in r else "")
            check("4 parts vs floor", ratio("p4", "floor"), ">", 1.0,
                  r["p4"].get("cpu", "") + no_finish("p4") if "p4" in r else "")
            check("5% loss vs lossless, 4 parts", ratio("loss4", "clean4"), ">=", 0.25)
            check("5% loss vs lossless, 1 part", ratio("loss1", "clean1"), ">=", 0.25)
            check("E. 10 ms RTT: default (auto) vs 1 part", ratio("rttauto", "rtt1"), ">=", 10)
            def median_ratio(a, b):   # the targets are medians of 3
                if a not in r or b not in r:
                    return None
                return r[a]["median_mbps"] / r[b]["median_mbps"]

            def medians(*keys):
                return "medians " + ", ".join("%s %.0f MB/s" % (k, r[k]["median_mbps"])
                                              for k in keys if k in r)

            check("F. loopback: default (auto) vs atftp", median_ratio("auto", "atftp"), ">=",
                  1.0, medians("auto", "atftp") if "atftp" in r
                  else "atftp not run (root, atftp and tftpd-hpa needed)")
            check("F. loopback: default (auto) vs 1 part", median_ratio("auto", "p1"), ">=", 1.0,
                  medians("auto", "p1"))
            check("20 clients: total vs 1 client alone", ratio("many", "one"), ">=", 0.7)
            check("20 clients: slowest / fastest", r.get("many", {}).get("slow_fast"), "<=", 3.0)
            single = [x for x in self.rows if x["key"] not in ("copy", "many", "atftp")]
            srv_peak = max_or_none([x["srv_rss"] for x in self.rows])
            cli_peak = max_or_none([x["cli_rss"] for x in single])
            check("peak RSS server, MB (all rows)", srv_peak, "<", 50)
            check("peak RSS client, MB (1-client rows)", cli_peak, "<", 50)
            if "many" in r:
                check("peak RSS of the 20-client row, MB", r["many"]["cli_rss"], "<", 50,
                      "one process per client" if self.args.clients_procs
                      else "all 20 clients in one process")
            if "sparse" in r:
                check("7. sparse file: peak RSS server, MB", r["sparse"]["srv_rss"], "<", 50)
                check("7. sparse file: peak RSS client, MB", r["sparse"]["cli_rss"], "<", 50)
        checks += self.path_checks
        for group, (sent, retx, runs) in self.lossless.items():
            checks.append(make_check("no loss: retransmitted %% of sent, %s" % group,
                                     100.0 * retx / sent if sent else None, "<=", 0.2,
                                     "%d of %d datagrams, %d runs" % (retx, sent, runs)))
        print()
        print("targets:")
        print_checks(checks)
        misses = sum(c[3] == "MISS" for c in checks)
        print("%d of %d targets met%s" % (sum(c[3] == "PASS" for c in checks), len(checks),
                                          ", %d missed" % misses if misses else ""))


def build_parser():
    p = argparse.ArgumentParser(description="Benchmark the UDP file-transfer tool.")
    p.add_argument("--quick", action="store_true",
                   help="sizes divided by 16, each scenario once: a smoke test of a few seconds")
    p.add_argument("--repeat", type=int, default=0,
                   help="runs of the floor, 1-part and 4-part scenarios, best shown "
                        "(default 3, 1 with --quick)")
    p.add_argument("--clients-procs", action="store_true",
                   help="scenario 5 with one client process each instead of 20 threads in one")
    p.add_argument("--skip-sparse", action="store_true", help="skip scenario 7 (2 GiB)")
    p.add_argument("--seed", type=int, default=1, help="seed of the loss pattern")
    paths = p.add_mutually_exclusive_group()
    paths.add_argument("--paths-only", action="store_true",
                       help="run only the path scenarios A-D (network namespaces, root only)")
    paths.add_argument("--no-paths", action="store_true",
                       help="skip the path scenarios A-D and the long paths L1-L4")
    paths.add_argument("--long-only", action="store_true",
                       help="run only the long paths L1-L4 (network namespaces, root only)")
    p.add_argument("--path-runs", type=int, default=0, metavar="N",
                   help="runs of each tool in each path scenario, median shown "
                        "(default 3, 1 with --quick)")
    p.add_argument("--path-size-mib", type=int, default=0, metavar="MIB",
                   help="file size of every path scenario (default 64/64/32/16 MiB for A/B/C/D, "
                        "8 MiB with --quick)")
    p.add_argument("--path-timeout", type=float, default=0, metavar="SECONDS",
                   help="time allowed to each download in the path scenarios "
                        "(default 60, 10 with --quick)")
    p.add_argument("--path-cburst", default="", metavar="SIZE",
                   help="htb ceil bucket of path B in tc's syntax, e.g. 256k (default: tc's "
                        "own, less than one packet at 1 Gbit/s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each row as it is done")
    p.add_argument("--child-server", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--child-client", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--child-host", default=LOOPBACK, help=argparse.SUPPRESS)
    p.add_argument("--child-floor-send", nargs=2, metavar=("FILE", "SIZE"),
                   help=argparse.SUPPRESS)
    p.add_argument("--child-floor-recv", nargs=3, metavar=("FILE", "BYTES", "PORT"),
                   help=argparse.SUPPRESS)
    p.add_argument("--child-delay", nargs=3, metavar=("TUN", "MICROSECONDS", "MTU"),
                   help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child_server:
        return child_server(args.child_server, args.child_host)
    if args.child_client:
        return child_client(args.child_client)
    if args.child_floor_send:
        return child_floor_send(args.child_floor_send[0], int(args.child_floor_send[1]))
    if args.child_floor_recv:
        f = args.child_floor_recv
        return child_floor_recv(f[0], int(f[1]), int(f[2]))
    if args.child_delay:
        d = args.child_delay
        return child_delay(d[0], int(d[1]), int(d[2]))
    global queue, signal, subprocess, tempfile
    import queue
    import signal
    import subprocess
    import tempfile

    def terminated(signum, frame):   # kill: clean up as on Ctrl-C (namespaces, children)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    bench = Bench(args)
    try:
        bench.run()
    except BenchError as exc:
        print("\nBENCHMARK FAILED: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()
    return 1 if bench.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
