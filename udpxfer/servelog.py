"""What the server tells its operator: one line per file served to a client (who, what, how
much, how fast, how many datagrams were resent), however many ranges and lanes the client
fetched it in; each range's own start and end only at debug level (-v).

A file's transfers are summed per client (its socket where it runs lanes, its IP where it opens
a socket per transfer) and the line is written once none of them has run for `linger` seconds:
a client asks for the next range of a file while, or just after, the last one ends.

Relies on: display (text for people), ranges. Must not know: sockets, the clock (`now` comes
in), the wire format, or how transfers run.
"""

from udpxfer.display import format_addr, human
from udpxfer.ranges import RangeSet

# How a transfer's outcome reads in the file's line, when it is the reason the file stopped.
_STOPPED = {"timeout": "the client went quiet", "changed": "the file changed",
            "unreadable": "the server could not read it", "preempted": "its slot went to another",
            "busy": "no free slot", "shutdown": "the server stopped"}


class _Served:
    __slots__ = ("who", "name", "size", "first", "last", "bytes", "transfers", "running",
                 "retransmissions", "early", "stopped", "flush_at", "asked", "got")

    def __init__(self, who, name, size, now):
        self.who, self.name, self.size = who, name, size
        self.first = self.last = now
        self.bytes = self.transfers = self.running = self.retransmissions = self.early = 0
        self.stopped = None          # why the last transfer that did not end well ended
        self.flush_at = None
        self.asked, self.got = RangeSet(), RangeSet()   # bytes asked for, and acknowledged


class ServeLog:
    """Sums each client's transfers of a file into one line (see the module's docstring)."""

    def __init__(self, logger, linger=1.0):
        self.log = logger
        self.linger = linger
        self.files = {}          # (who, name) -> _Served
        self.lines = 0           # files reported so far
        self.bytes = 0           # their bytes

    @staticmethod
    def _who(t):
        return format_addr(t.addr) if t.lane is not None else t.addr[0]

    def started(self, t, now):
        key = (self._who(t), t.name)
        served = self.files.get(key)
        if served is None:
            served = self.files[key] = _Served(key[0], t.name, t.entry.size, now)
        served.transfers += 1
        served.running += 1
        served.asked.add(t.start, t.end)
        served.flush_at = None
        self.log.debug("%s: start %s [%d, %d) of %d bytes%s", format_addr(t.addr), t.name,
                       t.start, t.end, t.entry.size,
                       "" if t.lane is None else " on lane %d" % t.lane)

    def ended(self, t, now):
        """A transfer that had started (its SIZE acknowledged) ended."""
        moved = t.pos - t.start
        self.log.debug("%s: %s %s [%d, %d): %d bytes in %.3f s, %d retransmissions (%d early)",
                       format_addr(t.addr), t.outcome, t.name, t.start, t.end, moved,
                       now - t.activated, t.retransmissions, t.early_retransmissions)
        served = self.files.get((self._who(t), t.name))
        if served is None:
            return
        served.bytes += moved
        served.got.add(t.start, t.pos)
        served.retransmissions += t.retransmissions
        served.early += t.early_retransmissions
        served.last = now
        served.running -= 1
        if t.outcome not in ("done", "replaced"):
            served.stopped = t.outcome
        if served.running <= 0:
            served.flush_at = now + self.linger

    def flush(self, now, everything=False):
        """Write the lines of files whose transfers have all ended `linger` seconds ago (all of
        them, when the server stops)."""
        for key, s in list(self.files.items()):
            if everything or (s.flush_at is not None and s.flush_at <= now):
                del self.files[key]
                self._write(s)

    def _write(self, s):
        self.lines += 1
        self.bytes += s.bytes
        seconds = max(s.last - s.first, 1e-6)
        what = "the listing" if s.name == "<list>" else s.name
        resent = ""
        if s.retransmissions:
            resent = ", %d datagram%s resent%s" % (
                s.retransmissions, "" if s.retransmissions == 1 else "s",
                " (%d early)" % s.early if s.early else "")
        # Every byte asked for was acknowledged (a range that stalled may have been asked for
        # again on another lane, and delivered there): the file was served.
        if s.stopped is None or all(s.got.covers_range(a, b) for a, b in s.asked.ranges):
            self.log.info("%s: sent %s, %s in %.2f s, %s/s%s", s.who, what, human(s.bytes),
                          seconds, human(s.bytes / seconds), resent)
        else:
            self.log.info("%s: %s stopped after %s of %s (%s)%s", s.who, what, human(s.bytes),
                          human(s.size), _STOPPED.get(s.stopped, s.stopped), resent)
