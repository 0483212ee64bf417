"""One transfer on the server: a range of a file (or the listing) on one lane of one client,
stop-and-wait: SIZE, DATA after DATA, EOF, each sent again on its timer or on evidence of its loss;
datagram sizes from the path; the running CRC; read-ahead of the next chunk into a shared pool of
buffers with a byte budget.

Also the interface of what is served: an entry has .size, .version and .open() -> a source with
.read(offset, n) (and optionally .readinto(offset, view)), .unchanged() and .close();
MemoryEntry is one held in memory (the listing), Changed is what a source raises when the file
is not the one announced any more, and Unreadable what it raises when the server may not read it.

Relies on: wire (formats, tags, tokens, the CRC seed), netpath (round trips, sizes, send order).
Must not know: sockets, the clock (every call takes `now`), how files are opened (an entry does
that), or other transfers (the dispatcher routes, limits and schedules).
"""

import errno
import zlib

from udpxfer.netpath import Path, SendOrder
from udpxfer.wire import (ListRequest, crc_start, format_data_header, format_eof, format_error,
                          format_size, lane_tag, new_token)


class MemoryEntry:
    """Something servable held in memory (the listing, or a file in tests)."""

    def __init__(self, data, version=None):
        self.data = memoryview(bytes(data))
        self.size = len(self.data)
        self.version = version or "%08x-%x" % (zlib.crc32(self.data), self.size)

    def open(self):
        return self

    def read(self, offset, n):
        return self.data[offset:offset + n]

    def unchanged(self):
        return True

    def close(self):
        pass


class SharedFiles:
    """Files being served, shared by the transfers that read them: one open file per entry
    (one path with one identity), however many lanes read it, closed when the last one ends.
    Entries without a `key` (in memory) are opened as they are."""

    def __init__(self):
        self.files = {}           # key -> _SharedSource

    def open(self, entry):
        key = getattr(entry, "key", None)
        if key is None:
            return entry.open()
        shared = self.files.get(key)
        if shared is None:
            shared = self.files[key] = _SharedSource(entry.open(), self, key)
        shared.users += 1
        return shared


class _SharedSource:
    """One open file, read by `users` transfers (pread and preadv need no file position)."""

    def __init__(self, source, files, key):
        self.source, self.files, self.key = source, files, key
        self.users = 0
        self.read = source.read
        self.unchanged = source.unchanged
        if hasattr(source, "readinto"):
            self.readinto = source.readinto

    def close(self):
        self.users -= 1
        if self.users <= 0:
            self.files.files.pop(self.key, None)
            self.source.close()


class Changed(Exception):
    """The file is not the one announced in SIZE any more."""


class Unreadable(Exception):
    """The server may not read the file (its permissions): said to the client in words."""

    def __init__(self, why="permission denied on the server"):
        super().__init__(why)
        self.why = why


def read_failure(exc):
    """(outcome, ERROR code, text) for an exception met opening or reading a file."""
    if isinstance(exc, Changed):
        return "changed", "CHANGED", ""
    if isinstance(exc, (Unreadable, PermissionError)):
        return "unreadable", "INTERNAL", getattr(exc, "why", "permission denied on the server")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return "busy", "BUSY", "too many open files"
    return "unreadable", "INTERNAL", "cannot read it on the server"


class BufferPool:
    """Payload buffers shared by a server's transfers, within a byte budget: a transfer reads the
    next chunk ahead into one (and sends from it) only while the budget has one free, so the
    memory for payloads is bounded in bytes, whatever the number of transfers. A buffer goes
    back once the datagram that uses it has been sent (ServerTransfer.after_send)."""

    def __init__(self, size, budget):
        self.size = size
        self.limit = max(0, budget // size)
        self.made = 0
        self.free = []

    def take(self):
        """A buffer of `size` bytes (a memoryview), or None when the budget is spent."""
        if self.free:
            return self.free.pop()
        if self.made < self.limit:
            self.made += 1
            return memoryview(bytearray(self.size))
        return None

    def give(self, buf):
        self.free.append(buf)


WAIT_SIZE, WAIT_DATA, WAIT_EOF = "wait-size", "wait-data", "wait-eof"
_DATA_OVERHEAD = len(b"DATA  00000000\n")   # header bytes besides the offset digits and tag


class ServerTransfer:
    """One transfer on the server: SIZE, then DATA chunks, then EOF, each stop-and-wait.

    A transfer is a client address and a lane (None: untagged); every message it sends carries
    the lane's tag. The caller (ServerDispatcher) feeds it ACKs (already checked for the token)
    and timer expiries; it appends datagrams (tuples of buffers: header and payload go out with
    scatter-gather I/O, never concatenated) to `out`, and calls after_send() once they are sent.

    The running CRC (PROTOCOL.md): `_r` is R(pos), the CRC of the range up to the acknowledged
    offset; the outstanding DATA at pos carries crc32(payload, R(pos)), and `_crcs` maps each
    payload length sent at pos (a shrink sends a smaller copy) to the CRC it carried, so the ACK
    of either copy gives R of the new offset.

    Memory: the outstanding DATA's payload is let go once it is sent, and read again (and
    checked against the CRC it carried) if it has to be resent; the next chunk is read ahead
    only into a buffer of the shared pool. So a transfer holds no payload of its own, and
    hundreds of them cost the pool's budget, not hundreds of chunks.
    """

    def __init__(self, addr, lane, request, entry, start, end, now, settings, rtt, out,
                 bytes_in=0, ceiling=None, token=None, path=None, order=None, pool=None):
        self.addr, self.lane, self.request, self.entry = addr, lane, request, entry
        self.key = (addr, lane)
        self.tag = lane_tag(lane)
        self.name = "<list>" if isinstance(request, ListRequest) else request.name
        self.start = self.pos = start
        self.end = end
        self.s = settings
        self.rtt = rtt
        self.out = out
        self.token = token or new_token()
        self.path = path or Path(settings, ceiling or settings.datagram_size)
        self.order = order or SendOrder(settings, self.path)
        self.pool = pool
        self.source = None
        self.outcome = None          # set when finished: "done", "timeout", "changed", ...
        self.started = now
        self.activated = None
        self.retransmissions = 0
        self.early_retransmissions = 0
        self.bytes_sent = 0          # payload bytes, retransmissions included
        self.shrinks = 0
        self._r = crc_start(start)
        self._crcs = {}
        self._seq = 0                # the outstanding DATA's number in the client's send order
        self._flying = False         # counted in path.flights (a DATA outstanding)
        self._flights = 0            # path.flights when the outstanding datagram was sent
        self._early_at = None        # when the outstanding DATA counts as lost (evidence)
        self._spurious_check = self._spurious_check_early = self._last_early = False
        self.ceiling = ceiling or settings.datagram_size   # lowered if the OS refuses a size
        self._black_hole = False     # big datagrams never arrive: stay at the safe size
        self._probe_every = settings.probe_after
        self._small_streak = 0
        self._probing = False
        self._ahead = None           # read-ahead: (offset, r, datagram, crc, pooled buffer)
        self._buf = None             # the pooled buffer of the outstanding payload, if any
        self._spent = []             # pooled buffers to give back once what was sent is gone
        # The outstanding datagram: its header, its payload (None once sent and let go) and
        # the payload's length (0: a SIZE or an EOF).
        self._header = self._payload = None
        self._n = 0
        # Until SIZE is acknowledged with its token the address may be forged: by timer, send
        # at most amplification_factor times what it sent us (RFC 9000 8.1 applies the same
        # rule to QUIC), but always the first SIZE and one retransmission (or a client that
        # follows PROTOCOL.md to the letter would stall when its ACK of SIZE is lost), and
        # never more than pending_byte_budget in all.
        size_msg = format_size(entry.size, entry.version, self.token, self.tag)
        self._unvalidated_sent = 0
        self._expiries = 0
        self._allowance = min(settings.pending_byte_budget,
                              max(2 * len(size_msg), settings.amplification_factor * bytes_in))
        self.state = WAIT_SIZE
        self._transmit(size_msg, None, now)

    # -- sending

    @property
    def tries(self):
        """How many times the outstanding datagram has been sent."""
        return self._tries

    def _transmit(self, header, payload, now):
        """Send a new datagram: it becomes the one unacknowledged datagram."""
        self._header, self._payload = header, payload
        self._n = 0 if payload is None else len(payload)
        self._tries = 1
        self._timeouts = 0
        self._first_sent_at = now
        self._fly(self.state == WAIT_DATA)
        self._flights = self.path.flights if self._flying else 0
        self._emit()
        self._arm(now)

    def _fly(self, flying):
        if flying != self._flying:
            self._flying = flying
            if flying:
                self.path.flights += 1
                self.path.sending.add(self)
            else:
                self.path.flights -= 1
                self.path.sending.discard(self)

    def rto(self):
        """The retransmission timeout for the outstanding datagram: the RTO, and at least what
        the queue of the client's DATAs in flight takes (Path.queue_rto): a SIZE or an EOF
        waits behind them as a DATA does. On a lane, at least lane_rto_factor smoothed round
        trips: a client that runs lanes paces them by holding its ACKs back, and holds them
        longer when it slows down (QUIC's PTO counts the peer's ack delay the same way)."""
        rto = max(self.rtt.rto, self.path.queue_rto())
        if self.lane is not None and self.rtt.srtt is not None:
            floor = self.s.lane_rto_factor * self.rtt.srtt
            if floor > rto:
                return floor
        return rto

    def _arm(self, now):
        self._sent_at = now
        self.deadline = self._timeout_at()
        self._early_at = None

    def _emit(self):
        """Hand the outstanding datagram to the loop (read again first if it was let go)."""
        if self.state == WAIT_SIZE:
            self._unvalidated_sent += len(self._header)
            self.out.append(((self._header,), self.addr))
            return
        if self.state == WAIT_EOF:
            self.out.append(((self._header,), self.addr))
            return
        if self._payload is None:
            self._reload()
        self.bytes_sent += self._n
        self._seq = self.order.sent(self)
        self.out.append(((self._header, self._payload), self.addr))

    def _reload(self):
        """Read the outstanding DATA's payload again to resend it, and check it is the bytes
        that were sent: the CRC it carried must come out again (else the file changed)."""
        payload, buf = self._read(self.pos, self._n)
        if zlib.crc32(payload, self._r) != self._crcs.get(self._n):
            if buf is not None:
                self.pool.give(buf)
            raise Changed()
        self._payload, self._buf = payload, buf

    def after_send(self):
        """The loop has sent what this transfer handed it: let the outstanding payload go (it
        is read again if it must be resent), give spent buffers back, and read the next chunk
        ahead, so the client's processing of this one overlaps with ours of the next (two
        cores): idle work, done after sending and before waiting."""
        if self._buf is not None:
            self._spent.append(self._buf)
            self._buf = None
        self._payload = None
        if self._spent:
            for buf in self._spent:
                self.pool.give(buf)
            self._spent = []
        if (self.state != WAIT_DATA or self._ahead is not None or self.outcome is not None
                or self._tries != 1 or self.pool is None):
            return
        offset = self.pos + self._n
        if offset < self.end:
            r = self._crcs[self._n]
            try:
                self._ahead = (offset, r) + self._build(offset, r, self._datagram_size(),
                                                        pooled_only=True)
            except (Changed, OSError, _NoBuffer):
                return   # found again, and reported, when the chunk is really needed

    def _may_send_size(self, limit):
        """Stay within `limit` bytes sent to an address that has not acknowledged SIZE."""
        return self._unvalidated_sent + len(self._header) <= limit

    def _datagram_len(self):
        """The size of the outstanding DATA datagram (header and payload)."""
        return len(self._header) + self._n

    def _datagram_size(self):
        if self._black_hole and not self._probing:
            return self.s.safe_datagram_size
        return min(self.path.size, self.ceiling)

    def _payload_limit_for(self, datagram_size, offset):
        return datagram_size - _DATA_OVERHEAD - len(self.tag) - len(str(offset))

    def _read(self, offset, n, pooled_only=False):
        """Read n bytes at offset, checking the file is still the announced one: (payload,
        the pooled buffer it is in, or None). A source with readinto() reads into a buffer of
        the pool while the budget has one (no allocation per chunk)."""
        buf = None
        if self.pool is not None and hasattr(self.source, "readinto"):
            buf = self.pool.take()
        if buf is None and pooled_only:
            raise _NoBuffer()
        try:
            if buf is not None:
                payload = self.source.readinto(offset, buf[:n])
            else:
                payload = self.source.read(offset, n)
            if len(payload) != n or not self.source.unchanged():
                raise Changed()
        except BaseException:
            if buf is not None:
                self.pool.give(buf)
            raise
        return payload, buf

    def _build(self, offset, r, datagram_size, pooled_only=False):
        """Read the DATA at offset whose range CRC so far is r: (header, payload, crc, buffer)."""
        n = min(self.end - offset, self._payload_limit_for(datagram_size, offset))
        payload, buf = self._read(offset, n, pooled_only)
        crc = zlib.crc32(payload, r)
        return format_data_header(offset, crc, self.tag), payload, crc, buf

    def _take(self, header, payload, buf):
        """A new outstanding DATA: the buffer of the one before is spent once it is sent."""
        if self._buf is not None:
            self._spent.append(self._buf)
        self._buf = buf
        return header, payload

    def _send_next(self, now):
        """Send what follows self.pos: the next DATA, or EOF once the range is acknowledged."""
        try:
            if self.pos < self.end:
                size = self._datagram_size()
                ahead, self._ahead = self._ahead, None
                n = min(self.end - self.pos, self._payload_limit_for(size, self.pos))
                if (ahead is not None and ahead[0] == self.pos and ahead[1] == self._r
                        and len(ahead[3]) == n):
                    # Checked against the announced version when it was read (_read); a
                    # change since then shows at the next read, and before EOF at the latest.
                    _, _, header, payload, crc, buf = ahead
                else:
                    if ahead is not None and ahead[5] is not None:
                        self._spent.append(ahead[5])
                    header, payload, crc, buf = self._build(self.pos, self._r, size)
                header, payload = self._take(header, payload, buf)
                self._crcs = {n: crc}
                self.state = WAIT_DATA
                self._transmit(header, payload, now)
                return
            if not self.source.unchanged():
                raise Changed()
        except (Changed, OSError) as exc:
            return self._fail(*read_failure(exc))
        self.state = WAIT_EOF
        self._transmit(format_eof(self._r, self.tag), None, now)

    def _fail(self, outcome, code, text=""):
        # Sent once, like every ERROR.
        self.out.append(((format_error(code, text, self.tag),), self.addr))
        self.finish(outcome)

    def finish(self, outcome):
        if self.outcome is None:
            self.outcome = outcome
            self.deadline = None
            self._fly(False)
            if self._ahead is not None and self._ahead[5] is not None:
                self._spent.append(self._ahead[5])
            self._ahead = None
            if self.source is not None:
                self.source.close()
            # (Buffers of what was just handed to the loop go back in after_send.)

    # -- events

    def acknowledges_size(self, n):
        return self.state == WAIT_SIZE and n == self.start

    def resend_size(self, now, bytes_in):
        """The same request came again while SIZE is unacknowledged: send SIZE again."""
        if self.state != WAIT_SIZE:
            return
        # One SIZE per request is no amplification in datagrams, and a client whose SIZE was
        # lost has no other way to get it: answer, within the total byte budget.
        self._allowance = min(self.s.pending_byte_budget,
                              self._allowance + self.s.amplification_factor * bytes_in)
        if self._may_send_size(self.s.pending_byte_budget):
            self._tries += 1
            self._emit()

    def activate(self, now, opener=None):
        """SIZE was acknowledged: open the file (checking it is the announced version), go.
        `opener(entry)` opens it (SharedFiles.open: one open file for all its transfers)."""
        try:
            self.source = opener(self.entry) if opener is not None else self.entry.open()
        except (Changed, Unreadable, OSError) as exc:
            return self._fail(*read_failure(exc))
        self.activated = now
        if self._tries > 1 and self.path.rtt.srtt is not None:
            # SIZE went more than once (its timer backed off, and Karn's rule keeps that ACK
            # from timing anything): the data starts from the path's round trip, as the other
            # lanes measure it, not from a timer doubled for a lost SIZE or ACK (a first lane
            # at 5% loss waited 1.5 s for its second DATA).
            self.rtt = self.path.transfer_rtt()
        self._sample(now)
        self._send_next(now)

    def _sample(self, now):
        if self._tries == 1:                      # Karn's rule: never time a retransmitted one
            r = now - self._sent_at
            self.rtt.sample(r)
            self.path.sample(r, self._flights)

    def on_ack(self, n, now):
        """ACK n: continue at n if it acknowledges the outstanding DATA; ignore it otherwise."""
        if n == self.pos and self._spurious_check:
            # The client acknowledged the previous DATA again: it got both copies of a
            # retransmission, which was needless (the idea of DSACK, RFC 3708).
            self._spurious_check = False
            self.path.spurious()
            if self._spurious_check_early:
                self.order.widen(now)
            else:
                # The timer fired too early: the ACK that came answered the first copy, so
                # its time is a true round trip (the Eifel response, RFC 4015): learn it.
                self.rtt.sample(self._spurious_rtt)
                self.path.sample(self._spurious_rtt, self._spurious_flights)
            return
        crc = self._crcs.get(n - self.pos) if self.state == WAIT_DATA else None
        if crc is None:
            return   # duplicate, stale or bogus: never answered (RFC 1123 4.2.3.1)
        length = n - self.pos
        first_try = self._tries == 1
        self._sample(now)
        if first_try:
            self.path.outcome(self._datagram_len(), False, now)
            if self._seq > self.order.acked:
                self.order.acked = self._seq
        # Exactly one resend: if the client acknowledges again, the first copy got through.
        self._spurious_check = self._tries == 2
        self._spurious_check_early = self._last_early
        self._spurious_rtt = now - self._first_sent_at
        self._spurious_flights = self._flights
        self._adjust_size(length)
        self._r = crc
        self.pos = n
        self._send_next(now)

    def _adjust_size(self, length):
        """After shrinking to the safe size (a path that drops big datagrams), probe big
        datagrams again now and then, like PLPMTUD (RFC 8899)."""
        if not self._black_hole:
            return
        if length > self._payload_limit_for(self.s.safe_datagram_size, self.pos):
            # The big copy got through after all: the timeouts were delay, not a path that
            # drops big datagrams. Back to big ones at once.
            self._black_hole, self._probing, self._small_streak = False, False, 0
            self._probe_every = self.s.probe_after
        elif self._probing:
            self._probing = False     # the probe was not needed to carry this one
        else:
            self._small_streak += 1
            if self._small_streak >= self._probe_every:
                self._probing, self._small_streak = True, 0

    def on_ack_eof(self, now):
        if self.state == WAIT_EOF:
            self._sample(now)
            self.finish("done")

    def overtaken(self, seq, now):
        """A DATA sent later to the same client was acknowledged: if `seq` is still the
        outstanding DATA, it is lost once the reordering threshold has passed since it was sent,
        and reorder_min (or the smoothed round trip, if shorter) after this evidence at the
        soonest: after a pause, a client answers the backlog of its transfers in the order it
        reads them, not in send order. A DATA already resent early and still unanswered waits
        a whole RTO more, backed off like a timeout, before the next early resend: its client
        may be gone, and others' evidence must not resend it again and again. Returns whether
        that changed anything (a deadline)."""
        if self.outcome is not None or self.state != WAIT_DATA or seq != self._seq:
            return False
        early_at = max(self._sent_at + self.order.loss_threshold(),
                       now + min(self.s.reorder_min, self.path.rtt.srtt or 1.0))
        if self._tries > 1:
            early_at = max(early_at, self._sent_at + self.rto())
        self._early_at = early_at
        # From now on that threshold, not the RTO, sets the timer (see on_timer).
        self.deadline = min(self._early_at, self._hold())
        return True

    def _timeout_at(self, rtos=1):
        """When the outstanding datagram times out, after `rtos` RTOs: at the silence limit at
        the latest, so the slot is freed on time."""
        return min(self._sent_at + rtos * self.rto(),
                   self._first_sent_at + self.s.client_silence)

    def _hold(self):
        """How long evidence of a loss may hold the timeout back (see on_timer)."""
        return self._timeout_at(2)

    def on_timer(self, now):
        """A timer expired: an early retransmission, the retransmission timer, or giving up."""
        if self._early_at is not None:
            # A DATA sent later was acknowledged, so this one is lost once the reordering
            # threshold has passed, and until then that threshold sets the timer, even when the
            # RTO would expire sooner (as in RFC 9002's SetLossDetectionTimer, appendix A.8): a
            # client whose other transfers answer is not silent, only answering out of order.
            # A threshold widened by needless early resends (SendOrder.widen) holds for this one
            # too, including a widening since the evidence came. (On loopback, 20 clients in one
            # process: needless timeouts went from 6-48 per run to 0-7.) But for at most twice
            # the RTO, and never past the silence limit: a window widened up to 16-fold (18
            # round trips) must not turn a loss into a long stall. Past that hold (also when
            # the timer fires late), the timeout below decides, as if no evidence had come.
            hold = self._hold()
            if now < hold:
                due = max(self._early_at, self._sent_at + self.order.loss_threshold())
                if due <= now:
                    return self._retransmit(now, early=True)
                self._early_at = due
                self.deadline = min(due, hold)
                return
        # The timeout is taken again now: more DATAs may have joined the client's queue since
        # this datagram was sent (Path.queue_rto), and their round trips make its own longer.
        due = self._timeout_at()
        if due > now:
            self.deadline = due
            return
        if self.state == WAIT_SIZE:
            # Retransmit only within the anti-amplification allowance; either way stay ready
            # for the client's ACK (or its repeated request) for pending_max_sends timeouts,
            # and at least pending_keep seconds, whatever the RTO learnt for the IP.
            self._expiries += 1
            if self._expiries >= self.s.pending_max_sends:
                keep = self._first_sent_at + self.s.pending_keep
                if now >= keep:
                    return self.finish("expired")
                self.deadline = keep
                return
            self.rtt.backoff()
            self.deadline = now + self.rtt.rto
            if self._may_send_size(self._allowance):
                self._tries += 1
                self.retransmissions += 1
                self._emit()
            return
        if self._client_gone(now):
            # Every byte was acknowledged and only our EOF (or the ACK of it) went unanswered:
            # the range was delivered, and the client may have stopped listening on the lane
            # (PROTOCOL.md "Small print").
            return self.finish("done" if self.state == WAIT_EOF else "timeout")
        self.rtt.backoff()
        self._timeouts += 1
        self._retransmit(now, early=False)

    def _retransmit(self, now, early):
        if early and self._tries > 1:
            # Resent early before and still unanswered: back off as a timeout does.
            self.rtt.backoff()
        self._last_early = early
        first_resend = self._tries == 1
        self._tries += 1
        self.retransmissions += 1
        try:
            if self.state == WAIT_DATA:
                if first_resend:   # one loss per datagram, however often it must be resent
                    self.path.outcome(self._datagram_len(), True, now, not early)
                if early:
                    self.early_retransmissions += 1
                    self.order.early_resent()
                if (not early and self._timeouts >= self.s.shrink_after
                        and self._n > self._payload_limit_for(self.s.safe_datagram_size,
                                                              self.pos)):
                    self._shrink(self.s.safe_datagram_size, black_hole=True)
                elif self._n > self._payload_limit_for(self._datagram_size(), self.pos):
                    # The path's size came down (losses): resend the bytes in a datagram of
                    # that size, or a lossy path would resend a many-fragment datagram forever.
                    self._shrink(self._datagram_size())
            self._emit()
        except (Changed, OSError) as exc:
            return self._fail(*read_failure(exc))
        # An early retransmission keeps the backed-off timer running from now: evidence of
        # loss is not evidence of a slower path.
        self._arm(now)

    def _client_gone(self, now):
        """Give up on a client that acknowledged nothing for client_silence seconds (about when
        it gives up itself: its idle timeout), or after max_retransmits timeouts of one
        datagram, whichever comes first. _first_sent_at is when the outstanding datagram was
        first sent, that is when the transfer last advanced."""
        return (self._timeouts >= self.s.max_retransmits
                or now >= self._first_sent_at + self.s.client_silence)

    def too_big(self, size, now):
        """The OS refused to send a datagram this big (EMSGSIZE): lower the ceiling for good."""
        if self.state != WAIT_DATA or size <= self.s.safe_datagram_size:
            return
        self.ceiling = max(self.s.safe_datagram_size, min(self.ceiling, size // 2))
        try:
            self._shrink(self.ceiling, black_hole=self.ceiling == self.s.safe_datagram_size)
            self._emit()
        except (Changed, OSError) as exc:
            self._fail(*read_failure(exc))

    def _shrink(self, datagram_size, black_hole=False):
        """Resend the outstanding DATA with a smaller payload (some paths drop IP fragments).
        Raises Changed or OSError if the file cannot be read again as it was."""
        if black_hole:
            if self._probing:
                self._probe_every = min(self._probe_every * 2, self.s.probe_after_max)
            self._black_hole, self._probing, self._small_streak = True, False, 0
        self.shrinks += 1
        if self._ahead is not None and self._ahead[5] is not None:
            self._spent.append(self._ahead[5])
        self._ahead = None
        header, payload, crc, buf = self._build(self.pos, self._r, datagram_size)
        self._header, self._payload = self._take(header, payload, buf)
        self._n = len(payload)
        self._crcs[self._n] = crc    # an ACK for either copy is good


class _NoBuffer(Exception):
    """The pool has no buffer free: no read-ahead now."""
