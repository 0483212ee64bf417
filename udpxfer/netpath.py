"""The server's model of the path to one client IP (Path): round trips, the queue of the client's
DATAs in flight, the loss estimate, the datagram size that moves the most bytes, the orphan
fragments a lost datagram leaves in the client's reassembly buffer; and the send order that early
retransmission reads its evidence from (SendOrder: one per client socket that runs lanes, one per
IP for untagged transfers).

Relies on: rtt (the RFC 6298 estimator). Must not know: the wire format, sockets, the clock (every
call takes `now`), files, or which transfer a datagram belongs to beyond the object handed in.
"""

from collections import deque

from udpxfer.rtt import RttEstimator

DEFAULT_MTU = 1500   # assumed where the OS cannot tell a path's MTU (Ethernet)


def fragment_payload(mtu, ipv6=False):
    """Bytes of a UDP datagram (its 8-byte header included) that one IP fragment carries: the
    MTU less the IP header (and IPv6's fragment header), a multiple of 8 (RFC 791, RFC 8200)."""
    return max(8, (mtu - (48 if ipv6 else 20)) // 8 * 8)


def fragments(datagram_size, per_fragment, whole=0):
    """IP packets that carry a UDP datagram: one if it fits in `whole` bytes (the MTU less
    the IP header), else one per `per_fragment` bytes."""
    if datagram_size + 8 <= whole:
        return 1
    return -(-(datagram_size + 8) // per_fragment)


def size_ladder(per_fragment, ceiling, whole=0):
    """Datagram sizes that fill their last packet (1, 2, 3, ... 32 fragments), and the
    ceiling: the sizes worth choosing between on a path."""
    top = ceiling
    if ceiling + 8 > whole:
        # The largest size that fills its last fragment, if that costs little payload: 65507
        # bytes on Ethernet are 44 full fragments and one of 395 bytes, and every packet costs
        # both ends (and a small one the most per byte).
        filled = (ceiling + 8) // per_fragment * per_fragment - 8
        if filled > 0 and ceiling - filled <= ceiling // 64:
            top = filled
    sizes = {min(k * per_fragment - 8, top) for k in (1, 2, 3, 4, 6, 8, 11, 16, 22, 32)}
    return tuple(sorted(sizes | {top, min(max(whole - 8, 1), ceiling)}))


def orphans_per_loss(k):
    """The fragments a datagram of k fragments, declared lost, leaves in the receiver's
    reassembly buffer, on average: k - 1 if the DATA was lost; none if its ACK was, which
    looks the same to the server. With one packet more than the k of the DATA, about 1 such
    loss in k + 1 is an ACK's (at equal loss each way)."""
    return (k - 1) * k / (k + 1)


class Path:
    """What the server learns about one client IP, shared by all of that client's transfers.

    - Round trip: an RFC 6298 estimator fed by every transfer's samples; a new transfer starts
      with its RTO, and early retransmission uses its smoothed RTT.
    - Datagram size: on a path of the given MTU a datagram of k IP fragments arrives with
      probability (1-p)^k, where p is the per-packet loss rate, and a lost one costs about a
      loss-detection delay. The path estimates p from what it sends (an exponentially weighted
      count of lost datagrams per fragment sent, starting from a prior of no loss) and uses the
      size from size_ladder() that moves the most bytes per second: size * (1-p)^k / (cost per
      datagram + (1-(1-p)^k) * delay), but at most lossy_max_fragments fragments once p is
      above fragment_loss_limit, and none for a while if most of those are lost (see
      _choose_size). With no loss that is the largest size; as losses stop, the estimate
      decays and the size climbs back. Where nothing fragments (loopback), every size is one
      packet and the largest always wins.
    - Queueing: every transfer of the IP keeps one DATA in flight, so where those DATAs queue
      (a bottleneck link, a busy receiver) the round trip grows with their number. When the
      client opens more parts at once, a timer set from the round trips measured before
      fires for every transfer together, before the ACKs of the longer queue can come
      (spurious retransmissions, and each one adds to the queue). So the path also keeps an
      RFC 6298 estimate of the queueing per DATA in flight (the round trip less the smallest
      one seen, divided by the DATAs in flight when the timed one was sent), and a datagram's
      timer is at least the smallest round trip plus that estimate times the DATAs in flight
      now (Little's law: the queue is the flights times the time each takes; a SIZE or an EOF
      waits behind them too). Where the round trip does not grow with them (propagation
      delay), the ordinary estimate is the larger and this one changes nothing.
    The send order that early retransmission reads is a SendOrder of its own: it follows the
    client's socket where the client runs lanes, which the IP would mix up with its neighbours'.
    """

    def __init__(self, settings, ceiling, mtu=DEFAULT_MTU, ipv6=False):
        self.s = settings
        self.per_fragment = fragment_payload(mtu, ipv6)
        self.whole = mtu - (40 if ipv6 else 20)     # what one unfragmented packet carries
        self.rtt = RttEstimator(settings.rto_initial, settings.rto_min, settings.rto_max)
        self.latest_rtt = 0.0
        self.flights = 0                            # transfers with a DATA outstanding:
        self.sending = set()                        # ... these
        self.min_rtt = None                         # the path without a queue
        # Queueing per DATA in flight (its srtt and rttvar are used; see queue_rto).
        self.per_flight = RttEstimator(settings.rto_initial, 0.0, settings.rto_max)
        self.ceiling = ceiling                      # largest size this IP may get
        self.size = size_ladder(self.per_fragment, ceiling, self.whole)[-1]
        # On a long path (see sample), fragments per datagram grow from a few as datagrams
        # come through: the most allowed now, and the clean ones in a row at that many.
        self.fragment_cap = None                    # None: as many as the ceiling needs
        self._clean = 0
        self._cap_at = 0.0                          # when the cap last changed
        self._cap_before = None                     # the cap before a loss cut it
        self._lost = 0.0                            # weighted lost datagrams ...
        self._frags = float(settings.loss_prior)    # ... per weighted fragment sent
        self._events = 0
        self._frag_lost = 0.0                       # recent fragmented datagrams lost
        self._unfragmented_until = 0.0              # none fragmented until then ...
        self._unfragmented_next = settings.unfragmented_first   # ... for this long next time
        self._orphans = deque()                     # [second, fragments orphaned in it]
        self._orphan_count = 0                      # their sum
        self._to_come_at = (-1.0, 0)                # (when, bytes_to_come() then)

    def transfer_rtt(self):
        """A retransmission timer for a new transfer to this IP: the round trips measured so
        far, none of the backoff of another transfer's timeouts."""
        rtt = self.rtt
        return RttEstimator(self.s.rto_initial, self.s.rto_min, self.s.rto_max, rtt.srtt,
                            rtt.rttvar)

    def sample(self, r, flights=0):
        """A round trip; `flights` is the number of DATAs in flight when the timed one was sent
        (0: not a DATA)."""
        self.latest_rtt = r
        self.rtt.sample(r)
        if self.min_rtt is None and r >= self.s.wan_rtt and self.per_fragment < self.ceiling:
            # A long path that fragments big datagrams: its bottleneck is likely shared and
            # its queue may overflow, where one lost fragment loses the whole datagram and
            # leaves the others in the receiver's reassembly buffer for 30 s (one burst of
            # 45-fragment losses filled it, and the rest of the download went at 1472 bytes).
            # So at most start_fragments (8: 11,832 bytes on Ethernet), halved after a burst of
            # losses (once a round trip, down to one), doubled back after grow_after clean
            # datagrams and a round trip, up to wan_max_fragments (see outcome).
            self.fragment_cap = self.s.start_fragments
            self._choose_size()
        self.min_rtt = r if self.min_rtt is None else min(self.min_rtt, r)
        if flights:
            self.per_flight.sample((r - self.min_rtt) / flights)

    def queue_rto(self):
        """The least RTO for a datagram sent now: the smallest round trip seen, plus the
        per-flight queueing estimate (smoothed value and four deviations) times the flights,
        plus the clock granularity; 0 until a DATA has been timed. Never above rto_max: the
        queue must not keep a lost datagram from being resent."""
        pf = self.per_flight
        if pf.srtt is None:
            return 0.0
        rto = self.min_rtt + self.flights * (pf.srtt + 4 * pf.rttvar) + RttEstimator.G
        return min(rto, self.s.rto_max)

    def loss_rate(self):
        return self._lost / self._frags

    def fragments(self, size):
        """IP packets that carry a datagram of `size` bytes on this path."""
        return fragments(size, self.per_fragment, self.whole)

    def outcome(self, size, lost, now=0.0, timed_out=False):
        """A DATA of `size` bytes was acknowledged at its first try, or declared lost (by its
        timer if `timed_out`, else by evidence: a later one acknowledged)."""
        k = self.fragments(size)
        cap = self.fragment_cap
        if k > 1:
            if lost:   # its other fragments wait in the receiver's reassembly buffer
                self._orphan(orphans_per_loss(k), now)
            # Recent fragmented datagrams lost, for _choose_size: when most are, the receiver's
            # reassembly buffer is full of the fragments of lost ones (see _choose_size). On a
            # long path only losses shown by evidence count: a client that runs lanes holds
            # their ACKs in the order their DATAs came, so a burst of timeouts with no later
            # DATA acknowledged is a client holding ACKs (the drain after its startup: 140
            # needless timeouts within 50 ms), not a queue that overflowed, which loses some
            # datagrams and lets later ones through. (Counted, they cut the datagrams to one
            # fragment, and the client opened a thousand lanes for them.)
            if not (lost and timed_out and cap is not None):
                self._frag_lost += ((1.0 if lost else 0.0) - self._frag_lost) / 64
        if cap is not None:
            # Halved when losses come in bursts (a queue that overflowed: over wan_burst_loss
            # of the recent fragmented datagrams), once a round trip, down to one fragment;
            # doubled after grow_after datagrams at the cap came through at their first try,
            # and a round trip since the last change. (A lost datagram now and then, or a lane
            # the client let go, changes nothing.)
            srtt = self.rtt.srtt or 0.0
            if lost:
                self._clean = 0
                # (Well over what the path loses at random, four times as many datagrams as
                # its loss rate says: a path that loses at random is sized by that rate, in
                # _choose_size, and the noise of that loss must not set this off.)
                burst = max(self.s.wan_burst_loss, 4.0 * k * self.loss_rate())
                if cap > 1 and self._frag_lost > burst and now - self._cap_at > srtt:
                    self._cap_before = cap
                    self._set_cap(cap // 2, now)
            elif k >= cap and cap < self.s.wan_max_fragments:
                self._clean += 1
                if self._clean >= self.s.grow_after and now - self._cap_at > srtt:
                    self._clean = 0
                    self._set_cap(2 * cap, now)
        if k > 1:
            if self._frag_lost > 0.5:
                self._frag_lost = 0.0
                if cap is not None:   # a long path: from one fragment up again
                    self._cap_before = max(cap, self._cap_before or 0)
                    self._set_cap(1, now)
                else:
                    self._no_fragments(now)
                lost = True
        decay = self.s.loss_decay ** k
        self._lost = self._lost * decay + (1.0 if lost else 0.0)
        self._frags = self._frags * decay + k
        self._events += 1
        if lost or self._events % 32 == 0:
            self._choose_size(now)

    def _set_cap(self, cap, now):
        self.fragment_cap, self._cap_at = cap, now
        self._choose_size(now)

    def _no_fragments(self, now):
        """Most fragmented datagrams are lost: none for a while. A full reassembly buffer stays
        full for up to reassembly_backoff (30 s), but a burst of congestion (a queue that
        overflowed) is over at once: so first unfragmented_first, then twice as long each time
        it happens again, up to reassembly_backoff; after that long without, short again."""
        if now - self._unfragmented_until > self.s.reassembly_backoff:
            self._unfragmented_next = self.s.unfragmented_first
        self._unfragmented_until = now + self._unfragmented_next
        self._unfragmented_next = min(2 * self._unfragmented_next, self.s.reassembly_backoff)

    def _orphan(self, n, now):
        second = int(now)
        if self._orphans and self._orphans[-1][0] == second:
            self._orphans[-1][1] += n
        else:
            self.orphans(now)   # (drops the expired seconds: the deque stays short)
            self._orphans.append([second, n])
        self._orphan_count += n

    def orphans(self, now):
        """About how many fragments of lost datagrams wait in the client's reassembly buffer:
        those orphaned in the last reassembly_backoff seconds (see outcome)."""
        q = self._orphans
        while q and q[0][0] <= now - self.s.reassembly_backoff:
            self._orphan_count -= q.popleft()[1]
        if not q:
            self._orphan_count = 0   # (no rounding left over)
        return self._orphan_count

    def spurious(self):
        """A retransmission turned out needless (the client got both copies): not a loss."""
        self._lost = max(0.0, self._lost - 1.0)
        self._frag_lost = max(0.0, self._frag_lost - 1.0 / 64)   # about undone, if counted
        if self._cap_before is not None and self.fragment_cap < self._cap_before:
            # The loss that cut the fragments was not one (a client that held its ACK back,
            # pacing): undone, as TCP undoes a needless window reduction (RFC 3708, 4015).
            self.fragment_cap, self._cap_before = self._cap_before, None
            self._choose_size()

    def _choose_size(self, now=0.0):
        p = min(self.loss_rate(), 0.5)
        ladder = size_ladder(self.per_fragment, self.ceiling, self.whole)
        if self.fragment_cap is not None:
            ladder = [size for size in ladder if self.fragments(size) <= self.fragment_cap]
        if p > self.s.fragment_loss_limit:
            # Each lost fragment leaves its siblings in the receiver's reassembly buffer for
            # 30 s (Linux: ipfrag_time), and once that buffer is full (4 MB, ipfrag_high_thresh)
            # every fragmented datagram is dropped: with big datagrams even 0.1% loss fills it
            # within a second. So on a lossy path: datagrams of at most lossy_max_fragments
            # (fewer where losses are heavy) while the orphans they leave fit in the budget
            # (config.orphan_budget), else fewer; and none for a while once most of them are
            # lost (_no_fragments). On a long path, none fragmented either once the orphans
            # counted pass the budget (one fewer than two leaves no orphan: it "fits" while
            # they are within it): there the cap that follows a burst of losses grows back
            # within a round trip, and three 64 MiB downloads in a row at 1% loss found the
            # buffer full, again and again (21 s instead of 4). On a LAN two at the least:
            # _no_fragments backs off in seconds, and two move 256 MiB at 1% loss in 3.7 s
            # where unfragmented datagrams take 4.6 s.
            if now < self._unfragmented_until:
                most = 1
            else:
                # The most while one fewer would still fit what is to come: a download too big
                # for them throughout starts with them and goes on with fewer. Back up only
                # with an eighth of the budget to spare: the bytes still to come change as
                # parts end and start, and the size should not flap with them.
                most = self.s.lossy_max_fragments
                if p > self.s.heavy_loss:
                    most = min(most, self.s.heavy_loss_fragments)
                now_k, to_come = self.fragments(self.size), self._to_come(now)
                least = 1 if self.fragment_cap is not None else 2
                while most > least and not self._orphans_fit(ladder, most - 1, p, now, to_come,
                                                             now_k < most):
                    most -= 1
            self.size = self._largest(ladder, most)
            return
        delay = max(self.rtt.rto, self.s.rto_min)
        best, best_rate = ladder[-1], -1.0
        for size in reversed(ladder):
            arrives = (1.0 - p) ** self.fragments(size)
            rate = size * arrives / (self.s.datagram_cost + size * self.s.byte_cost
                                     + (1.0 - arrives) * delay)
            if rate > best_rate * 1.02:   # a smaller size only if clearly better
                best, best_rate = size, rate
        self.size = best

    def _largest(self, ladder, k):
        """The largest size of the ladder that crosses in at most k fragments."""
        return max(size for size in ladder if self.fragments(size) <= k)

    def _orphans_fit(self, ladder, k, p, now, to_come, spare):
        """Whether datagrams of k fragments for the `to_come` bytes of this IP's downloads
        would leave orphans within the budget (with an eighth of it to spare if `spare`),
        counted as orphans() counts them, at the loss rate estimated (which takes a lost ACK
        for a lost DATA, as the count does)."""
        need = to_come / self._largest(ladder, k) * (1.0 - (1.0 - p) ** k) * orphans_per_loss(k)
        return self.orphans(now) + need <= self.s.orphan_budget * (0.875 if spare else 1.0)

    def _to_come(self, now):
        """bytes_to_come(), counted again at most every to_come_every seconds: it walks every
        running transfer of the IP, and the size is chosen again at each loss (at 1% loss,
        with 1,000 lanes, it took a quarter of the server's time)."""
        at, n = self._to_come_at
        if not at <= now < at + self.s.to_come_every:
            n = self.bytes_to_come()
            self._to_come_at = (now, n)
        return n

    def bytes_to_come(self):
        """About how many bytes this IP's downloads still need: in each file, from the lowest
        position its running transfers have reached to the end (other parts fetch the later
        ranges; what the client asks for after that is unknown)."""
        left = {}
        for t in self.sending:
            n = t.entry.size - t.pos
            if n > left.get(t.name, -1):
                left[t.name] = n
        return sum(left.values())


class SendOrder:
    """The order in which DATAs went to one client, for early retransmission (PROTOCOL.md "Early
    retransmission", RFC 8985 and RFC 9002 6.1.2): each DATA sent gets a sequence number; the
    highest number acknowledged at first try is evidence that every earlier one still
    outstanding is lost once 9/8 of the round trip has passed since it was sent.

    One per client socket for transfers on lanes (they share one client: a busy one answers all
    of them late together, and a dead one answers none), one per IP for untagged transfers (a
    version 2 client uses a socket per transfer). Round trips come from the IP's Path.
    """

    def __init__(self, settings, path):
        self.s = settings
        self.path = path
        self.reorder_mult = 1                       # widened after needless early resends
        self._persist = 0                           # early resends before it narrows again
        self._widened_at = float("-inf")            # when it last widened
        self.seq = 0                                # last sequence number given out
        self.acked = 0                              # highest acknowledged at first try
        self.outstanding = []                       # (seq, transfer), in send order
        self._head = 0                              # index of the first live entry

    def widen(self, now):
        """An early retransmission turned out needless: widen the reordering window, as RACK
        does (RFC 8985 6.2): a busy client answers its transfers out of order. Once a round
        trip at most: one burst of out-of-order answers proves many resends needless at once
        (12 within 20 ms in a startup at 50 ms), and each must not double the window again."""
        self._persist = self.s.reorder_persist
        rtt = self.path.rtt.srtt
        if rtt is not None and now < self._widened_at + rtt:
            return
        self._widened_at = now
        self.reorder_mult = min(self.reorder_mult * 2, self.s.reorder_mult_max)

    def early_resent(self):
        """An early retransmission was sent. The window widened by needless ones narrows again
        only after reorder_persist of them without a needless one (RFC 8985 6.2 counts loss
        recoveries the same way): on a path that loses nothing it stays wide."""
        if self.reorder_mult > 1:
            self._persist -= 1
            if self._persist <= 0:
                self.reorder_mult = 1

    def loss_threshold(self):
        """How long after its sending a DATA overtaken by an acknowledged one is lost: 9/8 of
        the round trip, times the widening, but never more than one round trip (or
        reorder_wide_min, if longer: a busy process) beyond the 9/8 (RACK, RFC 8985 6.2, holds
        its window within a round trip): on a 50 ms path a window widened 16-fold took 1.4 s,
        and every loss waited for the timeout instead."""
        path = self.path
        rtt = max(path.rtt.srtt or 0.0, path.latest_rtt)
        base = max(self.s.reorder_factor * rtt, self.s.reorder_min)
        if self.reorder_mult == 1:
            return base
        return min(self.reorder_mult * base, base + max(rtt, self.s.reorder_wide_min))

    def sent(self, transfer):
        self.seq += 1
        self.outstanding.append((self.seq, transfer))
        live = len(self.outstanding) - self._head
        if live > self.s.max_transfers * 4:
            # Nothing acknowledged at first try for long (a client that answers only
            # retransmissions): the oldest entries are only evidence candidates; drop them.
            self._head += live - self.s.max_transfers * 4
        if self._head > 64 and self._head * 2 > len(self.outstanding):
            del self.outstanding[:self._head]
            self._head = 0
        return self.seq

    def overtaken(self):
        """Pop the outstanding sends older than the highest acknowledged one: (seq, transfer)."""
        out, q, acked = [], self.outstanding, self.acked
        while self._head < len(q) and q[self._head][0] < acked:
            out.append(q[self._head])
            self._head += 1
        return out
