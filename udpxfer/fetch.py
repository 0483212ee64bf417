"""The client's download loop: every transfer of every file over one UDP socket, each on a lane
of its own (protocol version 3), driven by one single-threaded loop; or, with a server that knows
only version 2, one socket per transfer.

Per datagram the loop does little: receive, find the lane, hand the message to its transfer,
send the ACK (or hold it back, when the pace says so), write the payload at its offset. The
rest runs at housekeeping, a few times per round trip: timers, transfers that ended, how many
lanes run (lanes.py) and how fast their ACKs go, new transfers for the files that want them
(download.py: files at once, small ones whole on lanes of their own), records, progress.

Holding an ACK back holds back the DATA it would bring, so the ACKs are the pace: the rate cap
of --limit-rate, and the controller's pacing rate on a long path. A lane that has finished keeps
its token for a while, to answer a late EOF (its ACK EOF was lost) without the server having to
wait for its retransmission limit.

The server must first show it knows lanes (a tagged answer). Until then the client runs only
tagged transfers; an untagged ERROR BAD_REQUEST to a tagged request, or silence where an
untagged request is answered, means a version 2 server, and the client goes on with one socket
per transfer, untagged.

Relies on: client_transfer, download, lanes, planner, partial (targets), ratelimit, errors, rtt,
wire, config. Must not know: the command line, input.txt, or how results are shown (a printer
is handed in).
"""

import selectors
import shutil
import socket
import time
import weakref
from collections import OrderedDict, deque

import config
from udpxfer.client_transfer import FINISHED, RECEIVING, ClientTransfer
from udpxfer.display import format_addr, human
from udpxfer.download import Download, Part
from udpxfer.errors import Failure, NoServer
from udpxfer.lanes import LaneController
from udpxfer.partial import MemoryTarget
from udpxfer.ratelimit import Pacer
from udpxfer.rtt import RttEstimator
from udpxfer.wire import (HUGE, MAX_DATAGRAM, MAX_LANE, RECV_BUFSIZE, Data, Eof, Error,
                          ProtocolError, format_ack_eof, lane_tag, parse_listing,
                          parse_server_datagram)

_IN_QUARANTINE = 10.0   # seconds a port is not used again (the server ignores its late copies)


def _close_all(sel):
    """Close a client's selector and every socket in it."""
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()


class Client:
    """Talks to one server. add() downloads (files, the listing) and run() drives them; fetch()
    and listing() do one and return. `on_result(download, error)` is called as each ends."""

    def __init__(self, host, port, settings, printer, out_dir=config.DOWNLOADS_DIR,
                 on_result=None):
        self.s = settings
        self.printer = printer
        self.out_dir = out_dir
        self.on_result = on_result
        # An ASCII name goes as bytes: a str would be IDNA-encoded, and importing that codec
        # costs a millisecond of every start (a non-ASCII name still gets it).
        infos = socket.getaddrinfo(host.encode("ascii") if host.isascii() else host, port, 0,
                                   socket.SOCK_DGRAM)
        self.family, _, _, _, self.server = infos[0]
        self.rtt = RttEstimator(settings.request_timeout, settings.request_timeout_min,
                                settings.request_timeout_max)
        self.control = LaneController(settings, time.monotonic(), settings.parts)
        self.cap = Pacer(settings.limit_rate) if settings.limit_rate else None
        if self.cap is not None:   # under a cap, no more lanes than the cap can feed
            self.control.cap(self.cap.max_parts)
        # The controller's pace (its rate set each round; a burst of two datagrams at most).
        self.pace = Pacer(None, slack=0.002, cap=False)
        self.buf = bytearray(RECV_BUFSIZE)
        self.view = memoryview(self.buf)
        self.sel = selectors.DefaultSelector()
        self._closer = weakref.finalize(self, _close_all, self.sel)
        self.lanes = None            # the server knows lanes: None (not yet seen), True, False
        self.sock = None             # the socket of the lanes
        self.next_lane = 1
        self.by_lane = {}            # lane -> Part
        self.finished = OrderedDict()   # lane -> token, of transfers that ended well
        self.parts = []              # every transfer running
        self.jobs = []               # downloads open
        self.waiting = deque()       # downloads not yet open
        # ACKs held back, in order: entries [due or None, part, bytes, since, datagrams] (see
        # _hold; a part's `held` is its entry)
        self.held = deque()
        self.inflight = 0            # lanes with an ACK out whose DATA has not come back
        self.last_size = 0           # the largest payload lately (any lane)
        self._ports = OrderedDict()  # local port -> when it was last used (version 2)
        self.stats = {"transfers": 0, "stalls": 0, "restarts": 0, "sockets": 0, "late": 0,
                      "overdue": 0}
        self.answered = False        # the server ever answered (SIZE or ERROR)
        self.began = None            # when the first request went
        self.last_heard = None
        self.refused_at = None
        self.last_fetch = None       # the Download of the last fetch(), for its counters
        self.most_lanes = 0
        self.kept = False            # the last run left partial downloads to resume
        self.total = self.finished_jobs = 0   # files of this run, and those ended

    # -- one download, the old way

    def fetch(self, name, target, parts=None, size_hint=None, give_up=None, label=None):
        """Fetch `name` (None: the listing) into `target` and return the seconds spent moving
        bytes; raise Failure (or NoServer) if it fails. `parts`: a fixed number of lanes for
        this download (None: the settings')."""
        job = Download(name, target, self.s, size_hint, give_up, label, self._say,
                       self.printer.detail, self.server)
        self.last_fetch = job
        fixed = self.control.fixed
        if parts is not None:
            self.control.fix(parts)
        try:
            self.add(job)
            self.run()
        finally:
            self.control.fix(fixed)
        if job.error is not None:
            raise job.error
        return job.seconds()

    def listing(self, give_up=None):
        target = MemoryTarget()
        self.fetch(None, target, give_up=give_up)
        return parse_listing(target.data)

    # -- many downloads

    def add(self, job):
        """Queue a download; it opens when the files at once allow."""
        job.error = None
        self.waiting.append(job)
        if job.name is not None:
            self.total += 1

    def run(self, forever=False, tick=None, every=1.0):
        """Drive the downloads until none is left (or, `forever`, until Ctrl-C), calling
        `tick(now)` every `every` seconds (watch mode adds downloads there). NoServer and
        KeyboardInterrupt end it; a download's own failure ends only that download."""
        now = time.monotonic()
        next_tick = now
        next_check = 0.0
        select, recv_into = self.sel.select, None
        try:
            while forever or self.jobs or self.waiting:
                now = time.monotonic()
                if tick is not None and now >= next_tick:
                    tick(now)
                    next_tick = now + every
                if self.held:
                    self._release(now)
                if now >= next_check:
                    next_check = self._housekeeping(now)
                    if not (forever or self.jobs or self.waiting):
                        break
                due = next_check
                if self.held and self.inflight < self.control.window \
                        and self.held[0][0] is not None:
                    due = min(due, self.held[0][0])
                if tick is not None:
                    due = min(due, next_tick)
                timeout = max(due - time.monotonic(), 0.0)
                if not self.parts:   # nothing to wait on: select() of nothing fails on Windows
                    time.sleep(timeout)
                    continue
                for key, _ in select(timeout):
                    sock = key.fileobj
                    recv_into = sock.recv_into
                    for _ in range(64):      # what is queued, up to a bound, then timers
                        try:
                            n = recv_into(self.buf)
                        except BlockingIOError:
                            break
                        except OSError as exc:   # ICMP port unreachable, and the like
                            self._refused(exc, time.monotonic())
                            break
                        if self._datagram(key.data, n, time.monotonic()):
                            next_check = 0.0
                        if key.data is not None and key.data.t.state == FINISHED:
                            break
        finally:   # also on Ctrl-C: keep every accepted byte for the next run
            self._stop_all()
            self.total = self.finished_jobs = 0

    # -- the per-datagram path

    def _datagram(self, part, n, now):
        """One datagram from the server. Returns True when housekeeping should come at once (a
        transfer ended, a file's first SIZE came)."""
        heard, self.last_heard = self.last_heard, now
        if heard is not None and now - heard > self.s.silence_note:
            for job in self.jobs:   # the server was silent: time that is not transfer time
                if job.started <= heard:
                    job.waited += now - heard
        try:
            lane, msg = parse_server_datagram(self.view[:n])
        except ProtocolError:
            return False         # corrupted or garbage: no answer (the server resends)
        if part is None:         # the lanes' socket
            if lane is None:
                return self._untagged(msg, now)
            if not self.lanes:
                self._lanes_known(now)
            part = self.by_lane.get(lane)
            if part is None:
                token = self.finished.get(lane)
                if token is not None and isinstance(msg, Eof):
                    self._send(None, format_ack_eof(token, lane_tag(lane)))   # ours was lost
                return False
        elif lane is not None:
            return False         # a socket of its own carries no lane
        elif self.lanes is None:
            self._no_lanes(now)  # the untagged probe was answered, the tagged request not
        t = part.t
        payload = t.receive(msg, now)
        if part.flying and (payload is not None or t.state == FINISHED
                            or isinstance(msg, (Eof, Error))):
            # What its ACK brought is here (not a repeated SIZE or DATA): one fewer in flight.
            part.flying = False
            self.inflight -= 1
            if self.held:
                self._release(now)
        if payload is not None:
            n = len(payload)
            left = t.end - t.pos
            self.control.delivered(n, part.acked_at, left > 0, now)
            # What the next DATA brings: the server's size (the largest lately: a DATA cut at
            # a read-ahead block's end is followed by a full one), or what is left.
            size = self.last_size
            self.last_size = size = n if n > size else size - (size >> 6)
            self._ack(part, now, min(left, size))
            part.job.target.write(t.pos - n, payload)
            part.written, part.written_crc = t.pos, t.crc
            return t.state == FINISHED   # (cut: another lane has the rest)
        # (The first DATA of a range: as big as the last one of any, or the most at first.)
        self._ack(part, now, min(t.end - t.pos, self.last_size or MAX_DATAGRAM)
                  if t.state == RECEIVING and not t.flowing else 0)
        if t.state == FINISHED or (t.size is not None and part.job.target.size is None):
            return True
        if isinstance(msg, Data):
            part.job.unneeded += 1   # a retransmission (or a damaged copy)
        return False

    def _ack(self, part, now, brings):
        """Send what the transfer has to send. An ACK that brings a DATA (of about `brings`
        bytes: the largest lately, or what is left of the range) waits its turn, in order:
        while the lanes in flight fill the window (lanes.py), and until the pace allows it (the
        rate cap, or the controller's on a long path)."""
        out = part.t.datagrams_to_send()
        if not out:
            return
        entry = part.held
        if entry is not None:            # its ACK waits already: this goes with it
            entry[4] += out
            if brings > 0 and not part.flying and not entry[2]:
                # It waited as one that brings nothing (a repeated request), and now brings a
                # DATA: it waits for the window and the pace as well, and goes as _fly sends.
                entry[0], entry[2] = None, brings
            return
        if brings > 0 and not part.flying:   # (a repeat for a SIZE that came twice goes at once)
            if (not self.held and self.inflight < self.control.window and self.cap is None
                    and self.pace.rate is None):
                self._fly(part, out, now)        # nothing to wait for (loopback, a LAN)
                return
            self._hold(part, None, brings, out, now)
            self._release(now)
            return
        if brings == 0 and not part.flying and self.held:
            # The ACK of a range's last DATA brings only its EOF: it waits for nothing but the
            # ACKs held before it, and goes after them. ACKs leave in the order their DATAs
            # came, so the server can take one acknowledged out of its send order as evidence
            # of a loss (PROTOCOL.md "Early retransmission"); ahead of the others it proved
            # their DATAs lost while they waited here, and the needless early resends widened
            # the server's reordering window until losses waited for the timeout.
            self._hold(part, now, 0, out, now)
            return
        for datagram in out:
            self._send(part, datagram)

    def _hold(self, part, due, brings, out, now):
        """`out` waits in the queue of held ACKs: [due (None: reckoned at the head), part,
        bytes it brings (0: only an EOF), since, datagrams]."""
        part.held = entry = [due, part, brings, now, out]
        self.held.append(entry)

    @staticmethod
    def _unhold(part):
        """What a part had waiting, now let go of (its entry is skipped in the queue)."""
        out, part.held = part.held[4], None
        return out

    def _fly(self, part, out, now):
        """Send the ACK that brings the lane's next DATA: the lane is in flight from now."""
        if part.acked_pos == part.t.pos:
            # The same ACK again (its DATA was late or lost): the DATA that comes may answer
            # either, so it times nothing (Karn's rule).
            part.acked_at = None
        else:
            part.acked_at, part.acked_pos = now, part.t.pos
        part.flying, part.flew_at = True, now
        self.inflight += 1
        for datagram in out:   # (an ACK repeated for a repeated DATA tells the server its
            self._send(part, datagram)   # resend was needless)

    def _due(self, n, now):
        due = now
        if self.cap is not None:
            due = self.cap.take(n, now)
        if self.pace.rate is not None:
            due = max(due, self.pace.take(n, now))
        return due

    def _release(self, now):
        """Send the held ACKs whose turn it is: while the window has room, each when the pace
        says (a quantum of a millisecond early at most; its slot in the pace is taken once, when
        it comes to the head). Without --limit-rate, one held for hold_max goes whatever they
        say: the server gives a request whose SIZE is not acknowledged up after 3 s, and a
        client silent for 5 s, and long before that its timer resends what was not lost.
        (Twice in some fifty downloads at 1% loss, 200 Mbit/s and +50 ms, the pace fell with
        the rate that ACKs held ever longer let through, down to 0.02 MB/s: a transfer the
        server had given up answered BAD_REQUEST, and the download failed after 60 s.) A rate
        cap is a promise to the user: it keeps its holds short by the lanes it allows."""
        held = self.held
        window = self.control.window
        soon = now + 0.001
        overdue = now - self.s.hold_max if self.cap is None else -1.0
        while held:
            entry = held[0]
            part = entry[1]
            if part.held is not entry:    # closed meanwhile: its ACK went then
                held.popleft()
                continue
            if not entry[2]:              # it brings an EOF: its turn is enough
                held.popleft()
                for datagram in self._unhold(part):
                    self._send(part, datagram)
                continue
            if entry[3] > overdue:
                if self.inflight >= window:
                    return
                if entry[0] is None:
                    entry[0] = self._due(entry[2], now)
                if entry[0] > soon:
                    return
            else:
                self.stats["overdue"] += 1
            held.popleft()
            self._fly(part, self._unhold(part), now)

    def _send(self, part, datagram):
        sock = self.sock if part is None or part.sock is None else part.sock
        try:
            sock.send(datagram)
        except OSError as exc:
            self._refused(exc, time.monotonic())   # else the timers see to it

    def _refused(self, exc, now):
        """A send or receive failed. A refusal (ICMP port unreachable: ECONNREFUSED, or
        ConnectionResetError on Windows) from a server that never answered: most often one that
        is starting, so the requests go again soon, for refused_grace seconds; then NoServer.
        Anything else is left to the timers."""
        if self.answered or not isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
            return
        if self.began is not None and now - self.began >= self.s.refused_grace:
            raise NoServer(self.server, "nothing is listening there")
        self.refused_at = now
        for part in self.parts:
            part.t.nudge(now, self.s.refused_retry)
            part.check_at = 0.0

    # -- lanes or not

    def _untagged(self, msg, now):
        """An untagged datagram on the lanes' socket: before any tagged answer, an ERROR
        BAD_REQUEST says the server does not know lanes (version 2): go on without them."""
        if self.lanes is None and isinstance(msg, Error) and msg.code == "BAD_REQUEST":
            self._no_lanes(now)
            return True
        return False

    def _lanes_known(self, now):
        """A tagged answer: the server knows lanes; an untagged probe is let go."""
        self.lanes = True
        for part in [p for p in self.parts if p.sock is not None]:
            self._retire(part, now)

    def _no_lanes(self, now):
        """Version 2: the tagged transfers are let go (what they asked for is asked again,
        untagged, on sockets of their own)."""
        self.lanes = False
        self.printer.detail("the server does not know lanes (protocol version 2): one socket "
                            "per transfer")
        for part in [p for p in self.parts if p.lane is not None]:
            self._retire(part, now)

    def _retire(self, part, now):
        """Let a transfer go though nothing is wrong with it: its bytes are kept and the rest
        of its range asked for again."""
        self._close(part)
        part.t.retire()
        part.job.ended(part, now)

    # -- housekeeping

    def _housekeeping(self, now):
        """Everything but moving bytes; returns when it is due again."""
        self._open_jobs(now)
        if not self.answered:
            self._check_answered(now)
        control = self.control
        limit = now - control.flight_limit()
        for part in list(self.parts):
            if not part.alive:
                continue   # its download ended, restarted or failed meanwhile
            if part.flying and part.flew_at < limit:
                part.flying = False   # lost, one way or the other: the window is for others
                self.inflight -= 1
                self.stats["late"] += 1
            self._look_at(part, now)
        window = control.update(now, self._data_lanes() < control.window)
        self.pace.set(control.pacing_rate)
        self._schedule(now, window)
        for job in list(self.jobs):
            self._progress(job, now)
        self._show(now)
        tick = control.min_rtt / 4 if control.min_rtt else self.s.housekeeping
        return now + min(max(tick, 0.002), self.s.housekeeping)

    def _look_at(self, part, now):
        """A transfer's SIZE (once), its timers (when due: hundreds of lanes run), its end."""
        job, t = part.job, part.t
        try:
            if t.size is not None and not part.sized:
                part.sized = True
                if job.target.size is None:
                    job.adopt(t, self._check_space)
                    self._take_rtt(t)   # now, so that the other lanes start with a good timeout
                elif job.conflicts(t):
                    return self._restart(job, job.restart("the file changed on the server", now))
            if now >= part.check_at:
                t.handle_timer(now)
                self._ack(part, now, 0)
                part.check_at = t.get_timer() or now
            if t.state == FINISHED:
                self._ended(part, now)
        except NoServer:
            raise   # not about this file: the run ends, and says it once
        except Failure as exc:
            self._fail(job, exc, now)

    def _ended(self, part, now):
        t = part.t
        self._close(part)
        self._take_rtt(t)
        if t.outcome in ("done", "mismatch") and part.lane is not None:
            self.finished[part.lane] = t.token
            while len(self.finished) > self.s.finished_lanes:
                self.finished.popitem(last=False)
        if t.outcome not in ("done", "version", "changed"):
            self.stats["stalls"] += 1
        self._restart(part.job, part.job.ended(part, now))

    def _restart(self, job, what):
        if what == "restart":
            self.stats["restarts"] += 1
            for part in [p for p in self.parts if p.job is job]:
                self._close(part)

    def _take_rtt(self, t):
        if t.rtt_sample is not None:
            self.rtt.sample(t.rtt_sample)
            t.rtt_sample = None   # each sample counts once

    def _check_answered(self, now):
        """Until the server first answers: NoServer after no_answer_timeout (or give_up if
        shorter) of silence, for systems and firewalls that report no ICMP refusal. A tagged
        request asked probe_after times without an answer is asked untagged as well, on a
        socket of its own: a version 2 server may drop what it cannot parse."""
        if any(p.t.size is not None or p.t.error_code is not None for p in self.parts):
            self.answered = True
            return
        if self.began is None:
            return
        limit = min([self.s.no_answer_timeout] + [j.give_up for j in self.jobs])
        if now - self.began >= limit:
            raise NoServer(self.server, "no answer in %g s" % limit)
        if self.lanes is None and self.refused_at is None and self.parts and not any(
                p.sock is not None for p in self.parts):
            first = self.parts[0]
            if first.t.requests >= self.s.probe_after:
                self._start(first.job, first.t.start, first.t.length, now, untagged=True)

    def _data_lanes(self):
        """Transfers that will carry data for more than a couple of datagrams: the window
        counts these (one near its end lets the next start: no idle round trips). With --parts
        N, every transfer but a confirmation counts: N at once, as said."""
        near = 2 * self.control.dgram if not self.control.fixed else -1
        count = 0
        for p in self.parts:
            t = p.t
            if not p.confirm and (t.end is None or t.end - t.pos > near):
                count += 1
        return count

    def _schedule(self, now, window):
        """Start transfers while the window has room, for the downloads that want them: the
        one running the fewest first (a small file gets its lane at once beside a big one)."""
        if not self.jobs:
            return
        control = self.control
        want = control.lanes_to_run()
        limit = want + window + self.s.lanes_extra   # with those asking and ending
        if not self.answered:
            limit = min(limit, 2)   # a new socket waits in the server's strangers' pool
        data = self._data_lanes()
        lanes = control.plan_lanes()
        # A lane's rate: its share of the rate measured, or before that a datagram per round
        # trip (the requests' round trip).
        lane_rate = control.bw / max(window, 1) if control.bw else (
            control.dgram / self.rtt.srtt if self.rtt.srtt else 0.0)
        splits = 0
        while data < want and len(self.parts) < limit:
            job = min((j for j in self.jobs if j.want_lane(now, lanes, control.dgram)),
                      key=lambda j: len(j.parts), default=None)
            if job is None:
                if self._open_jobs(now, more=True):
                    continue
                # The end of the files, and lanes to spare: the longest range still running is
                # cut in two, so that a slow lane (its datagrams shrank, it lost some) does not
                # end the run alone. A lane moves a datagram per round trip and a new one needs
                # two round trips before its first, so a range of more than four datagrams
                # would end sooner in two; but the server resends what the cut lane no longer
                # acknowledges until it gives up, and counts it lost: only beyond split_datagrams.
                least = self.s.split_datagrams * control.dgram / 2
                if splits < window - data and any(j.split(least) for j in self.jobs):
                    splits += 1
                    continue
                break
            start, length = job.next_request(now, lanes, control.dgram, lane_rate)
            part = self._start(job, start, length, now)
            if not part.confirm and (length is None or length > 2 * control.dgram
                                     or control.fixed):
                data += 1
        self.most_lanes = max(self.most_lanes, len(self.parts))

    def _open_jobs(self, now, more=False):
        """Open waiting downloads: the first always; `more` while files_at_once allows (the
        open ones want no lane). Returns whether one opened."""
        opened = False
        while self.waiting and (not self.jobs or (more and len(self.jobs) < self.s.files_at_once)):
            job = self.waiting.popleft()
            try:
                job.open(now)
            except NoServer:
                raise   # not about this file: the run ends, and says it once
            except Failure as exc:
                self._fail(job, exc, now, opened=False)
                continue
            self.jobs.append(job)
            target = job.target
            for a, b in getattr(target, "damaged", ()):
                self._say("%s: the kept bytes [%d, %d) do not match their checksum (damaged on "
                          "disk?); fetching them again" % (job.label, a, b))
            if target.resumed and target.size:
                self._say("%s: resuming, %s of %s already here" % (
                    job.label, human(target.resumed), human(target.size)))
            if job.name is not None:
                try:
                    self._check_space(job.target.size - job.target.done.total()
                                      if job.target.size is not None else 0)
                except NoServer:
                    raise   # not about this file: the run ends, and says it once
                except Failure as exc:
                    self._fail(job, exc, now)
                    continue
            opened = True
            if more:
                break
        return opened

    def _start(self, job, start, length, now, untagged=False):
        """A new transfer for `job`: on the next lane, or (version 2, or a probe) untagged on
        a socket of its own."""
        if self.began is None:
            self.began = now
        expect = (job.target.size, job.target.version) if job.target.version else None
        rto = self.rtt.rto if self.rtt.srtt else None
        if self.lanes is False or untagged:
            sock = self._socket()
            t = ClientTransfer(job.name, start, length, now, self.s, expect, rto)
            part = Part(t, job, sock)
            self.sel.register(sock, selectors.EVENT_READ, part)
        else:
            if self.sock is None or self.next_lane > MAX_LANE:
                self._lanes_socket()
            lane = self.next_lane
            self.next_lane += 1
            t = ClientTransfer(job.name, start, length, now, self.s, expect, rto, lane)
            part = Part(t, job, lane=lane)
            self.by_lane[lane] = part
        self.parts.append(part)
        job.parts.append(part)
        if not part.confirm:
            job.lanes += 1
            job.most_lanes = max(job.most_lanes, job.lanes)
        self.stats["transfers"] += 1
        for datagram in t.datagrams_to_send():
            self._send(part, datagram)
        self.printer.detail("%s: asking for [%d, %s)%s" % (
            job.label, start, "end" if length is None or length >= HUGE else start + length,
            "" if part.lane is None else " on lane %d" % part.lane))
        return part

    def _close(self, part):
        """A transfer leaves: its held ACK still goes (Ctrl-C, a failure, a restart), its lane
        or socket is let go."""
        if part.held is not None:
            for datagram in dict.fromkeys(self._unhold(part)):
                self._send(part, datagram)
        if part.flying:
            part.flying = False
            self.inflight -= 1
        if part.alive:
            part.alive = False
            if not part.confirm:
                part.job.lanes -= 1
        if part in self.parts:
            self.parts.remove(part)
        if part.lane is not None:
            self.by_lane.pop(part.lane, None)
        elif part.sock is not None:
            self.sel.unregister(part.sock)
            part.sock.close()

    # -- sockets

    def close(self):
        """Let the sockets go (the lanes' one stays open between runs, for late EOFs; a Client
        dropped without close() lets them go when it is collected)."""
        if self.jobs or self.parts:
            self._stop_all()
        self.sock = None
        self._closer()

    def _lanes_socket(self):
        """The one socket of the lanes (a new one if lane numbers ran out)."""
        if self.sock is not None:
            self.sel.unregister(self.sock)
            self.sock.close()
        self.sock = self._socket()
        self.next_lane = 1
        self.by_lane.clear()
        self.finished.clear()
        self.sel.register(self.sock, selectors.EVENT_READ, None)

    def _socket(self):
        """A new connected socket on a port not used in the last _IN_QUARANTINE seconds."""
        rejected = []
        try:
            for _ in range(16):
                sock = socket.socket(self.family, socket.SOCK_DGRAM)
                try:   # room for the datagrams of many lanes arriving together
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.s.receive_buffer)
                except OSError:
                    pass
                # Connected: the kernel drops datagrams from anyone but the server.
                try:
                    sock.connect(self.server)
                except OSError as exc:   # e.g. no route to the server
                    sock.close()
                    raise Failure("cannot reach %s: %s" % (
                        format_addr(self.server), exc.strerror or exc)) from None
                sock.setblocking(False)
                port = sock.getsockname()[1]
                now = time.monotonic()
                if now - self._ports.get(port, -_IN_QUARANTINE) >= _IN_QUARANTINE:
                    break
                rejected.append(sock)   # kept open while we look, so the OS picks another
            else:
                rejected.pop()          # no luck: use the last one all the same
            self._ports[port] = now
            self._ports.move_to_end(port)
            while len(self._ports) > 4096:
                self._ports.popitem(last=False)
            self.stats["sockets"] += 1
            return sock
        finally:
            for r in rejected:
                r.close()

    # -- progress and endings

    def _progress(self, job, now):
        try:
            job.progress(now)
            if job.whole():
                return self._result(job, None, now)
            job.check_give_up(now)
            if job.parts and now - job.saved_at >= self.s.record_interval:
                job.saved_at = now
                job.target.save(job.in_flight(), wait=False)
        except NoServer:
            raise   # not about this file: the run ends, and says it once
        except Failure as exc:
            self._fail(job, exc, now)

    def _fail(self, job, exc, now, opened=True):
        for part in [p for p in self.parts if p.job is job]:
            self._close(part)
        job.parts = []
        job.error = exc
        if opened:
            try:
                job.target.save(job.in_flight())
            except OSError:
                pass
        self._result(job, exc, now)

    def _result(self, job, error, now):
        job.ended_at = now
        job.done = True
        if job in self.jobs:
            self.jobs.remove(job)
        if job.name is not None:
            self.finished_jobs += 1
        job.close()
        if self.on_result is not None:
            self.on_result(job, error)

    def _show(self, now):
        """The progress line: the file's, or the whole run's when several run."""
        jobs = [j for j in self.jobs if j.name is not None]
        if not jobs:
            return
        silent = self.last_heard is not None and now - self.last_heard > self.s.silence_note
        have = sum(j.have for j in jobs if j.have > 0)
        size = sum(j.target.size or 0 for j in jobs)
        moved = sum(max(j.have - j.target.resumed, 0) for j in jobs)
        seconds = max(now - min(j.started for j in jobs), 1e-6)
        label = (jobs[0].label if self.total <= 1
                 else "%d/%d files" % (self.finished_jobs, self.total))
        known = all(j.target.size is not None for j in jobs)
        self.printer.progress(label, have, size if known else None, moved / seconds, now,
                              note="waiting for the server" if silent else None)

    def _say(self, text):
        self.printer.line(text)

    def _check_space(self, need):
        try:
            free = shutil.disk_usage(self.out_dir).free
        except OSError:
            return
        if need > free:
            raise Failure("needs %s but only %s is free in %s" % (human(need), human(free),
                                                                  self.out_dir), retry=False)

    def _stop_all(self):
        """The end of a run (Ctrl-C included): held ACKs go, every accepted byte is recorded,
        the transfers are let go. `kept`: whether a partial download was left to resume."""
        self.kept = any(j.name is not None and j.target is not None
                        and (j.target.done.total() or j.in_flight()) for j in self.jobs)
        for job in list(self.jobs):
            try:
                job.target.save(job.in_flight())
            except OSError:
                pass
        for part in list(self.parts):
            self._close(part)
        for job in self.jobs:
            job.parts = []
            job.close()
        self.jobs = []
        self.held.clear()
        self.inflight = 0
