"""How much a client keeps in flight: the number of lanes that run at once and the pace at which
their ACKs go, sized from what it measures, as BBR sizes its window and its pacing rate
(Cardwell et al., "BBR: Congestion-Based Congestion Control", 2016; draft-cardwell-iccrg-bbr).

Each lane is a stop-and-wait transfer: it carries one datagram per round trip, and every ACK the
client sends makes the server send the next DATA of that lane at once. So the lanes are the
window (bytes that may be in flight: lanes x datagram size) and the ACKs are the pacing: holding
an ACK back holds back the DATA it would bring. The model:

- the bottleneck rate: the most bytes delivered in one round trip, over the last 10 rounds;
- the path's round trip: the least time from an ACK to the DATA it brought, over 10 seconds;
- the lanes: enough for `cwnd gain` times the bandwidth-delay product, plus those still
  asking (a lane brings nothing for its first two round trips); the pacing: `pacing gain`
  times the bottleneck rate.

Startup doubles the lanes every round (pacing at twice the rate) until the rate stops growing or
the round trip shows a queue; drain then paces below the rate until the queue is gone; and in
steady state the pacing gain cycles 1.25, 0.75, 1 x 6 (probe for more, then drain what the
probe queued). Random loss alone changes nothing: it lowers neither the rate delivered per round
nor the least round trip. A queue that keeps growing (another flow filling the bottleneck) or
losses in bursts do: the rate the client gets falls, and the lanes and the pace follow it down.

Where the round trip is under pacing_min_rtt (loopback, a LAN) nothing is paced: there the
round trip is mostly the two processes' own work, and the lanes alone keep both cores busy.

Relies on: nothing but settings. Must not know: sockets, the clock (`now` comes in), files,
transfers or the wire format.
"""

from collections import deque

STARTUP, DRAIN, PROBE = "startup", "drain", "probe"
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


class LaneController:
    """The window (lanes) and the pacing rate of one client (see the module's docstring).

    The download loop calls delivered(n) for every payload accepted (cheap: the hot path),
    rtt_sample(r) for every ACK -> DATA time it measures, and update(now, ...) from
    housekeeping, which ends a round when one round trip has passed; then `window` says how
    many lanes may carry data and `pacing_rate` (bytes per second, or None) how fast their ACKs
    may go. `fixed` (--parts N) fixes the window at N lanes and paces nothing.
    """

    def __init__(self, settings, now=0.0, fixed=0):
        s = self.s = settings
        self.fixed = 0
        self.phase = STARTUP
        self.window = s.lanes_start
        self.max_window = s.lanes_max         # at most; less once the server said BUSY
        self.fix(fixed)
        self.pacing_rate = None
        self.bytes = 0               # delivered in all
        self.datagrams = 0
        self.bw = 0.0                # the bottleneck rate, bytes per second
        self.min_rtt = None          # the path's round trip
        self._min_rtt_at = now
        self._rates = deque(maxlen=s.bw_rounds)
        self._round_at = now
        self._round_bytes = 0
        self._round_datagrams = 0
        self._round_rtt = None       # the least sample of this round
        self._tick_rtt = None        # ... and since the last update
        self._queued_ticks = 0       # updates in a row whose least sample showed a queue
        self.rounds = 0
        self._full_bw = 0.0          # startup: the rate to beat by 25%
        self._full_count = 0
        self._cycle = 0
        self.dgram = s.lanes_datagram_guess   # payload bytes per datagram, as seen

    # -- the hot path

    def delivered(self, n):
        self.bytes += n
        self.datagrams += 1

    def rtt_sample(self, r):
        if self._round_rtt is None or r < self._round_rtt:
            self._round_rtt = r
        if self._tick_rtt is None or r < self._tick_rtt:
            self._tick_rtt = r

    # -- once a round

    def update(self, now, limited=False):
        """From housekeeping. `limited`: fewer lanes carried data than the window allowed
        (too little left to fetch): the round's rate says nothing of the path, unless higher.
        Returns the window."""
        s = self.s
        rtt, self._tick_rtt = self._tick_rtt, None
        if self.phase == STARTUP and rtt is not None and self._queued(rtt):
            # A queue in the least round trip of two updates in a row (a quarter round trip
            # each): the pipe is full now, not a round later (as HyStart++ sees it, RFC 9406).
            self._queued_ticks += 1
            if self._queued_ticks >= 2 and self.rounds > 2 and not self.fixed:
                self.phase = DRAIN
                self._size(now)
        else:
            self._queued_ticks = 0
        length = max(self.min_rtt or 0.0, s.round_min)
        if now - self._round_at < length:
            return self.window
        self._end_round(now, limited)
        return self.window

    def _queued(self, rtt):
        """Whether a round trip shows a queue: over queue_factor times the path's, and
        queue_margin more."""
        return (self.min_rtt is not None
                and rtt > self.min_rtt * self.s.queue_factor + self.s.queue_margin)

    def _end_round(self, now, limited):
        s = self.s
        seconds = now - self._round_at
        got = self.bytes - self._round_bytes
        if self.datagrams > self._round_datagrams:
            per = got / (self.datagrams - self._round_datagrams)
            self.dgram = per if self._round_datagrams == 0 else self.dgram + (per - self.dgram) / 4
        rtt = self._round_rtt
        if rtt is not None and (self.min_rtt is None or rtt <= self.min_rtt
                                or now - self._min_rtt_at > s.min_rtt_seconds):
            self.min_rtt, self._min_rtt_at = rtt, now
        self._round_at, self._round_bytes = now, self.bytes
        self._round_datagrams, self._round_rtt = self.datagrams, None
        self.rounds += 1
        if got and (not limited or got / seconds > self.bw):
            self._rates.append(got / seconds)
            self.bw = max(self._rates)
        if self.fixed:
            self.window = min(self.fixed, self.max_window)
            return
        queued = rtt is not None and self._queued(rtt)
        if self.phase == STARTUP:
            if self.bw >= self._full_bw * 1.25:
                self._full_bw, self._full_count = self.bw, 0
            elif not limited:
                self._full_count += 1
            if self._full_count >= s.full_rounds or (queued and self.rounds > 2):
                self.phase = DRAIN
        elif self.phase == DRAIN:
            if not queued:
                self.phase, self._cycle = PROBE, 0
        else:
            self._cycle = (self._cycle + 1) % len(PROBE_GAINS)
        self._size(now)

    def _size(self, now):
        """The window and the pacing rate for the round to come."""
        s = self.s
        if self.phase == STARTUP:
            pacing_gain, cwnd_gain = s.startup_gain, s.startup_cwnd_gain
        elif self.phase == DRAIN:
            pacing_gain, cwnd_gain = 1.0 / s.startup_gain, s.cwnd_gain
        else:
            pacing_gain, cwnd_gain = PROBE_GAINS[self._cycle], s.cwnd_gain
        bdp = self.bw * (self.min_rtt or 0.0) / max(self.dgram, 1.0)
        window = int(cwnd_gain * bdp) + 1
        if self.phase == STARTUP:
            # Twice as many lanes every round while the rate grows: a lane brings data only two
            # round trips after it opens, so the window runs ahead of the rate it has measured,
            # up to startup_cwnd_gain times that (the rate lags, as the lanes do), and it never
            # shrinks before the pipe is full.
            window = max(min(2 * self.window, window), self.window)
        # At most twice as many as last round: a rate measured over one round can be a burst.
        window = max(min(window, 2 * self.window), s.lanes_min)
        self.window = min(window, self.max_window)
        paced = self.min_rtt is not None and self.min_rtt >= s.pacing_min_rtt and self.bw > 0
        self.pacing_rate = pacing_gain * self.bw if paced else None

    def fix(self, n):
        """--parts N: N lanes, and no pace (0: decided from what is measured, again)."""
        self.fixed = n or 0
        if self.fixed:
            self.window = min(self.fixed, self.max_window)
            self.pacing_rate = None
        else:
            self.window = max(min(self.window, self.max_window), self.s.lanes_min)

    def cap(self, n):
        """The server had no slot for more than n lanes (or a rate cap cannot feed more):
        never ask for more."""
        self.max_window = max(1, min(self.max_window, n))
        self.window = min(self.window, self.max_window)

    def plan_lanes(self):
        """How many lanes a file's ranges are cut for: during startup the window will grow
        (the path is not known yet), so for up to eight times as many."""
        if self.phase == STARTUP and not self.fixed:
            return min(self.max_window, 8 * self.window)
        return self.window
