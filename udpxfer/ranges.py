"""Which bytes of a file we have: disjoint, sorted [start, end) ranges.

Relies on: nothing. Must not know: where the bytes are, or how they came.
"""


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

    def covers_range(self, a, b):
        """Whether [a, b) is wholly in hand."""
        return a >= b or any(x <= a and b <= y for x, y in self.ranges)
