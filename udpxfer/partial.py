"""Where a download's bytes live until it is whole: downloads/.NAME.part (the bytes, at their
offsets), .NAME.resume (a JSON record of which bytes are verified, each kept range with its
running CRC, the size and the version) and .NAME.lock (so two clients never share one), then the
atomic rename to the real name; and the listing's target in memory.

On resume the kept bytes are read once and checked against their CRCs: bytes damaged on disk
between two runs are fetched again, never saved as verified.

Relies on: ranges, errors, wire (the name rule). Must not know: sockets, transfers or the
protocol: it is given bytes at offsets and told when the file is whole.
"""

import os
import sys
import threading
import zlib

from udpxfer.errors import Failure
from udpxfer.ranges import RangeSet
from udpxfer.wire import crc_start, is_servable_name


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
        self.kept = []         # (start, end, R(end)) of each range kept: the record's
        self.damaged = []      # ranges the last record claimed that did not match their CRC
        self.f = None
        self.resumed = 0
        self.finished = False
        self._saver = None   # background record writer
        self._flusher = None   # background write-behind (_write_behind)
        self.unflushed = 0     # bytes written since the last write-behind ...
        self._written = {}     # ... in these ranges: end -> start (each part writes in order)
        self._lock = _lock(self.lock_path)
        try:
            os.remove(self.record_path + ".tmp")   # a record write of ours that did not end
        except OSError:
            pass
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
            kept = [(int(a), int(b), int(crc, 16)) for a, b, crc in rec["kept"]]
            if any(a < 0 or b > size or a >= b for a, b, _ in kept):
                raise ValueError("bad ranges")
            if os.path.getsize(self.part_path) < max([b for _, b, _ in kept] or [0]):
                raise ValueError("part file shorter than its record")
            kept = self._check(kept)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            self.discard()
            return
        self.size, self.version = size, version
        for a, b, crc in kept:
            self.keep(a, b, crc)
        self.resumed = self.done.total()

    def _check(self, kept):
        """The kept ranges whose bytes still match their running CRC (one pass over them);
        the others go to `damaged`, to be fetched again."""
        good = []
        with open(self.part_path, "rb", buffering=0) as f:
            for a, b, crc in kept:
                f.seek(a)
                r, left = crc_start(a), b - a
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    r = zlib.crc32(chunk, r)
                    left -= len(chunk)
                (good if left == 0 and r == crc else self.damaged).append((a, b, crc))
        self.damaged = [(a, b) for a, b, _ in self.damaged]
        return good

    def keep(self, start, end, crc):
        """The bytes [start, end) are in, accepted under the running CRC of a range that began
        at `start`, which is `crc` at `end`."""
        if start < end:
            self.done.add(start, end)
            self.kept.append((start, end, crc))

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
        kept = [(a, b, "%08x" % crc) for a, b, crc in self.kept + list(extra)]
        record = {"name": self.name, "size": self.size, "version": self.version, "kept": kept}
        fd = self.f.fileno() if self.f is not None else None
        if wait:
            self._write_record(fd, record)
        else:
            self._saver = threading.Thread(target=self._write_record, args=(fd, record),
                                           daemon=True)
            self._saver.start()

    def _write_record(self, fd, record):
        """Replace the record, or leave the previous one as it was: the new one is written and
        flushed to disk first (a full disk shows there, not after the rename)."""
        import json
        tmp = self.record_path + ".tmp"
        try:
            if fd is not None:
                os.fsync(fd)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.record_path)
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass   # the previous record stays valid; the next save tries again

    def reset(self, size=None, version=None):
        """Start over (the file changed on the server)."""
        self.close()
        self.discard()
        self.size, self.version, self.done, self.kept = size, version, RangeSet(), []

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
        for leftover in (self.record_path, self.record_path + ".tmp"):
            try:
                os.remove(leftover)
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

    def keep(self, start, end, crc):
        self.done.add(start, end)

    def reset(self, size=None, version=None):
        self.data = bytearray()
        self.size, self.version, self.done = size, version, RangeSet()

    def save(self, extra=(), wait=True):
        pass

    def close(self):
        pass

    def finish(self):
        pass
