"""The served folder: which names are servable (regular files directly inside it, valid UTF-8,
not hidden, no link leading out), each file's size and version token, the listing (also written
to the list file), and the open files a transfer reads from, whose identity is checked at every
read so that a change is never missed.

Relies on: wire (the name rule, the listing format), server_transfer (MemoryEntry, Changed: the
interface of what is served), config. Must not know: sockets, transfers or the protocol's timers.
"""

import hashlib
import logging
import os
import stat
import time

import config
from udpxfer.server_transfer import Changed, MemoryEntry, Unreadable
from udpxfer.wire import format_listing, is_servable_name

log = logging.getLogger("udpxfer.server")


def file_identity(st):
    """What must stay the same while a file is served. The change time is in it because no
    user call can set it back: a rewrite in place with the old size and the old mtime put back
    (cp -p, touch -r, rsync) still moves st_ctime_ns. (On Windows st_ctime is the creation
    time, so there such a rewrite goes unnoticed; README.md, "Limits".)"""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_version(st):
    """Changes whenever the content may have changed: inode, size, modification and change
    time. A digest of them keeps the token a fixed 32 visible characters (the wire allows 1..64)
    whatever the numbers are (negative or far-future times included)."""
    fields = "%d %d %d %d" % (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return hashlib.sha256(fields.encode("ascii")).hexdigest()[:32]


class FileSource:
    """An open file being served; read() checks its identity so a change is never missed."""

    def __init__(self, path, identity):
        self.f = open(path, "rb", buffering=0)
        try:
            self.identity = identity
            if not self.unchanged():
                raise Changed()
        except BaseException:
            self.f.close()
            raise
        self.fd = self.f.fileno()

    if hasattr(os, "pread"):
        def read(self, offset, n):
            return os.pread(self.fd, n, offset)
    else:  # Windows
        def read(self, offset, n):
            self.f.seek(offset)
            return self.f.read(n) or b""

    if hasattr(os, "preadv"):
        def readinto(self, offset, view):
            """Read into a caller's buffer (a memoryview); returns the part filled."""
            return view[:os.preadv(self.fd, [view], offset)]
    else:  # Windows, macOS before 11
        def readinto(self, offset, view):
            self.f.seek(offset)
            return view[:self.f.readinto(view) or 0]

    def unchanged(self):
        return file_identity(os.fstat(self.f.fileno())) == self.identity

    def close(self):
        self.f.close()


class FileEntry:
    __slots__ = ("path", "size", "version", "identity")

    def __init__(self, path, st):
        self.path, self.size, self.version, self.identity = path, st.st_size, file_version(st), \
            file_identity(st)

    @property
    def key(self):
        """What makes two entries one open file for the transfers that read it."""
        return self.path, self.identity

    def open(self):
        try:
            return FileSource(self.path, self.identity)
        except PermissionError:
            raise Unreadable() from None


class Folder:
    """The served folder: which names are servable, and the listing (also in file_list.txt)."""

    def __init__(self, root, list_path=None, settings=None):
        self.root = os.path.realpath(root)
        self.list_path = list_path
        self.s = settings or config.ServerSettings()
        self.files = {}             # name -> size: what the last scan found
        self._listing = None
        self._listing_bytes = None
        self._scanned_at = self._checked_at = None
        self._dir_mtime = None
        self._unreadable = set()    # names said to be unreadable (said once, until readable)
        if not os.path.isdir(self.root):
            if os.path.exists(self.root):
                raise NotADirectoryError("%s is a file, not a folder (--dir names the folder "
                                         "to serve)" % root)
            raise FileNotFoundError("no such folder: %s" % root)
        if list_path is not None and self._inside(os.path.realpath(list_path)):
            raise ValueError("the list file must not be inside the served folder")

    def lookup(self, name):
        """The entry for a servable name, checked on disk now; None for anything else.
        Raises Unreadable for a file the server may not read (said in the log once)."""
        if not is_servable_name(name):
            return None
        path = os.path.join(self.root, name)
        # A drive letter ("C:x") or anything that is not one plain component is refused here.
        if os.path.dirname(path) != self.root or os.path.basename(path) != name:
            return None
        try:
            real = os.path.realpath(path)
            if not self._inside(real):
                return None   # a link that leads outside the folder
            st = os.stat(real)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if not self._readable(name, real):
            raise Unreadable()
        return FileEntry(real, st)

    def _readable(self, name, path):
        """Whether the server may read the file; the first time it may not, the log says so
        (the operator can fix the permissions), and again once it may."""
        if os.access(path, os.R_OK):
            if name in self._unreadable:
                self._unreadable.discard(name)
                log.info("%s is readable again: served", name)
            return True
        if name not in self._unreadable:
            self._unreadable.add(name)
            log.warning("cannot read %s (permission denied): not listed, and refused to "
                        "clients", os.path.join(self.root, name))
        return False

    def _inside(self, real):
        try:
            return os.path.commonpath([real, self.root]) == self.root and real != self.root
        except ValueError:   # different drives on Windows
            return False

    def scan(self):
        """Rescan the folder; rewrite the list file if the listing changed."""
        found = {}
        try:
            self._dir_mtime = os.stat(self.root).st_mtime_ns
            entries = list(os.scandir(self.root))
        except OSError as exc:
            log.error("cannot read %s: %s", self.root, exc)
            self._dir_mtime = None
            entries = []
        for e in entries:
            name = e.name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue   # not valid UTF-8 on disk: never listed nor served
            if not is_servable_name(name):
                continue
            try:
                if e.is_file(follow_symlinks=False):   # the common case: no realpath needed
                    if self._readable(name, e.path):
                        found[name] = e.stat(follow_symlinks=False).st_size
                    continue
                entry = self.lookup(name)   # a link: served only if it stays inside the folder
            except (OSError, Unreadable):
                continue
            if entry is not None:
                found[name] = entry.size
        self.files = found
        self._scanned_at = self._checked_at = time.monotonic()
        data = format_listing(found.items())
        if data != self._listing_bytes:
            self._listing_bytes = data
            self._listing = MemoryEntry(data)
            self._write_list(data)
        return found

    def _write_list(self, data):
        if self.list_path is None:
            return
        tmp = self.list_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.list_path)
        except OSError as exc:
            log.error("cannot write %s: %s", self.list_path, exc)

    def listing(self):
        """The listing entry, rescanning first unless a scan was made very recently (a flood of
        LIST requests must not turn into a flood of folder scans) and the folder's own mtime
        says no name came or went since (one stat)."""
        if (self._scanned_at is None
                or time.monotonic() - self._scanned_at >= self.s.list_rescan_interval
                or self._folder_mtime() != self._dir_mtime):
            self.scan()
        return self._listing

    def _folder_mtime(self):
        try:
            return os.stat(self.root).st_mtime_ns
        except OSError:
            return None

    def maybe_rescan(self, now):
        """Keep file_list.txt fresh without stalling transfers: every scan_interval look at the
        folder's own mtime (one stat; it changes when names come and go) and rescan if it
        moved; rescan anyway every full_scan_interval (sizes of files written in place)."""
        if self._scanned_at is None:
            self.scan()
            return
        if now - self._checked_at < self.s.scan_interval:
            return
        self._checked_at = now
        if (self._folder_mtime() != self._dir_mtime
                or now - self._scanned_at >= self.s.full_scan_interval):
            self.scan()
