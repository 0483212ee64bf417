"""The server's dispatcher: every datagram of one server socket enters here, with `now`, and
leaves as datagrams to send and a deadline (the shape of aioquic's connection).

It routes by client address to the transfers, keeps the pending pool (requests whose SIZE is not
acknowledged) apart from the active one, gives each client IP a fair share, rate-limits replies to
strangers, remembers finished transfers for a while, keeps one Path per client IP, and repairs a
loss early when a client's other transfers show it (PROTOCOL.md "Early retransmission").

Relies on: wire (parsing, errors, names), server_transfer, path, rtt, limits, text (addresses in
log lines); a catalog handed in resolves names to entries. Must not know: sockets, the clock,
files or folders (the catalog does that), or how the loop around it waits.
"""

import heapq
from collections import OrderedDict

from config import ServerSettings
from udpxfer.display import format_addr
from udpxfer.limits import IpCounts, Pace, TokenBucket, client_of
from udpxfer.netpath import DEFAULT_MTU, Path
from udpxfer.rtt import RttEstimator
from udpxfer.server_transfer import WAIT_DATA, ServerTransfer
from udpxfer.wire import (HUGE, Ack, ListRequest, ProtocolError, format_error, is_servable_name,
                          parse_client_message, token_maker)


class ServerDispatcher:
    """All transfers of one server socket, keyed by client address (PROTOCOL.md).

    `catalog` resolves names: catalog.listing() -> entry and catalog.lookup(name) -> entry or
    None, where an entry has .size, .version and .open() -> source with .read(offset, n),
    .unchanged() and .close(). Verbs: receive_datagram(data, addr, now), datagrams_to_send(),
    get_timer(), handle_timer(now), read_ahead(), too_big(addr, size, now), close().
    """

    def __init__(self, catalog, settings=None, logger=None, new_token=None, path_mtu=None):
        self.catalog = catalog
        self.s = settings or ServerSettings()
        if logger is None:
            import logging
            logger = logging.getLogger("udpxfer")
        self.log = logger
        self.active = {}              # addr -> ServerTransfer (SIZE acknowledged)
        self.pending = OrderedDict()  # addr -> ServerTransfer awaiting ACK of SIZE, oldest first
        self.recent = OrderedDict()   # addr -> (request, forget_at): finished transfers
        self.paths = OrderedDict()    # client IP -> Path: round trip, datagram size, send order
        self.errors = TokenBucket(self.s.error_rate, self.s.error_burst)
        self._new_token = new_token or token_maker()   # (addr, request) -> token
        self._path_mtu = path_mtu     # client IP -> the MTU towards it, or None (unknown)
        self._out = []
        self._timers = []             # heap of (deadline, seq, transfer); stale entries skipped
        self._seq = 0
        self._ahead = []              # transfers that just sent DATA: read their next chunk
        self.ceiling = self.s.datagram_size   # lowered if the OS refuses big datagrams
        # Fairness (PROTOCOL.md "Hostile input"); see _fair_share, _make_room, _admit_pending.
        self.by_ip = IpCounts()       # active transfers per client IP
        self.pace = {}                # addr -> Pace of each active transfer
        self.waiting = OrderedDict()  # IP refused a slot while holding none -> until when
        self.known = OrderedDict()    # IPs that completed a transfer (recently used last)
        self.pending_ips = {False: IpCounts(), True: IpCounts()}   # strangers, known IPs
        self.stats = {"datagrams_in": 0, "malformed": 0, "errors_sent": 0,
                      "errors_suppressed": 0, "evicted": 0, "busy": 0, "finished": 0,
                      "preempted": 0}

    # -- verbs

    def datagrams_to_send(self):
        out = self._out[:]       # the transfers hold this list: empty it, do not replace it
        self._out.clear()
        return out

    def get_timer(self):
        heap = self._timers
        while heap and heap[0][2].deadline != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def handle_timer(self, now):
        heap = self._timers
        while heap and heap[0][0] <= now:
            deadline, _, t = heapq.heappop(heap)
            if t.deadline == deadline:
                t.on_timer(now)
                self._after(t, now)

    def read_ahead(self):
        for t in self._ahead:
            t.read_ahead()
        self._ahead.clear()

    def too_big(self, addr, size, now):
        t = self.active.get(addr)
        if t is not None:
            t.too_big(size, now)
            # The limit is the sending host's (macOS: 9216 bytes by default): keep it for
            # every later transfer instead of finding it again each time.
            self.ceiling = min(self.ceiling, t.ceiling)
            for path in self.paths.values():
                path.ceiling = min(path.ceiling, self.ceiling)
                path.size = min(path.size, self.ceiling)
            self._after(t, now)

    def close(self):
        for t in list(self.active.values()) + list(self.pending.values()):
            t.finish("shutdown")
        self.active.clear()
        self.pending.clear()
        self.by_ip.clear()
        self.pace.clear()
        for counts in self.pending_ips.values():
            counts.clear()

    def receive_datagram(self, data, addr, now):
        self.stats["datagrams_in"] += 1
        try:
            msg = parse_client_message(data)
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            if addr in self.active or addr in self.pending:
                return   # a bit flip must not kill a transfer: ignore, no reply
            self.log.debug("malformed datagram from %s: %s", format_addr(addr), exc)
            return self._error(addr, "BAD_REQUEST", now, len(data))
        if isinstance(msg, Ack):
            return self._on_ack(msg, addr, now, len(data))
        return self._on_request(msg, addr, now, len(data))

    # -- internals

    def _on_ack(self, ack, addr, now, size_in):
        t = self.active.get(addr)
        if t is not None and ack.token == t.token:
            if ack.n is None:
                t.on_ack_eof(now)
            else:
                acked = t.path.acked
                t.on_ack(ack.n, now)
                if t.path.acked != acked:
                    self._detect_losses(t.path, now)
            return self._after(t, now)
        p = self.pending.get(addr)
        if p is not None:
            if ack.token == p.token and ack.n is not None and p.acknowledges_size(ack.n):
                self._activate(p, now)
            return
        if t is not None:
            return   # forged or damaged: ignored like a malformed datagram
        if self._is_recent(addr, now):
            return   # late copy of a finished transfer's ACK: ignore quietly
        self.log.debug("ACK from %s, which has no transfer", format_addr(addr))
        self._error(addr, "BAD_REQUEST", now, size_in)

    def _detect_losses(self, path, now):
        """A DATA was acknowledged: the client's older DATAs still outstanding on its other
        transfers are lost once the reordering threshold has passed (PROTOCOL.md "Early
        retransmission"). Each is looked at once per such evidence."""
        for seq, other in path.overtaken():
            # Entries of earlier DATAs, and of finished transfers, linger: they change nothing.
            if other.overtaken(seq, now):
                self._after(other, now)

    def _activate(self, t, now):
        """The client acknowledged SIZE (so its address is real): give it an active slot, taking
        one from a transfer that holds it unfairly if need be, or answer BUSY."""
        self._pending_remove(t)
        old = self.active.get(t.addr)
        if old is not None:   # the client proved it moved on to this request: the old one ends
            old.finish("replaced")
            self._forget(old, now)
        ip = client_of(t.addr)
        if self._refuse_more(ip, now):
            return self._refuse(t, now)
        if len(self.active) >= self.s.max_transfers:
            victim = self._make_room(ip, now)
            if victim is None:
                return self._refuse(t, now)
            self._preempt(victim, now)
        self.active[t.addr] = t
        self.by_ip.add(t.addr)
        self.waiting.pop(ip, None)
        t.activate(now)
        self.pace[t.addr] = Pace(t, now)
        self.log.info("%s: start %s [%d, %d) of %d bytes", format_addr(t.addr), t.name,
                      t.start, t.end, t.entry.size)
        self._after(t, now)

    def _refuse(self, t, now):
        """BUSY for a transfer whose SIZE was acknowledged. If its IP holds no slot, it now
        waits for one: it counts in the fair share until busy_wait_seconds have passed."""
        ip = client_of(t.addr)
        if not self.by_ip.held(ip):
            self.waiting[ip] = now + self.s.busy_wait_seconds
            self.waiting.move_to_end(ip)
            while len(self.waiting) > self.s.recent_max:
                self.waiting.popitem(last=False)
        self._busy(t.addr, now)
        t.finish("busy")

    def _preempt(self, victim, now):
        self.stats["preempted"] += 1
        self.log.warning("%s: %s preempted at %d of [%d, %d): its slot goes to a waiting client",
                         format_addr(victim.addr), victim.name, victim.pos, victim.start,
                         victim.end)
        self._busy(victim.addr, now)
        victim.finish("preempted")
        self._forget(victim, now)

    def _busy(self, addr, now, size_in=None):
        """The one place ERROR BUSY is sent. To a mere request (size_in: its size) it is an
        error to a stranger, within _error's limits: the source may be forged. To an address
        that acknowledged SIZE (size_in None: refused at activation, or preempted) it always
        goes, once per transfer: that client is real and waits for an answer."""
        self.stats["busy"] += 1
        if size_in is not None:
            return self._error(addr, "BUSY", now, size_in)
        self._out.append(((format_error("BUSY"),), addr))

    def _scarce(self, now):
        """Slots are scarce when the free ones are no more than the IPs refused one that are
        still waiting (each of those is owed one), all taken included."""
        while self.waiting and next(iter(self.waiting.values())) < now:
            self.waiting.popitem(last=False)
        return len(self.active) + len(self.waiting) >= self.s.max_transfers

    def _fair_share(self, ip):
        """max_transfers divided among the IPs holding or waiting for a slot (ip included),
        at least 1. Per IP, not per address: one host with many ports is one client."""
        n = len(self.by_ip.by_ip) + len(self.waiting)
        if not self.by_ip.held(ip) and ip not in self.waiting:
            n += 1
        return max(1, self.s.max_transfers // n)

    def _refuse_more(self, ip, now):
        """An IP that holds its fair share gets BUSY for another transfer while slots are
        scarce, so the others are served; while they are not, it may use the idle ones."""
        return self._scarce(now) and self.by_ip.held(ip) >= self._fair_share(ip)

    def _make_room(self, ip, now):
        """All slots are taken and a client of `ip` (below its fair share) needs one: which
        transfer gives its slot up, or None. First the slowest of the IP holding the most
        if that is more than its fair share; else the slowest transfer of another IP that is
        merely kept alive (_kept_alive). Never one of `ip` itself. O(transfers), and only run
        when a proven client finds every slot taken, never per datagram."""
        heavy = self.by_ip.heaviest()
        if heavy is not None and heavy != ip and self.by_ip.most() > self._fair_share(ip):
            return min((self.active[a] for a in self.by_ip.by_ip[heavy]), key=self._slowness)
        slow = [t for t in self.active.values()
                if client_of(t.addr) != ip and self._kept_alive(t, now)]
        return min(slow, key=self._slowness) if slow else None

    def _slowness(self, t):
        """Sort key, slowest first: fewest datagrams acknowledged in the last window (a young
        transfer counts what it did so far), then the longest since it last moved."""
        p = self.pace[t.addr]
        return (p.acks if p.last_acks is None else p.last_acks, p.advanced)

    def _kept_alive(self, t, now):
        """A transfer that acknowledged fewer than slow_acks datagrams in its last complete
        slow_window: acknowledged just before each timeout, or on a path too slow to justify
        holding a slot others wait for. A stop-and-wait transfer cannot tell the two apart, so
        under contention such transfers take turns: each keeps its slot for a window at least
        (a young one is never judged), and its client asks again later for the rest."""
        p = self.pace[t.addr]
        p.update(t, now, self.s.slow_window)
        return p.last_acks is not None and p.last_acks < self.s.slow_acks

    def _on_request(self, req, addr, now, size_in):
        active, pending = self.active.get(addr), self.pending.get(addr)
        for old in (pending, active):
            if old is not None and old.request == req:   # the client retransmitted it
                return old.resend_size(now, size_in)
        if active is None and pending is None and self._is_recent(addr, now, req):
            return
        # A different valid request replaces an unacknowledged one at once, but ends a running
        # transfer only when its SIZE is acknowledged with its token (_activate): a forged
        # request must not end someone's transfer. One that is refused (perhaps a damaged
        # copy) changes nothing.
        if isinstance(req, ListRequest):
            entry, start, length = self.catalog.listing(), 0, HUGE
        else:
            entry = self.catalog.lookup(req.name) if is_servable_name(req.name) else None
            if entry is None:
                return self._error(addr, "NOT_FOUND", now, size_in)
            start, length = req.offset, req.chunk_size
        if start > entry.size:
            return self._error(addr, "BAD_REQUEST", now, size_in)
        if pending is not None:
            pending.finish("replaced")
            self._forget(pending, now)
        # An IP beyond its share is refused at once. Any other request gets its SIZE even when
        # every slot is taken: only its ACK proves the address, and only then may it take a
        # slot from someone else (_activate).
        if self._refuse_more(client_of(addr), now):
            return self._busy(addr, now, size_in)
        self._admit_pending(addr)
        path = self._path(addr[0])
        rtt = RttEstimator(self.s.rto_initial, self.s.rto_min, self.s.rto_max,
                           path.rtt.srtt, path.rtt.rttvar)
        end = min(entry.size, start + length)
        t = ServerTransfer(addr, req, entry, start, end, now, self.s, rtt, self._out, size_in,
                           self.ceiling, self._new_token(addr, req), path)
        self.pending[addr] = t
        self.pending_ips[client_of(addr) in self.known].add(addr)
        self.log.debug("%s: %r -> SIZE %d", format_addr(addr), req, entry.size)
        self._schedule(t)

    def _path(self, ip):
        """The Path of a client IP; the least recently used are forgotten beyond rtt_cache_max
        (a transfer keeps its own reference)."""
        path = self.paths.get(ip)
        if path is None:
            mtu = self._path_mtu(ip) if self._path_mtu is not None else None
            path = self.paths[ip] = Path(self.s, self.ceiling, mtu or DEFAULT_MTU, ":" in ip)
            while len(self.paths) > self.s.rtt_cache_max:
                self.paths.popitem(last=False)
        else:
            self.paths.move_to_end(ip)
        return path

    def _admit_pending(self, addr):
        """Make room in the pending pool for a request from addr. Strangers may fill it but
        for a reserved share (pending_reserved) kept for IPs that completed a transfer before,
        so a flood from forged addresses cannot evict a returning client. The entry dropped is
        the oldest of the IP holding the most entries (in the class that must give way): a
        flood from one IP with many ports evicts itself, whatever the round trip of others."""
        strangers, known = self.pending_ips[False], self.pending_ips[True]
        reserved = int(self.s.max_pending * self.s.pending_reserved)
        if (client_of(addr) not in self.known and strangers.size
                and strangers.size >= self.s.max_pending - reserved):
            return self._evict(strangers.oldest_of_heaviest())
        if len(self.pending) < self.s.max_pending:
            return
        # Full: known IPs give way only beyond their reserved share (or if nobody else holds any).
        classes = [c for c in (strangers, known) if c.size and (
            c is strangers or c.size > reserved or not strangers.size)]
        if classes:
            victim_class = max(classes, key=lambda c: c.most())   # ties: strangers first
            self._evict(victim_class.oldest_of_heaviest())

    def _evict(self, addr):
        t = self.pending[addr]
        t.finish("evicted")
        self.stats["evicted"] += 1
        self._forget(t, None)

    def _pending_remove(self, t):
        if self.pending.get(t.addr) is t:
            del self.pending[t.addr]
            for counts in self.pending_ips.values():
                counts.discard(t.addr)

    def _after(self, t, now):
        """Bookkeeping after the transfer handled an event."""
        if t.outcome is not None:
            return self._forget(t, now)
        pace = self.pace.get(t.addr)
        if pace is not None:
            pace.update(t, now, self.s.slow_window)
        if t.state == WAIT_DATA and t.tries == 1:
            self._ahead.append(t)
        self._schedule(t)

    def _schedule(self, t):
        if t.deadline is not None:
            self._seq += 1
            heapq.heappush(self._timers, (t.deadline, self._seq, t))
            if len(self._timers) > 4 * (len(self.active) + len(self.pending)) + 64:
                self._timers = [e for e in self._timers if e[2].deadline == e[0]]
                heapq.heapify(self._timers)

    def _forget(self, t, now):
        if self.active.get(t.addr) is t:
            del self.active[t.addr]
            self.by_ip.discard(t.addr)
            self.pace.pop(t.addr, None)
        else:
            self._pending_remove(t)
        if t.outcome == "done":   # a proven, successful client: it keeps a reserved share
            self.known[client_of(t.addr)] = None
            self.known.move_to_end(client_of(t.addr))
            while len(self.known) > self.s.known_max:
                self.known.popitem(last=False)
        if now is None:           # evicted from the pending pool: nothing more to note
            return
        if t.activated is not None:
            # Late copies of a finished transfer's datagrams are ignored for a while. Not those
            # of a request that was never acknowledged: its client may well ask again.
            self.recent[t.addr] = (t.request, now + self.s.recent_seconds)
            self.recent.move_to_end(t.addr)
            while len(self.recent) > self.s.recent_max:
                self.recent.popitem(last=False)
        if t.activated is None:
            self.log.debug("%s: %s ended before SIZE was acknowledged (%s)",
                           format_addr(t.addr), t.name, t.outcome)
            return
        self.stats["finished"] += 1
        seconds = max(now - t.activated, 1e-9)
        moved = t.pos - t.start
        self.stats["bytes_served"] = self.stats.get("bytes_served", 0) + moved
        say = self.log.info if t.outcome == "done" else self.log.warning
        say("%s: %s %s: %d bytes in %.2f s, %.1f MB/s, %d retransmissions%s%s; path: %d-byte "
            "datagrams, %.2f%% loss", format_addr(t.addr), t.outcome, t.name, moved, seconds,
            moved / seconds / 1e6, t.retransmissions,
            " (%d early)" % t.early_retransmissions if t.early_retransmissions else "",
            ", %d shrinks" % t.shrinks if t.shrinks else "", t.path.size,
            100 * t.path.loss_rate())

    def _is_recent(self, addr, now, request=None):
        entry = self.recent.get(addr)
        if entry is None:
            return False
        if entry[1] < now:
            del self.recent[addr]
            return False
        return request is None or entry[0] == request

    def _error(self, addr, code, now, size_in):
        """One ERROR to an address without a transfer: at most amplification_factor times the
        size of what it answers, and rate-limited."""
        msg = format_error(code)
        if len(msg) > self.s.amplification_factor * size_in or not self.errors.take(now):
            self.stats["errors_suppressed"] += 1
            return
        self.stats["errors_sent"] += 1
        self._out.append(((msg,), addr))
