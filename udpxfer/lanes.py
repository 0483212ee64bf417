"""How much a client keeps in flight: the number of lanes that run at once and the pace at which
their ACKs go, sized from what it measures, as BBR sizes its window and its pacing rate
(Cardwell et al., "BBR: Congestion-Based Congestion Control", 2016; draft-cardwell-iccrg-bbr).

Each lane is a stop-and-wait transfer: it carries one datagram per round trip, and every ACK the
client sends makes the server send the next DATA of that lane at once. So the lanes are the
window (bytes that may be in flight: lanes x datagram size) and the ACKs are the pacing: holding
an ACK back holds back the DATA it would bring. The model:

- the bottleneck rate: the most bytes delivered in one round trip, over the last 10 rounds;
- the path's round trip: the least time from an ACK to the DATA it brought, over 10 seconds;
- the window: `cwnd gain` times the bandwidth-delay product, in bytes, counted in lanes of
  the server's datagram size (lanes still asking come on top: a lane brings nothing for its
  first two round trips); the pacing: `pacing gain` times the bottleneck rate.

Startup doubles the window every round (pacing at startup_gain times the rate, twice the
window's lanes open) until the rate stops growing or the round trip shows a queue; drain then
paces below the rate until the round trip is the path's again; and in steady state the pacing
gain cycles 1.25, 0.75, 1 x 6 (probe for more, then drain what the probe queued). Random loss
alone changes nothing: it lowers neither the rate delivered per round nor the least round trip.
A queue that keeps growing (another flow filling the bottleneck) or losses in bursts do: the
rate the client gets falls, and the lanes and the pace follow it down.

Where the round trip is under pacing_min_rtt (loopback, a LAN) nothing is paced: there the
round trip is mostly the two processes' own work, and the lanes alone keep both cores busy;
startup doubles them while the rate grows, and they stay at what last made it grow.

Relies on: nothing but settings. Must not know: sockets, the clock (`now` comes in), files,
transfers or the wire format.
"""

from collections import deque

STARTUP, DRAIN, PROBE = "startup", "drain", "probe"
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


class LaneController:
    """The window (lanes) and the pacing rate of one client (see the module's docstring).

    The download loop calls delivered(n, acked_at) for every payload accepted (cheap: the hot path),
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
        self.cwnd = s.lanes_start * s.lanes_datagram_guess   # bytes in flight, at most
        self.max_window = s.lanes_max         # at most; less once the server said BUSY
        self.fix(fixed)
        self.pacing_rate = None
        self.bytes = 0               # delivered in all
        self._full = [0, 0]          # bytes and count of whole datagrams since the last update
        self._round_full = [0, 0]    # ... in this round
        self.bw = 0.0                # the bottleneck rate, bytes per second
        self.min_rtt = None          # the path's round trip
        self.srtt = None             # a smoothed round trip (a queue included)
        self._min_rtt_at = now
        self._rates = deque(maxlen=s.bw_rounds)
        self._round_at = now
        self._round_bytes = 0
        self._sent_at = 0.0          # the latest ACK that brought a payload was sent then ...
        self._round_sent_at = None   # ... and at the end of the last round
        self._round_rtt = None       # the least sample of this round ...
        self._round_rtt2 = None      # ... and the next (see _end_round)
        self._tick_rtt = None        # ... and since the last update
        self._tick_n = self._round_n = 0   # samples since the last update, in this round
        self._queued_ticks = 0       # updates in a row whose least sample showed a queue
        self._careful = False        # startup sees a queue forming: slower
        self.rounds = 0
        self._full_bw = 0.0          # startup: the rate to beat by 25%
        self._full_count = 0
        self._full_cwnd = 0.0        # ... and the window that last beat it
        self._grew = False           # the last round beat it
        self._cycle = 0
        self._drain_rounds = 0
        self.dgram = s.lanes_datagram_guess   # payload bytes per datagram, as seen

    # -- the hot path

    def delivered(self, n, acked_at, whole=True, now=None):
        """A payload of n bytes, brought by the ACK sent at `acked_at` (None: sent more than
        once, it times nothing), which came at `now`; `whole`: not the short last datagram of
        a range (the datagram size is counted from these)."""
        self.bytes += n
        if whole:
            full = self._full
            full[0] += n
            full[1] += 1
        if acked_at is not None:
            if acked_at > self._sent_at:
                self._sent_at = acked_at
            if now is not None:
                self.rtt_sample(now - acked_at)

    def rtt_sample(self, r):
        self.srtt = r if self.srtt is None else self.srtt + (r - self.srtt) / 8
        least = self._round_rtt
        if least is None:
            self._round_rtt = r
        elif r < least:
            self._round_rtt, self._round_rtt2 = r, least
        elif self._round_rtt2 is None or r < self._round_rtt2:
            self._round_rtt2 = r
        if self._tick_rtt is None or r < self._tick_rtt:
            self._tick_rtt = r
        self._tick_n += 1

    # -- once a round

    def update(self, now, limited=False):
        """From housekeeping. `limited`: fewer lanes carried data than the window allowed
        (too little left to fetch): the round's rate says nothing of the path, unless higher.
        Returns the window."""
        s = self.s
        rtt, self._tick_rtt = self._tick_rtt, None
        samples, self._tick_n = self._tick_n, 0
        (got, count), self._full = self._full, [0, 0]
        self._round_full[0] += got
        self._round_full[1] += count
        if count >= s.size_samples and got / count > 1.1 * self.dgram:
            # The server's datagrams grew: as many bytes in flight are fewer lanes, now (the
            # lanes waiting to send their ACK would bring the bigger ones).
            self.dgram = got / count
            self._lanes()
        self._round_n += samples
        if samples < s.queue_samples:
            rtt = None        # too few to tell a queue from a lost datagram's late answer
        if self.phase == STARTUP and rtt is not None and not self.fixed:
            # Each update (a quarter round trip apart) looks at the least round trip since the
            # last: a queue that starts to form slows the startup down to careful_gain (as
            # HyStart++'s conservative slow start, RFC 9406: what was sent in the last round
            # trip is still on its way to the queue), and one there twice in a row ends it,
            # now rather than a round later.
            careful = self._queued(rtt, s.careful_factor, s.careful_margin)
            if careful != self._careful:
                self._careful = careful
                self._size(now)
            if self._queued(rtt):
                self._queued_ticks += 1
                if self._queued_ticks >= 2 and self.rounds > 2:
                    self.phase, self._drain_rounds = DRAIN, 0
                    self._size(now)
            else:
                self._queued_ticks = 0
        elif self.phase == DRAIN and rtt is not None \
                and not self._queued(rtt, s.careful_factor, s.careful_margin):
            # The queue that startup made is gone (the round trip is the path's again): cruise.
            self.phase, self._cycle = PROBE, 2
            self._size(now)
        length = max(self.min_rtt or 0.0, s.round_min)
        if now - self._round_at < length:
            return self.window
        self._end_round(now, limited)
        return self.window

    def _queued(self, rtt, factor=None, margin=None):
        """Whether a round trip shows a queue: over queue_factor times the path's, and
        queue_margin more (or the factor and margin given)."""
        if factor is None:
            factor, margin = self.s.queue_factor, self.s.queue_margin
        return self.min_rtt is not None and rtt > self.min_rtt * factor + margin

    def _end_round(self, now, limited):
        s = self.s
        # The round's delivery rate: its bytes over the longer of the time they took to come
        # and the time the ACKs that brought them took to go (as BBR's delivery rate samples:
        # a burst that a queue or a token bucket let through at once is not the path's rate).
        seconds = now - self._round_at
        if self._round_sent_at is not None:
            seconds = max(seconds, self._sent_at - self._round_sent_at)
        self._round_sent_at = self._sent_at if self._sent_at else None
        got = self.bytes - self._round_bytes
        # The server's datagram size: the mean payload of the round (but the short last one of
        # a range). The window is bytes; it is counted in lanes of this size.
        shrinking = False
        (full, count), self._round_full = self._round_full, [0, 0]
        if count >= s.size_samples:
            shrinking = full / count < 0.9 * self.dgram and self.rounds > 2
            self.dgram = full / count
        # The round's round trip: its second least sample, not the least. One sample that
        # timed the wrong ACK (0.0 s on a 50 ms path, once in a run of 1% loss) would be the
        # path's round trip for min_rtt_seconds: a bandwidth-delay product a fifth of the
        # path's, a window that shrank with the rate it let through, 4 lanes for 10 s.
        rtt = self._round_rtt2
        if rtt is None and self.min_rtt is None:
            rtt = self._round_rtt    # (the first round may have one)
        enough = self._round_n >= s.queue_samples
        self._round_n = 0
        if rtt is not None and (self.min_rtt is None or rtt <= self.min_rtt
                                or now - self._min_rtt_at > s.min_rtt_seconds):
            self.min_rtt, self._min_rtt_at = rtt, now
        self._round_at, self._round_bytes = now, self.bytes
        self._round_rtt = self._round_rtt2 = None
        self.rounds += 1
        if got and (not limited or got / seconds > self.bw):
            self._rates.append(got / seconds)
            self.bw = max(self._rates)
        if self.fixed:
            self.window = min(self.fixed, self.max_window)
            return
        queued = rtt is not None and enough and self._queued(rtt)
        if self.phase == STARTUP:
            self._grew = self.bw >= self._full_bw * 1.25
            if self._grew:
                self._full_bw, self._full_count, self._full_cwnd = self.bw, 0, self.cwnd
            elif not limited and not shrinking:
                # (While the server makes its datagrams smaller, after losses, the same lanes
                # carry fewer bytes: that says nothing of the pipe.)
                self._full_count += 1
            if self._full_count >= s.full_rounds or (queued and self.rounds > 2):
                self.phase, self._drain_rounds = DRAIN, 0
        elif self.phase == DRAIN:
            self._drain_rounds += 1
            if self._drain_rounds > s.drain_rounds_max:   # (a path whose round trip grew)
                self.phase, self._cycle = PROBE, 2
        else:
            self._cycle = (self._cycle + 1) % len(PROBE_GAINS)
        self._size(now)

    def _size(self, now):
        """The window and the pacing rate for the round to come."""
        s = self.s
        if self.phase == STARTUP:
            pacing_gain = s.careful_gain if self._careful else s.startup_gain
            cwnd_gain = s.startup_cwnd_gain
        elif self.phase == DRAIN:
            # (Gently: the lanes' ACKs wait longer the slower they go, and a server whose
            # timer fires first resends what was not lost.)
            pacing_gain, cwnd_gain = s.drain_gain, s.cwnd_gain
        else:
            pacing_gain, cwnd_gain = PROBE_GAINS[self._cycle], s.cwnd_gain
        bdp = self.bw * (self.min_rtt or 0.0)
        cwnd = cwnd_gain * bdp + self.dgram
        lan = self.min_rtt is not None and self.min_rtt < s.pacing_min_rtt
        if lan:
            # Loopback, a LAN: the round trip is mostly the two ends' own work, and the
            # bandwidth-delay product a lane or two; what more lanes buy is loss recovery in the
            # shadow of the others (at 5% loss, 4 lanes moved a third of what 32 did). So in
            # startup twice the lanes each round the rate grew by 25% (as the rounds, 5 ms,
            # span many round trips, one round tells), the same when it did not, and then the
            # window that last made it grow.
            if self.phase == STARTUP:
                cwnd = min(2 * self.cwnd if self._grew else self.cwnd,
                           s.lan_lanes_max * self.dgram)
            else:
                cwnd = max(cwnd, self._full_cwnd)
        elif self.phase == STARTUP:
            # Twice as much in flight every round while the rate grows: a lane brings data only
            # two round trips after it opens, so the window runs ahead of the rate it has
            # measured, up to startup_cwnd_gain times that (the rate lags, as the lanes do), and
            # it never shrinks before the pipe is full.
            cwnd = max(min(2 * self.cwnd, cwnd), self.cwnd)
        # At most twice as much as last round: a rate measured over one round can be a burst.
        self.cwnd = min(cwnd, 2 * self.cwnd, self.max_window * self.dgram)
        before = self.window
        self._lanes()
        # And at most twice as many lanes: smaller datagrams (a server that saw losses) may be
        # back to their size within a round trip, and lanes cannot be taken back (each runs its
        # range to the end, its ACKs held ever longer).
        self.window = min(self.window, max(2 * before, self.s.lanes_min))
        paced = self.min_rtt is not None and self.min_rtt >= s.pacing_min_rtt and self.bw > 0
        self.pacing_rate = pacing_gain * self.bw if paced else None

    def _lanes(self):
        """The window in lanes: the bytes in flight over the datagram size."""
        window = max(int(self.cwnd / max(self.dgram, 1.0) + 0.5), self.s.lanes_min)
        self.window = min(window, self.max_window)

    def flight_limit(self):
        """How long an ACK's answer may take before the lane no longer counts as in flight
        (the ACK or its DATA was lost; the server's timer will see to it): a lane that waits
        for that must not hold back the others."""
        if self.srtt is None:
            return self.s.request_timeout
        return max(2 * (self.min_rtt or self.srtt), 1.5 * self.srtt) + self.s.flight_limit_min

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

    def lanes_to_run(self):
        """How many lanes should carry data: the window, and during startup twice that (a new
        lane brings data two round trips after it opens: those for the next round's window
        open now, and wait with their ACK held until it has room)."""
        if self.phase == STARTUP and not self.fixed:
            return min(self.max_window, int(self.s.startup_lanes * self.window))
        return self.window

    def plan_lanes(self):
        """How many lanes a file's ranges are cut for: during startup the window will grow
        (the path is not known yet), so for up to eight times as many."""
        if self.phase == STARTUP and not self.fixed:
            return min(self.max_window, 8 * self.window)
        return self.window
