"""The client's planning for one file, with no I/O: which range of the file to ask for next, and
how long it is.

What is missing and not in flight is a list of gaps; a new transfer takes the start of the first
gap, cut to a lane's share of everything still to fetch (guided self-scheduling: each range is
what is left divided by the lanes), so that ranges are long while much is left and the lanes
end together at the end of the file. No range is shorter than a few dozen datagrams or
part_seconds at a lane's rate (each range costs a request and a round trip or two), nor longer
than max_part_size; and no gap is left shorter than that. How many lanes there are is not its
business: the download loop says (lanes.py decides).

Relies on: ranges, wire (HUGE: "to the end"), config (the client's settings). Must not know:
sockets, transfers' messages, files, the clock, or how results are shown.
"""

from udpxfer.ranges import RangeSet
from udpxfer.wire import HUGE


class RangePlanner:
    """The ranges of one file still to ask for (a listing is one range, from 0 to its end)."""

    def __init__(self, settings, listing=False, size_hint=None):
        self.s = settings
        self.listing = listing
        self.size_hint = size_hint
        self.gaps = []               # [start, end) missing and not asked for, in order

    def plan(self, size, busy):
        """What is left to ask for in a file of `size` bytes: the gaps left by `busy`, the
        ranges in hand or in flight."""
        self.gaps = RangeSet(busy).missing(size)

    def first_length(self, lanes, dgram):
        """Before the size is known only one range runs: its length, from the listing's size
        if there was one (cut for `lanes`), else min_part_size; the listing whole."""
        if self.listing:
            return None
        if lanes <= 1:
            return HUGE
        if self.size_hint:
            return self.piece(self.size_hint, lanes, dgram, 0.0)
        return self.s.min_part_size

    def min_piece(self, dgram, lane_rate):
        """The shortest range worth a request: range_datagrams datagrams, and part_seconds at
        a lane's rate, at least tail_min_size."""
        return max(self.s.tail_min_size, int(self.s.range_datagrams * dgram),
                   int(lane_rate * self.s.part_seconds))

    def piece(self, left, lanes, dgram, lane_rate):
        """A lane's share of the `left` bytes still to fetch, within [min_piece,
        max_part_size]."""
        share = -(-left // max(1, lanes))
        return min(max(share, self.min_piece(dgram, lane_rate)), self.s.max_part_size)

    def next_range(self, lanes, dgram, lane_rate, left_running):
        """Take the next range to ask for: (start, length). `left_running`: the bytes the
        running transfers of the file still have to fetch (they count as left)."""
        a, b = self.gaps[0]
        if lanes <= 1:
            n = b - a                # one lane: each gap in one range
        else:
            left = sum(y - x for x, y in self.gaps) + left_running
            n = self.piece(left, lanes, dgram, lane_rate)
            if b - a - n < self.min_piece(dgram, lane_rate):
                n = b - a            # never leave a gap shorter than the shortest range
        if n < b - a:
            self.gaps[0] = (a + n, b)
        else:
            self.gaps.pop(0)
        return a, n

    def put_back(self, start, end):
        """A range that was asked for and not finished goes first in line again."""
        if start < end:
            self.gaps.insert(0, (start, end))
