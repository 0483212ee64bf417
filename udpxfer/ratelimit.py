"""When each ACK may go, so that what the client receives keeps to a rate: the cap of
--limit-rate, and the pace the in-flight controller sets on a long path (lanes.py).

Relies on: display (byte counts in messages). Must not know: sockets, the clock (`now` comes
in), or which transfer an ACK belongs to.
"""

from udpxfer.display import human


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

    def __init__(self, rate, slack=0.02, cap=True):
        """`rate` bytes per second (None: no pace); `cap`: a --limit-rate, held to MIN_RATE;
        `slack`: how far behind the schedule may fall before it starts afresh (seconds at the
        rate, at least two datagrams' time)."""
        if cap and rate < self.MIN_RATE:
            raise ValueError("a rate cap below %s/s is not possible: the server sends "
                             "datagrams of up to 64 KiB" % human(self.MIN_RATE))
        self._slack = slack
        self.due = 0.0
        self.set(rate)

    def set(self, rate):
        """A new rate from now on (None: none)."""
        self.rate = None if rate is None else float(rate)
        if self.rate:
            self.slack = max(2 * 65536 / self.rate, self._slack)
            self.max_parts = max(1, int(self.rate // self.MIN_RATE))

    def take(self, n, now):
        """n bytes arrived at `now`: the time their ACK may be sent (if <= now: at once)."""
        due = self.due
        if due < now - self.slack:
            due = now   # idle: start afresh
        self.due = due = due + n / self.rate
        return due
