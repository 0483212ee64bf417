"""The client's planning for one download, with no I/O: which ranges of the file to ask for
next, how long each is, and how many run at once (the parts tuner, when --parts is automatic).

The download loop tells it what is in hand and what runs (offsets and byte counts, the rate, the
round trip) and asks for the next range; it never sees a socket, a clock (`now` comes in) or a
file, so tests drive it on a virtual clock.

Relies on: ranges, wire (HUGE: "to the end"), config (the client's settings). Must not know:
sockets, transfers' messages, files, or how results are shown.
"""

from udpxfer.ranges import RangeSet
from udpxfer.wire import HUGE


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


class RangePlanner:
    """The ranges of one file still to ask for, and how many parts run at once.

    Ranges are cut to about size / (2 * parts) so the parts finish together (within
    [min_piece, max_part_size]); with automatic parts they are cut for one doubling more than run
    now, and what is not yet asked for is cut again when the tuner changes its mind. Near the end
    each new range is only a part's share of what is left (guided self-scheduling). A listing is
    one range from 0 to its end.
    """

    def __init__(self, settings, parts, listing=False, size_hint=None):
        self.s = settings
        self.listing = listing
        # parts == 0: automatic: the tuner decides how many run at once (see _plan_for).
        self.tuner = None
        if listing:
            parts = 1
        elif parts == 0:
            self.tuner = PartsTuner(settings.auto_parts_start, settings.auto_parts_max)
        self.parts = self.tuner.n if self.tuner else max(1, parts)
        self.plan_parts = self._plan_for(self.parts)
        self.size_hint = size_hint
        self.queue = []                          # ranges still to request, in order
        self.min_piece = settings.min_part_size  # the shortest range to cut (see update)
        self.tail_piece = settings.tail_min_size  # ... and to ask for near the end (tail_cut)

    def _plan_for(self, parts):
        """How many parts the ranges are cut for: with automatic parts, for one doubling more
        than run now (each new range costs a round trip or two; few big ones are cheapest), and
        cut again when the number changes."""
        if self.tuner is None:
            return parts
        return min(2 * parts, self.s.auto_parts_max)

    def plan(self, size, busy):
        """Cut what is missing of a file of `size` bytes into ranges: the gaps left by `busy`,
        the ranges in hand or in flight."""
        gaps = RangeSet(busy).missing(size)
        if self.plan_parts == 1:
            self.queue = gaps
            return
        piece = self.piece(size)
        self.queue = [(a, min(a + piece, b)) for a, b in gaps for a in range(a, b, piece)]

    def first_length(self):
        """Before the size is known only one range runs; guess its length from the listing."""
        if self.listing:
            return None
        if self.plan_parts == 1:
            return HUGE
        if self.size_hint:
            # With automatic parts it is cut for the most parts: the tuner does not know the
            # path yet, and on a long one a big first range would finish long after the rest.
            return self.piece(self.size_hint,
                              self.s.auto_parts_max if self.tuner else self.plan_parts)
        return self.s.min_part_size

    def piece(self, size, parts=None):
        """The length of one range of a file of `size` bytes fetched in `parts` parts (default
        plan_parts): about size / (2 * parts) so the parts finish together, within
        [min_piece, max_part_size]."""
        return min(max(size // (2 * (parts or self.plan_parts)), self.min_piece),
                   self.s.max_part_size)

    def next_range(self, left_running):
        """Take the next range to ask for: (start, length). `left_running`: the bytes the
        running parts still have to fetch."""
        a, b = self.queue[0]
        n = self.tail_cut(b - a, left_running)
        if n < b - a:
            self.queue[0] = (a + n, b)
        else:
            self.queue.pop(0)
        return a, n

    def tail_cut(self, length, left_running):
        """How much of the next planned range of `length` bytes to ask for: near the end of
        the file only a part's share of what is left (asked for or not), so that the parts
        finish together (config.ClientSettings.tail_seconds). Never a remainder shorter than
        the shortest range."""
        left = sum(b - a for a, b in self.queue) + left_running
        n = max(-(-left // self.parts), self.tail_piece)
        return length if length - n < self.tail_piece else n

    def update(self, now, have, rate, running, rtt, size):
        """From housekeeping: `have` bytes in hand, `rate` bytes per second so far, `running`
        parts, the smoothed round trip (or None), the file's size (None until known). Returns
        True when the ranges not yet asked for are to be cut again (call plan)."""
        # (Here the parts wanted, not those running: near the end, several may just have ended.)
        self.tail_piece = max(self.s.tail_min_size, int(
            rate / max(running, self.parts) * self.s.tail_seconds))
        if self.tuner is None or size is None:
            return False
        # Ranges that last part_seconds at the rate a part gets: few on a fast path.
        per_part = rate / max(running, 1)
        self.min_piece = max(self.s.min_part_size, int(per_part * self.s.part_seconds))
        self.parts = self.tuner.update(now, have, rtt)
        if self._plan_for(self.parts) != self.plan_parts:
            self.plan_parts = self._plan_for(self.parts)
            return True
        return False

    def put_back(self, start, end):
        """A range that was asked for and not finished goes first in line again."""
        self.queue.insert(0, (start, end))
        self.queue = [r for r in self.queue if r[0] < r[1]]

    def cap(self, n):
        """Run no more than n parts from now on (the server had no slot for more)."""
        self.parts = max(1, n)
        if self.tuner is not None:   # the tuner never asks for more than the server gives
            self.tuner.cap(self.parts)
