"""Wire protocol version 2 (PROTOCOL.md) and the transfer state machines, with no I/O.

Strategy: every rule of the protocol lives in this file. The state machines never touch a socket,
a clock or a file: they take datagrams and the current time, and give back datagrams to send and
the time they next need attention (the shape of h11 and aioquic). server.py and client.py are thin
loops around them; tests drive them on a virtual clock.

- Codec: one record type, one parse and one format function per message; parsers check every
  field and raise ProtocolError, so a truncated datagram never parses as something valid.
- Integrity: one running CRC-32 per transfer (PROTOCOL.md "The running CRC"): each DATA carries
  the CRC of the range up to the end of its payload, so every byte is checked once on each side
  and a lost, duplicated, reordered, misplaced or damaged DATA can never be accepted.
- Address validation: SIZE carries a 64-bit token nobody off the path can guess (token_maker)
  that every ACK must echo, so the server sends no data to an address that never got the SIZE.
- ServerTransfer: one stop-and-wait transfer (SIZE, DATA..., EOF) with an RFC 6298 timer, Karn's
  rule, datagram sizes chosen for the path, and read-ahead of the next chunk.
- ServerDispatcher: routes datagrams by client address, holds the pools and limits that keep a
  hostile network from exhausting the server, rate-limits replies to strangers, and repairs a
  loss early when a client's other transfers show it (PROTOCOL.md "Early retransmission").
- ClientTransfer: the client side of one transfer: request retransmission, in-order acceptance by
  offset under the running CRC, cumulative ACKs, the end-to-end check on EOF.
"""

import functools
import heapq
import os
import re
import unicodedata
import zlib
from collections import OrderedDict, deque
from typing import NamedTuple, Optional

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

# Modules only the server side needs (hmac, hashlib, ipaddress, logging: about 10 ms) are
# imported where they are used, so that client.py does not pay for them at every start.


class ProtocolError(Exception):
    """A datagram that is not a valid message (or not one we expect here)."""

    def __init__(self, message, code="BAD_REQUEST"):
        super().__init__(message)
        self.code = code


# --- Codec ----------------------------------------------------------------------------------

_NUMBER = re.compile(r"0|[1-9][0-9]*")
_CRC = re.compile(rb"[0-9a-f]{8}")
_TOKEN = re.compile(rb"[0-9a-f]{16}")
# "DATA <offset> <crc>\n", the header before a DATA's payload.
_DATA = re.compile(rb"DATA (0|[1-9][0-9]*) ([0-9a-f]{8})\n")
# "ACK <n> <token>" or "ACK EOF <token>", one optional trailing \n or \r\n (PROTOCOL.md).
_ACK = re.compile(rb"ACK (EOF|0|[1-9][0-9]*) ([0-9a-f]{16})(?:\r?\n)?")
_VERSION = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_VERSION)
_CODE = re.compile(r"[A-Z][A-Z_]{0,30}")


def parse_number(text):
    """An unsigned decimal field: no sign, no leading zeros, ASCII digits only."""
    if not _NUMBER.fullmatch(text):
        raise ProtocolError("bad number %r" % text[:20])
    return HUGE if len(text) > MAX_DIGITS else int(text)


def _strip_newline(data):
    """A control message as bytes, with one trailing \\n or \\r\\n removed."""
    data = bytes(data)
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def _control_text(data):
    """Decode a control message: UTF-8, one trailing \\n or \\r\\n ignored."""
    try:
        return _strip_newline(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("not UTF-8") from None


def new_token():
    """16 lowercase hex digits from the OS's random source: unguessable off the path."""
    return os.urandom(8).hex().encode("ascii")


def token_maker(secret=None):
    """The server's tokens (PROTOCOL.md "Address validation"): the first 8 bytes of an
    HMAC-SHA256, under a secret drawn at start-up, of the client's address and its request.
    Nobody off the path can guess one, and a repeated request gets the same token even after
    its unacknowledged entry was forgotten and made anew: the client's ACK, which echoes the
    token of the first SIZE it got, still fits."""
    import hashlib
    import hmac
    key = secret or os.urandom(32)

    def token(addr, request):
        text = b"%s %d " % (str(addr[0]).encode("ascii", "replace"), addr[1])
        return hmac.new(key, text + format_request(request), hashlib.sha256).hexdigest()[
            :16].encode("ascii")
    return token


def crc_start(start):
    """R(start) of PROTOCOL.md "The running CRC": the CRC-32 of the ASCII decimal start."""
    return zlib.crc32(b"%d" % start)


class ListRequest(NamedTuple):
    """LIST."""


class DownloadRequest(NamedTuple):
    name: str
    offset: int
    chunk_size: int


class Ack(NamedTuple):
    n: Optional[int]     # next byte needed, or None for "ACK EOF"
    token: bytes         # the transfer's token, as 16 ASCII hex digits


def parse_client_message(data):
    """LIST, DOWNLOAD or ACK, as sent to the server. Raises ProtocolError."""
    if data[:4] == b"ACK ":   # the hot path: one match on the bytes, no copy, no decoding
        m = _ACK.fullmatch(data)
        if m is None:
            raise ProtocolError("bad ACK")
        n, token = m.groups()
        if n == b"EOF":
            return Ack(None, token)
        return Ack(HUGE if len(n) > MAX_DIGITS else int(n), token)
    text = _control_text(data)
    if text == "LIST":
        return ListRequest()
    if text.startswith("DOWNLOAD "):
        # The name is everything between "DOWNLOAD " and the last two fields: it may hold spaces.
        parts = text[9:].rsplit(" ", 2)
        if len(parts) != 3:
            raise ProtocolError("DOWNLOAD needs a name, an offset and a chunk size")
        return DownloadRequest(parts[0], parse_number(parts[1]), parse_number(parts[2]))
    raise ProtocolError("unknown message")


def format_list():
    return b"LIST"


def format_request(request):
    """A parsed request (ListRequest or DownloadRequest) as it goes on the wire."""
    if isinstance(request, ListRequest):
        return format_list()
    return format_download(request.name, request.offset, request.chunk_size)


def format_download(name, offset, chunk_size):
    return ("DOWNLOAD %s %d %d" % (name, offset, chunk_size)).encode("utf-8")


def format_ack(n, token):
    return b"ACK %d %s" % (n, token)


def format_ack_eof(token):
    return b"ACK EOF " + token


class Size(NamedTuple):
    size: int
    version: str
    token: bytes


class Data(NamedTuple):
    offset: int
    crc: int             # R(offset + len(payload)), not yet checked: only the receiver can
    payload: memoryview


class Eof(NamedTuple):
    crc: int             # R(end)


class Error(NamedTuple):
    code: str
    text: str = ""


def format_size(size, version, token):
    if not _VERSION.fullmatch(version):
        raise ValueError("bad version token %r" % version)
    if not _TOKEN.fullmatch(token):
        raise ValueError("bad token %r" % token)
    return b"SIZE %d %s %s" % (size, version.encode("ascii"), token)


def format_data_header(offset, crc):
    """The header of a DATA datagram; the payload follows it (sent with scatter-gather I/O).
    `crc` is R(offset + len(payload)) = zlib.crc32(payload, R(offset))."""
    return b"DATA %d %08x\n" % (offset, crc)


def format_eof(crc):
    return b"EOF %08x" % crc


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

    A DATA's payload is a memoryview into `data` (no copy). Its crc is checked by the receiver,
    the only one who knows R(offset): ClientTransfer.
    """
    view = memoryview(data)
    if view[:5] == b"DATA ":   # the hot path: one match on the header, no copy
        m = _DATA.match(view, 0, MAX_DATA_HEADER)
        if m is None:
            raise ProtocolError("bad DATA header")
        offset, crc = m.groups()
        payload = view[m.end():]
        if not payload:
            raise ProtocolError("empty DATA")
        return Data(HUGE if len(offset) > MAX_DIGITS else int(offset), int(crc, 16), payload)
    text = _control_text(view)
    word, _, rest = text.partition(" ")
    if word == "SIZE":
        fields = rest.split(" ")
        if (len(fields) != 3 or not _VERSION.fullmatch(fields[1])
                or not _TOKEN.fullmatch(fields[2].encode("utf-8"))):
            raise ProtocolError("bad SIZE")
        return Size(parse_number(fields[0]), fields[1], fields[2].encode("ascii"))
    if word == "EOF":
        if not _CRC.fullmatch(rest.encode("utf-8")):
            raise ProtocolError("bad EOF")
        return Eof(int(rest, 16))
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
        # Three of these run per ACK on the server (transfer, path, queue): written out, without
        # calls, for speed.
        srtt = self.srtt
        if srtt is None:                            # RFC 6298 2.2
            srtt, rttvar = r, r / 2
        else:                                       # RFC 6298 2.3
            d = srtt - r
            rttvar = 0.75 * self.rttvar + 0.25 * (d if d >= 0 else -d)
            srtt = 0.875 * srtt + 0.125 * r
        self.srtt, self.rttvar = srtt, rttvar
        k = 4 * rttvar
        rto = srtt + (k if k > self.G else self.G)
        self.rto = self.min if rto < self.min else (self.max if rto > self.max else rto)

    def backoff(self):                              # RFC 6298 5.5
        self.rto = min(self.rto * 2, self.max)


# --- Server side ------------------------------------------------------------------------------

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


class Changed(Exception):
    """The file is not the one announced in SIZE any more."""


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
    - Send order, for early retransmission (PROTOCOL.md "Early retransmission", RFC 8985 and
      RFC 9002 6.1.2): each DATA sent to the IP gets a sequence number; the highest number
      acknowledged at first try is evidence that every earlier one still outstanding is lost
      once 9/8 of the round trip has passed since it was sent.
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
        self._lost = 0.0                            # weighted lost datagrams ...
        self._frags = float(settings.loss_prior)    # ... per weighted fragment sent
        self._events = 0
        self._frag_lost = 0.0                       # recent fragmented datagrams lost
        self._unfragmented_until = 0.0
        self._orphans = deque()                     # [second, fragments orphaned in it]
        self._orphan_count = 0                      # their sum
        self.reorder_mult = 1                       # widened after needless early resends
        self._persist = 0                           # early resends before it narrows again
        self.seq = 0                                # last sequence number given out
        self.acked = 0                              # highest acknowledged at first try
        self.outstanding = []                       # (seq, transfer), in send order
        self._head = 0                              # index of the first live entry

    def sample(self, r, flights=0):
        """A round trip; `flights` is the number of DATAs in flight when the timed one was sent
        (0: not a DATA)."""
        self.latest_rtt = r
        self.rtt.sample(r)
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

    def outcome(self, size, lost, now=0.0):
        """A DATA of `size` bytes was acknowledged at its first try, or declared lost."""
        k = self.fragments(size)
        if k > 1:
            if lost:   # its other fragments wait in the receiver's reassembly buffer
                self._orphan(orphans_per_loss(k), now)
            # Recent fragmented datagrams lost, for _choose_size: when most are, the receiver's
            # reassembly buffer is full of the fragments of lost ones (see _choose_size).
            self._frag_lost += ((1.0 if lost else 0.0) - self._frag_lost) / 64
            if self._frag_lost > 0.5:
                self._frag_lost = 0.0
                self._unfragmented_until = now + self.s.reassembly_backoff
                lost = True
        decay = self.s.loss_decay ** k
        self._lost = self._lost * decay + (1.0 if lost else 0.0)
        self._frags = self._frags * decay + k
        self._events += 1
        if lost or self._events % 32 == 0:
            self._choose_size(now)

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

    def spurious(self, early):
        """A retransmission turned out needless (the client got both copies): not a loss.
        After an early one, widen the reordering window, as RACK does (RFC 8985 6.2): a busy
        client answers its transfers out of order."""
        self._lost = max(0.0, self._lost - 1.0)
        self._frag_lost = max(0.0, self._frag_lost - 1.0 / 64)   # about undone, if counted
        if early:
            self.reorder_mult = min(self.reorder_mult * 2, self.s.reorder_mult_max)
            self._persist = self.s.reorder_persist

    def early_resent(self):
        """An early retransmission was sent. The window widened by needless ones narrows again
        only after reorder_persist of them without a needless one (RFC 8985 6.2 counts loss
        recoveries the same way): on a path that loses nothing it stays wide."""
        if self.reorder_mult > 1:
            self._persist -= 1
            if self._persist <= 0:
                self.reorder_mult = 1

    def _choose_size(self, now=0.0):
        p = min(self.loss_rate(), 0.5)
        ladder = size_ladder(self.per_fragment, self.ceiling, self.whole)
        if p > self.s.fragment_loss_limit:
            # Each lost fragment leaves its siblings in the receiver's reassembly buffer for
            # 30 s (Linux: ipfrag_time), and once that buffer is full (4 MB, ipfrag_high_thresh)
            # every fragmented datagram is dropped: with big datagrams even 0.1% loss fills it
            # within a second. So on a lossy path: datagrams of at most lossy_max_fragments
            # (fewer where losses are heavy) while the orphans they leave fit in the budget
            # (config.orphan_budget), else fewer down to two, and none fragmented for
            # reassembly_backoff once most of them are lost.
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
                now_k, to_come = self.fragments(self.size), self.bytes_to_come()
                while most > 2 and not self._orphans_fit(ladder, most - 1, p, now, to_come,
                                                         now_k < most):
                    most -= 1
            self.size = self._largest(ladder, most)
            return
        delay = max(self.rtt.rto, self.s.rto_min)
        best, best_rate = self.ceiling, -1.0
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

    def loss_threshold(self):
        """How long after its sending a DATA overtaken by an acknowledged one is lost."""
        return self.reorder_mult * max(
            self.s.reorder_factor * max(self.rtt.srtt or 0.0, self.latest_rtt),
            self.s.reorder_min)

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


WAIT_SIZE, WAIT_DATA, WAIT_EOF = "wait-size", "wait-data", "wait-eof"
_DATA_OVERHEAD = len(b"DATA  00000000\n")   # header bytes besides the offset digits


class ServerTransfer:
    """One transfer on the server: SIZE, then DATA chunks, then EOF, each stop-and-wait.

    The caller (ServerDispatcher) feeds it ACKs (already checked for the token) and timer
    expiries; it appends datagrams (tuples of buffers: header and payload go out with
    scatter-gather I/O, never concatenated) to `out`.

    The running CRC (PROTOCOL.md): `_r` is R(pos), the CRC of the range up to the acknowledged
    offset; the outstanding DATA at pos carries crc32(payload, R(pos)), and `_crcs` maps each
    payload length sent at pos (a shrink sends a smaller copy) to the CRC it carried, so the ACK
    of either copy gives R of the new offset.
    """

    def __init__(self, addr, request, entry, start, end, now, settings, rtt, out, bytes_in=0,
                 ceiling=None, token=None, path=None):
        self.addr, self.request, self.entry = addr, request, entry
        self.name = "<list>" if isinstance(request, ListRequest) else request.name
        self.start = self.pos = start
        self.end = end
        self.s = settings
        self.rtt = rtt
        self.out = out
        self.token = token or new_token()
        self.path = path or Path(settings, ceiling or settings.datagram_size)
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
        self._seq = 0                # the outstanding DATA's number in the path's send order
        self._flying = False         # counted in path.flights (a DATA outstanding)
        self._flights = 0            # path.flights when the outstanding datagram was sent
        self._early_at = None        # when the outstanding DATA counts as lost (evidence)
        self._spurious_check = self._spurious_check_early = self._last_early = False
        self.ceiling = ceiling or settings.datagram_size   # lowered if the OS refuses a size
        self._black_hole = False     # big datagrams never arrive: stay at the safe size
        self._probe_every = settings.probe_after
        self._small_streak = 0
        self._probing = False
        self._ahead = None           # read-ahead: (offset, r, datagram, crc)
        self._bufs = None            # two payload buffers, see _read()
        self._cur = 1                # which one holds the outstanding payload
        # Until SIZE is acknowledged with its token the address may be forged: by timer, send
        # at most amplification_factor times what it sent us (RFC 9000 8.1 applies the same
        # rule to QUIC), but always the first SIZE and one retransmission (or a client that
        # follows PROTOCOL.md to the letter would stall when its ACK of SIZE is lost), and
        # never more than pending_byte_budget in all.
        size_msg = format_size(entry.size, entry.version, self.token)
        self._unvalidated_sent = 0
        self._expiries = 0
        self._allowance = min(settings.pending_byte_budget,
                              max(2 * len(size_msg), settings.amplification_factor * bytes_in))
        self.state = WAIT_SIZE
        self._transmit((size_msg,), now)

    # -- sending

    @property
    def tries(self):
        """How many times the outstanding datagram has been sent."""
        return self._tries

    def _transmit(self, datagram, now):
        """Send a new datagram: it becomes the one unacknowledged datagram."""
        self._current = datagram
        self._tries = 1
        self._timeouts = 0
        self._first_sent_at = now
        self._fly(self.state == WAIT_DATA)
        self._flights = self.path.flights if self._flying else 0
        self._emit(datagram, now)
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
        waits behind them as a DATA does."""
        return max(self.rtt.rto, self.path.queue_rto())

    def _arm(self, now):
        self._sent_at = now
        self.deadline = self._timeout_at()
        self._early_at = None

    def _emit(self, datagram, now=None):
        if self.state == WAIT_SIZE:
            self._unvalidated_sent += len(datagram[0])
        elif self.state == WAIT_DATA:
            self.bytes_sent += len(datagram[1])
            self._seq = self.path.sent(self)
        self.out.append((datagram, self.addr))

    def _may_send_size(self, limit):
        """Stay within `limit` bytes sent to an address that has not acknowledged SIZE."""
        return self._unvalidated_sent + len(self._current[0]) <= limit

    def _datagram_len(self):
        """The size of the outstanding DATA datagram (header and payload)."""
        return len(self._current[0]) + len(self._current[1])

    def _datagram_size(self):
        if self._black_hole and not self._probing:
            return self.s.safe_datagram_size
        return min(self.path.size, self.ceiling)

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
        return payload

    def _build(self, offset, r, datagram_size):
        """Read the DATA at offset whose range CRC so far is r: ((header, payload), crc)."""
        n = min(self.end - offset, self._payload_limit_for(datagram_size, offset))
        payload = self._read(offset, n)
        crc = zlib.crc32(payload, r)
        return (format_data_header(offset, crc), payload), crc

    def _send_next(self, now):
        """Send what follows self.pos: the next DATA, or EOF once the range is acknowledged."""
        try:
            if self.pos < self.end:
                size = self._datagram_size()
                ahead, self._ahead = self._ahead, None
                n = min(self.end - self.pos, self._payload_limit_for(size, self.pos))
                if (ahead is not None and ahead[0] == self.pos and ahead[1] == self._r
                        and len(ahead[2][1]) == n):
                    # Checked against the announced version when it was read (_read); a
                    # change since then shows at the next read, and before EOF at the latest.
                    datagram, crc = ahead[2], ahead[3]
                else:
                    datagram, crc = self._build(self.pos, self._r, size)
                self._cur = 1 - self._cur          # its payload lives in the other buffer
                self._crcs = {n: crc}
                self.state = WAIT_DATA
                self._transmit(datagram, now)
                return
            if not self.source.unchanged():
                raise Changed()
        except (Changed, OSError):
            return self._fail("changed", "CHANGED")
        self.state = WAIT_EOF
        self._transmit((format_eof(self._r),), now)

    def read_ahead(self):
        """Idle work, done after sending and before waiting: read and checksum the next chunk,
        so the client's processing of this one overlaps with ours of the next (two cores)."""
        if self.state != WAIT_DATA or self._ahead is not None or self.outcome is not None:
            return
        payload = self._current[1]
        offset = self.pos + len(payload)
        if offset < self.end:
            r = self._crcs[len(payload)]
            try:
                datagram, crc = self._build(offset, r, self._datagram_size())
            except (Changed, OSError):
                return   # found again, and reported, when the chunk is really needed
            self._ahead = (offset, r, datagram, crc)

    def _fail(self, outcome, code):
        self.out.append(((format_error(code),), self.addr))   # sent once, like every ERROR
        self.finish(outcome)

    def finish(self, outcome):
        if self.outcome is None:
            self.outcome = outcome
            self.deadline = None
            self._ahead = None
            self._fly(False)
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
            size = min(self.end - self.start, self.ceiling)
            self._bufs = (memoryview(bytearray(size)), memoryview(bytearray(size)))
        self.activated = now
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
            self.path.spurious(self._spurious_check_early)
            if not self._spurious_check_early:
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
            if self._seq > self.path.acked:
                self.path.acked = self._seq
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
        """A DATA sent later to the same IP was acknowledged: if `seq` is still the outstanding
        DATA, it is lost once the reordering threshold has passed since it was sent, and
        reorder_min (or the smoothed round trip, if shorter) after this evidence at the soonest:
        after a pause, a client answers the backlog of its transfers in the order it reads its
        sockets, not in send order. Returns whether that changed anything (a deadline)."""
        if self.outcome is not None or self.state != WAIT_DATA or seq != self._seq:
            return False
        self._early_at = max(self._sent_at + self.path.loss_threshold(),
                             now + min(self.s.reorder_min, self.path.rtt.srtt or 1.0))
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
            # A threshold widened by needless early resends (Path.spurious) holds for this one
            # too, including a widening since the evidence came. (On loopback, 20 clients in one
            # process: needless timeouts went from 6-48 per run to 0-7.) But for at most twice
            # the RTO, and never past the silence limit: a window widened up to 16-fold (18
            # round trips) must not turn a loss into a long stall. Past that hold (also when
            # the timer fires late), the timeout below decides, as if no evidence had come.
            hold = self._hold()
            if now < hold:
                due = max(self._early_at, self._sent_at + self.path.loss_threshold())
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
                self._emit(self._current)
            return
        if self._client_gone(now):
            return self.finish("timeout")
        self.rtt.backoff()
        self._timeouts += 1
        self._retransmit(now, early=False)

    def _retransmit(self, now, early):
        self._last_early = early
        self._tries += 1
        self.retransmissions += 1
        if self.state == WAIT_DATA:
            self.path.outcome(self._datagram_len(), True, now)
            if early:
                self.early_retransmissions += 1
                self.path.early_resent()
            n = len(self._current[1])
            if (not early and self._timeouts >= self.s.shrink_after
                    and n > self._payload_limit_for(self.s.safe_datagram_size, self.pos)):
                self._shrink(self.s.safe_datagram_size, black_hole=True)
            elif n > self._payload_limit_for(self._datagram_size(), self.pos):
                # The path's size came down (losses): resend the bytes in a datagram of that
                # size, or a lossy path would resend a many-fragment datagram forever.
                self._shrink(self._datagram_size())
            if self.outcome is not None:
                return   # the file changed under the re-read: ERROR CHANGED was sent
        self._emit(self._current)
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
        self._shrink(self.ceiling, black_hole=self.ceiling == self.s.safe_datagram_size)
        if self.outcome is None:
            self._emit(self._current)

    def _shrink(self, datagram_size, black_hole=False):
        """Resend the outstanding DATA with a smaller payload (some paths drop IP fragments)."""
        if black_hole:
            if self._probing:
                self._probe_every = min(self._probe_every * 2, self.s.probe_after_max)
            self._black_hole, self._probing, self._small_streak = True, False, 0
        self.shrinks += 1
        self._ahead = None
        try:
            datagram, crc = self._build(self.pos, self._r, datagram_size)
        except (Changed, OSError):
            return self._fail("changed", "CHANGED")
        self._cur = 1 - self._cur
        self._crcs[len(datagram[1])] = crc    # an ACK for either copy is good
        self._current = datagram


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


@functools.lru_cache(maxsize=4096)
def _client_of_host(host):
    if ":" not in host:
        return host
    import ipaddress
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def client_of(addr):
    """Who a fair share belongs to: the IPv4 address, or the IPv6 /64 (a host, or a site, is
    usually given a whole /64, so one IPv6 client can send from 2**64 addresses)."""
    return _client_of_host(addr[0])


class IpCounts:
    """Entries (client addresses) grouped by client (client_of: IP, or IPv6 /64), oldest first,
    with the client that holds the most found in O(1): groups[k] holds the clients with at
    least k entries, in the order they got there (so only the top group can empty when an
    entry goes). Every operation is O(1)."""

    def __init__(self):
        self.by_ip = {}        # ip -> {addr: None}, oldest first
        self.groups = [{}]     # groups[k]: {ip: None} of IPs holding >= k entries (k >= 1)
        self.size = 0

    def held(self, ip):
        entries = self.by_ip.get(ip)
        return len(entries) if entries else 0

    def most(self):
        """How many entries the IP holding the most has (0 when empty)."""
        return len(self.groups) - 1

    def heaviest(self):
        """The IP holding the most entries (of those, the first to get there), or None."""
        return next(iter(self.groups[-1])) if self.size else None

    def add(self, addr):
        ip = client_of(addr)
        entries = self.by_ip.setdefault(ip, {})
        entries[addr] = None
        k = len(entries)
        if k == len(self.groups):
            self.groups.append({})
        self.groups[k][ip] = None
        self.size += 1

    def discard(self, addr):
        ip = client_of(addr)
        entries = self.by_ip.get(ip)
        if entries is None or addr not in entries:
            return
        del self.groups[len(entries)][ip]
        del entries[addr]
        if not entries:
            del self.by_ip[ip]
        if len(self.groups) > 1 and not self.groups[-1]:
            self.groups.pop()
        self.size -= 1

    def oldest_of_heaviest(self):
        """The oldest entry of the IP that holds the most: who is dropped from a full pool."""
        return next(iter(self.by_ip[self.heaviest()]))

    def clear(self):
        self.__init__()


class Pace:
    """How much an active transfer advanced lately: datagrams acknowledged in the last complete
    window of slow_window seconds (None until one window has passed), and when it last moved."""

    __slots__ = ("start", "acks", "pos", "last_acks", "advanced")

    def __init__(self, t, now):
        self.start = self.advanced = now
        self.acks = 0
        self.pos = t.pos
        self.last_acks = None

    def update(self, t, now, window):
        if t.pos != self.pos:
            self.pos, self.advanced = t.pos, now
            self.acks += 1
        if now - self.start >= window:
            self.last_acks, self.acks, self.start = self.acks, 0, now


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


def human(n):
    """A byte count for people: 512 B, 1.5 KiB, 12.4 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0


def format_addr(addr):
    """host:port, or [v6-host]:port, for people."""
    return "[%s]:%d" % addr[:2] if ":" in addr[0] else "%s:%d" % addr[:2]


# --- Client side ------------------------------------------------------------------------------

REQUESTING, RECEIVING, FINISHED = "requesting", "receiving", "finished"


class ClientTransfer:
    """The client side of one transfer (one socket): a range of a file, or the listing.

    Use: datagrams_to_send() after creating it and after every call; receive_datagram(data, now)
    returns the payload it accepted (or None), already checked under the running CRC. Send the
    ACK first, then write the payload: the disk write overlaps with the server preparing the next.

    `outcome` once finished: "done", "mismatch" (EOF's CRC differs from ours: discard this
    transfer's bytes), 
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
                                        # (else our ACK of SIZE -> the first DATA)
        self.token = None               # from SIZE; every ACK echoes it
        self._r = crc_start(offset)     # R(pos): the running CRC up to the next byte needed
        self._sent_at = self._last_heard = now
        self._request_rto = request_rto or self.s.request_timeout
        self._requests = 1
        self._next_request = now + self._request_rto
        self._flowing = False           # a DATA or EOF arrived after SIZE
        self._size_acked_at = None      # when SIZE was acknowledged, if timing the first DATA
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
                if (msg.token != self.token and not self._flowing
                        and self._requests > self._token_requests):
                    # Our ACK was lost and the server forgot the request meanwhile: this SIZE
                    # answers our repeated request with a transfer made anew, its own token.
                    self.token = msg.token
                    self._token_requests = self._requests
                if msg.token == self.token:
                    self._out.append(format_ack(self.pos, self.token))   # our ACK was lost
                    self._size_acked_at = None   # which ACK the first DATA answers is unknown
            return
        if self.state != REQUESTING:
            return
        if self.expect is not None and (msg.size, msg.version) != tuple(self.expect):
            return self._finish("version")   # not acknowledged: the server sends no data
        if self.start > msg.size:
            return self._finish("error", "BAD_REQUEST")
        self.size, self.version, self.token = msg
        self._token_requests = self._requests   # requests sent when the token was taken
        self.end = min(msg.size, self.start + self.length) if self.length is not None else msg.size
        if self._requests == 1:
            self.rtt_sample = now - self._sent_at
        else:   # Karn's rule: not the request's round trip, but that of our ACK to the DATA
            self._size_acked_at = now
        self.state = RECEIVING
        self._last_heard = now
        self._next_request = now + self._request_rto
        self._out.append(format_ack(self.pos, self.token))

    def _on_data(self, msg, now):
        if self.state != RECEIVING:
            return None
        if not self._flowing:
            self._flowing = True
            if self._size_acked_at is not None and msg.offset == self.start:
                self.rtt_sample = now - self._size_acked_at
        if msg.offset == self.pos:
            payload = msg.payload
            if self.pos + len(payload) > self.end or zlib.crc32(payload, self._r) != msg.crc:
                return None   # damaged, misplaced or beyond the range: not acknowledged
            self._r = msg.crc
            self.pos += len(payload)
            self._out.append(format_ack(self.pos, self.token))
            return payload
        if msg.offset < self.pos:
            # A duplicate (perhaps of another size): our ACK was lost, say it again.
            self._out.append(format_ack(self.pos, self.token))
        return None

    def _on_eof(self, msg, now):
        if self.state == FINISHED and self.outcome in ("done", "mismatch"):
            self._out.append(format_ack_eof(self.token))   # our ACK EOF was lost
        if self.state != RECEIVING:
            return
        self._flowing = True
        # Twice: a lost ACK EOF would leave the server retransmitting EOF to a closed socket
        # until its retry limit; the server ignores the spare copy.
        ack = format_ack_eof(self.token)
        self._out += (ack, ack)
        if self.pos != self.end:
            # No server sends EOF before every byte is acknowledged: a forged or broken one.
            # Keep the verified bytes and wait for data (a stall asks again).
            return
        good = msg.crc == self._r
        self._finish("done" if good else "mismatch")

    @property
    def received(self):
        return self.pos - self.start
