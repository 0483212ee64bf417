"""One file's download (or the listing), with no I/O of its own: which ranges are in hand, in
flight and still to ask for; what each ended transfer means (its bytes kept, asked for again,
a retry with back-off, a restart because the file changed, a final failure); when the file is
whole and confirmed; and its progress.

A file is saved only once two independent requests got the same (size, version) (a resume
record counts as one): requests and SIZE carry no checksum, so a bit flip could turn one name
into another that exists. A file in one range gets its second request on a lane of its own, at
once (DOWNLOAD name 0 0: an empty range), beside the one that carries the data.

The download loop (fetch.py) owns the sockets, lanes and timers: it asks want_lane() and
next_request() to start transfers, and tells ended() how each ended. The target comes in as an
object (downloads/.NAME.part, or memory for the listing).

Relies on: planner (ranges), errors (Failure), display (text for people), config. Must not know:
sockets, the clock (`now` comes in), how files are opened, or the other downloads.
"""

from udpxfer.client_transfer import RECEIVING
from udpxfer.display import format_addr, human
from udpxfer.errors import Failure
from udpxfer.planner import RangePlanner
from udpxfer.wire import HUGE

# ClientTransfer outcomes that mean the range's end-to-end check failed: its bytes are wrong
# somewhere and must never be claimed by a record nor counted as done.
FAILED_CHECK = frozenset(("mismatch",))


class Part:
    """One transfer in flight: its ClientTransfer, the download it serves, where it goes (a lane
    of the client's socket, or a socket of its own) and how far its bytes are written (t.pos
    moves when a payload is accepted, a moment before the payload is on disk; records must only
    claim written bytes, even if Ctrl-C falls in between), with the running CRC there."""

    __slots__ = ("t", "job", "sock", "lane", "written", "written_crc", "held", "acked_at",
                 "acked_pos", "confirm", "flying", "flew_at", "alive", "sized", "check_at")

    def __init__(self, t, job, sock=None, lane=None):
        self.t, self.job, self.sock, self.lane = t, job, sock, lane
        self.written = t.start
        self.written_crc = t.crc
        self.held = None        # its entry in the loop's queue of held ACKs (fetch.py _hold)
        self.acked_at = None    # when the ACK of a new DATA went (RTT samples), if only once
        self.acked_pos = None   # ... the position it acknowledged
        self.flying = False     # its ACK went and what it brings has not come back
        self.flew_at = 0.0      # ... since then
        self.alive = True       # not closed yet
        self.sized = False      # its SIZE was checked against the file's
        self.check_at = 0.0     # its timers are due then at the soonest
        self.confirm = t.length == 0 and t.name is not None   # the second request of a file

    @property
    def failed_check(self):
        """The range's end-to-end check failed: none of its bytes may be trusted."""
        return self.t.outcome in FAILED_CHECK

    def claimable(self):
        """The bytes of this part a record may claim: (start, written, R(written)), or None
        once the check failed (Ctrl-C can land between that and housekeeping)."""
        if self.failed_check or self.written <= self.t.start:
            return None
        return self.t.start, self.written, self.written_crc


class Download:
    """The state of one file's download (see the module's docstring)."""

    def __init__(self, name, target, settings, size_hint=None, give_up=None, label=None,
                 say=None, detail=None, server=None):
        """`target`: where the bytes go, or a function that makes it (called when the download
        opens: only files_at_once targets are open at a time)."""
        self.name, self.s = name, settings
        self.target = None if callable(target) else target
        self._make_target = target if callable(target) else None
        self.size_hint = size_hint
        self.give_up = settings.give_up if give_up is None else give_up
        self.label = label or (name if name is not None else "listing")
        self.say = say or (lambda text: None)          # a line for the person
        self.detail = detail or (lambda text: None)    # a line for -v
        self.server = server or ("?", 0)
        self.plan = RangePlanner(settings, name is None, size_hint)
        self.parts = []             # running
        self.cap = None             # the most lanes the server gave this file (BUSY)
        self.failures = 0           # consecutive attempts that ended without progress
        self.retry_at = 0.0
        self.restarts = 0
        self.warned = False
        self.confirmations = 0
        self.not_found = self.bad_requests = self.refused = 0
        self.attempts = 0           # transfers ended without finishing, since the last progress
        self.busy = 0               # of which the server had no slot for (ERROR BUSY)
        self.unneeded = 0           # DATA received that brought no new byte (retransmissions)
        self.most_lanes = 0         # the most transfers that ran at once for it
        self.lanes = 0              # ... running now (not counting a confirmation)
        self._left = (None, 0)      # (when, left_running then): one sum per schedule
        self.started = self.last_progress = self.ended_at = None
        self.saved_at = 0.0         # when the record was last saved
        self.waited = 0.0           # seconds spent with the server silent (not transfer time)
        self.have = -1              # bytes in hand at the last progress check
        self.done = False           # ended: whole, confirmed and saved, or failed
        self.error = None           # the Failure it ended with, if it failed

    # -- what to ask for

    def open(self, now):
        """Make the target if need be (raises Failure), and start."""
        if self.target is None:
            self.target = self._make_target()
        self.started = self.last_progress = self.saved_at = now
        if self.target.version is not None:
            self.confirmations = 1   # a resume record counts as one
        if self.target.size is not None:
            self._plan()

    def close(self):
        """Let the target go (its lock and open files); nothing more is written."""
        if self.target is not None:
            self.target.close()
            release = getattr(self.target, "release", None)
            if release is not None:
                release()

    def seconds(self):
        """How long it moved bytes: from its start to its end, without the time the server
        was silent."""
        end = self.ended_at if self.ended_at is not None else self.last_progress
        return max(end - self.started - self.waited, 1e-6)

    def want_lane(self, now, lanes, dgram):
        """Whether this download has a transfer to start now (`lanes`, `dgram`: see
        next_request)."""
        if self.done or now < self.retry_at:
            return False
        if self.cap is not None and len(self.parts) >= self.cap:
            return False
        if self.target.size is None:
            if not self.parts:
                return True
            # The listing said the file fits in the first range: its second request goes now.
            return (self.size_hint is not None and len(self.parts) == 1
                    and self.size_hint <= self.plan.first_length(lanes, dgram)
                    and self._needs_confirmation())
        return bool(self.plan.gaps) or self._needs_confirmation()

    def _needs_confirmation(self):
        """The second request of a file all of whose ranges are asked for: when the transfers
        running (each brings a SIZE) will not make two (one range, or a resume's last one)."""
        if self.name is None:
            return False
        return self.confirmations + len(self.parts) < 2

    def next_request(self, now, lanes, dgram, lane_rate):
        """(start, length) of the transfer to start: a range of the file, or the empty one that
        confirms it. `lanes`: how many the ranges are cut for; `dgram`, `lane_rate`: a
        datagram's payload and a lane's rate as seen."""
        if not self.parts and self.target.size is None:
            return 0, self.plan.first_length(lanes, dgram)
        if self.target.size is not None and self.plan.gaps:
            at, left = self._left
            if at != now:   # (the ranges started since, at the same `now`, are added below)
                left = self.left_running()
            start, n = self.plan.next_range(lanes, dgram, lane_rate, left)
            self._left = (now, left + n)
            return start, n
        return 0, 0

    def end_of(self, t):
        """Where a transfer's range ends: known from its SIZE (or where it was cut), else as
        asked."""
        if t.cut_at is not None:
            return t.cut_at
        if t.end is not None:
            return t.end
        size = self.target.size
        if t.length is None or size is None:
            return size if size is not None else HUGE
        return min(t.start + t.length, size)

    def _plan(self):
        """What is missing (and not in flight) is what is left to ask for."""
        self.plan.plan(self.target.size, self.target.done.ranges + [
            (p.t.start, self.end_of(p.t)) for p in self.parts])

    def left_running(self):
        return sum(self.end_of(p.t) - p.t.pos for p in self.parts)

    def split(self, least):
        """The end of a file, lanes to spare: the running range with the most left (more than
        twice `least`) is cut in two, and its second half becomes a gap (next_request takes
        it). Returns whether one was. Never once the server said BUSY to this file: the cut
        lane's transfer keeps its slot on the server until the server gives up on it, and the
        second half found no slot, again and again (2 s for 3 MiB with two slots)."""
        if self.cap is not None:
            return False
        best, most = None, 2 * least
        for p in self.parts:
            t = p.t
            if t.state == RECEIVING and t.end is not None and not p.confirm:
                left = self.end_of(t) - t.pos
                if left > most:
                    best, most = p, left
        if best is None:
            return False
        at = best.t.pos + most // 2
        self.plan.put_back(at, self.end_of(best.t))
        best.t.cut(at)
        return True

    # -- what came

    def adopt(self, t, check_space):
        """The first SIZE tells the file's size and version. Raises Failure."""
        if self.name is None and t.size > self.s.max_list_bytes:
            raise Failure("the server announced a listing of %s; refusing" % human(t.size),
                          retry=False)
        if self.name is not None:
            check_space(t.size - self.target.done.total())
        self.target.size, self.target.version = t.size, t.version
        self._plan()

    def conflicts(self, t):
        return (t.size, t.version) != (self.target.size, self.target.version)

    def ended(self, part, now):
        """A transfer of this download ended (part.t.outcome says how). Returns "restart"
        when the file starts over (its other transfers must be closed). Raises Failure."""
        t = part.t
        self.parts.remove(part)
        outcome = t.outcome
        if t.version is not None and not self.conflicts(t):
            self.confirmations += 1
        self.detail("%s: [%d, %s) %s%s" % (
            self.label, t.start, t.end, outcome, " " + t.error_code if t.error_code else ""))
        if outcome == "done":
            self.target.keep(t.start, part.written, part.written_crc)
            self.bad_requests = self.not_found = self.refused = 0
            return None
        if outcome == "cut":       # its bytes are in; the rest of its range runs elsewhere
            self.target.keep(t.start, part.written, part.written_crc)
            return None
        if outcome == "retired":   # let go by the loop, nothing wrong: asked again as it was
            if self.name is not None:
                self.target.keep(t.start, part.written, part.written_crc)
            if self.target.size is not None and not part.confirm:
                self.plan.put_back(part.written, self.end_of(t))
            return None
        if outcome in ("version", "changed"):
            # ERROR CHANGED starts the file over (PROTOCOL.md), even where the version in a new
            # SIZE would come back the same: a server's version may be coarser than its check
            # (a modification time in whole seconds), and keeping the bytes read before the
            # change would then save a file made of two versions. A forged ERROR costs a restart.
            return self.restart("the file changed on the server", now)
        self.attempts += 1
        code = t.error_code if outcome == "error" else None
        if code == "BUSY":
            self.busy += 1
            if self._carry_on_without(part):
                return None
        if code == "BAD_REQUEST" and t.size is None and not part.confirm:
            # Our request was valid for the file we know, so either it was damaged on the way
            # or the file shrank under it: the second time in a row, start over. Before any
            # size is known it is the request itself the server refuses (a server that cannot
            # read our numbers, say): the third time in a row, that is the answer.
            self.bad_requests += 1
            if self.target.size is None and self.bad_requests >= 3:
                why = t.error_text or "the request was refused"
                raise Failure("the server says BAD_REQUEST (%s)" % why, retry=False)
            if self.target.size is not None and self.bad_requests >= 2:
                return self.restart("the file changed on the server", now)
        # NOT_FOUND twice in a row is final; so is INTERNAL (the server cannot read the file),
        # said in its words. Any other error, known or not (a bit flip can damage the code), is
        # retried with back-off until give_up.
        self.not_found = self.not_found + 1 if code == "NOT_FOUND" else 0
        if self.not_found >= 2:
            raise Failure("not on the server", retry=False)
        self.refused = self.refused + 1 if code == "INTERNAL" else 0
        if self.refused >= 2:
            why = t.error_text or "the server cannot read it"
            raise Failure(why if "server" in why else why + " (on the server)")
        if part.failed_check:
            self.say("%s: CRC mismatch on [%d, %d); fetching it again" % (
                self.label, t.start, t.end))
            # A record saved while it ran listed those bytes: it is replaced at once.
            self.target.save(self.in_flight())
        elif self.name is not None:
            self.target.keep(t.start, part.written, part.written_crc)   # covered by crcs
        if self.name is None:
            self.target.reset()
        elif self.target.size is not None and not part.confirm:
            # (Else the first range is simply asked for again; a confirmation too.)
            self.plan.put_back(t.start if part.failed_check else part.written, self.end_of(t))
        if t.received == 0 or outcome != "stalled":
            self.failures += 1
            delay = min(self.s.retry_initial * 2 ** min(self.failures - 1, 30),
                        self.s.retry_max)
            self.retry_at = now + delay
            if outcome == "stalled" and self.failures >= 2 and not self.warned:
                self.warned = True
                self.say("%s: server at %s not answering; retrying" % (
                    self.label, format_addr(self.server)))
        return None

    def _carry_on_without(self, part):
        """The server had no slot for this transfer (ERROR BUSY) while others of the file run:
        keep its bytes, put the rest of its range back, and run no more transfers for this file
        than run now. Not a failure: nothing is wrong, the server is shared. Returns False when
        no other transfer of the file runs (then it is retried with back-off like any failure)."""
        if not self.parts or self.name is None or self.target.size is None:
            return False
        t = part.t
        self.target.keep(t.start, part.written, part.written_crc)
        if not part.confirm:
            self.plan.put_back(part.written, self.end_of(t))
        self.cap = len(self.parts)
        self.detail("%s: server busy; going on with %d transfer%s" % (
            self.label, self.cap, "" if self.cap == 1 else "s"))
        return True

    def restart(self, why, now):
        """The file starts over: returns "restart" (the loop closes its transfers). Raises
        Failure after max_restarts."""
        self.restarts += 1
        if self.restarts > self.s.max_restarts:
            raise Failure("%s %d times; giving up" % (why, self.restarts - 1))
        self.say("%s: %s; starting over" % (self.label, why))
        self.bad_requests = 0
        self.confirmations = 0
        self.have = -1               # progress counts afresh for the new version
        self.last_progress = now
        self.parts = []
        self.plan.gaps = []
        self.target.reset()
        self.retry_at = 0.0
        return "restart"

    # -- progress

    def bytes_in_hand(self):
        have = self.target.done.total() + sum(p.t.received for p in self.parts)
        # (A cut range's last datagram may reach into the next range's, running elsewhere.)
        return have if self.target.size is None else min(have, self.target.size)

    def progress(self, now):
        """Note the bytes in hand; returns them."""
        have = self.bytes_in_hand()
        if have > self.have:
            self.have = have
            self.last_progress = now
            self.failures = 0
            self.attempts = self.busy = 0
            if self.warned:
                self.say("%s: server is answering again" % self.label)
                self.warned = False
        return have

    def check_give_up(self, now):
        """Raises Failure after give_up seconds without progress."""
        if now - self.last_progress <= self.give_up:
            return
        if self.busy and self.busy == self.attempts:
            raise Failure("server busy (%s had no free transfer slot); gave up after %d s"
                          % (format_addr(self.server), self.give_up))
        raise Failure("server at %s not answering; gave up after %d s" % (
            format_addr(self.server), self.give_up))

    def whole(self):
        """Every byte is in and no transfer runs: saved if confirmed (returns True)."""
        target = self.target
        if target.size is None or self.parts or not target.done.covers(target.size):
            return False
        if self.confirmations >= 2 or self.name is None:
            target.finish()
            self.done = True
            return True
        return False

    def in_flight(self):
        """Bytes of running transfers that are written and not known bad, for the record."""
        return [r for r in (p.claimable() for p in self.parts) if r is not None]
