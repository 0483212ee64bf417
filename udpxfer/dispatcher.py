"""The server's dispatcher: every datagram of one server socket enters here, with `now`, and
leaves as datagrams to send and a deadline (the shape of aioquic's connection).

A transfer is a client address and a lane (PROTOCOL.md "Lanes"; None for an untagged one). The
dispatcher routes each datagram to its transfer, keeps the pending pool (requests whose SIZE is
not acknowledged) apart from the active one, gives each client IP a fair share, rate-limits
replies to strangers, remembers finished transfers for a while, keeps one Path per client IP and
one send order per client (early retransmission, PROTOCOL.md "Reliability"), shares open files
and a budget of payload buffers among the transfers, and sums their work into one log line per
file served.

Relies on: wire (parsing, errors, names), server_transfer, netpath, rtt, limits, servelog,
display (addresses in log lines); a catalog handed in resolves names to entries. Must not know:
sockets, the clock, files or folders (the catalog does that), or how the loop around it waits.
"""

import heapq
from collections import OrderedDict

from config import ServerSettings
from udpxfer.display import format_addr
from udpxfer.limits import IpCounts, Pace, TokenBucket, client_of
from udpxfer.netpath import DEFAULT_MTU, Path, SendOrder
from udpxfer.server_transfer import BufferPool, ServerTransfer, SharedFiles, Unreadable
from udpxfer.servelog import ServeLog
from udpxfer.wire import (HUGE, NO_LANE, Ack, ListRequest, ProtocolError, format_error,
                          is_servable_name, lane_tag, parse_client_datagram, token_maker)


class ServerDispatcher:
    """All transfers of one server socket, keyed by (client address, lane) (PROTOCOL.md).

    `catalog` resolves names: catalog.listing() -> entry and catalog.lookup(name) -> entry or
    None (or raises Unreadable), where an entry has .size, .version and .open() -> source with
    .read(offset, n), .unchanged() and .close(). Verbs: receive_datagram(data, addr, now),
    datagrams_to_send(), get_timer(), handle_timer(now), read_ahead() (after sending),
    too_big(addr, datagram, now), close().
    """

    def __init__(self, catalog, settings=None, logger=None, new_token=None, path_mtu=None):
        self.catalog = catalog
        self.s = settings or ServerSettings()
        if logger is None:
            import logging
            logger = logging.getLogger("udpxfer")
        self.log = logger
        self.served = ServeLog(logger)
        self.active = {}              # (addr, lane) -> ServerTransfer (SIZE acknowledged)
        self.pending = OrderedDict()  # (addr, lane) -> ServerTransfer awaiting ACK of SIZE
        self.recent = OrderedDict()   # (addr, lane) -> (request, forget_at): finished ones
        self.paths = OrderedDict()    # client IP -> Path: round trip, datagram size, loss
        self.orders = OrderedDict()   # client address (lanes) or IP (untagged) -> SendOrder
        self.errors = TokenBucket(self.s.error_rate, self.s.error_burst)
        self._new_token = new_token or token_maker()   # (addr, lane, request) -> token
        self._path_mtu = path_mtu     # client IP -> the MTU towards it, or None (unknown)
        self._out = []
        self._timers = []             # heap of (deadline, seq, transfer); stale entries skipped
        self._seq = 0
        self._sent = {}               # transfers that handed datagrams out: after_send() them
        self._now = 0.0               # the latest time an event came with
        self.ceiling = self.s.datagram_size   # lowered if the OS refuses big datagrams
        self.pool = BufferPool(self.ceiling, self.s.read_ahead_bytes)
        self.files = SharedFiles()
        # Fairness (PROTOCOL.md "Hostile input"); see _fair_share, _make_room, _admit_pending.
        self.by_ip = IpCounts()       # active transfers per client IP
        self.pace = {}                # (addr, lane) -> Pace of each active transfer
        self.waiting = OrderedDict()  # IP refused a slot while holding none -> until when
        self.known = OrderedDict()    # IPs that completed a transfer (recently used last)
        self.pending_ips = {False: IpCounts(), True: IpCounts()}   # strangers, known IPs
        # Client addresses proven to receive what is sent there (a SIZE acknowledged with its
        # token): those with transfers running, and for validated_seconds after their last one
        # ended. Their requests (new lanes) wait in a pool of their own, at most their IP's fair
        # share, not in the strangers' pool: a client on a long path opens many lanes at once.
        self.running = {}                # client address -> its active transfers
        self.validated = OrderedDict()   # client address -> when its last transfer ended
        self.lane_pending = IpCounts()   # those requests, per client IP
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
        self._now = now
        heap = self._timers
        while heap and heap[0][0] <= now:
            deadline, _, t = heapq.heappop(heap)
            if t.deadline == deadline:
                t.on_timer(now)
                self._after(t, now)
        # Log lines due are written here too: the loop comes here at least twice a second.
        self.served.flush(now)

    def read_ahead(self):
        """After the loop has sent what datagrams_to_send() gave it: the transfers let their
        sent payloads go and read their next chunk ahead."""
        sent, self._sent = self._sent, {}
        for t in sent:
            t.after_send()

    def too_big(self, addr, datagram, now):
        """The OS refused to send `datagram` to addr as too large (EMSGSIZE)."""
        head = bytes(datagram[0][:12])
        lane = int(head[1:head.index(b" ")]) if head[:1] == b"#" and b" " in head else None
        t = self.active.get((addr, lane))
        if t is not None:
            t.too_big(sum(map(len, datagram)), now)
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
            if t.activated is not None:
                self.served.ended(t, self._now)
        self.served.flush(self._now, everything=True)
        self.active.clear()
        self.running.clear()
        self.pending.clear()
        self.by_ip.clear()
        self.lane_pending.clear()
        self.pace.clear()
        for counts in self.pending_ips.values():
            counts.clear()

    def receive_datagram(self, data, addr, now):
        self._now = now
        self.stats["datagrams_in"] += 1
        try:
            lane, msg = parse_client_datagram(data)
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            if exc.lane is NO_LANE or (addr, exc.lane) in self.active \
                    or (addr, exc.lane) in self.pending:
                return   # no lane to answer on; or a bit flip: it must not kill a transfer
            self.log.debug("malformed datagram from %s: %s", format_addr(addr), exc)
            return self._error(addr, exc.lane, "BAD_REQUEST", now, len(data))
        if isinstance(msg, Ack):
            return self._on_ack(msg, addr, lane, now, len(data))
        return self._on_request(msg, addr, lane, now, len(data))

    # -- internals

    def _on_ack(self, ack, addr, lane, now, size_in):
        key = (addr, lane)
        t = self.active.get(key)
        if t is not None and ack.token == t.token:
            if ack.n is None:
                t.on_ack_eof(now)
            else:
                acked = t.order.acked
                t.on_ack(ack.n, now)
                if t.order.acked != acked:
                    self._detect_losses(t.order, now)
            return self._after(t, now)
        p = self.pending.get(key)
        if p is not None:
            if ack.token == p.token and ack.n is not None and p.acknowledges_size(ack.n):
                self._activate(p, now)
            return
        if t is not None:
            return   # forged or damaged: ignored like a malformed datagram
        if self._is_recent(key, now):
            return   # late copy of a finished transfer's ACK: ignore quietly
        self.log.debug("ACK from %s on lane %s, which has no transfer", format_addr(addr), lane)
        self._error(addr, lane, "BAD_REQUEST", now, size_in)

    def _detect_losses(self, order, now):
        """A DATA was acknowledged: the client's older DATAs still outstanding on its other
        transfers are lost once the reordering threshold has passed (PROTOCOL.md "Early
        retransmission"). Each is looked at once per such evidence."""
        for seq, other in order.overtaken():
            # Entries of earlier DATAs, and of finished transfers, linger: they change nothing.
            if other.overtaken(seq, now):
                self._after(other, now)

    def _activate(self, t, now):
        """The client acknowledged SIZE (so its address is real): give it an active slot, taking
        one from a transfer that holds it unfairly if need be, or answer BUSY."""
        self._pending_remove(t)
        old = self.active.get(t.key)
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
        self.active[t.key] = t
        self.running[t.addr] = self.running.get(t.addr, 0) + 1
        self.by_ip.add(t.key, ip)
        self.waiting.pop(ip, None)
        t.activate(now, self.files.open)
        self.pace[t.key] = Pace(t, now)
        self.served.started(t, now)
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
        self._busy(t.addr, t.lane, now)
        t.finish("busy")

    def _preempt(self, victim, now):
        self.stats["preempted"] += 1
        self.log.info("%s: %s preempted at %d of [%d, %d): its slot goes to a waiting client",
                      format_addr(victim.addr), victim.name, victim.pos, victim.start,
                      victim.end)
        self._busy(victim.addr, victim.lane, now)
        victim.finish("preempted")
        self._forget(victim, now)

    def _busy(self, addr, lane, now, size_in=None):
        """The one place ERROR BUSY is sent. To a mere request (size_in: its size) it is an
        error to a stranger, within _error's limits: the source may be forged. To an address
        that acknowledged SIZE (size_in None: refused at activation, or preempted) it always
        goes, once per transfer: that client is real and waits for an answer."""
        self.stats["busy"] += 1
        if size_in is not None:
            return self._error(addr, lane, "BUSY", now, size_in)
        self._out.append(((format_error("BUSY", tag=lane_tag(lane)),), addr))

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
            return min((self.active[k] for k in self.by_ip.by_ip[heavy]), key=self._slowness)
        slow = [t for t in self.active.values()
                if client_of(t.addr) != ip and self._kept_alive(t, now)]
        return min(slow, key=self._slowness) if slow else None

    def _slowness(self, t):
        """Sort key, slowest first: fewest datagrams acknowledged in the last window (a young
        transfer counts what it did so far), then the longest since it last moved."""
        p = self.pace[t.key]
        return (p.acks if p.last_acks is None else p.last_acks, p.advanced)

    def _kept_alive(self, t, now):
        """A transfer that acknowledged fewer than slow_acks datagrams in its last complete
        slow_window: acknowledged just before each timeout, or on a path too slow to justify
        holding a slot others wait for. A stop-and-wait transfer cannot tell the two apart, so
        under contention such transfers take turns: each keeps its slot for a window at least
        (a young one is never judged), and its client asks again later for the rest."""
        p = self.pace[t.key]
        p.update(t, now, self.s.slow_window)
        return p.last_acks is not None and p.last_acks < self.s.slow_acks

    def _on_request(self, req, addr, lane, now, size_in):
        key = (addr, lane)
        active, pending = self.active.get(key), self.pending.get(key)
        for old in (pending, active):
            if old is not None and old.request == req:   # the client retransmitted it
                return old.resend_size(now, size_in)
        if lane is not None and (active is not None or pending is not None
                                 or self._is_recent(key, now)):
            # A lane carries one transfer in its life: a different request on one that has or
            # had a transfer is a forgery or garbage (a late copy of its own request, quietly).
            return
        if active is None and pending is None and self._is_recent(key, now, req):
            return
        # On the untagged lane a different valid request replaces an unacknowledged one at
        # once, but ends a running transfer only when its SIZE is acknowledged with its token
        # (_activate): a forged request must not end someone's transfer. One that is refused
        # (perhaps a damaged copy, perhaps forged) changes nothing and, while a transfer has
        # the lane, gets no answer: a version 2 client ends its transfer on any ERROR.
        quiet = active is not None or pending is not None
        if isinstance(req, ListRequest):
            entry, start, length = self.catalog.listing(), 0, HUGE
        else:
            try:
                entry = self.catalog.lookup(req.name) if is_servable_name(req.name) else None
            except Unreadable as exc:
                return None if quiet else self._error(addr, lane, "INTERNAL", now, size_in,
                                                      exc.why)
            if entry is None:
                return None if quiet else self._error(addr, lane, "NOT_FOUND", now, size_in)
            start, length = req.offset, req.chunk_size
        if start > entry.size:
            return None if quiet else self._error(addr, lane, "BAD_REQUEST", now, size_in)
        # An IP beyond its share is refused at once. Any other request gets its SIZE even when
        # every slot is taken: only its ACK proves the address, and only then may it take a
        # slot from someone else (_activate).
        ip = client_of(addr)
        validated = self._validated(addr, now)
        if self._refuse_more(ip, now) or (validated and self.lane_pending.held(ip)
                                          >= self._fair_share(ip)):
            return None if quiet else self._busy(addr, lane, now, size_in)
        if pending is not None:
            pending.finish("replaced")
            self._forget(pending, now)
        if not validated:
            self._admit_pending(ip)
        path = self._path(addr[0])
        rtt = path.transfer_rtt()
        end = min(entry.size, start + length)
        t = ServerTransfer(addr, lane, req, entry, start, end, now, self.s, rtt, self._out,
                           size_in, self.ceiling, self._new_token(addr, lane, req), path,
                           self._order(addr, lane, path), self.pool)
        self.pending[key] = t
        if validated:
            self.lane_pending.add(key, ip)
        else:
            self.pending_ips[ip in self.known].add(key, ip)
        self.log.debug("%s: %r on lane %s -> SIZE %d", format_addr(addr), req, lane, entry.size)
        self._schedule(t)

    def _validated(self, addr, now):
        """Whether addr is proven: it has transfers running, or had until validated_seconds
        ago (a client asks for its next file's ranges as the last ones end)."""
        if addr in self.running:
            return True
        at = self.validated.get(addr)
        return at is not None and now - at <= self.s.validated_seconds

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

    def _order(self, addr, lane, path):
        """The send order a transfer's DATAs join, for early retransmission: its client
        socket's where it runs lanes, its IP's where it is untagged (PROTOCOL.md)."""
        key = addr if lane is not None else addr[0]
        order = self.orders.get(key)
        if order is None or order.path is not path:
            order = self.orders[key] = SendOrder(self.s, path)
            while len(self.orders) > self.s.rtt_cache_max:
                self.orders.popitem(last=False)
        else:
            self.orders.move_to_end(key)
        return order

    def _admit_pending(self, ip):
        """Make room in the strangers' pending pool for a request from a client of `ip`.
        Strangers may fill it but for a reserved share (pending_reserved) kept for IPs that
        completed a transfer before, so a flood from forged addresses cannot evict a returning
        client. The entry dropped is the oldest of the IP holding the most entries (in the class
        that must give way): a flood from one IP with many ports evicts itself, whatever the
        round trip of others."""
        strangers, known = self.pending_ips[False], self.pending_ips[True]
        reserved = int(self.s.max_pending * self.s.pending_reserved)
        if (ip not in self.known and strangers.size
                and strangers.size >= self.s.max_pending - reserved):
            return self._evict(strangers.oldest_of_heaviest())
        if strangers.size + known.size < self.s.max_pending:
            return
        # Full: known IPs give way only beyond their reserved share (or if nobody else holds any).
        classes = [c for c in (strangers, known) if c.size and (
            c is strangers or c.size > reserved or not strangers.size)]
        if classes:
            victim_class = max(classes, key=lambda c: c.most())   # ties: strangers first
            self._evict(victim_class.oldest_of_heaviest())

    def _evict(self, key):
        t = self.pending[key]
        t.finish("evicted")
        self.stats["evicted"] += 1
        self._forget(t, None)

    def _pending_remove(self, t):
        if self.pending.get(t.key) is t:
            del self.pending[t.key]
            ip = client_of(t.addr)
            for counts in self.pending_ips.values():
                counts.discard(t.key, ip)
            self.lane_pending.discard(t.key, ip)

    def _after(self, t, now):
        """Bookkeeping after the transfer handled an event."""
        self._sent[t] = None
        if t.outcome is not None:
            return self._forget(t, now)
        pace = self.pace.get(t.key)
        if pace is not None:
            pace.update(t, now, self.s.slow_window)
        self._schedule(t)

    def _schedule(self, t):
        if t.deadline is not None:
            self._seq += 1
            heapq.heappush(self._timers, (t.deadline, self._seq, t))
            if len(self._timers) > 4 * (len(self.active) + len(self.pending)) + 64:
                self._timers = [e for e in self._timers if e[2].deadline == e[0]]
                heapq.heapify(self._timers)

    def _forget(self, t, now):
        self._sent[t] = None   # its buffers go back after the next send
        if self.active.get(t.key) is t:
            del self.active[t.key]
            self.by_ip.discard(t.key, client_of(t.addr))
            self.pace.pop(t.key, None)
            n = self.running.pop(t.addr) - 1
            if n:
                self.running[t.addr] = n
            elif now is not None:
                self.validated[t.addr] = now
                self.validated.move_to_end(t.addr)
                while len(self.validated) > self.s.known_max:
                    self.validated.popitem(last=False)
        else:
            self._pending_remove(t)
        if t.outcome == "done":   # a proven, successful client: it keeps a reserved share
            self.known[client_of(t.addr)] = None
            self.known.move_to_end(client_of(t.addr))
            while len(self.known) > self.s.known_max:
                self.known.popitem(last=False)
        if now is None:           # evicted from the pending pool: nothing more to note
            return
        if t.activated is not None or t.lane is not None:
            # Late copies of a finished transfer's datagrams are ignored for a while. Not those
            # of an untagged request that was never acknowledged: its client may well ask again
            # (on a lane it asks again on a new lane).
            self.recent[t.key] = (t.request, now + self.s.recent_seconds)
            self.recent.move_to_end(t.key)
            while len(self.recent) > self.s.recent_max:
                self.recent.popitem(last=False)
        if t.activated is None:
            self.log.debug("%s: %s ended before SIZE was acknowledged (%s)",
                           format_addr(t.addr), t.name, t.outcome)
            return
        self.stats["finished"] += 1
        self.stats["bytes_served"] = self.stats.get("bytes_served", 0) + t.pos - t.start
        self.served.ended(t, now)

    def _is_recent(self, key, now, request=None):
        entry = self.recent.get(key)
        if entry is None:
            return False
        if entry[1] < now:
            del self.recent[key]
            return False
        return request is None or entry[0] == request

    def _error(self, addr, lane, code, now, size_in, text=""):
        """One ERROR to an address without a transfer on that lane: at most
        amplification_factor times the size of what it answers, and rate-limited."""
        msg = format_error(code, text, lane_tag(lane))
        if len(msg) > self.s.amplification_factor * size_in or not self.errors.take(now):
            self.stats["errors_suppressed"] += 1
            return
        self.stats["errors_sent"] += 1
        self._out.append(((msg,), addr))
