"""The wire format of PROTOCOL.md: messages, lane tags, their parse and format functions, the
running CRC's seed, address tokens, the listing and the rule for servable names.

One record type per message, one parse and one format function for each. Parsers check every field
and raise ProtocolError, so a truncated or damaged datagram never parses as something valid; the
hot messages (ACK on the server, DATA on the client) are matched on the bytes, without a copy.
A datagram may start with a lane tag, "#<lane> " (version 3): parse_*_datagram() return the lane
(None when untagged) with the message, and every format function takes the tag's bytes
(lane_tag(lane), made once per transfer) to put in front.

Relies on: nothing but the standard library. Must not know: who sends what, timers, sockets,
files, or any transfer's state: it only turns bytes into records and back.
"""

import os
import re
import unicodedata
import zlib
from typing import NamedTuple, Optional

# --- Wire limits (PROTOCOL.md "Transport and encoding") ---------------------------------------
MAX_DATAGRAM = 65507      # the IPv4 UDP payload limit; no message is larger
RECV_BUFSIZE = 65536      # receivers read with at least this, so nothing is ever truncated
MAX_ERROR = 64            # an ERROR datagram is at most this long (cheap to send to strangers)
MAX_VERSION = 64          # the version token is 1..64 visible ASCII characters
MAX_DATA_HEADER = 128     # "[#lane ]DATA <offset> <crc>\n" is searched for in this prefix
MAX_LANE = 4294967295     # lane numbers are 1 .. 2**32 - 1 (PROTOCOL.md "Lanes")
# Numbers have no upper bound on the wire, but one longer than this many digits is larger than any
# real file, so it is read as HUGE instead of converting an attacker's 60 kB of digits to an int.
MAX_DIGITS = 40
HUGE = 10 ** MAX_DIGITS
# What we send for "to the end": a length that brings offset + length to 2**63 - 1, so that a
# server that reads numbers into 64-bit integers can take it (one written so refused 10**40 with
# BAD_REQUEST); the protocol itself sets no limit.
WIDEST = 2 ** 63 - 1

ERROR_CODES = ("NOT_FOUND", "BAD_REQUEST", "BUSY", "CHANGED", "INTERNAL")

# Modules only the server side needs (hmac, hashlib, ipaddress, logging: about 10 ms) are
# imported where they are used, so that client.py does not pay for them at every start.


# ProtocolError.lane of a datagram whose lane tag is itself malformed: nobody can be answered,
# since no lane can be named (PROTOCOL.md "Lanes").
NO_LANE = "no-lane"


class ProtocolError(Exception):
    """A datagram that is not a valid message (or not one we expect here). `lane`: the lane its
    tag named (None: untagged; NO_LANE: the tag itself is malformed)."""

    def __init__(self, message, code="BAD_REQUEST", lane=None):
        super().__init__(message)
        self.code = code
        self.lane = lane


# --- Codec ----------------------------------------------------------------------------------

_NUMBER = re.compile(r"0|[1-9][0-9]*")
_CRC = re.compile(rb"[0-9a-f]{8}")
_TOKEN = re.compile(rb"[0-9a-f]{16}")
# "#<lane> ", the optional tag in front of any message: no leading zeros, no #0.
_TAG = rb"#([1-9][0-9]{0,9}) "
_LANE_TAG = re.compile(_TAG)
# "DATA <offset> <crc>\n", the header before a DATA's payload, with its tag if any.
_DATA = re.compile(rb"(?:%s)?DATA (0|[1-9][0-9]*) ([0-9a-f]{8})\n" % _TAG)
# "ACK <n> <token>" or "ACK EOF <token>", one optional trailing \n or \r\n (PROTOCOL.md), with
# its tag if any.
_ACK = re.compile(rb"(?:%s)?ACK (EOF|0|[1-9][0-9]*) ([0-9a-f]{16})(?:\r?\n)?" % _TAG)
_VERSION = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_VERSION)
_CODE = re.compile(r"[A-Z][A-Z_]{0,30}")


def lane_tag(lane):
    """The bytes in front of every message of a lane's transfer: b"#7 ", or b"" untagged."""
    return b"" if lane is None else b"#%d " % lane


def _lane(digits):
    """A tag's lane number (digits matched by _TAG), or ProtocolError if it is too large."""
    lane = int(digits)
    if lane > MAX_LANE:
        raise ProtocolError("lane out of range", lane=NO_LANE)
    return lane


def _split_lane(view):
    """A tagged datagram -> (lane, the message after the tag). Raises ProtocolError."""
    m = _LANE_TAG.match(view)
    if m is None:
        raise ProtocolError("bad lane tag", lane=NO_LANE)
    return _lane(m.group(1)), view[m.end():]


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

    def token(addr, lane, request):
        text = b"%s %d %s " % (str(addr[0]).encode("ascii", "replace"), addr[1],
                               b"-" if lane is None else b"%d" % lane)
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


def parse_client_datagram(data):
    """(lane, message) of a datagram sent to the server: LIST, DOWNLOAD or ACK, the lane None
    when untagged. Raises ProtocolError (its .lane says whom an answer could go to)."""
    m = _ACK.fullmatch(data)   # the hot path: one match on the bytes, no copy, no decoding
    if m is not None:
        lane, n, token = m.groups()
        if lane is not None:
            lane = _lane(lane)
        if n == b"EOF":
            return lane, Ack(None, token)
        return lane, Ack(HUGE if len(n) > MAX_DIGITS else int(n), token)
    lane = None
    if data[:1] == b"#":
        lane, data = _split_lane(memoryview(data))
    try:
        return lane, parse_client_message(data)
    except ProtocolError as exc:
        exc.lane = lane
        raise


def parse_client_message(data):
    """LIST, DOWNLOAD or ACK, as sent to the server, without a lane tag (one is malformed here).
    Raises ProtocolError."""
    if data[:4] == b"ACK ":
        m = _ACK.fullmatch(data)
        if m is None or m.group(1) is not None:
            raise ProtocolError("bad ACK")
        _, n, token = m.groups()
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


def format_list(tag=b""):
    return tag + b"LIST"


def format_request(request, tag=b""):
    """A parsed request (ListRequest or DownloadRequest) as it goes on the wire."""
    if isinstance(request, ListRequest):
        return format_list(tag)
    return format_download(request.name, request.offset, request.chunk_size, tag)


def format_download(name, offset, chunk_size, tag=b""):
    """A request; a chunk_size past WIDEST (HUGE: "to the end") goes as what reaches WIDEST."""
    if offset + chunk_size > WIDEST:
        chunk_size = max(WIDEST - offset, 0)
    return tag + ("DOWNLOAD %s %d %d" % (name, offset, chunk_size)).encode("utf-8")


def format_ack(n, token, tag=b""):
    return b"%sACK %d %s" % (tag, n, token)


def format_ack_eof(token, tag=b""):
    return tag + b"ACK EOF " + token


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


def format_size(size, version, token, tag=b""):
    if not _VERSION.fullmatch(version):
        raise ValueError("bad version token %r" % version)
    if not _TOKEN.fullmatch(token):
        raise ValueError("bad token %r" % token)
    return b"%sSIZE %d %s %s" % (tag, size, version.encode("ascii"), token)


def format_data_header(offset, crc, tag=b""):
    """The header of a DATA datagram; the payload follows it (sent with scatter-gather I/O).
    `crc` is R(offset + len(payload)) = zlib.crc32(payload, R(offset))."""
    return b"%sDATA %d %08x\n" % (tag, offset, crc)


def format_eof(crc, tag=b""):
    return b"%sEOF %08x" % (tag, crc)


def format_error(code, text="", tag=b""):
    """[#lane ]ERROR <CODE> [<text>], cut to 64 bytes after the tag; the text is reduced to
    printable ASCII."""
    assert code in ERROR_CODES
    msg = "ERROR " + code
    if text:
        text = "".join(c if " " <= c <= "~" else "?" for c in text)
        msg = (msg + " " + text)[:MAX_ERROR]
    return tag + msg.encode("ascii")


def _data(m, view):
    """The Data record of a header matched by _DATA: its payload is a view (no copy)."""
    offset, crc = m.group(2), m.group(3)
    payload = view[m.end():]
    if not payload:
        raise ProtocolError("empty DATA")
    return Data(HUGE if len(offset) > MAX_DIGITS else int(offset), int(crc, 16), payload)


def parse_server_datagram(data):
    """(lane, message) of a datagram sent to the client: SIZE, DATA, EOF or ERROR, the lane None
    when untagged. Raises ProtocolError (with the lane, if its tag was readable)."""
    view = memoryview(data)
    m = _DATA.match(view, 0, MAX_DATA_HEADER)   # the hot path: one match, no copy
    lane = None
    try:
        if m is not None:
            lane = m.group(1)
            if lane is not None:
                lane = _lane(lane)
            return lane, _data(m, view)
        if view[:1] == b"#":
            lane, view = _split_lane(view)
        return lane, parse_server_message(view)
    except ProtocolError as exc:
        if exc.lane is None:
            exc.lane = lane
        raise


def parse_server_message(data):
    """SIZE, DATA, EOF or ERROR, as sent to the client, without a lane tag (one is malformed
    here). Raises ProtocolError.

    A DATA's payload is a memoryview into `data` (no copy). Its crc is checked by the receiver,
    the only one who knows R(offset): ClientTransfer.
    """
    view = memoryview(data)
    if view[:5] == b"DATA ":
        m = _DATA.match(view, 0, MAX_DATA_HEADER)
        if m is None:
            raise ProtocolError("bad DATA header")
        return _data(m, view)
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
