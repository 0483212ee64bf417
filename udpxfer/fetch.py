"""The client's transfer loop: the ranges of one file (or the listing), each one stop-and-wait
transfer over a connected UDP socket of its own, all driven by one single-threaded selector loop;
bytes go straight to the target at their offsets; the record of what is in is saved as it goes.

Relies on: client_transfer (one range), planner (which ranges, how many at once), partial (the
targets), ratelimit (--limit-rate), errors, rtt, wire, config. Must not know: the command line,
input.txt, or how results are shown (a printer is handed in).
"""

import selectors
import shutil
import socket
import time
from collections import OrderedDict

import config
from udpxfer.client_transfer import FINISHED, ClientTransfer
from udpxfer.display import format_addr, human
from udpxfer.errors import Failure, NoServer
from udpxfer.partial import MemoryTarget
from udpxfer.planner import RangePlanner
from udpxfer.ratelimit import Pacer
from udpxfer.rtt import RttEstimator
from udpxfer.wire import HUGE, RECV_BUFSIZE, parse_listing


# ClientTransfer outcomes that mean the range's end-to-end check failed: its bytes are wrong
# somewhere and must never be claimed by a record nor counted as done.
FAILED_CHECK = frozenset(("mismatch",))


class Part:
    """One range in flight: a socket, its ClientTransfer, and how far its bytes are written
    (t.pos moves when a payload is accepted, a moment before the payload is on disk; records
    must only claim written bytes, even if Ctrl-C falls in between)."""

    def __init__(self, sock, transfer):
        self.sock, self.t = sock, transfer
        self.written = transfer.start
        self.held_until = 0.0   # --limit-rate: what it sends is held until then (Pacer)
        self.held = []

    @property
    def failed_check(self):
        """The range's end-to-end check failed: none of its bytes may be trusted."""
        return self.t.outcome in FAILED_CHECK

    def claimable(self):
        """The bytes of this part a record may claim: [start, written), or none at all once
        the check failed (Ctrl-C can land between that and housekeeping)."""
        return None if self.failed_check else (self.t.start, self.written)


class Client:
    """Talks to one server. fetch() drives the parts of one file (or the listing)."""

    def __init__(self, host, port, settings, printer, out_dir=config.DOWNLOADS_DIR):
        self.s = settings
        self.printer = printer
        self.out_dir = out_dir
        # An ASCII name goes as bytes: a str would be IDNA-encoded, and importing that codec
        # costs a millisecond of every start (a non-ASCII name still gets it).
        infos = socket.getaddrinfo(host.encode("ascii") if host.isascii() else host, port, 0,
                                   socket.SOCK_DGRAM)
        self.family, _, _, _, self.server = infos[0]
        self.rtt = RttEstimator(self.s.request_timeout, self.s.request_timeout_min,
                                self.s.request_timeout_max)
        self.buf = bytearray(RECV_BUFSIZE)
        self.view = memoryview(self.buf)
        self.stats = {"transfers": 0, "stalls": 0, "restarts": 0}
        self._ports = OrderedDict()   # local port -> when it was last used
        # Whether the server ever answered (SIZE or ERROR): until then a refused port or
        # silence means "no server here" and ends a fetch early (NoServer); once it has
        # answered, silence is a restart or a lossy path and is waited out patiently.
        self.answered = False
        self.pacer = Pacer(self.s.limit_rate) if self.s.limit_rate else None
        self.last_fetch = None   # the _Fetch of the last fetch(), for its counters

    # A port used this recently is not used again: the server remembers finished transfers
    # for a few seconds (config.ServerSettings.recent_seconds) and ignores their late copies.
    PORT_QUARANTINE = 10.0

    def _socket(self):
        """A new connected socket on a port not used in the last PORT_QUARANTINE seconds."""
        rejected = []
        try:
            for _ in range(16):
                sock = socket.socket(self.family, socket.SOCK_DGRAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
                except OSError:
                    pass
                # Connected: the kernel drops datagrams from anyone but the server, and a new
                # port per transfer keeps late datagrams of old transfers out.
                try:
                    sock.connect(self.server)
                except OSError as exc:   # e.g. no route to the server
                    sock.close()
                    raise Failure("cannot reach %s: %s" % (
                        format_addr(self.server), exc.strerror or exc)) from None
                sock.setblocking(False)
                port = sock.getsockname()[1]
                now = time.monotonic()
                if now - self._ports.get(port, -self.PORT_QUARANTINE) >= self.PORT_QUARANTINE:
                    break
                rejected.append(sock)   # kept open while we look, so the OS picks another
            else:
                rejected.pop()          # no luck: use the last one all the same
            self._ports[port] = now
            self._ports.move_to_end(port)
            while len(self._ports) > 4096:
                self._ports.popitem(last=False)
            return sock
        finally:
            for r in rejected:
                r.close()

    def _flush(self, part, datagrams=None):
        """Send what the part's transfer has to send (or `datagrams`), unless it is held."""
        if datagrams is None:
            datagrams = part.t.datagrams_to_send()
            if part.held_until:   # --limit-rate: its ACK waits (see Pacer); so does the rest
                part.held += datagrams
                return
        for datagram in datagrams:
            try:
                part.sock.send(datagram)
            except OSError as exc:
                self.refused(exc)   # else the timers handle it (e.g. a server restarting)

    def _release(self, part):
        """Send what a part held back: its ACK is due, or the part is being closed."""
        held, part.held, part.held_until = part.held, [], 0.0
        self._flush(part, dict.fromkeys(held))   # repeats of one ACK go once

    def refused(self, exc):
        """A send or receive failed. A refusal (ICMP port unreachable: ECONNREFUSED, or
        ConnectionResetError on Windows) from a server that never answered means nothing
        listens there: raise NoServer. Anything else is left to the timers."""
        if not self.answered and isinstance(exc, (ConnectionRefusedError,
                                                  ConnectionResetError)):
            raise NoServer(self.server, "nothing is listening there") from None

    # -- listing

    def listing(self, give_up=None):
        target = MemoryTarget()
        self.fetch(None, target, give_up=give_up)
        return parse_listing(target.data)

    # -- one file

    def fetch(self, name, target, parts=1, size_hint=None, give_up=None, label=None):
        """Fetch `name` (None: the listing) into `target`. Returns seconds spent moving bytes.
        Raises Failure with a reason for the person. Afterwards (also after a Failure)
        self.last_fetch.unneeded counts the DATA datagrams that brought no new byte."""
        if self.pacer is not None:   # under a cap, no more parts than the cap can feed
            parts = min(parts, self.pacer.max_parts) if parts else self.pacer.max_parts
        self.last_fetch = _Fetch(self, name, target, parts, size_hint,
                                 self.s.give_up if give_up is None else give_up, label)
        return self.last_fetch.run()


class _Fetch:
    """The state of one file's download: which ranges are missing, in flight, backed off."""

    def __init__(self, client, name, target, parts, size_hint, give_up, label):
        self.c, self.name, self.target = client, name, target
        self.s = client.s
        self.plan = RangePlanner(self.s, parts, name is None, size_hint)
        self.give_up = give_up
        self.label = label or (name if name is not None else "listing")
        self.active = []
        self.sel = selectors.DefaultSelector()
        self.failures = 0           # consecutive attempts that ended without progress
        self.retry_at = 0.0
        self.restarts = 0
        self.warned = False
        # Requests and SIZE carry no checksum, so a bit flip can turn "a.bin" into another
        # existing name. A file is saved only once two independent requests got the same
        # (size, version) (a resume record counts as one), and NOT_FOUND must come twice.
        self.confirmations = 1 if target.version is not None else 0
        self.not_found = 0
        self.bad_requests = 0
        self._have = -1             # bytes in hand at the last progress check
        self.attempts = 0           # parts ended without finishing, since the last progress
        self.busy = 0               # of which the server had no slot for (ERROR BUSY)
        self.unneeded = 0           # DATA received that brought no new byte (retransmissions)
        self.most_parts = 0         # the most parts that ran at once

    # -- planning (RangePlanner decides; this says what is in hand and what runs)

    def _plan(self):
        """Cut what is missing (and not in flight) into ranges."""
        self.plan.plan(self.target.size, self.target.done.ranges + [
            (p.t.start, self._end_of(p.t)) for p in self.active])

    def _end_of(self, t):
        """Where a transfer's range ends: known from its SIZE, else as asked."""
        if t.end is not None:
            return t.end
        if t.length is None or self.target.size is None:
            return self.target.size if self.target.size is not None else HUGE
        return min(t.start + t.length, self.target.size)

    def _start(self, start, length, now):
        expect = (self.target.size, self.target.version) if self.target.version else None
        t = ClientTransfer(self.name, start, length, now, self.s, expect,
                           request_rto=self.c.rtt.rto if self.c.rtt.srtt else None)
        part = Part(self.c._socket(), t)
        self.sel.register(part.sock, selectors.EVENT_READ, part)
        self.active.append(part)
        self.most_parts = max(self.most_parts, len(self.active))
        self.c.stats["transfers"] += 1
        self.c._flush(part)
        self.c.printer.detail("%s: asking for [%d, %s)" % (
            self.label, start, "end" if length is None or length >= HUGE
            else start + length))

    def _schedule(self, now):
        if now < self.retry_at:
            return
        if self.target.size is None:
            if not self.active:
                self._start(0, self.plan.first_length(), now)
            return
        plan = self.plan
        if not plan.queue and not self.active:
            self._plan()
        while plan.queue and len(self.active) < plan.parts:
            start, length = plan.next_range(sum(self._end_of(p.t) - p.t.pos
                                                for p in self.active))
            self._start(start, length, now)

    # -- the loop

    def run(self):
        """Drive the parts until the file is whole. The per-datagram path is kept short (receive,
        ACK, write); timers, scheduling, the record and progress run at most every
        HOUSEKEEPING seconds, or at once when a part finishes or a first SIZE arrives."""
        target, c = self.target, self.c
        self.started = time.monotonic()
        self.last_progress = self.started
        self.last_save = self.started
        if target.resumed and target.size:
            c.printer.line("%s: resuming, %s of %s already here" % (
                self.label, human(target.resumed), human(target.size)))
        if target.size is not None:
            self._check_space(target.size - target.done.total())
            self._plan()
        buf, view, select = c.buf, c.view, self.sel.select
        pacer = c.pacer
        next_check = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_check:
                    if self._housekeeping(now):
                        return now - self.started
                    next_check = self._next_check(now)
                if not self.active:   # waiting to retry; select() of nothing fails on Windows
                    time.sleep(max(min(next_check - now, self.HOUSEKEEPING), 0))
                    continue
                for key, _ in select(max(next_check - now, 0)):
                    part = key.data
                    try:
                        n = part.sock.recv_into(buf)
                    except OSError as exc:   # spurious wake-up, or ICMP refused
                        c.refused(exc)
                        continue
                    t = part.t
                    now = time.monotonic()
                    payload = t.receive_datagram(view[:n], now)
                    if pacer is not None and payload is not None:
                        due = pacer.take(len(payload), now)
                        if due > now:   # _flush holds the ACK; housekeeping sends it then
                            part.held_until = due
                            next_check = min(next_check, due)
                    c._flush(part)
                    if payload is not None:
                        target.write(t.pos - len(payload), payload)
                        part.written = t.pos
                    elif t.state == FINISHED or (t.size is not None and target.size is None):
                        next_check = 0.0
                    elif buf.startswith(b"DATA", 0, n):
                        self.unneeded += 1   # a retransmission (or a damaged copy)
        finally:   # also on Ctrl-C: keep every accepted byte for the next run
            if target.size is not None:
                try:
                    target.save(self._in_flight())
                except OSError:
                    pass
            for part in self.active:
                self._close(part)
            target.close()
            self.sel.close()

    HOUSEKEEPING = 0.05

    def _in_flight(self):
        """Bytes of running parts that are written and not known bad, for the record."""
        return [r for r in (p.claimable() for p in self.active) if r is not None]

    def _next_check(self, now):
        timers = [p.t.get_timer() for p in self.active]
        timers += [p.held_until for p in self.active if p.held_until]
        if self.retry_at > now:
            timers.append(self.retry_at)
        return min(timers + [now + self.HOUSEKEEPING])

    def _housekeeping(self, now):
        """Everything but moving bytes. Returns True when the file is complete and saved."""
        target = self.target
        for part in self.active:
            if part.held_until and part.held_until <= now:
                self.c._release(part)   # --limit-rate: its ACK is due
        if not self.c.answered:
            self._check_answered(now)
        for part in list(self.active):
            if part not in self.active:
                continue   # a restart closed it
            t = part.t
            if t.size is not None and target.size is None:
                self._adopt(t)
            t.handle_timer(now)
            self.c._flush(part)
            if t.state == FINISHED:
                self._ended(part, now)
            elif t.size is not None and self._conflicts(t):
                self._restart("the file changed on the server", now)
                break
        self._progress(now)
        if now - self.last_progress > self.give_up:
            if self.busy and self.busy == self.attempts:
                raise Failure("server busy (%s had no free transfer slot); gave up after %d s"
                              % (format_addr(self.c.server), self.give_up))
            raise Failure("server at %s not answering; gave up after %d s" % (
                format_addr(self.c.server), self.give_up))
        if target.size is not None and target.done.covers(target.size) and not self.active:
            if self.confirmations >= 2 or self.name is None:
                target.finish()
                return True
            if now >= self.retry_at:   # an empty range at the end: SIZE, EOF, done
                self._start(target.size, 0, now)
            return False
        self._schedule(now)
        if self.active and now - self.last_save >= self.s.record_interval:
            self.last_save = now
            target.save(self._in_flight(), wait=False)
        return False

    def _check_answered(self, now):
        """Until the server first answers: NoServer after no_answer_timeout (or give_up if
        shorter) of silence, for systems and firewalls that report no ICMP refusal."""
        if any(p.t.size is not None or p.t.error_code is not None for p in self.active):
            self.c.answered = True
        else:
            limit = min(self.s.no_answer_timeout, self.give_up)
            if now - self.started >= limit:
                raise NoServer(self.c.server, "no answer in %g s" % limit)

    def _progress(self, now):
        have = self.target.done.total() + sum(p.t.received for p in self.active)
        if have > self._have:
            self._have = have
            self.last_progress = now
            self.failures = 0
            self.attempts = self.busy = 0
            if self.warned:
                self.c.printer.line("%s: server is answering again" % self.label)
                self.warned = False
        rate = (have - self.target.resumed) / max(now - self.started, 1e-6)
        if self.plan.update(now, have, rate, len(self.active), self.c.rtt.srtt,
                            self.target.size):
            self._plan()   # ranges not yet asked for are cut again for that many parts
        if self.name is not None:
            self.c.printer.progress(self.label, have, self.target.size, rate, now)

    def _adopt(self, t):
        """The first SIZE tells the file's size and version."""
        if self.name is None and t.size > self.s.max_list_bytes:
            raise Failure("the server announced a listing of %s; refusing" % human(t.size),
                          retry=False)
        self._check_space(t.size)
        self.target.size, self.target.version = t.size, t.version
        self._take_rtt(t)   # now, so that the other parts start with a measured timeout
        self._plan()

    def _take_rtt(self, t):
        if t.rtt_sample is not None:
            self.c.rtt.sample(t.rtt_sample)
            t.rtt_sample = None   # each sample counts once

    def _conflicts(self, t):
        return (t.size, t.version) != (self.target.size, self.target.version)

    def _check_space(self, need):
        if self.name is None:
            return
        try:
            free = shutil.disk_usage(self.c.out_dir).free
        except OSError:
            return
        if need > free:
            raise Failure("needs %s but only %s is free in %s" % (human(need), human(free),
                                                                  self.c.out_dir))

    def _close(self, part):
        if part.held_until:   # a held ACK still goes out (Ctrl-C, a failure, a restart)
            self.c._release(part)
        self.sel.unregister(part.sock)
        part.sock.close()

    def _ended(self, part, now):
        t = part.t
        self.active.remove(part)
        self._close(part)
        self._take_rtt(t)
        outcome = t.outcome
        if t.version is not None and not self._conflicts(t):
            self.confirmations += 1
        self.c.printer.detail("%s: [%d, %s) %s%s" % (
            self.label, t.start, t.end, outcome, " " + t.error_code if t.error_code else ""))
        if outcome == "done":
            self.target.done.add(t.start, part.written)
            self.bad_requests = self.not_found = 0
            return
        if outcome == "version" or outcome == "changed":
            # ERROR CHANGED starts the file over (PROTOCOL.md), even where the version in a new
            # SIZE would come back the same: a server's version may be coarser than its check
            # (a modification time in whole seconds), and keeping the bytes read before the
            # change would then save a file made of two versions. A forged ERROR costs a restart.
            return self._restart("the file changed on the server", now)
        self.attempts += 1
        if outcome == "error" and t.error_code == "BUSY":
            self.busy += 1
            if self._carry_on_without(part):
                return
        if outcome == "error" and t.error_code == "BAD_REQUEST" and t.size is None:
            # Our request was valid for the file we know, so either it was damaged on the way
            # or the file shrank under it: the second time in a row, start over.
            self.bad_requests += 1
            if self.bad_requests >= 2:
                return self._restart("the file changed on the server", now)
        # NOT_FOUND twice in a row is final. Any other error, known or not (a bit flip can
        # damage the code), is retried with back-off until give_up.
        if outcome == "error" and t.error_code == "NOT_FOUND":
            self.not_found += 1
            if self.not_found >= 2:
                raise Failure("not on the server", retry=False)
        else:
            self.not_found = 0
        if part.failed_check:
            self.c.printer.line("%s: CRC mismatch on [%d, %d); fetching it again" % (
                self.label, t.start, t.end))
            # A record saved while it ran listed those bytes: replace it at once.
            self.target.save(self._in_flight())
        elif self.name is None:
            pass   # a listing cannot be resumed: it starts over
        else:
            self.target.done.add(t.start, part.written)   # accepted bytes: covered by crcs
        if self.name is None:
            self.target.reset()
        elif self.target.size is not None:   # else the first range is simply asked again
            self.plan.put_back(t.start if part.failed_check else part.written, self._end_of(t))
        self.c.stats["stalls"] += 1
        if t.received == 0 or outcome != "stalled":
            self.failures += 1
            delay = min(self.s.retry_initial * 2 ** min(self.failures - 1, 30),
                        self.s.retry_max)
            self.retry_at = now + delay
            if outcome == "stalled" and self.failures >= 2 and not self.warned:
                self.warned = True
                self.c.printer.line("%s: server at %s not answering; retrying" % (
                    self.label, format_addr(self.c.server)))

    def _carry_on_without(self, part):
        """The server had no slot for this part (ERROR BUSY) while others of the file run:
        keep its bytes, put the rest of its range back in the queue, and run no more parts
        than are running now. Not a failure: nothing is wrong, the server is shared. Returns
        False when no other part runs (then it is retried with back-off like any failure)."""
        if not self.active or self.name is None or self.target.size is None:
            return False
        t = part.t
        self.target.done.add(t.start, part.written)
        self.plan.put_back(part.written, self._end_of(t))
        self.plan.cap(len(self.active))
        self.c.printer.detail("%s: server busy; going on with %d parts" % (
            self.label, self.plan.parts))
        return True

    def _restart(self, why, now):
        self.restarts += 1
        self.c.stats["restarts"] += 1
        if self.restarts > self.s.max_restarts:
            raise Failure("%s %d times; giving up" % (why, self.restarts - 1))
        self.c.printer.line("%s: %s; starting over" % (self.label, why))
        self.bad_requests = 0
        self.confirmations = 0
        self._have = -1              # progress counts afresh for the new version
        self.last_progress = now
        for part in self.active:
            self._close(part)
        self.active = []
        self.plan.queue = []
        self.target.reset()
        self.retry_at = 0.0
