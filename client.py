#!/usr/bin/env python3
"""UDP file client: lists the server's files and downloads names from input.txt (protocol v2,
PROTOCOL.md).

Strategy: a file is fetched as byte ranges, up to --parts at a time, each range one stop-and-wait
transfer (ClientTransfer) over its own connected UDP socket; one single-threaded selector
loop drives them all. Bytes go straight to a partial file in downloads/ at their offsets, beside a
small JSON record of which bytes are verified, the file's size and the server's version token, so
an interrupted download resumes with only the missing bytes. A file is renamed to its real name
only when every byte is in, each accepted under its range's running CRC-32 and each range's
final CRC matching the server's EOF: downloads/ never holds a wrong file under a real name.
"""

import argparse
import gc
import os
import re
import selectors
import shutil
import socket
import sys
import threading
import time
from collections import OrderedDict

import config
from udpxfer.client_transfer import FINISHED, ClientTransfer
from udpxfer.display import duration, format_addr, human
from udpxfer.rtt import RttEstimator
from udpxfer.wire import HUGE, RECV_BUFSIZE, ProtocolError, is_servable_name, parse_listing

MiB = 1024 * 1024


class Failure(Exception):
    """A download failed for a reason to tell the user in one line. `retry`: whether trying
    again later may help (watch mode does)."""

    def __init__(self, message, retry=True):
        super().__init__(message)
        self.retry = retry


class NoServer(Failure):
    """Nothing has ever answered at the server's address: the port is closed (the OS reported
    it at once) or nothing answered within ClientSettings.no_answer_timeout. The cure is on the
    person's side (start server.py, or fix --host/--port), so it is said once, not per file."""

    def __init__(self, address, why):
        super().__init__("no server at %s (%s): start server.py first, or give its address "
                         "with --host and --port" % (format_addr(address), why))


# --- Small helpers ----------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_rate(text):
    """A --limit-rate value in bytes per second: "500K", "10M", "1G" or plain bytes ("250000");
    K, M and G are 1024, 1024**2 and 1024**3, as in curl and wget, lowercase too."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError("not a rate: %r (examples: 500K, 10M, 1G, 250000)" % text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Pacer:
    """--limit-rate: when each ACK may go, so that the bytes this process receives (every part
    and every file together, the listing too) keep to `rate` bytes per second.

    Stop-and-wait makes a cap simple: a part gets its next datagram only after its ACK, so an
    ACK held back slows the server down; nothing is dropped. The schedule is a virtual clock:
    the bytes received so far are due at `due`, and each datagram moves it on by len / rate.
    A wake-up that came late (the loop, the OS timer) is caught up as long as the clock is less
    than `slack` behind (two datagrams' time, or 20 ms at high rates), so pace is not lost to
    timer granularity; further behind means the link was idle (between files), and then the
    schedule starts afresh from now: idle time is never saved up for a burst.

    Held ACKs stay short: the cap is at least MIN_RATE and a file runs at most max_parts parts
    at a time, so each part hears from the server at least about once a second. That keeps a
    held ACK far below the client's stall timer (idle_timeout, 5 s) and below the server's
    largest retransmission timeout (2 s), which then learns the pace as a longer round trip
    instead of resending.
    """

    MIN_RATE = 64 * 1024     # one full datagram a second

    def __init__(self, rate):
        if rate < self.MIN_RATE:
            raise ValueError("a rate cap below %s/s is not possible: the server sends "
                             "datagrams of up to 64 KiB" % human(self.MIN_RATE))
        self.rate = float(rate)
        self.slack = max(2 * 65536, 0.02 * rate) / self.rate
        self.max_parts = max(1, int(rate // self.MIN_RATE))
        self.due = 0.0

    def take(self, n, now):
        """n bytes arrived at `now`: the time their ACK may be sent (if <= now: at once)."""
        due = self.due
        if due < now - self.slack:
            due = now   # idle: start afresh
        self.due = due = due + n / self.rate
        return due


class RangeSet:
    """Disjoint, sorted [start, end) ranges of a file: which bytes we have."""

    def __init__(self, ranges=()):
        self.ranges = []
        for a, b in ranges:
            self.add(a, b)

    def add(self, a, b):
        if a >= b:
            return
        out = []
        for x, y in self.ranges:
            if y < a or x > b:
                out.append((x, y))
            else:
                a, b = min(a, x), max(b, y)
        out.append((a, b))
        out.sort()
        self.ranges = out

    def total(self):
        return sum(b - a for a, b in self.ranges)

    def missing(self, size):
        """The gaps in [0, size)."""
        gaps, pos = [], 0
        for a, b in self.ranges:
            if a > pos:
                gaps.append((pos, min(a, size)))
            pos = max(pos, b)
        if pos < size:
            gaps.append((pos, size))
        return [(a, b) for a, b in gaps if a < b]

    def covers(self, size):
        return not self.missing(size)


class Printer:
    """What the person sees: lines, and on a terminal one progress line redrawn in place."""

    def __init__(self, quiet=False, verbose=False, stream=None):
        self.stream = stream or sys.stdout
        self.quiet, self.verbose = quiet, verbose
        self.tty = self.stream.isatty() and not quiet
        self._progress_shown = False
        self._last_draw = 0.0

    def line(self, text, always=False):
        """Print a line (unless quiet, for lines that are not results or errors)."""
        if self.quiet and not always:
            return
        self._clear()
        print(text, file=self.stream, flush=True)

    def detail(self, text):
        if self.verbose:
            self.line("  " + text)

    def _clear(self):
        if self._progress_shown:
            self.stream.write("\r\033[K")
            self._progress_shown = False

    def progress(self, name, have, size, rate, now, force=False):
        if not self.tty or (not force and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        if size:
            pct = 100.0 * have / size
            eta = duration((size - have) / rate) if rate > 0 else "--:--"
            text = "%s  %5.1f%%  %s / %s  %s/s  ETA %s" % (name, pct, human(have), human(size),
                                                            human(rate), eta)
        else:
            text = "%s  %s  %s/s" % (name, human(have), human(rate))
        width = shutil.get_terminal_size((80, 20)).columns - 1
        self.stream.write("\r\033[K" + text[:width])
        self.stream.flush()
        self._progress_shown = True


# --- Where a download's bytes live ------------------------------------------------------------

def _temp_base(out_dir, name):
    """Temporary names never equal a real name: they start with "." (not servable)."""
    if len(name.encode("utf-8")) > 180:   # keep within file-name length limits
        import hashlib   # rare: not imported at every start
        name = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
    return os.path.join(out_dir, "." + name)


_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    "%s%d" % (p, i) for p in ("COM", "LPT") for i in range(1, 10)}


def locally_safe_name(name):
    """Whether this system stores `name` as itself. The server's rule (is_servable_name) is
    checked first; on Windows also no device names, no characters it refuses or turns into
    something else (a trailing dot or space vanishes, ":" opens a stream of another file)."""
    if not is_servable_name(name):
        return False
    if os.name == "nt":
        if any(c in '<>:"|?*' for c in name) or name[-1] in ". ":
            return False
        if name.split(".")[0].upper().rstrip(" ") in _WINDOWS_RESERVED:
            return False
    return True


def _lock(path):
    """Hold an exclusive lock for this download, or raise Failure: two clients writing one
    partial file could rename the other's bytes into place. The OS drops it if we die."""
    for _ in range(3):
        f = open(path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise Failure("another client is downloading it into the same folder") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                return f
        except OSError:
            pass
        f.close()   # the file was replaced meanwhile: lock the new one
    raise Failure("cannot lock %s" % path)


# Written data waits in the page cache until the final fsync writes it all, a wait the user sees
# at the end (40 ms for 64 MiB here). Every WRITE_BEHIND bytes the kernel is asked to start
# writing it out meanwhile (and to drop it once clean: a download is not read back), so little
# is left for that fsync. Not fsync itself: that commits the journal, and on ext4 a commit holds
# the writes of the download loop for milliseconds. POSIX_FADV_DONTNEED starts the writeback on
# Linux; elsewhere nothing is done early and fsync does it all. It is given the ranges written
# since the last time, not the whole file: over the whole file each call walked every page of
# it, and the download loop's writes waited milliseconds behind it (long enough for the server
# to resend needlessly).
WRITE_BEHIND = 2 << 20

if hasattr(os, "posix_fadvise") and sys.platform.startswith("linux"):
    def _start_writeback(fd, ranges):
        try:
            for a, b in ranges:
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
else:
    _start_writeback = None


class PartialFile:
    """downloads/.NAME.part (the bytes, at their offsets) and .NAME.resume (the JSON record).

    The record never claims more than the part file holds: the data is flushed to disk before
    the record that mentions it is atomically replaced.
    """

    def __init__(self, out_dir, name):
        self.out_dir, self.name = out_dir, name
        self.final = os.path.join(out_dir, name)
        if os.path.dirname(os.path.abspath(self.final)) != os.path.abspath(out_dir):
            raise Failure("refusing a name that is not a plain file name", retry=False)
        if not locally_safe_name(name):
            raise Failure("this system cannot store that name safely", retry=False)
        base = _temp_base(out_dir, name)
        self.part_path, self.record_path = base + ".part", base + ".resume"
        self.lock_path = base + ".lock"
        self.size = self.version = None
        self.done = RangeSet()
        self.f = None
        self.resumed = 0
        self.finished = False
        self._saver = None   # background record writer
        self._flusher = None   # background write-behind (_write_behind)
        self.unflushed = 0     # bytes written since the last write-behind ...
        self._written = {}     # ... in these ranges: end -> start (each part writes in order)
        self._lock = _lock(self.lock_path)
        self._load()

    def release(self):
        """Let another client take this download over. The lock file goes too: a process
        that locked it meanwhile sees that its inode is no longer the path's (_lock)."""
        self.close()
        if self._lock is not None:
            for step in (lambda: os.remove(self.lock_path), self._lock.close,
                         lambda: os.remove(self.lock_path)):   # Windows: only once closed
                try:
                    step()
                except OSError:
                    pass
            self._lock = None

    def _load(self):
        try:
            with open(self.record_path, "r", encoding="utf-8") as f:
                import json   # here, not at the top: only a resumed download needs it
                rec = json.load(f)
            if rec.get("name") != self.name or not os.path.exists(self.part_path):
                raise ValueError("stale record")
            size, version = int(rec["size"]), str(rec["version"])
            done = RangeSet((int(a), int(b)) for a, b in rec["done"])
            if done.ranges and (done.ranges[0][0] < 0 or done.ranges[-1][1] > size):
                raise ValueError("bad ranges")
            if os.path.getsize(self.part_path) < (done.ranges[-1][1] if done.ranges else 0):
                raise ValueError("part file shorter than its record")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            self.discard()
            return
        self.size, self.version, self.done = size, version, done
        self.resumed = done.total()

    def open(self):
        if self.f is None:
            mode = "r+b" if os.path.exists(self.part_path) else "w+b"
            self.f = open(self.part_path, mode, buffering=0)
        return self.f

    if hasattr(os, "pwrite"):
        def write(self, offset, data):
            fd = self.open().fileno()
            self.unflushed += len(data)
            written = self._written
            written[offset + len(data)] = written.pop(offset, offset)
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
            if self.unflushed >= WRITE_BEHIND:
                self._write_behind(fd)
    else:  # Windows
        def write(self, offset, data):
            f = self.open()
            f.seek(offset)
            while data:
                data = data[f.write(data):]

    def _write_behind(self, fd):
        """Have the kernel start writing what is written so far to disk, in a thread (the call
        can take milliseconds), unless the last one is still running."""
        self.unflushed = 0
        if _start_writeback is None:
            self._written.clear()
            return
        if self._flusher is not None and self._flusher.is_alive():
            return   # its ranges wait for the next one
        ranges = [(a, b) for b, a in self._written.items()]
        self._written = {}
        self._flusher = threading.Thread(target=_start_writeback, args=(fd, ranges),
                                         daemon=True)
        self._flusher.start()

    def save(self, extra=(), wait=True):
        """Write the record: what is done, plus ranges of transfers still running.

        The data is fsynced before the record that claims it replaces the old one, so even a
        power cut never leaves a record promising bytes the disk does not hold. With
        wait=False this runs in a background thread (fsync releases the GIL), so the download
        does not pause; a save still running is not queued behind (the next one will come).
        """
        if self.size is None or self.finished:
            return
        if self._saver is not None:
            if not wait and self._saver.is_alive():
                return
            self._saver.join()
            self._saver = None
        ranges = RangeSet(self.done.ranges + list(extra)).ranges
        record = {"name": self.name, "size": self.size, "version": self.version, "done": ranges}
        fd = self.f.fileno() if self.f is not None else None
        if wait:
            self._write_record(fd, record)
        else:
            self._saver = threading.Thread(target=self._write_record, args=(fd, record),
                                           daemon=True)
            self._saver.start()

    def _write_record(self, fd, record):
        try:
            if fd is not None:
                os.fsync(fd)
            import json
            tmp = self.record_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(tmp, self.record_path)
        except OSError:
            pass   # the previous record stays valid; the next save tries again

    def reset(self, size=None, version=None):
        """Start over (the file changed on the server)."""
        self.close()
        self.discard()
        self.size, self.version, self.done = size, version, RangeSet()

    def discard(self):
        self.close()
        for path in (self.part_path, self.record_path):
            try:
                os.remove(path)
            except OSError:
                pass

    def close(self):
        self._join()
        if self.f is not None:
            self.f.close()
            self.f = None

    def _join(self):
        """Wait for the background threads (before the file descriptor they use is closed)."""
        for thread in (self._saver, self._flusher):
            if thread is not None:
                thread.join()
        self._saver = self._flusher = None

    def finish(self):
        """All bytes are in: flush, and give the file its real name in one atomic step."""
        self._join()
        f = self.open()
        f.truncate(self.size)
        os.fsync(f.fileno())
        if os.fstat(f.fileno()).st_ino != os.stat(self.part_path).st_ino:
            raise Failure("the partial file was replaced by someone else; not saving it")
        self.close()
        os.replace(self.part_path, self.final)
        self.finished = True
        try:
            os.remove(self.record_path)
        except OSError:
            pass


class MemoryTarget:
    """Where the listing goes: memory, bounded by max_list_bytes."""

    def __init__(self):
        self.data = bytearray()
        self.size = self.version = None
        self.done = RangeSet()
        self.resumed = 0

    def write(self, offset, payload):
        end = offset + len(payload)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = payload

    def reset(self, size=None, version=None):
        self.data = bytearray()
        self.size, self.version, self.done = size, version, RangeSet()

    def save(self, extra=(), wait=True):
        pass

    def close(self):
        pass

    def finish(self):
        pass


# --- The transfer loop ------------------------------------------------------------------------

# ClientTransfer outcomes that mean the range's end-to-end check failed: its bytes are wrong
# somewhere and must never be claimed by a record nor counted as done.
FAILED_CHECK = frozenset(("mismatch",))


class Part:
    """One range in flight: a socket, its ClientTransfer, and how far its bytes are written
    (t.pos moves when a payload is accepted, a moment before the payload is on disk; records
    must only claim written bytes, even if Ctrl-C falls in between)."""

    def __init__(self, sock, transfer):
        self.sock, self.t = sock, transfer
        self.written = transfer.start
        self.held_until = 0.0   # --limit-rate: what it sends is held until then (Pacer)
        self.held = []

    @property
    def failed_check(self):
        """The range's end-to-end check failed: none of its bytes may be trusted."""
        return self.t.outcome in FAILED_CHECK

    def claimable(self):
        """The bytes of this part a record may claim: [start, written), or none at all once
        the check failed (Ctrl-C can land between that and housekeeping)."""
        return None if self.failed_check else (self.t.start, self.written)


class PartsTuner:
    """How many parts to run at once when --parts is automatic: a hill climb on throughput.

    Parallel parts pay on long paths (each stop-and-wait part moves one datagram per round
    trip) and on lossy ones (another part's acknowledgements reveal a loss, and keep the path
    busy while one part waits), and only contend where the round trip is short and both cores
    are busy anyway (loopback). So: start with `start` parts (`long_start` on a path whose
    round trip is over `long_rtt`: there one part alone does little); every window (four round
    trips, at least `min_window` seconds) compare the rate with the window before. After a
    doubling that paid (rate up by more than `gain`), double again, up to `most`; after one
    that did not, go back and hold for `hold` windows before trying again. The three round
    trips after a change are not judged: new parts spend them asking.
    """

    def __init__(self, start, most, min_window=0.03, gain=1.1, hold=3, long_start=8,
                 long_rtt=0.002):
        self.n, self.most = start, most
        self.long_start, self.long_rtt = long_start, long_rtt
        self.min_window, self.gain, self.hold = min_window, gain, hold
        self._at = self._bytes = None
        self._before = None          # (n, rate) before the last doubling
        self._settle = False
        self._held = 0

    def cap(self, n):
        """Never more than n parts from now on (the server had no slot for more)."""
        self.most = self.n = n
        self._before, self._settle = None, False

    def update(self, now, have, rtt):
        """Called from housekeeping with the bytes in hand; returns the number of parts."""
        rtt = rtt or 0.0
        if self._at is None:
            self._at, self._bytes = now, have
            if rtt > self.long_rtt:
                self.n = max(self.n, min(self.long_start, self.most))
            return self.n
        if now - self._at < (3 * rtt if self._settle else max(self.min_window, 4 * rtt)):
            return self.n
        rate = (have - self._bytes) / (now - self._at)
        self._at, self._bytes = now, have
        if self._settle:
            self._settle = False
            return self.n
        if self._before is not None:
            n0, rate0 = self._before
            self._before = None
            if rate < rate0 * self.gain:          # the doubling did not pay: back, and hold
                self.n, self._held = n0, self.hold
                self._settle = True
                return self.n
        if self._held > 0:
            self._held -= 1
        elif self.n < self.most:
            self._before = (self.n, rate)
            self.n = min(self.n * 2, self.most)
            self._settle = True
        return self.n


class Client:
    """Talks to one server. fetch() drives the parts of one file (or the listing)."""

    def __init__(self, host, port, settings=None, printer=None, out_dir=config.DOWNLOADS_DIR):
        self.s = settings or config.ClientSettings()
        self.printer = printer or Printer()
        self.out_dir = out_dir
        # An ASCII name goes as bytes: a str would be IDNA-encoded, and importing that codec
        # costs a millisecond of every start (a non-ASCII name still gets it).
        infos = socket.getaddrinfo(host.encode("ascii") if host.isascii() else host, port, 0,
                                   socket.SOCK_DGRAM)
        self.family, _, _, _, self.server = infos[0]
        self.rtt = RttEstimator(self.s.request_timeout, self.s.request_timeout_min,
                                self.s.request_timeout_max)
        self.buf = bytearray(RECV_BUFSIZE)
        self.view = memoryview(self.buf)
        self.stats = {"transfers": 0, "stalls": 0, "restarts": 0}
        self._ports = OrderedDict()   # local port -> when it was last used
        # Whether the server ever answered (SIZE or ERROR): until then a refused port or
        # silence means "no server here" and ends a fetch early (NoServer); once it has
        # answered, silence is a restart or a lossy path and is waited out patiently.
        self.answered = False
        self.pacer = Pacer(self.s.limit_rate) if self.s.limit_rate else None
        self.last_fetch = None   # the _Fetch of the last fetch(), for its counters

    # A port used this recently is not used again: the server remembers finished transfers
    # for a few seconds (config.ServerSettings.recent_seconds) and ignores their late copies.
    PORT_QUARANTINE = 10.0

    def _socket(self):
        """A new connected socket on a port not used in the last PORT_QUARANTINE seconds."""
        rejected = []
        try:
            for _ in range(16):
                sock = socket.socket(self.family, socket.SOCK_DGRAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
                except OSError:
                    pass
                # Connected: the kernel drops datagrams from anyone but the server, and a new
                # port per transfer keeps late datagrams of old transfers out.
                try:
                    sock.connect(self.server)
                except OSError as exc:   # e.g. no route to the server
                    sock.close()
                    raise Failure("cannot reach %s: %s" % (
                        format_addr(self.server), exc.strerror or exc)) from None
                sock.setblocking(False)
                port = sock.getsockname()[1]
                now = time.monotonic()
                if now - self._ports.get(port, -self.PORT_QUARANTINE) >= self.PORT_QUARANTINE:
                    break
                rejected.append(sock)   # kept open while we look, so the OS picks another
            else:
                rejected.pop()          # no luck: use the last one all the same
            self._ports[port] = now
            self._ports.move_to_end(port)
            while len(self._ports) > 4096:
                self._ports.popitem(last=False)
            return sock
        finally:
            for r in rejected:
                r.close()

    def _flush(self, part, datagrams=None):
        """Send what the part's transfer has to send (or `datagrams`), unless it is held."""
        if datagrams is None:
            datagrams = part.t.datagrams_to_send()
            if part.held_until:   # --limit-rate: its ACK waits (see Pacer); so does the rest
                part.held += datagrams
                return
        for datagram in datagrams:
            try:
                part.sock.send(datagram)
            except OSError as exc:
                self.refused(exc)   # else the timers handle it (e.g. a server restarting)

    def _release(self, part):
        """Send what a part held back: its ACK is due, or the part is being closed."""
        held, part.held, part.held_until = part.held, [], 0.0
        self._flush(part, dict.fromkeys(held))   # repeats of one ACK go once

    def refused(self, exc):
        """A send or receive failed. A refusal (ICMP port unreachable: ECONNREFUSED, or
        ConnectionResetError on Windows) from a server that never answered means nothing
        listens there: raise NoServer. Anything else is left to the timers."""
        if not self.answered and isinstance(exc, (ConnectionRefusedError,
                                                  ConnectionResetError)):
            raise NoServer(self.server, "nothing is listening there") from None

    # -- listing

    def listing(self, give_up=None):
        target = MemoryTarget()
        self.fetch(None, target, give_up=give_up)
        return parse_listing(target.data)

    # -- one file

    def fetch(self, name, target, parts=1, size_hint=None, give_up=None, label=None):
        """Fetch `name` (None: the listing) into `target`. Returns seconds spent moving bytes.
        Raises Failure with a reason for the person. Afterwards (also after a Failure)
        self.last_fetch.unneeded counts the DATA datagrams that brought no new byte."""
        if self.pacer is not None:   # under a cap, no more parts than the cap can feed
            parts = min(parts, self.pacer.max_parts) if parts else self.pacer.max_parts
        self.last_fetch = _Fetch(self, name, target, parts, size_hint,
                                 self.s.give_up if give_up is None else give_up, label)
        return self.last_fetch.run()


class _Fetch:
    """The state of one file's download: which ranges are missing, in flight, backed off."""

    def __init__(self, client, name, target, parts, size_hint, give_up, label):
        self.c, self.name, self.target = client, name, target
        self.s = client.s
        # parts == 0: automatic: the tuner decides how many run at once (see _plan_for).
        self.tuner = None
        if name is None:
            parts = 1
        elif parts == 0:
            self.tuner = PartsTuner(self.s.auto_parts_start, self.s.auto_parts_max)
        self.parts = self.tuner.n if self.tuner else max(1, parts)
        self.plan_parts = self._plan_for(self.parts)
        self.size_hint = size_hint
        self.give_up = give_up
        self.label = label or (name if name is not None else "listing")
        self.active = []
        self.queue = []             # ranges still to request, in order
        self.sel = selectors.DefaultSelector()
        self.failures = 0           # consecutive attempts that ended without progress
        self.retry_at = 0.0
        self.restarts = 0
        self.warned = False
        # Requests and SIZE carry no checksum, so a bit flip can turn "a.bin" into another
        # existing name. A file is saved only once two independent requests got the same
        # (size, version) (a resume record counts as one), and NOT_FOUND must come twice.
        self.confirmations = 1 if target.version is not None else 0
        self.not_found = 0
        self.bad_requests = 0
        self._have = -1             # bytes in hand at the last progress check
        self.attempts = 0           # parts ended without finishing, since the last progress
        self.busy = 0               # of which the server had no slot for (ERROR BUSY)
        self.unneeded = 0           # DATA received that brought no new byte (retransmissions)
        self.most_parts = 0         # the most parts that ran at once
        self.min_piece = self.s.min_part_size   # the shortest range to cut (see _progress)
        self.tail_piece = self.s.tail_min_size  # ... and to ask for near the end (_tail_cut)

    # -- planning

    def _plan_for(self, parts):
        """How many parts the ranges are cut for: with automatic parts, for one doubling more
        than run now (each new range costs a round trip or two; few big ones are cheapest), and
        cut again when the number changes."""
        if self.tuner is None:
            return parts
        return min(2 * parts, self.s.auto_parts_max)

    def _plan(self):
        """Cut what is missing (and not in flight) into ranges."""
        size = self.target.size
        busy = RangeSet(self.target.done.ranges + [(p.t.start, self._end_of(p.t))
                                                   for p in self.active])
        gaps = busy.missing(size)
        if self.plan_parts == 1:
            self.queue = gaps
            return
        piece = self._piece(size)
        self.queue = [(a, min(a + piece, b)) for a, b in gaps for a in range(a, b, piece)]

    def _end_of(self, t):
        """Where a transfer's range ends: known from its SIZE, else as asked."""
        if t.end is not None:
            return t.end
        if t.length is None or self.target.size is None:
            return self.target.size if self.target.size is not None else HUGE
        return min(t.start + t.length, self.target.size)

    def _first_length(self):
        """Before the size is known only one range runs; guess its length from the listing."""
        if self.name is None:
            return None
        if self.plan_parts == 1:
            return HUGE
        if self.size_hint:
            # With automatic parts it is cut for the most parts: the tuner does not know the
            # path yet, and on a long one a big first range would finish long after the rest.
            return self._piece(self.size_hint,
                               self.s.auto_parts_max if self.tuner else self.plan_parts)
        return self.s.min_part_size

    def _piece(self, size, parts=None):
        """The length of one range of a file of `size` bytes fetched in `parts` parts (default
        plan_parts): about size / (2 * parts) so the parts finish together, within
        [min_piece, max_part_size]."""
        return min(max(size // (2 * (parts or self.plan_parts)), self.min_piece),
                   self.s.max_part_size)

    def _start(self, start, length, now):
        expect = (self.target.size, self.target.version) if self.target.version else None
        t = ClientTransfer(self.name, start, length, now, self.s, expect,
                           request_rto=self.c.rtt.rto if self.c.rtt.srtt else None)
        part = Part(self.c._socket(), t)
        self.sel.register(part.sock, selectors.EVENT_READ, part)
        self.active.append(part)
        self.most_parts = max(self.most_parts, len(self.active))
        self.c.stats["transfers"] += 1
        self.c._flush(part)
        self.c.printer.detail("%s: asking for [%d, %s)" % (
            self.label, start, "end" if length is None or length >= HUGE
            else start + length))

    def _schedule(self, now):
        if now < self.retry_at:
            return
        if self.target.size is None:
            if not self.active:
                self._start(0, self._first_length(), now)
            return
        if not self.queue and not self.active:
            self._plan()
        while self.queue and len(self.active) < self.parts:
            a, b = self.queue[0]
            n = self._tail_cut(b - a)
            if n < b - a:
                self.queue[0] = (a + n, b)
            else:
                self.queue.pop(0)
            self._start(a, n, now)

    def _tail_cut(self, length):
        """How much of the next planned range of `length` bytes to ask for: near the end of
        the file only a part's share of what is left (asked for or not), so that the parts
        finish together (config.ClientSettings.tail_seconds). Never a remainder shorter than
        the shortest range."""
        left = sum(b - a for a, b in self.queue)
        left += sum(self._end_of(p.t) - p.t.pos for p in self.active)
        n = max(-(-left // self.parts), self.tail_piece)
        return length if length - n < self.tail_piece else n

    # -- the loop

    def run(self):
        """Drive the parts until the file is whole. The per-datagram path is kept short (receive,
        ACK, write); timers, scheduling, the record and progress run at most every
        HOUSEKEEPING seconds, or at once when a part finishes or a first SIZE arrives."""
        target, c = self.target, self.c
        self.started = time.monotonic()
        self.last_progress = self.started
        self.last_save = self.started
        if target.resumed and target.size:
            c.printer.line("%s: resuming, %s of %s already here" % (
                self.label, human(target.resumed), human(target.size)))
        if target.size is not None:
            self._check_space(target.size - target.done.total())
            self._plan()
        buf, view, select = c.buf, c.view, self.sel.select
        pacer = c.pacer
        next_check = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_check:
                    if self._housekeeping(now):
                        return now - self.started
                    next_check = self._next_check(now)
                if not self.active:   # waiting to retry; select() of nothing fails on Windows
                    time.sleep(max(min(next_check - now, self.HOUSEKEEPING), 0))
                    continue
                for key, _ in select(max(next_check - now, 0)):
                    part = key.data
                    try:
                        n = part.sock.recv_into(buf)
                    except OSError as exc:   # spurious wake-up, or ICMP refused
                        c.refused(exc)
                        continue
                    t = part.t
                    now = time.monotonic()
                    payload = t.receive_datagram(view[:n], now)
                    if pacer is not None and payload is not None:
                        due = pacer.take(len(payload), now)
                        if due > now:   # _flush holds the ACK; housekeeping sends it then
                            part.held_until = due
                            next_check = min(next_check, due)
                    c._flush(part)
                    if payload is not None:
                        target.write(t.pos - len(payload), payload)
                        part.written = t.pos
                    elif t.state == FINISHED or (t.size is not None and target.size is None):
                        next_check = 0.0
                    elif buf.startswith(b"DATA", 0, n):
                        self.unneeded += 1   # a retransmission (or a damaged copy)
        finally:   # also on Ctrl-C: keep every accepted byte for the next run
            if target.size is not None:
                try:
                    target.save(self._in_flight())
                except OSError:
                    pass
            for part in self.active:
                self._close(part)
            target.close()
            self.sel.close()

    HOUSEKEEPING = 0.05

    def _in_flight(self):
        """Bytes of running parts that are written and not known bad, for the record."""
        return [r for r in (p.claimable() for p in self.active) if r is not None]

    def _next_check(self, now):
        timers = [p.t.get_timer() for p in self.active]
        timers += [p.held_until for p in self.active if p.held_until]
        if self.retry_at > now:
            timers.append(self.retry_at)
        return min(timers + [now + self.HOUSEKEEPING])

    def _housekeeping(self, now):
        """Everything but moving bytes. Returns True when the file is complete and saved."""
        target = self.target
        for part in self.active:
            if part.held_until and part.held_until <= now:
                self.c._release(part)   # --limit-rate: its ACK is due
        if not self.c.answered:
            self._check_answered(now)
        for part in list(self.active):
            if part not in self.active:
                continue   # a restart closed it
            t = part.t
            if t.size is not None and target.size is None:
                self._adopt(t)
            t.handle_timer(now)
            self.c._flush(part)
            if t.state == FINISHED:
                self._ended(part, now)
            elif t.size is not None and self._conflicts(t):
                self._restart("the file changed on the server", now)
                break
        self._progress(now)
        if now - self.last_progress > self.give_up:
            if self.busy and self.busy == self.attempts:
                raise Failure("server busy (%s had no free transfer slot); gave up after %d s"
                              % (format_addr(self.c.server), self.give_up))
            raise Failure("server at %s not answering; gave up after %d s" % (
                format_addr(self.c.server), self.give_up))
        if target.size is not None and target.done.covers(target.size) and not self.active:
            if self.confirmations >= 2 or self.name is None:
                target.finish()
                return True
            if now >= self.retry_at:   # an empty range at the end: SIZE, EOF, done
                self._start(target.size, 0, now)
            return False
        self._schedule(now)
        if self.active and now - self.last_save >= self.s.record_interval:
            self.last_save = now
            target.save(self._in_flight(), wait=False)
        return False

    def _check_answered(self, now):
        """Until the server first answers: NoServer after no_answer_timeout (or give_up if
        shorter) of silence, for systems and firewalls that report no ICMP refusal."""
        if any(p.t.size is not None or p.t.error_code is not None for p in self.active):
            self.c.answered = True
        else:
            limit = min(self.s.no_answer_timeout, self.give_up)
            if now - self.started >= limit:
                raise NoServer(self.c.server, "no answer in %g s" % limit)

    def _progress(self, now):
        have = self.target.done.total() + sum(p.t.received for p in self.active)
        if have > self._have:
            self._have = have
            self.last_progress = now
            self.failures = 0
            self.attempts = self.busy = 0
            if self.warned:
                self.c.printer.line("%s: server is answering again" % self.label)
                self.warned = False
        rate = (have - self.target.resumed) / max(now - self.started, 1e-6)
        # (Here the parts wanted, not those running: near the end, several may just have ended.)
        self.tail_piece = max(self.s.tail_min_size, int(
            rate / max(len(self.active), self.parts) * self.s.tail_seconds))
        if self.tuner is not None and self.target.size is not None:
            # Ranges that last part_seconds at the rate a part gets: few on a fast path.
            per_part = rate / max(len(self.active), 1)
            self.min_piece = max(self.s.min_part_size, int(per_part * self.s.part_seconds))
            self.parts = self.tuner.update(now, have, self.c.rtt.srtt)
            if self._plan_for(self.parts) != self.plan_parts:
                self.plan_parts = self._plan_for(self.parts)
                self._plan()   # ranges not yet asked for are cut again for that many parts
        if self.name is not None:
            self.c.printer.progress(self.label, have, self.target.size, rate, now)

    def _adopt(self, t):
        """The first SIZE tells the file's size and version."""
        if self.name is None and t.size > self.s.max_list_bytes:
            raise Failure("the server announced a listing of %s; refusing" % human(t.size),
                          retry=False)
        self._check_space(t.size)
        self.target.size, self.target.version = t.size, t.version
        self._take_rtt(t)   # now, so that the other parts start with a measured timeout
        self._plan()

    def _take_rtt(self, t):
        if t.rtt_sample is not None:
            self.c.rtt.sample(t.rtt_sample)
            t.rtt_sample = None   # each sample counts once

    def _conflicts(self, t):
        return (t.size, t.version) != (self.target.size, self.target.version)

    def _check_space(self, need):
        if self.name is None:
            return
        try:
            free = shutil.disk_usage(self.c.out_dir).free
        except OSError:
            return
        if need > free:
            raise Failure("needs %s but only %s is free in %s" % (human(need), human(free),
                                                                  self.c.out_dir))

    def _close(self, part):
        if part.held_until:   # a held ACK still goes out (Ctrl-C, a failure, a restart)
            self.c._release(part)
        self.sel.unregister(part.sock)
        part.sock.close()

    def _ended(self, part, now):
        t = part.t
        self.active.remove(part)
        self._close(part)
        self._take_rtt(t)
        outcome = t.outcome
        if t.version is not None and not self._conflicts(t):
            self.confirmations += 1
        self.c.printer.detail("%s: [%d, %s) %s%s" % (self.label, t.start, t.end, outcome,
                                                    " " + t.error_code if t.error_code else ""))
        if outcome == "done":
            self.target.done.add(t.start, part.written)
            self.bad_requests = self.not_found = 0
            return
        if outcome == "version" or outcome == "changed":
            # ERROR CHANGED starts the file over (PROTOCOL.md), even where the version in a new
            # SIZE would come back the same: a server's version may be coarser than its check
            # (a modification time in whole seconds), and keeping the bytes read before the
            # change would then save a file made of two versions. A forged ERROR costs a restart.
            return self._restart("the file changed on the server", now)
        self.attempts += 1
        if outcome == "error" and t.error_code == "BUSY":
            self.busy += 1
            if self._carry_on_without(part):
                return
        if outcome == "error" and t.error_code == "BAD_REQUEST" and t.size is None:
            # Our request was valid for the file we know, so either it was damaged on the way
            # or the file shrank under it: the second time in a row, start over.
            self.bad_requests += 1
            if self.bad_requests >= 2:
                return self._restart("the file changed on the server", now)
        # NOT_FOUND twice in a row is final. Any other error, known or not (a bit flip can
        # damage the code), is retried with back-off until give_up.
        if outcome == "error" and t.error_code == "NOT_FOUND":
            self.not_found += 1
            if self.not_found >= 2:
                raise Failure("not on the server", retry=False)
        else:
            self.not_found = 0
        if part.failed_check:
            self.c.printer.line("%s: CRC mismatch on [%d, %d); fetching it again" % (
                self.label, t.start, t.end))
            # A record saved while it ran listed those bytes: replace it at once.
            self.target.save(self._in_flight())
        elif self.name is None:
            pass   # a listing cannot be resumed: it starts over
        else:
            self.target.done.add(t.start, part.written)   # accepted bytes: covered by crcs
        if self.name is None:
            self.target.reset()
        elif self.target.size is not None:   # else the first range is simply asked again
            self.queue.insert(0, (t.start if part.failed_check else part.written,
                                  self._end_of(t)))
            self.queue = [r for r in self.queue if r[0] < r[1]]
        self.c.stats["stalls"] += 1
        if t.received == 0 or outcome != "stalled":
            self.failures += 1
            delay = min(self.s.retry_initial * 2 ** min(self.failures - 1, 30),
                        self.s.retry_max)
            self.retry_at = now + delay
            if outcome == "stalled" and self.failures >= 2 and not self.warned:
                self.warned = True
                self.c.printer.line("%s: server at %s not answering; retrying" % (
                    self.label, format_addr(self.c.server)))

    def _carry_on_without(self, part):
        """The server had no slot for this part (ERROR BUSY) while others of the file run:
        keep its bytes, put the rest of its range back in the queue, and run no more parts
        than are running now. Not a failure: nothing is wrong, the server is shared. Returns
        False when no other part runs (then it is retried with back-off like any failure)."""
        if not self.active or self.name is None or self.target.size is None:
            return False
        t = part.t
        self.target.done.add(t.start, part.written)
        self.queue.insert(0, (part.written, self._end_of(t)))
        self.queue = [r for r in self.queue if r[0] < r[1]]
        self.parts = max(1, len(self.active))
        if self.tuner is not None:   # the tuner never asks for more than the server gives
            self.tuner.cap(self.parts)
        self.c.printer.detail("%s: server busy; going on with %d parts" % (self.label,
                                                                          self.parts))
        return True

    def _restart(self, why, now):
        self.restarts += 1
        self.c.stats["restarts"] += 1
        if self.restarts > self.s.max_restarts:
            raise Failure("%s %d times; giving up" % (why, self.restarts - 1))
        self.c.printer.line("%s: %s; starting over" % (self.label, why))
        self.bad_requests = 0
        self.confirmations = 0
        self._have = -1              # progress counts afresh for the new version
        self.last_progress = now
        for part in self.active:
            self._close(part)
        self.active = []
        self.queue = []
        self.target.reset()
        self.retry_at = 0.0


# --- What the person runs ---------------------------------------------------------------------

def read_names(path):
    """input.txt: one name per line; blank lines and # comments skipped; spaces trimmed."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    names = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and line not in names:
            names.append(line)
    return names


class App:
    def __init__(self, args, settings, printer):
        self.args, self.s, self.p = args, settings, printer
        self.client = Client(args.host, args.port, settings, printer, args.out)
        self.sizes = {}
        self.seen = set()
        self.retry = set()
        self.started = time.monotonic()
        self.results = []   # one dict per file tried: see result()
        self.json = getattr(args, "json", False)   # args may be a bare Namespace (tests)

    def show_listing(self, give_up, always=False):
        entries = self.client.listing(give_up=give_up)
        self.sizes = dict(entries)
        if always and self.json:   # --list --json: one object per file on the server
            for name, size in entries:
                self._print_json({"name": name, "size": size})
            return entries
        width = max([len(n) for n, _ in entries] + [4])
        self.p.line("%d files on %s:" % (len(entries), format_addr(self.client.server)),
                    always)
        for name, size in entries:
            self.p.line("  %-*s  %10s" % (width, name, human(size)), always)
        return entries

    def download(self, name, give_up):
        """One name, start to end, with its result line. True if the file is here and whole;
        a name worth trying again later goes into self.retry."""
        p = self.p
        started = time.monotonic()
        if not is_servable_name(name):
            p.line("%s: not a valid file name; skipped" % name, always=True)
            return self.result(name, started, error="not a valid file name")
        final = os.path.join(self.args.out, name)
        if os.path.isfile(final) and name not in self.sizes:
            try:   # a file here already: is it complete? Ask for a fresh listing once.
                self.sizes = dict(self.client.listing(give_up=min(give_up, 10.0)))
            except Failure:
                pass
        size = self.sizes.get(name)
        if os.path.isfile(final) and os.path.getsize(final) == size:
            p.line("%s: already in %s; skipped" % (name, self.args.out))
            return self.result(name, started, size=size, skipped=True)
        target = None
        self.client.last_fetch = None
        try:
            target = PartialFile(self.args.out, name)
            seconds = self.client.fetch(name, target, self.s.parts, size, give_up)
        except NoServer:
            raise   # not about this file: main() says it once
        except Failure as exc:
            p.line("%s: FAILED: %s" % (name, exc), always=True)
            if exc.retry:
                self.retry.add(name)
            return self.result(name, started, target, error=str(exc))
        except OSError as exc:
            p.line("%s: FAILED: %s" % (name, exc), always=True)
            return self.result(name, started, target, error=str(exc))
        finally:
            if target is not None:
                target.release()
        rate = (target.size - target.resumed) / max(seconds, 1e-6)
        p.line("%s: %s in %.2f s, %s/s, verified (CRC-32)%s" % (
            name, human(target.size), seconds, human(rate),
            ", resumed" if target.resumed else ""), always=True)
        return self.result(name, started, target, seconds=seconds)

    def result(self, name, started, target=None, seconds=None, error=None, size=None,
               skipped=False):
        """Record how one file went (for the summary line, and printed as one JSON line with
        --json); returns whether it is here and whole. "bytes" are those fetched in this run
        (not those resumed), "retransmissions" the DATA datagrams that brought no new byte."""
        fetch = self.client.last_fetch if target is not None else None
        if seconds is None:
            seconds = time.monotonic() - started
        moved = resumed = 0
        if target is not None:
            size, resumed = target.size, target.resumed
            moved = target.size - resumed if error is None else max(
                target.done.total() - resumed, 0)
        record = {"name": name, "result": "ok" if error is None else "failed", "size": size,
                  "bytes": moved, "resumed": resumed, "seconds": round(seconds, 3),
                  "rate": int(moved / max(seconds, 1e-6)),
                  "parts": fetch.most_parts if fetch else 0,
                  "retransmissions": fetch.unneeded if fetch else 0}
        if skipped:
            record["skipped"] = "already here"
        if error is not None:
            record["error"] = error
        self.results.append(record)
        if self.json:
            self._print_json(record)
        return error is None

    @staticmethod
    def _print_json(obj):
        import json
        print(json.dumps(obj), flush=True)

    def summary(self):
        """The last line after --once or names: the outcome at a glance."""
        ok = [r for r in self.results if r["result"] == "ok"]
        skipped = sum(1 for r in ok if r.get("skipped"))
        moved = sum(r["bytes"] for r in self.results)
        seconds = time.monotonic() - self.started
        return "done: %d file%s%s, %d failed, %s in %.2f s, %s/s" % (
            len(ok), "" if len(ok) == 1 else "s",
            " (%d already here)" % skipped if skipped else "",
            len(self.results) - len(ok), human(moved), seconds,
            human(moved / max(seconds, 1e-6)))

    def run_names(self, names):
        ok = True
        for name in names:
            if name in self.seen:
                continue
            self.seen.add(name)
            ok = self.download(name, self.s.give_up) and ok
        return ok

    def watch(self):
        """Download every new name in input.txt, checking it every poll_interval, until Ctrl-C."""
        path = self.args.input
        self.p.line("watching %s for names (Ctrl-C to stop)" % path)
        later = {}   # name -> when to try it again (the server may come back)
        stamp = None
        while True:
            try:
                st = os.stat(path)
                new_stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                new_stamp = None
            now = time.monotonic()
            due = [n for n, when in later.items() if when <= now]
            if new_stamp != stamp or due:
                stamp = new_stamp
                for name in read_names(path):
                    if name in self.seen and name not in due:
                        continue
                    self.seen.add(name)
                    later.pop(name, None)
                    self.retry.discard(name)
                    if not self.download(name, self.s.watch_give_up) and name in self.retry:
                        later[name] = time.monotonic() + self.s.watch_retry
            time.sleep(self.s.poll_interval)


def _rate_arg(text):
    try:
        rate = parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if rate < Pacer.MIN_RATE:
        raise argparse.ArgumentTypeError(
            "%s is below the smallest cap, 64K: the server sends datagrams of up to 64 KiB and "
            "resends one not acknowledged within 2 s" % text)
    return rate


def build_parser():
    p = argparse.ArgumentParser(
        description="Download files from a UDP file server (protocol v2). With no names, show "
                    "the server's files, download every name in the input file and keep "
                    "watching it for new names until Ctrl-C.")
    p.add_argument("names", nargs="*", metavar="NAME", help="download these names and exit")
    p.add_argument("--host", default=config.HOST,
                   help="server address: a name, an IPv4 address or an IPv6 one such as ::1 "
                        "(default %(default)s)")
    p.add_argument("--port", type=int, default=config.PORT,
                   help="server port (default %(default)s)")
    p.add_argument("--input", default=config.INPUT_FILE,
                   help="file of names to download, one per line (default: input.txt in the "
                        "project folder)")
    p.add_argument("--out", default=config.DOWNLOADS_DIR,
                   help="folder to save into (default: downloads/ in the project folder)")
    p.add_argument("--parts", default="auto", metavar="N|auto",
                   help="ranges of one file fetched at the same time: 1 to 64, or auto "
                        "(default: auto, which opens more while they make the download faster)")
    p.add_argument("--give-up", type=float, default=config.ClientSettings().give_up,
                   metavar="SECONDS",
                   help="with --once or names: give up on a file after this long without "
                        "progress (default %(default)s; watch mode waits 10 times longer)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="download the names in the input file now, then exit")
    mode.add_argument("--list", action="store_true", help="show the server's files and exit")
    p.add_argument("--limit-rate", type=_rate_arg, metavar="RATE",
                   help="receive at most RATE bytes per second, all parts and files together, "
                        "e.g. 500K, 10M, 1G (K = 1024, M = 1024^2, G = 1024^3, as in curl and "
                        "wget; lowercase and plain bytes too); at least 64K (default: no cap)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per finished file on stdout (name, result, "
                        "size, bytes, resumed, seconds, rate, parts, retransmissions; error or "
                        "skipped); the lines meant for people go to stderr")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only result lines and errors")
    g.add_argument("-v", "--verbose", action="store_true", help="also print each part")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.names and (args.list or args.once):
        parser.error("names cannot be combined with --list or --once")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    if args.parts == "auto":
        args.parts = 0
    elif not args.parts.isdigit() or not 1 <= int(args.parts) <= 64:
        parser.error("--parts must be auto or a number from 1 to 64")
    else:
        args.parts = int(args.parts)
    if args.give_up <= 0:
        parser.error("--give-up must be more than 0")
    settings = config.ClientSettings(parts=args.parts, give_up=args.give_up,
                                     watch_give_up=10 * args.give_up,
                                     limit_rate=args.limit_rate or 0)
    # --json: stdout holds only JSON lines; what a person reads goes to stderr.
    printer = Printer(quiet=args.quiet, verbose=args.verbose,
                      stream=sys.stderr if args.json else None)
    try:
        os.makedirs(args.out, exist_ok=True)
        app = App(args, settings, printer)
        pacer = app.client.pacer
        if pacer is not None and pacer.max_parts < args.parts:
            printer.line("--limit-rate %s/s: at most %d part%s at a time" % (
                human(pacer.rate), pacer.max_parts, "" if pacer.max_parts == 1 else "s"))
        if args.names:
            ok = app.run_names(args.names)
            printer.line(app.summary(), always=True)
            return 0 if ok else 1
        if args.list or args.once:
            try:
                app.show_listing(settings.give_up, always=args.list)
            except NoServer:
                raise
            except Failure as exc:
                printer.line("cannot get the list: %s" % exc, always=True)
                return 1
            if args.list:
                return 0
            ok = app.run_names(read_names(args.input))
            printer.line(app.summary(), always=True)
            return 0 if ok else 1
        delay = settings.retry_initial
        waiting = False
        while True:   # watch mode: keep asking for the list until the server answers
            try:
                app.show_listing(settings.give_up)
                break
            except NoServer as exc:
                if not waiting:   # said once; then the client waits quietly
                    printer.line("%s; waiting for it (Ctrl-C to stop)" % exc, always=True)
                    waiting = True
            except Failure as exc:
                if not exc.retry:
                    printer.line("cannot get the list: %s" % exc, always=True)
                    return 1
                printer.line("cannot get the list: %s; retrying" % exc, always=True)
            time.sleep(delay)
            delay = min(2 * delay, settings.retry_max)
        app.watch()
    except NoServer as exc:
        printer.line(str(exc), always=True)
        return 1
    except KeyboardInterrupt:
        printer.line("interrupted; partial downloads are kept and resume on the next run",
                     always=True)
        return 130
    except socket.gaierror as exc:
        printer.line("client: cannot resolve --host %s: %s" % (args.host, exc.strerror or exc),
                     always=True)
        return 1
    except (OSError, ProtocolError) as exc:
        printer.line("client: %s" % exc, always=True)
        return 1
    return 0


if __name__ == "__main__":
    # What the imports made lives until exit: keep the garbage collector from walking it again.
    # A full collection of it took 4 ms here: a pause in the middle of a download (the server's
    # timer is 2 ms on a fast path), and once more at exit. (Here, not in main(): callers that
    # run main() in their own process keep their collector as it is.)
    gc.freeze()
    sys.exit(main())
