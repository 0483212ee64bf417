"""The client side of one transfer: a range of a file, or the listing, on a lane of the client's
socket (or untagged, alone on a socket of its own). It retransmits its request until the server
answers, accepts bytes in order by offset under the running CRC, acknowledges cumulatively with
the token of SIZE, checks the whole range against EOF, and notices a stall.

Relies on: wire (parse and format, tags, the CRC seed), config (the client's timers). Must not
know: sockets, the clock (every call takes `now`), files, or the other transfers of the
download.
"""

import zlib

from config import ClientSettings
from udpxfer.wire import (Data, Eof, Error, ProtocolError, Size, crc_start, format_ack,
                          format_ack_eof, format_download, format_list, lane_tag,
                          parse_server_datagram)

REQUESTING, RECEIVING, FINISHED = "requesting", "receiving", "finished"


class ClientTransfer:
    """The client side of one transfer (one lane, or one socket): a range of a file, or the
    listing.

    Use: datagrams_to_send() after creating it and after every call; receive(message, now)
    (parsed, the lane already matched) or receive_datagram(data, now) returns the payload it
    accepted (or None), already checked under the running CRC. Send the ACK first, then write
    the payload: the disk write overlaps with the server preparing the next.

    `outcome` once finished: "done", "mismatch" (EOF's CRC differs from ours: discard this
    transfer's bytes), "changed" (ERROR CHANGED), "version" (SIZE differs from the expected
    file), "error" (ERROR with `error_code`), "stalled" (nothing new for idle_timeout), "cut"
    (its bytes up to cut_at are in; another lane has the rest), "retired" (let go by the
    client for another reason than its own).
    """

    def __init__(self, name, offset, length, now, settings=None, expect=None, request_rto=None,
                 lane=None):
        self.s = settings or ClientSettings()
        self.name = name
        self.lane = lane
        self.tag = tag = lane_tag(lane)
        self.request = (format_list(tag) if name is None
                        else format_download(name, offset, length, tag))
        self.start = self.pos = offset
        self.length = length
        self.end = None
        self.size = self.version = None
        self.expect = expect            # (size, version) the file must still have, or None
        self.state = REQUESTING
        self.outcome = self.error_code = None
        self.error_text = ""            # what the server said with its ERROR, for people
        self.cut_at = None              # where the client stops taking bytes (see cut())
        # The request -> SIZE time, if the request was sent once (else our ACK of SIZE -> the
        # first DATA).
        self.rtt_sample = None
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

    def cut(self, at):
        """Stop at `at` instead of the range's end: the rest goes to another lane (a slow lane
        at the end of a file). Bytes up to the first DATA past `at` are still taken."""
        self.cut_at = at

    def retire(self):
        """The loop lets this transfer go (not for anything it did): outcome "retired"."""
        if self.state != FINISHED:
            self._finish("retired")

    def nudge(self, now, delay):
        """Ask again within `delay` (the port was refused: a server that is starting), without
        backing the request's timer off."""
        if self._asking() and self._next_request > now + delay:
            self._next_request = now + delay

    def _finish(self, outcome, code=None):
        self.state = FINISHED
        self.outcome, self.error_code = outcome, code

    def receive_datagram(self, data, now):
        """A whole datagram: parsed here, and ignored unless it is on this transfer's lane."""
        try:
            lane, msg = parse_server_datagram(data)
        except ProtocolError:
            return None   # corrupted or garbage: no answer (the server will retransmit)
        if lane != self.lane:
            return None
        return self.receive(msg, now)

    def receive(self, msg, now):
        """A parsed message of this transfer's lane: the payload accepted, or None."""
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
            self.error_text = "".join(c for c in msg.text if " " <= c <= "~")
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
                    # Our ACK was lost: again.
                    self._out.append(format_ack(self.pos, self.token, self.tag))
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
        self._out.append(format_ack(self.pos, self.token, self.tag))

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
            if self.cut_at is not None and self.pos >= self.cut_at:
                # Another lane fetches the rest: no ACK, so nothing more comes (the server
                # gives the transfer up at its retransmission limit).
                self._finish("cut")
                return payload
            self._out.append(format_ack(self.pos, self.token, self.tag))
            return payload
        if msg.offset < self.pos:
            # A duplicate (perhaps of another size): our ACK was lost, say it again.
            self._out.append(format_ack(self.pos, self.token, self.tag))
        return None

    def _on_eof(self, msg, now):
        if self.state == FINISHED and self.outcome in ("done", "mismatch"):
            self._out.append(format_ack_eof(self.token, self.tag))   # our ACK EOF was lost
        if self.state != RECEIVING:
            return
        self._flowing = True
        if self.pos != self.end:
            # No server sends EOF before every byte is acknowledged: a forged or broken one.
            # No answer; keep the verified bytes and wait for data (a stall asks again).
            return
        # On a lane, once: the client's socket lives on and answers a late EOF again. Alone on
        # a socket, twice: a lost ACK EOF would leave the server retransmitting EOF to a closed
        # socket until its retry limit; the server ignores the spare copy.
        ack = format_ack_eof(self.token, self.tag)
        self._out += (ack,) if self.lane is not None else (ack, ack)
        good = msg.crc == self._r
        self._finish("done" if good else "mismatch")

    @property
    def received(self):
        """Bytes of its range in hand (not those past where it was cut: another lane has
        them)."""
        pos = self.pos if self.cut_at is None else min(self.pos, self.cut_at)
        return pos - self.start

    @property
    def crc(self):
        """R(pos): the running CRC of the range up to the next byte needed."""
        return self._r

    @property
    def requests(self):
        """How many times the request went."""
        return self._requests

    @property
    def flowing(self):
        """A DATA or EOF came after SIZE."""
        return self._flowing
