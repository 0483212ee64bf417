#!/usr/bin/env python3
"""UDP file client: lists the server's files and downloads names from input.txt (protocol v3,
PROTOCOL.md).

This script is the person's side: the command line, the listing, the names to fetch (given,
or read from input.txt and watched), the progress line, one result line per file (or JSON), and
the exit status. The engine is udpxfer/: every file is fetched as byte ranges, several files and
many ranges at once, each range a stop-and-wait transfer on a lane of the client's one UDP socket
(udpxfer/fetch.py, download.py, lanes.py); bytes go straight to a partial file in downloads/
beside a record of which bytes are verified, so an interrupted download resumes with only the
missing bytes, and a file gets its real name only when complete and verified
(udpxfer/partial.py): downloads/ never holds a wrong file under a real name.
"""

import argparse
import errno
import gc
import os
import re
import shutil
import socket
import sys
import time

import config
from udpxfer.display import duration, format_addr, human
from udpxfer.download import Download
from udpxfer.errors import Failure, NoServer
from udpxfer.fetch import Client
from udpxfer.partial import MemoryTarget, PartialFile
from udpxfer.ratelimit import Pacer
from udpxfer.wire import ProtocolError, is_servable_name, parse_listing

MiB = 1024 * 1024
EXIT_STATUSES = ("exit status: 0 every file is here and verified (or --list worked); 1 a file "
                 "failed, or no server answered; 2 the command line is wrong (an unknown "
                 "option, a missing --input file); 130 interrupted by Ctrl-C (partial "
                 "downloads are kept and resume on the next run)")


# --- Small helpers ----------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_rate(text):
    """A --limit-rate value in bytes per second: "500K", "10M", "1G" or plain bytes ("250000");
    K, M and G are 1024, 1024**2 and 1024**3, as in curl and wget, lowercase too."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError("not a rate: %r (examples: 500K, 10M, 1G, 250000)" % text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def in_words(exc, path=None):
    """An OSError about a file or folder of ours, said for a person: what, where, what to do."""
    path = path or getattr(exc, "filename", None) or "?"
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied: %s (check who may write there)" % path
    if code == errno.ENOSPC:
        return ("no space left on the disk of %s: free some space (a partial download is kept "
                "and resumes)" % path)
    if code == errno.EROFS:
        return "%s is on a read-only disk" % path
    if code in (errno.EEXIST, errno.ENOTDIR):
        return "%s is a file, not a folder" % path
    if code == errno.EISDIR:
        return "%s is a folder, not a file" % path
    if code == errno.ENOENT:
        return "no such file or folder: %s" % path
    return "%s: %s" % (path, exc.strerror or exc)


class Printer:
    """What the person sees: lines, and on a terminal one progress line redrawn in place."""

    def __init__(self, quiet=False, verbose=False, stream=None):
        self.stream = stream or sys.stdout
        self.quiet, self.verbose = quiet, verbose
        self.tty = self.stream.isatty() and not quiet
        self._progress_shown = False
        self._last_draw = 0.0

    def line(self, text, always=False):
        """Print a line (unless quiet, for lines that are not results or errors)."""
        if self.quiet and not always:
            return
        self._clear()
        print(text, file=self.stream, flush=True)

    def detail(self, text):
        if self.verbose:
            self.line("  " + text)

    def _clear(self):
        if self._progress_shown:
            self.stream.write("\r\033[K")
            self._progress_shown = False

    def progress(self, label, have, size, rate, now, note=None, force=False):
        """One line for the whole run: what (a file's name, or "3/20 files"), how much, how
        fast, how long still; or why nothing moves."""
        if not self.tty or (not force and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        if note:
            figures = "%s  %s" % (human(have), note)
        elif size:
            eta = duration((size - have) / rate) if rate > 0 else "--:--"
            figures = "%5.1f%%  %s / %s  %s/s  ETA %s" % (
                100.0 * have / size, human(have), human(size), human(rate), eta)
        else:
            figures = "%s  %s/s" % (human(have), human(rate))
        width = shutil.get_terminal_size((80, 20)).columns - 1
        room = width - len(figures) - 2
        if len(label) > room:   # the name gives way, not the figures
            label = label[:max(room - 1, 1)] + "~"
        self.stream.write("\r\033[K" + ("%s  %s" % (label, figures))[:width])
        self.stream.flush()
        self._progress_shown = True


# --- What the person runs ---------------------------------------------------------------------

def read_names(path):
    """input.txt -> its names, in order, with how many times each stands there: one name per
    line; blank lines and # comments skipped; spaces trimmed; a byte-order mark ignored (Windows
    Notepad wrote one). Raises OSError."""
    with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
        lines = f.read().splitlines()
    names = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            names[line] = names.get(line, 0) + 1
    return names


class App:
    """The downloads of one run: names queued, results said (a line each, or JSON)."""

    def __init__(self, args, settings, printer):
        self.args, self.s, self.p = args, settings, printer
        self.client = Client(args.host, args.port, settings, printer, args.out,
                             on_result=self._ended)
        self.sizes = {}
        self.running = {}     # name -> its Download, while it runs
        self.retry = set()    # names that failed for a reason that may pass
        self.started = time.monotonic()
        self.results = []     # one dict per file tried: see result()
        self.json = getattr(args, "json", False)   # args may be a bare Namespace (tests)
        self.interrupted_with_bytes = False
        self.listing_job = None   # watch mode: a fresh listing running beside the downloads
        self.deferred = []        # ... and the names waiting for it

    def show_listing(self, give_up, always=False):
        entries = self.client.listing(give_up=give_up)
        self.sizes = dict(entries)
        if always and self.json:   # --list --json: one object per file on the server
            for name, size in entries:
                self._print_json({"name": name, "size": size})
            return entries
        width = max([len(n) for n, _ in entries] + [4])
        self.p.line("%d file%s on %s:" % (len(entries), "" if len(entries) == 1 else "s",
                                          format_addr(self.client.server)), always)
        for name, size in entries:
            self.p.line("  %-*s  %10s" % (width, name, human(size)), always)
        return entries

    def needs_listing(self, names):
        """Whether a fresh listing would tell if files already here are complete."""
        return any(os.path.isfile(os.path.join(self.args.out, n)) and n not in self.sizes
                   for n in names if is_servable_name(n))

    def queue(self, name, give_up):
        """Start downloading `name` (its result comes through _ended), or say at once why not:
        returns False if it is neither queued nor here already."""
        if name in self.running:
            self.p.line("%s: already being downloaded" % name)
            return True
        started = time.monotonic()
        if not is_servable_name(name):
            self.p.line("%s: not a valid file name; skipped" % name, always=True)
            return self.result(name, started, error="not a valid file name")
        final = os.path.join(self.args.out, name)
        size = self.sizes.get(name)
        if os.path.isfile(final) and os.path.getsize(final) == size:
            self.p.line("%s: already in %s; skipped" % (name, self.args.out))
            return self.result(name, started, size=size, skipped=True)
        out = self.args.out
        job = Download(name, lambda: PartialFile(out, name), self.s, size, give_up,
                       say=self.p.line, detail=self.p.detail, server=self.client.server)
        self.running[name] = job
        self.client.add(job)
        return True

    def _ended(self, job, error):
        """A download ended (the loop calls this): its result line."""
        if job.name is None:
            if job is self.listing_job:
                self._listing_in(job, error)
            return
        self.running.pop(job.name, None)
        target = job.target
        if error is not None:
            why = in_words(error) if isinstance(error, OSError) else str(error)
            self.p.line("%s: FAILED: %s" % (job.name, why), always=True)
            if getattr(error, "retry", True):
                self.retry.add(job.name)
            return self.result(job.name, job.started, target, job=job, error=why)
        seconds = job.seconds()
        rate = (target.size - target.resumed) / seconds
        self.p.line("%s: %s in %.2f s, %s/s, verified (CRC-32)%s" % (
            job.name, human(target.size), seconds, human(rate),
            ", resumed" if target.resumed else ""), always=True)
        return self.result(job.name, job.started, target, job=job, seconds=seconds)

    def result(self, name, started, target=None, seconds=None, error=None, size=None,
               skipped=False, job=None):
        """Record how one file went (for the summary line, and printed as one JSON line with
        --json); returns whether it is here and whole. "bytes" are those fetched in this run
        (not those resumed), "retransmissions" the DATA datagrams that brought no new byte,
        "parts" the most transfers that ran at once for it."""
        if seconds is None:
            seconds = (job.seconds() if job is not None and job.started is not None
                       else time.monotonic() - (started or time.monotonic()))
        moved = resumed = 0
        if target is not None and target.size is not None:
            size, resumed = target.size, target.resumed
            moved = target.size - resumed if error is None else max(
                target.done.total() - resumed, 0)
        record = {"name": name, "result": "ok" if error is None else "failed", "size": size,
                  "bytes": moved, "resumed": resumed, "seconds": round(seconds, 3),
                  "rate": int(moved / max(seconds, 1e-6)),
                  "parts": job.most_lanes if job else 0,
                  "retransmissions": job.unneeded if job else 0}
        if skipped:
            record["skipped"] = "already here"
        if error is not None:
            record["error"] = error
        self.results.append(record)
        if self.json:
            self._print_json(record)
        return error is None

    @staticmethod
    def _print_json(obj):
        import json
        print(json.dumps(obj), flush=True)

    def summary(self):
        """The last line after --once or names: the outcome at a glance."""
        ok = [r for r in self.results if r["result"] == "ok"]
        skipped = sum(1 for r in ok if r.get("skipped"))
        moved = sum(r["bytes"] for r in self.results)
        seconds = time.monotonic() - self.started
        return "done: %d file%s%s, %d failed, %s in %.2f s, %s/s" % (
            len(ok), "" if len(ok) == 1 else "s",
            " (%d already here)" % skipped if skipped else "",
            len(self.results) - len(ok), human(moved), seconds,
            human(moved / max(seconds, 1e-6)))

    def run_names(self, names):
        """Download the names, several at once; True if every one is here and whole."""
        if self.needs_listing(names):
            try:   # files here already: are they complete? One fresh listing tells.
                self.sizes = dict(self.client.listing(give_up=min(self.s.give_up, 10.0)))
            except Failure:
                pass
        first = len(self.results)
        for name in dict.fromkeys(names):
            self.queue(name, self.s.give_up)
        self.run()
        return all(r["result"] == "ok" for r in self.results[first:])

    def run(self, **kw):
        try:
            self.client.run(**kw)
        except KeyboardInterrupt:
            self.interrupted_with_bytes = self.client.kept
            raise

    def watch(self, path, waiting_for_file):
        """Download every name added to input.txt, several at once, until Ctrl-C. A name added
        again (it stands there more often than before) is tried again; a file rewritten with the
        same names starts nothing."""
        if waiting_for_file:
            self.p.line("waiting for %s to be made (one name per line; Ctrl-C to stop)" % path)
        else:
            self.p.line("watching %s for names (Ctrl-C to stop)" % path)
        state = {"stamp": None, "counts": {}, "later": {}, "said": False}
        self.run(forever=True, tick=lambda now: self._tick(path, state, now),
                 every=self.s.poll_interval)

    def _look(self, path, state, now):
        """One look at input.txt (from the download loop, every poll_interval)."""
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        later = state["later"]
        due = [n for n, when in later.items() if when <= now]
        if stamp == state["stamp"] and not due:
            return
        state["stamp"] = stamp
        try:
            counts = read_names(path) if stamp is not None else {}
        except OSError as exc:
            if not state["said"]:
                self.p.line("cannot read %s" % in_words(exc, path), always=True)
                state["said"] = True
            return
        state["said"] = False
        seen = state["counts"]
        fresh = [n for n, k in counts.items() if k > seen.get(n, 0)]
        state["counts"] = counts
        again = [n for n in fresh if n in seen]
        for name in again:
            self.p.line("%s: added again; trying it again" % name)
        for name in due:
            later.pop(name, None)
        names = list(dict.fromkeys(fresh + [n for n in due if n in counts]))
        if names and self.needs_listing(names):
            # Files here already: a fresh listing first tells whether they are complete (it
            # runs beside the downloads; the names go when it is in).
            self.deferred += names
            if self.listing_job is None:
                self.listing_job = Download(None, MemoryTarget(), self.s, give_up=10.0,
                                            say=self.p.line, detail=self.p.detail,
                                            server=self.client.server)
                self.client.add(self.listing_job)
            return
        for name in names:
            self.retry.discard(name)
            self.queue(name, self.s.watch_give_up)

    def _listing_in(self, job, error):
        """The fresh listing asked for in watch mode came (or failed): the names waiting
        for it go now."""
        self.listing_job = None
        if error is None:
            try:
                self.sizes.update(parse_listing(job.target.data))
            except ProtocolError:
                pass
        names, self.deferred = self.deferred, []
        for name in dict.fromkeys(names):
            self.retry.discard(name)
            self.queue(name, self.s.watch_give_up)

    def _tick(self, path, state, now):
        """watch(): input.txt, and the names that failed for a reason that may pass, which are
        tried again after watch_retry."""
        later = state["later"]
        for name in list(self.retry):
            if name not in self.running and name not in later:
                later[name] = now + self.s.watch_retry
        self._look(path, state, now)


def _rate_arg(text):
    try:
        rate = parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if rate < Pacer.MIN_RATE:
        raise argparse.ArgumentTypeError(
            "%s is below the smallest cap, 64K: the server sends datagrams of up to 64 KiB and "
            "resends one not acknowledged within 2 s" % text)
    return rate


def build_parser():
    p = argparse.ArgumentParser(
        description="Download files from a UDP file server (protocol v3). With no names, show "
                    "the server's files, download every name in the input file and keep "
                    "watching it for new names until Ctrl-C.",
        epilog=EXIT_STATUSES)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="download these names and exit (instead of the input file; not with "
                        "--once or --list)")
    p.add_argument("--host", default=config.HOST,
                   help="server address: a name, an IPv4 address or an IPv6 one such as ::1 "
                        "(default %(default)s)")
    p.add_argument("--port", type=int, default=config.PORT,
                   help="server port (default %(default)s)")
    p.add_argument("--input", metavar="FILE",
                   help="file of names to download, one per line (default: input.txt in the "
                        "project folder)")
    p.add_argument("--out", default=config.DOWNLOADS_DIR, metavar="DIR",
                   help="folder to save into (default: downloads/ in the project folder)")
    p.add_argument("--parts", default="auto", metavar="N|auto",
                   help="transfers at once (lanes), all files together: 1 to %d, or auto "
                        "(default: auto, as many as the path needs: few on a LAN, hundreds on "
                        "a long fast path)" % config.ClientSettings().lanes_max)
    p.add_argument("--give-up", type=float, default=config.ClientSettings().give_up,
                   metavar="SECONDS",
                   help="with --once or names: give up on a file after this long without "
                        "progress (default %(default)s; watch mode waits 10 times longer)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="download the names in the input file now, then exit")
    mode.add_argument("--list", action="store_true", help="show the server's files and exit")
    p.add_argument("--limit-rate", type=_rate_arg, metavar="RATE",
                   help="receive at most RATE bytes per second, all transfers and files "
                        "together, e.g. 500K, 10M, 1G (K = 1024, M = 1024^2, G = 1024^3, as in "
                        "curl and wget; lowercase and plain bytes too); at least 64K (default: "
                        "no cap)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per finished file on stdout (name, result, "
                        "size, bytes, resumed, seconds, rate, parts, retransmissions; error or "
                        "skipped); the lines meant for people go to stderr")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only result lines and errors")
    g.add_argument("-v", "--verbose", action="store_true", help="also print each transfer")
    return p


def _input_file(parser, args):
    """The input file, and whether it is the default one that does not exist yet. A named one
    must be a file that exists (exit 2 otherwise)."""
    if args.input is None:
        path = config.INPUT_FILE
        return path, not os.path.exists(path)
    if os.path.isdir(args.input):
        parser.error("--input %s is a folder, not a file of names" % args.input)
    if not os.path.isfile(args.input):
        parser.error("--input %s: no such file" % args.input)
    return args.input, False


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.names and (args.list or args.once):
        parser.error("names cannot be combined with --list or --once")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    most = config.ClientSettings().lanes_max
    if args.parts == "auto":
        args.parts = 0
    elif not args.parts.isdigit() or not 1 <= int(args.parts) <= most:
        parser.error("--parts must be auto or a number from 1 to %d" % most)
    else:
        args.parts = int(args.parts)
    if args.give_up <= 0:
        parser.error("--give-up must be more than 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error("--out %s is a file, not a folder" % args.out)
    input_path, no_input = (None, False) if args.names or args.list else \
        _input_file(parser, args)
    settings = config.ClientSettings(parts=args.parts, give_up=args.give_up,
                                     watch_give_up=10 * args.give_up,
                                     limit_rate=args.limit_rate or 0)
    # --json: stdout holds only JSON lines; what a person reads goes to stderr.
    printer = Printer(quiet=args.quiet, verbose=args.verbose,
                      stream=sys.stderr if args.json else None)
    app = None
    try:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            printer.line("client: cannot make the folder %s" % in_words(exc, args.out),
                         always=True)
            return 1
        app = App(args, settings, printer)
        cap = app.client.cap
        if cap is not None and args.parts and cap.max_parts < args.parts:
            printer.line("--limit-rate %s/s: at most %d transfer%s at a time" % (
                human(cap.rate), cap.max_parts, "" if cap.max_parts == 1 else "s"))
        if args.names:
            ok = app.run_names(args.names)
            printer.line(app.summary(), always=True)
            return 0 if ok else 1
        if args.once and no_input:
            printer.line("nothing to download: %s does not exist (write names in it, one per "
                         "line, or give names on the command line)" % input_path, always=True)
            return 1
        if args.list or args.once:
            try:
                app.show_listing(settings.give_up, always=args.list)
            except NoServer:
                raise
            except Failure as exc:
                printer.line("cannot get the list: %s" % exc, always=True)
                return 1
            if args.list:
                return 0
            try:
                names = read_names(input_path)
            except OSError as exc:
                printer.line("client: cannot read %s" % in_words(exc, input_path), always=True)
                return 1
            ok = app.run_names(list(names))
            printer.line(app.summary(), always=True)
            return 0 if ok else 1
        delay = settings.retry_initial
        waiting = False
        while True:   # watch mode: keep asking for the list until the server answers
            try:
                app.show_listing(settings.give_up)
                break
            except NoServer as exc:
                if not waiting:   # said once; then the client waits quietly
                    printer.line("%s; waiting for it (Ctrl-C to stop)" % exc, always=True)
                    waiting = True
            except Failure as exc:
                if not exc.retry:
                    printer.line("cannot get the list: %s" % exc, always=True)
                    return 1
                printer.line("cannot get the list: %s; retrying" % exc, always=True)
            time.sleep(delay)
            delay = min(2 * delay, settings.retry_max)
        app.watch(input_path, no_input)
    except NoServer as exc:
        printer.line(str(exc), always=True)
        return 1
    except KeyboardInterrupt:
        kept = app is not None and app.interrupted_with_bytes
        printer.line("interrupted; partial downloads are kept and resume on the next run"
                     if kept else "interrupted", always=True)
        return 130
    except socket.gaierror as exc:
        printer.line("client: cannot resolve --host %s: %s" % (args.host, exc.strerror or exc),
                     always=True)
        return 1
    except OSError as exc:
        printer.line("client: %s" % in_words(exc), always=True)
        return 1
    except ProtocolError as exc:
        printer.line("client: the server sent something malformed: %s" % exc, always=True)
        return 1
    finally:
        if app is not None:
            app.client.close()
    return 0


if __name__ == "__main__":
    # What the imports made lives until exit: keep the garbage collector from walking it again.
    # A full collection of it took 4 ms here: a pause in the middle of a download (the server's
    # timer is 2 ms on a fast path), and once more at exit. (Here, not in main(): callers that
    # run main() in their own process keep their collector as it is.)
    gc.freeze()
    sys.exit(main())
