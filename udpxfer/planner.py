"""The client's planning for one file, with no I/O: which range of the file to ask for next, and
how long it is.

What is missing and not in flight is a list of gaps; a new transfer takes the start of the first
gap, cut to a lane's share of everything still to fetch (guided self-scheduling: each range is
what is left divided by the lanes), so that ranges are long while much is left and the lanes
end together at the end of the file. No range is shorter than part_seconds at a lane's rate or
tail_min_size (each range costs a request and a round trip or two, hidden when the next one
starts before it ends), nor longer than max_part_size or range_seconds at a lane's rate (on a
long path a lane moves one datagram a round trip, and a range cut early must not end long after
the rest); and no gap is left shorter than the shortest range.
How many lanes there are is not its business: the download loop says (lanes.py decides).

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
        if there was one (cut for `lanes`), else first_range; the listing whole."""
        if self.listing:
            return None
        if lanes <= 1:
            return HUGE
        if self.size_hint:
            return self.piece(self.size_hint, lanes, dgram, 0.0)
        return self.s.first_range

    def min_piece(self, dgram, lane_rate):
        """The shortest range worth a request: part_seconds at a lane's rate, and two
        datagrams, at least tail_min_size."""
        return max(self.s.tail_min_size, 2 * int(dgram),
                   int((lane_rate or 0.0) * self.s.part_seconds))

    def piece(self, left, lanes, dgram, lane_rate):
        """A lane's share of the `left` bytes still to fetch, within [min_piece,
        max_part_size], and no longer than range_seconds at a lane's rate (`lane_rate`: 0 if
        not known yet, then first_range; None for no such limit): on a long path a lane moves
        one datagram a round trip, and a range cut while the lanes were few (startup) or the
        datagrams were big must not end long after the rest."""
        share = -(-left // max(1, lanes))
        least = self.min_piece(dgram, lane_rate)
        most = self.s.max_part_size
        if lane_rate is not None:   # (0: not known yet)
            most = min(most, int(self.s.range_seconds * lane_rate) if lane_rate
                       else self.s.first_range)
        return min(max(share, least), max(most, least))

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
