"""Wire protocol v1 (../shared/PROTOCOL.md) and the transfer state machines, with no I/O.

Strategy: every rule of the protocol lives in this file. The state machines never touch a socket,
a clock or a file: they take datagrams and the current time, and give back datagrams to send and
the time they next need attention (the shape of h11 and aioquic). server.py and client.py are thin
loops around them; tests drive them on a virtual clock.

- Codec: one parse and one format function per message; parsers check every field and raise
  ProtocolError, so a truncated datagram never parses as something valid.
- ServerTransfer: one stop-and-wait transfer (SIZE, DATA..., EOF) with an RFC 6298 timer, Karn's
  rule, payload shrinking on paths that drop big datagrams, and read-ahead of the next chunk.
- ServerDispatcher: routes datagrams by client address, holds the pools and limits that keep a
  hostile network from exhausting the server, and rate-limits replies to strangers.
- ClientTransfer: the client side of one transfer: request retransmission, in-order acceptance by
  offset, cumulative ACKs, the end-to-end SHA-256 check.
"""

import hashlib
import heapq
import logging
import re
import unicodedata
import zlib
from collections import OrderedDict

from config import ClientSettings, ServerSettings

# --- Wire limits (PROTOCOL.md "Transport and encoding") ---------------------------------------
MAX_DATAGRAM = 65507      # the IPv4 UDP payload limit; no message is larger
RECV_BUFSIZE = 65536      # receivers read with at least this, so nothing is ever truncated
MAX_ERROR = 64            # an ERROR datagram is at most this long (cheap to send to strangers)
MAX_VERSION = 64          # the version token is 1..64 visible ASCII characters
MAX_DATA_HEADER = 128     # "DATA <offset> <crc>\n" is searched for its newline in this prefix
# Numbers have no upper bound on the wire, but one longer than this many digits is larger than any
# real file, so it is read as HUGE instead of converting an attacker's 60 kB of digits to an int.
MAX_DIGITS = 40
HUGE = 10 ** MAX_DIGITS

ERROR_CODES = ("NOT_FOUND", "BAD_REQUEST", "BUSY", "CHANGED", "INTERNAL")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

log = logging.getLogger("udpxfer")


class ProtocolError(Exception):
    """A datagram that is not a valid message (or not one we expect here)."""

    def __init__(self, message, code="BAD_REQUEST"):
        super().__init__(message)
        self.code = code


# --- Codec ----------------------------------------------------------------------------------

_NUMBER = re.compile(r"0|[1-9][0-9]*")
_CRC = re.compile(rb"[0-9a-f]{8}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_VERSION)
_CODE = re.compile(r"[A-Z][A-Z_]{0,30}")


def parse_number(text):
    """An unsigned decimal field: no sign, no leading zeros, ASCII digits only."""
    if not _NUMBER.fullmatch(text):
        raise ProtocolError("bad number %r" % text[:20])
    return HUGE if len(text) > MAX_DIGITS else int(text)


def _control_text(data):
    """Decode a control message: UTF-8, one trailing \\n or \\r\\n ignored."""
    data = bytes(data)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("not UTF-8") from None


class ListRequest:
    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, ListRequest)

    def __hash__(self):
        return hash("LIST")

    def __repr__(self):
        return "LIST"


class DownloadRequest:
    __slots__ = ("name", "offset", "chunk_size")

    def __init__(self, name, offset, chunk_size):
        self.name, self.offset, self.chunk_size = name, offset, chunk_size

    def _key(self):
        return (self.name, self.offset, self.chunk_size)

    def __eq__(self, other):
        return isinstance(other, DownloadRequest) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return "DOWNLOAD %r %d %d" % self._key()


class Ack:
    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n   # next byte needed, or None for "ACK EOF"


def parse_client_message(data):
    """LIST, DOWNLOAD or ACK, as sent to the server. Raises ProtocolError."""
    text = _control_text(data)
    if text == "LIST":
        return ListRequest()
    if text.startswith("ACK "):
        field = text[4:]
        return Ack(None if field == "EOF" else parse_number(field))
    if text.startswith("DOWNLOAD "):
        # The name is everything between "DOWNLOAD " and the last two fields: it may hold spaces.
        parts = text[9:].rsplit(" ", 2)
        if len(parts) != 3:
            raise ProtocolError("DOWNLOAD needs a name, an offset and a chunk size")
        return DownloadRequest(parts[0], parse_number(parts[1]), parse_number(parts[2]))
    raise ProtocolError("unknown message")


def format_list():
    return b"LIST"


def format_download(name, offset, chunk_size):
    return ("DOWNLOAD %s %d %d" % (name, offset, chunk_size)).encode("utf-8")


def format_ack(n):
    return b"ACK %d" % n


ACK_EOF = b"ACK EOF"


class Size:
    __slots__ = ("size", "version")

    def __init__(self, size, version):
        self.size, self.version = size, version


class Data:
    __slots__ = ("offset", "payload")

    def __init__(self, offset, payload):
        self.offset, self.payload = offset, payload


class Eof:
    __slots__ = ("digest",)

    def __init__(self, digest):
        self.digest = digest


class Error:
    __slots__ = ("code", "text")

    def __init__(self, code, text=""):
        self.code, self.text = code, text


def format_size(size, version):
    if not _VERSION.fullmatch(version):
        raise ValueError("bad version token %r" % version)
    return ("SIZE %d %s" % (size, version)).encode("ascii")


def data_crc(offset_field, payload):
    """CRC-32 of the ASCII offset field followed by the payload (so a DATA cannot be misplaced)."""
    return zlib.crc32(payload, zlib.crc32(offset_field))


def format_data_header(offset, payload):
    """The header of a DATA datagram; the payload follows it (sent with scatter-gather I/O)."""
    field = b"%d" % offset
    return b"DATA %s %08x\n" % (field, data_crc(field, payload))


def format_eof(digest):
    return ("EOF " + digest).encode("ascii")


def format_error(code, text=""):
    """ERROR <CODE> [<text>], cut to 64 bytes; the text is reduced to printable ASCII."""
    assert code in ERROR_CODES
    msg = "ERROR " + code
    if text:
        text = "".join(c if " " <= c <= "~" else "?" for c in text)
        msg = (msg + " " + text)[:MAX_ERROR]
    return msg.encode("ascii")


def parse_server_message(data):
    """SIZE, DATA, EOF or ERROR, as sent to the client. Raises ProtocolError.

    A DATA's payload is a memoryview into `data` (no copy); its crc has been checked.
    """
    view = memoryview(data)
    if view[:5] == b"DATA ":
        head = bytes(view[:MAX_DATA_HEADER])
        newline = head.find(b"\n")
        fields = head[5:newline].split(b" ") if newline > 0 else ()
        if len(fields) != 2 or not _CRC.fullmatch(fields[1]):
            raise ProtocolError("bad DATA header")
        offset = parse_number(fields[0].decode("ascii", "replace"))
        payload = view[newline + 1:]
        if not payload:
            raise ProtocolError("empty DATA")
        if data_crc(fields[0], payload) != int(fields[1], 16):
            raise ProtocolError("DATA crc mismatch")
        return Data(offset, payload)
    text = _control_text(view)
    word, _, rest = text.partition(" ")
    if word == "SIZE":
        fields = rest.split(" ")
        if len(fields) != 2 or not _VERSION.fullmatch(fields[1]):
            raise ProtocolError("bad SIZE")
        return Size(parse_number(fields[0]), fields[1])
    if word == "EOF":
        if not _DIGEST.fullmatch(rest):
            raise ProtocolError("bad EOF")
        return Eof(rest)
    if word == "ERROR":
        code, _, message = rest.partition(" ")
        if len(view) > MAX_ERROR or not _CODE.fullmatch(code):
            raise ProtocolError("bad ERROR")
        return Error(code, message)
    raise ProtocolError("unknown message")


def is_servable_name(name):
    """The one rule for names (PROTOCOL.md "Hostile input"), used by server and client alike.

    A plain name directly inside the folder: not empty, no path separator, no control character
    (NUL, newline, DEL, C1), not hidden (which also rules out "." and ".."), valid UTF-8 text.
    """
    if not name or name[0] == "." or "/" in name or "\\" in name:
        return False
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):   # Cs: undecodable bytes
        return False
    return len(name.encode("utf-8")) <= 1024


def parse_listing(data):
    """The listing text -> list of (name, size). Raises ProtocolError on a malformed line."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("listing is not UTF-8") from None
    lines = text.split("\n")   # not splitlines(): a name may hold U+2028 and the like
    if lines[-1] == "":
        lines.pop()
    entries = []
    for line in lines:
        name, _, size = line.rpartition(" ")
        if not name:
            raise ProtocolError("bad listing line %r" % line[:80])
        if is_servable_name(name):   # never show (or fetch) what no server may serve:
            entries.append((name, parse_number(size)))   # e.g. terminal escape codes
    return entries


def format_listing(entries):
    """[(name, size)] -> listing bytes, sorted by code point as PROTOCOL.md requires."""
    return "".join("%s %d\n" % (name, size) for name, size in sorted(entries)).encode("utf-8")


# --- Retransmission timer (RFC 6298) ----------------------------------------------------------

class RttEstimator:
    """Smoothed RTT and variance -> RTO, doubled on each expiry, held within [min, max]."""

    G = 0.001  # clock granularity term of RFC 6298 2.3

    def __init__(self, initial, minimum, maximum, srtt=None, rttvar=None):
        self.min, self.max = minimum, maximum
        self.srtt, self.rttvar = srtt, rttvar
        self.rto = self._clamp(initial if srtt is None else srtt + max(self.G, 4 * rttvar))

    def _clamp(self, value):
        return min(max(value, self.min), self.max)

    def sample(self, r):
        if self.srtt is None:                       # RFC 6298 2.2
            self.srtt, self.rttvar = r, r / 2
        else:                                       # RFC 6298 2.3
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = self._clamp(self.srtt + max(self.G, 4 * self.rttvar))

    def backoff(self):                              # RFC 6298 5.5
        self.rto = min(self.rto * 2, self.max)


# --- Server side ------------------------------------------------------------------------------

class MemoryEntry:
    """Something servable held in memory (the listing, or a file in tests)."""

    def __init__(self, data, version=None):
        self.data = memoryview(bytes(data))
        self.size = len(self.data)
        self.version = version or hashlib.sha256(self.data).hexdigest()[:16]

    def open(self):
        return self

    def read(self, offset, n):
        return self.data[offset:offset + n]

    def unchanged(self):
        return True

    def close(self):
        pass


class Changed(Exception):
    """The file is not the one announced in SIZE any more."""


WAIT_SIZE, WAIT_DATA, WAIT_EOF = "wait-size", "wait-data", "wait-eof"
_DATA_OVERHEAD = len(b"DATA  00000000\n")   # header bytes besides the offset digits


class ServerTransfer:
    """One transfer on the server: SIZE, then DATA chunks, then EOF, each stop-and-wait.

    The caller (ServerDispatcher) feeds it ACKs and timer expiries; it appends datagrams (tuples
    of buffers: header and payload go out with scatter-gather I/O, never concatenated) to `out`.
    """

    def __init__(self, addr, request, entry, start, end, now, settings, rtt, out, bytes_in=0,
                 ceiling=None):
        self.addr, self.request, self.entry = addr, request, entry
        self.name = "<list>" if isinstance(request, ListRequest) else request.name
        self.start = self.pos = start
        self.end = end
        self.s = settings
        self.rtt = rtt
        self.out = out
        self.source = None
        self.outcome = None          # set when finished: "done", "timeout", "changed", ...
        self.started = now
        self.activated = None
        self.retransmissions = 0
        self.bytes_sent = 0          # payload bytes, retransmissions included
        self.shrinks = 0
        self._hash = hashlib.sha256()
        self._hashed_to = start
        self._ceiling = ceiling or settings.datagram_size   # lowered if the OS refuses a size
        self._limit = self._ceiling              # current datagram size
        self._probe_every = settings.probe_after
        self._small_streak = 0
        self._probing = False
        self._ahead = None                       # read-ahead: (offset, (header, payload))
        self._bufs = None                        # two payload buffers, see _read()
        self._cur = 1                            # which one holds the outstanding payload
        # Until SIZE is acknowledged the address may be spoofed: by timer, send at most
        # amplification_factor times what it sent us (RFC 9000 8.1 applies the same rule to
        # QUIC), but always the first SIZE and one retransmission (or a client that follows
        # PROTOCOL.md to the letter would stall when its ACK of SIZE is lost), and never more
        # than pending_byte_budget in all.
        size_msg = format_size(entry.size, entry.version)
        self._unvalidated_sent = 0
        self._expiries = 0
        self._allowance = min(settings.pending_byte_budget,
                              max(2 * len(size_msg), settings.amplification_factor * bytes_in))
        self.state = WAIT_SIZE
        self._transmit((size_msg,), now)

    # -- sending

    def _transmit(self, datagram, now):
        """Send a new datagram: it becomes the one unacknowledged datagram."""
        self._current = datagram
        self._tries = 1
        self._sent_at = now
        self.deadline = now + self.rtt.rto
        self._emit(datagram)

    def _emit(self, datagram):
        if self.state == WAIT_SIZE:
            self._unvalidated_sent += len(datagram[0])
        else:
            self.bytes_sent += len(datagram[-1]) if len(datagram) > 1 else 0
        self.out.append((datagram, self.addr))

    def _may_send_size(self, limit):
        """Stay within `limit` bytes sent to an address that has not acknowledged SIZE."""
        return self._unvalidated_sent + len(self._current[0]) <= limit

    def _payload_limit(self, offset):
        return self._payload_limit_for(self._limit, offset)

    @staticmethod
    def _payload_limit_for(datagram_size, offset):
        return datagram_size - _DATA_OVERHEAD - len(str(offset))

    def _read(self, offset, n):
        """Read n bytes at offset, checking the file is still the announced one.

        A source with readinto() reads into the one of our two buffers that the outstanding
        datagram does not use: no allocation per chunk (fresh 64 KiB blocks cost page faults).
        """
        if self._bufs is not None:
            payload = self.source.readinto(offset, self._bufs[1 - self._cur][:n])
        else:
            payload = self.source.read(offset, n)
        if len(payload) != n or not self.source.unchanged():
            raise Changed()
        if offset <= self._hashed_to < offset + n:   # hash every byte of the range once, in order
            self._hash.update(payload[self._hashed_to - offset:] if offset < self._hashed_to
                              else payload)
            self._hashed_to = offset + n
        return payload

    def _datagram(self, offset):
        """The DATA datagram (header, payload) at offset, from the read-ahead if it fits."""
        n = min(self.end - offset, self._payload_limit(offset))
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == offset and len(ahead[1][1]) == n:
            if not self.source.unchanged():
                raise Changed()
            return ahead[1]
        payload = self._read(offset, n)
        return (format_data_header(offset, payload), payload)

    def _send_next(self, now):
        """Send what follows self.pos: the next DATA, or EOF once the range is acknowledged."""
        try:
            if self.pos < self.end:
                datagram = self._datagram(self.pos)
                self._cur = 1 - self._cur          # its payload lives in the other buffer
                self._lengths = {len(datagram[1])}
                self.state = WAIT_DATA
                self._transmit(datagram, now)
                return
            if self._hashed_to != self.end or not self.source.unchanged():
                raise Changed()
        except (Changed, OSError):
            return self._fail("changed", "CHANGED")
        self.state = WAIT_EOF
        self._transmit((format_eof(self._hash.hexdigest()),), now)

    def read_ahead(self):
        """Idle work, done after sending and before waiting: read and checksum the next chunk,
        so the client's processing of this one overlaps with ours of the next (two cores)."""
        if self.state != WAIT_DATA or self._ahead is not None or self.outcome is not None:
            return
        offset = self.pos + len(self._current[1])
        if offset < self.end:
            try:
                payload = self._read(offset, min(self.end - offset, self._payload_limit(offset)))
            except (Changed, OSError):
                return   # found again, and reported, when the chunk is really needed
            self._ahead = (offset, (format_data_header(offset, payload), payload))

    def _fail(self, outcome, code):
        self.out.append(((format_error(code),), self.addr))   # sent once, like every ERROR
        self.finish(outcome)

    def finish(self, outcome):
        if self.outcome is None:
            self.outcome = outcome
            self.deadline = None
            self._ahead = None
            if self.source is not None:
                self.source.close()
            self._bufs = self._current = None

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
            self._emit(self._current)

    def activate(self, now):
        """SIZE was acknowledged: open the file (checking it is the announced version), go."""
        try:
            self.source = self.entry.open()
        except (Changed, OSError):
            return self._fail("changed", "CHANGED")
        if hasattr(self.source, "readinto") and self.end > self.start:
            size = min(self.end - self.start, self.s.datagram_size)
            self._bufs = (memoryview(bytearray(size)), memoryview(bytearray(size)))
        self.activated = now
        self._sample(now)
        self._send_next(now)

    def _sample(self, now):
        if self._tries == 1:                      # Karn's rule: never time a retransmitted one
            self.rtt.sample(now - self._sent_at)

    def on_ack(self, n, now):
        """ACK n: continue at n if it acknowledges the outstanding DATA; ignore it otherwise."""
        if self.state != WAIT_DATA or (n - self.pos) not in self._lengths:
            return   # duplicate, stale or bogus: never answered (RFC 1123 4.2.3.1)
        self._sample(now)
        if self._limit < self._ceiling and n - self.pos > self._payload_limit_for(
                self.s.safe_datagram_size, self.pos):
            # The big copy got through after all: the timeouts were delay, not a path that
            # drops big datagrams. Back to big ones at once.
            self._limit, self._probing, self._small_streak = self._ceiling, False, 0
        elif self._limit < self._ceiling:        # running small: probe big again now and then
            self._small_streak += 1
            if self._small_streak >= self._probe_every:
                self._limit, self._probing, self._small_streak = self._ceiling, True, 0
        elif self._probing:
            self._probing = False
            self._probe_every = self.s.probe_after
        self.pos = n
        self._send_next(now)

    def on_ack_eof(self, now):
        if self.state == WAIT_EOF:
            self._sample(now)
            self.finish("done")

    def on_timer(self, now):
        """The retransmission timer expired: send the outstanding datagram again, or give up."""
        if self.state == WAIT_SIZE:
            # Retransmit only within the anti-amplification allowance; either way stay ready
            # for the client's ACK (or its repeated request) for pending_max_sends timeouts.
            self._expiries += 1
            if self._expiries >= self.s.pending_max_sends:
                return self.finish("expired")
            self.rtt.backoff()
            self.deadline = now + self.rtt.rto
            if self._may_send_size(self._allowance):
                self._tries += 1
                self.retransmissions += 1
                self._emit(self._current)
            return
        if self._tries > self.s.max_retransmits:
            return self.finish("timeout")
        self.rtt.backoff()
        self._tries += 1
        self.retransmissions += 1
        if (self.state == WAIT_DATA and self._tries > self.s.shrink_after
                and self._limit > self.s.safe_datagram_size):
            self._shrink(self.s.safe_datagram_size)
            if self.outcome is not None:
                return   # the file changed under the re-read: ERROR CHANGED was sent
        self.deadline = now + self.rtt.rto
        self._emit(self._current)

    def too_big(self, size, now):
        """The OS refused to send a datagram this big (EMSGSIZE): lower the ceiling for good."""
        if self.state != WAIT_DATA or size <= self.s.safe_datagram_size:
            return
        self._ceiling = max(self.s.safe_datagram_size, min(self._ceiling, size // 2))
        self._shrink(self._ceiling)
        if self.outcome is None:
            self._emit(self._current)

    def _shrink(self, limit):
        """Resend the outstanding DATA with a smaller payload (some paths drop IP fragments)."""
        if self._probing:
            self._probe_every = min(self._probe_every * 2, self.s.probe_after_max)
            self._probing = False
        self._limit = limit
        self._small_streak = 0
        self.shrinks += 1
        self._ahead = None
        try:
            payload = self._read(self.pos, min(self.end - self.pos, self._payload_limit(self.pos)))
        except (Changed, OSError):
            return self._fail("changed", "CHANGED")
        self._cur = 1 - self._cur
        self._lengths.add(len(payload))   # an ACK for either copy is good
        self._current = (format_data_header(self.pos, payload), payload)


class TokenBucket:
    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, None

    def take(self, now):
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ServerDispatcher:
    """All transfers of one server socket, keyed by client address (PROTOCOL.md).

    `catalog` resolves names: catalog.listing() -> entry and catalog.lookup(name) -> entry or
    None, where an entry has .size, .version and .open() -> source with .read(offset, n),
    .unchanged() and .close(). Verbs: receive_datagram(data, addr, now), datagrams_to_send(),
    get_timer(), handle_timer(now), read_ahead(), too_big(addr, size, now), close().
    """

    def __init__(self, catalog, settings=None, logger=None):
        self.catalog = catalog
        self.s = settings or ServerSettings()
        self.log = logger or log
        self.active = {}              # addr -> ServerTransfer (SIZE acknowledged)
        self.pending = OrderedDict()  # addr -> ServerTransfer awaiting ACK of SIZE, oldest first
        self.recent = OrderedDict()   # addr -> (request, forget_at): finished transfers
        self.rtts = OrderedDict()     # client IP -> (srtt, rttvar)
        self.errors = TokenBucket(self.s.error_rate, self.s.error_burst)
        self._out = []
        self._timers = []             # heap of (deadline, seq, transfer); stale entries skipped
        self._seq = 0
        self._ahead = []              # transfers that just sent DATA: read their next chunk
        self.ceiling = self.s.datagram_size   # lowered if the OS refuses big datagrams
        self.stats = {"datagrams_in": 0, "malformed": 0, "errors_sent": 0,
                      "errors_suppressed": 0, "evicted": 0, "busy": 0, "finished": 0}

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
            self.ceiling = min(self.ceiling, t._ceiling)
            self._after(t, now)

    def close(self):
        for t in list(self.active.values()) + list(self.pending.values()):
            t.finish("shutdown")
        self.active.clear()
        self.pending.clear()

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
            return self._on_ack(msg.n, addr, now, len(data))
        return self._on_request(msg, addr, now, len(data))

    # -- internals

    def _on_ack(self, n, addr, now, size_in):
        t = self.active.get(addr)
        if t is not None:
            if n is None:
                t.on_ack_eof(now)
            else:
                t.on_ack(n, now)
            return self._after(t, now)
        t = self.pending.get(addr)
        if t is not None:
            if n is not None and t.acknowledges_size(n):
                self._activate(t, now)
            return
        if self._is_recent(addr, now):
            return   # late copy of a finished transfer's ACK: ignore quietly
        self.log.debug("ACK from %s, which has no transfer", format_addr(addr))
        self._error(addr, "BAD_REQUEST", now, size_in)

    def _activate(self, t, now):
        del self.pending[t.addr]
        if len(self.active) >= self.s.max_transfers:
            self.stats["busy"] += 1
            t.out.append(((format_error("BUSY"),), t.addr))
            return t.finish("busy")
        self.active[t.addr] = t
        t.activate(now)
        self.log.info("%s: start %s [%d, %d) of %d bytes", format_addr(t.addr), t.name,
                      t.start, t.end, t.entry.size)
        self._after(t, now)

    def _on_request(self, req, addr, now, size_in):
        old = self.active.get(addr) or self.pending.get(addr)
        if old is not None:
            if old.request == req:                   # the client retransmitted its request
                return old.resend_size(now, size_in)
        elif self._is_recent(addr, now, req):
            return
        # A different valid request ends the old transfer; one that is refused (perhaps a
        # damaged copy) leaves it running.
        if isinstance(req, ListRequest):
            entry, start, length = self.catalog.listing(), 0, HUGE
        else:
            entry = self.catalog.lookup(req.name) if is_servable_name(req.name) else None
            if entry is None:
                return self._error(addr, "NOT_FOUND", now, size_in)
            start, length = req.offset, req.chunk_size
        if start > entry.size:
            return self._error(addr, "BAD_REQUEST", now, size_in)
        if old is not None:
            old.finish("replaced")
            self._forget(old, now)
        if len(self.active) >= self.s.max_transfers:
            self.stats["busy"] += 1
            return self._error(addr, "BUSY", now, size_in)
        if len(self.pending) >= self.s.max_pending:   # flood: drop the oldest unacknowledged
            _, oldest = self.pending.popitem(last=False)
            oldest.finish("evicted")
            self.stats["evicted"] += 1
        cached = self.rtts.get(addr[0])
        rtt = RttEstimator(self.s.rto_initial, self.s.rto_min, self.s.rto_max,
                           *(cached or (None, None)))
        end = min(entry.size, start + length)
        t = ServerTransfer(addr, req, entry, start, end, now, self.s, rtt, self._out, size_in,
                           self.ceiling)
        self.pending[addr] = t
        self.log.debug("%s: %r -> SIZE %d", format_addr(addr), req, entry.size)
        self._schedule(t)

    def _after(self, t, now):
        """Bookkeeping after the transfer handled an event."""
        if t.outcome is not None:
            return self._forget(t, now)
        if t.state == WAIT_DATA and t._tries == 1:
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
        elif self.pending.get(t.addr) is t:
            del self.pending[t.addr]
        if t.activated is not None:
            # Late copies of a finished transfer's datagrams are ignored for a while. Not those
            # of a request that was never acknowledged: its client may well ask again.
            self.recent[t.addr] = (t.request, now + self.s.recent_seconds)
            self.recent.move_to_end(t.addr)
            while len(self.recent) > self.s.recent_max:
                self.recent.popitem(last=False)
        if t.rtt.srtt is not None:
            self.rtts[t.addr[0]] = (t.rtt.srtt, t.rtt.rttvar)
            self.rtts.move_to_end(t.addr[0])
            while len(self.rtts) > self.s.rtt_cache_max:
                self.rtts.popitem(last=False)
        if t.activated is None:
            self.log.debug("%s: %s ended before SIZE was acknowledged (%s)",
                           format_addr(t.addr), t.name, t.outcome)
            return
        self.stats["finished"] += 1
        seconds = max(now - t.activated, 1e-9)
        moved = t.pos - t.start
        self.stats["bytes_served"] = self.stats.get("bytes_served", 0) + moved
        level = logging.INFO if t.outcome == "done" else logging.WARNING
        self.log.log(level, "%s: %s %s: %d bytes in %.2f s, %.1f MB/s, %d retransmissions%s",
                     format_addr(t.addr), t.outcome, t.name, moved, seconds, moved / seconds / 1e6,
                     t.retransmissions, ", %d shrinks" % t.shrinks if t.shrinks else "")

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


def format_addr(addr):
    """host:port, or [v6-host]:port, for people."""
    return "[%s]:%d" % addr[:2] if ":" in addr[0] else "%s:%d" % addr[:2]


# --- Client side ------------------------------------------------------------------------------

REQUESTING, RECEIVING, FINISHED = "requesting", "receiving", "finished"


class ClientTransfer:
    """The client side of one transfer (one socket): a range of a file, or the listing.

    Use: datagrams_to_send() after creating it and after every call; receive_datagram(data, now)
    returns the payload it accepted (or None). Send the ACK first, then write the payload and pass
    it to absorb(): the digest and the disk write overlap with the server preparing the next one.

    `outcome` once finished: "done", "digest" (EOF digest mismatch: discard this transfer's bytes),
    "changed" (ERROR CHANGED), "version" (SIZE differs from the expected file), "error" (ERROR
    with `error_code`), "stalled" (nothing new for idle_timeout).
    """

    def __init__(self, name, offset, length, now, settings=None, expect=None, request_rto=None):
        self.s = settings or ClientSettings()
        self.name = name
        self.request = format_list() if name is None else format_download(name, offset, length)
        self.start = self.pos = offset
        self.length = length
        self.end = None
        self.size = self.version = None
        self.expect = expect            # (size, version) the file must still have, or None
        self.state = REQUESTING
        self.outcome = self.error_code = None
        self.rtt_sample = None          # request -> SIZE time, if the request was sent once
        self._hash = hashlib.sha256()
        self._sent_at = self._last_heard = now
        self._request_rto = request_rto or self.s.request_timeout
        self._requests = 1
        self._next_request = now + self._request_rto
        self._flowing = False           # a DATA or EOF arrived after SIZE
        self._out = [self.request]

    def datagrams_to_send(self):
        out, self._out = self._out, []
        return out

    def _asking(self):
        """The request is retransmitted until data flows: also after SIZE, in case our ACK of
        it was lost (a server may not be allowed to resend SIZE to an unproven address; a
        repeated request makes it do so, and is ignored once the transfer is under way)."""
        return self.state == REQUESTING or (self.state == RECEIVING and not self._flowing)

    def get_timer(self):
        if self.state == FINISHED:
            return None
        idle = self._last_heard + self.s.idle_timeout
        return min(idle, self._next_request) if self._asking() else idle

    def handle_timer(self, now):
        if self.state == FINISHED:
            return
        if now >= self._last_heard + self.s.idle_timeout:
            return self._finish("stalled")
        if self._asking() and now >= self._next_request:
            self._request_rto = min(self._request_rto * 2, self.s.request_timeout_max)
            self._next_request = now + self._request_rto
            self._requests += 1
            self._out.append(self.request)

    def _finish(self, outcome, code=None):
        self.state = FINISHED
        self.outcome, self.error_code = outcome, code

    def receive_datagram(self, data, now):
        try:
            msg = parse_server_message(data)
        except ProtocolError:
            return None   # corrupted or garbage: no answer (the server will retransmit)
        if self.state == RECEIVING and not isinstance(msg, Size):
            # "Nothing at all arrives for idle time" is a stall. Repeated SIZEs do not count:
            # a server that answers our repeated request but never sends data is stalled.
            self._last_heard = now
        if isinstance(msg, Data):
            return self._on_data(msg, now)
        if isinstance(msg, Size):
            self._on_size(msg, now)
        elif isinstance(msg, Eof):
            self._on_eof(msg, now)
        elif isinstance(msg, Error) and self.state != FINISHED:
            self._finish("changed" if msg.code == "CHANGED" else "error", msg.code)
        return None

    def _on_size(self, msg, now):
        if self.state == RECEIVING:
            if (msg.size, msg.version) == (self.size, self.version):
                self._out.append(format_ack(self.pos))     # our ACK of SIZE was lost
            return
        if self.state != REQUESTING:
            return
        if self.expect is not None and (msg.size, msg.version) != tuple(self.expect):
            return self._finish("version")   # not acknowledged: the server sends no data
        if self.start > msg.size:
            return self._finish("error", "BAD_REQUEST")
        self.size, self.version = msg.size, msg.version
        self.end = min(msg.size, self.start + self.length) if self.length is not None else msg.size
        if self._requests == 1:
            self.rtt_sample = now - self._sent_at
        self.state = RECEIVING
        self._last_heard = now
        self._next_request = now + self._request_rto
        self._out.append(format_ack(self.pos))

    def _on_data(self, msg, now):
        if self.state != RECEIVING:
            return None
        self._flowing = True
        if msg.offset == self.pos:
            n = len(msg.payload)
            if self.pos + n > self.end:
                return None   # beyond the range: a broken server; not acknowledged
            self.pos += n
            self._out.append(format_ack(self.pos))
            return msg.payload
        if msg.offset < self.pos:
            self._out.append(format_ack(self.pos))   # duplicate: our ACK was lost, say it again
        return None

    def absorb(self, payload):
        """Add an accepted payload to the digest (after its ACK has been sent)."""
        self._hash.update(payload)

    def _on_eof(self, msg, now):
        if self.state == FINISHED and self.outcome in ("done", "digest"):
            self._out.append(ACK_EOF)   # our ACK EOF was lost
        if self.state != RECEIVING:
            return
        self._flowing = True
        # Twice: a lost ACK EOF would leave the server retransmitting EOF to a closed socket
        # until its retry limit; the server ignores the spare copy.
        self._out += (ACK_EOF, ACK_EOF)
        good = self.pos == self.end and msg.digest == self._hash.hexdigest()
        self._finish("done" if good else "digest")

    @property
    def received(self):
        return self.pos - self.start
