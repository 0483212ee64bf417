#!/usr/bin/env python3
"""UDP file client: lists the server's files and downloads names from input.txt (protocol v2,
PROTOCOL.md).

This script is the person's side: the command line, the listing, the names to fetch (given,
or read from input.txt and watched), the progress line, one result line per file (or JSON), and
the exit status. The engine is udpxfer/: a file is fetched as byte ranges, up to --parts at a
time, each range one stop-and-wait transfer over its own UDP socket (udpxfer/fetch.py,
udpxfer/client_transfer.py); bytes go straight to a partial file in downloads/ beside a record
of which bytes are verified, so an interrupted download resumes with only the missing bytes, and
a file gets its real name only when complete and verified (udpxfer/partial.py): downloads/ never
holds a wrong file under a real name.
"""

import argparse
import gc
import os
import re
import shutil
import socket
import sys
import time

import config
from udpxfer.display import duration, format_addr, human
from udpxfer.errors import Failure, NoServer
from udpxfer.fetch import Client
from udpxfer.partial import PartialFile
from udpxfer.ratelimit import Pacer
from udpxfer.wire import ProtocolError, is_servable_name

MiB = 1024 * 1024


# --- Small helpers ----------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_rate(text):
    """A --limit-rate value in bytes per second: "500K", "10M", "1G" or plain bytes ("250000");
    K, M and G are 1024, 1024**2 and 1024**3, as in curl and wget, lowercase too."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError("not a rate: %r (examples: 500K, 10M, 1G, 250000)" % text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


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

    def progress(self, name, have, size, rate, now, force=False):
        if not self.tty or (not force and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        if size:
            pct = 100.0 * have / size
            eta = duration((size - have) / rate) if rate > 0 else "--:--"
            text = "%s  %5.1f%%  %s / %s  %s/s  ETA %s" % (name, pct, human(have), human(size),
                                                            human(rate), eta)
        else:
            text = "%s  %s  %s/s" % (name, human(have), human(rate))
        width = shutil.get_terminal_size((80, 20)).columns - 1
        self.stream.write("\r\033[K" + text[:width])
        self.stream.flush()
        self._progress_shown = True


# --- What the person runs ---------------------------------------------------------------------

def read_names(path):
    """input.txt: one name per line; blank lines and # comments skipped; spaces trimmed."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    names = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and line not in names:
            names.append(line)
    return names


class App:
    def __init__(self, args, settings, printer):
        self.args, self.s, self.p = args, settings, printer
        self.client = Client(args.host, args.port, settings, printer, args.out)
        self.sizes = {}
        self.seen = set()
        self.retry = set()
        self.started = time.monotonic()
        self.results = []   # one dict per file tried: see result()
        self.json = getattr(args, "json", False)   # args may be a bare Namespace (tests)

    def show_listing(self, give_up, always=False):
        entries = self.client.listing(give_up=give_up)
        self.sizes = dict(entries)
        if always and self.json:   # --list --json: one object per file on the server
            for name, size in entries:
                self._print_json({"name": name, "size": size})
            return entries
        width = max([len(n) for n, _ in entries] + [4])
        self.p.line("%d files on %s:" % (len(entries), format_addr(self.client.server)),
                    always)
        for name, size in entries:
            self.p.line("  %-*s  %10s" % (width, name, human(size)), always)
        return entries

    def download(self, name, give_up):
        """One name, start to end, with its result line. True if the file is here and whole;
        a name worth trying again later goes into self.retry."""
        p = self.p
        started = time.monotonic()
        if not is_servable_name(name):
            p.line("%s: not a valid file name; skipped" % name, always=True)
            return self.result(name, started, error="not a valid file name")
        final = os.path.join(self.args.out, name)
        if os.path.isfile(final) and name not in self.sizes:
            try:   # a file here already: is it complete? Ask for a fresh listing once.
                self.sizes = dict(self.client.listing(give_up=min(give_up, 10.0)))
            except Failure:
                pass
        size = self.sizes.get(name)
        if os.path.isfile(final) and os.path.getsize(final) == size:
            p.line("%s: already in %s; skipped" % (name, self.args.out))
            return self.result(name, started, size=size, skipped=True)
        target = None
        self.client.last_fetch = None
        try:
            target = PartialFile(self.args.out, name)
            seconds = self.client.fetch(name, target, self.s.parts, size, give_up)
        except NoServer:
            raise   # not about this file: main() says it once
        except Failure as exc:
            p.line("%s: FAILED: %s" % (name, exc), always=True)
            if exc.retry:
                self.retry.add(name)
            return self.result(name, started, target, error=str(exc))
        except OSError as exc:
            p.line("%s: FAILED: %s" % (name, exc), always=True)
            return self.result(name, started, target, error=str(exc))
        finally:
            if target is not None:
                target.release()
        rate = (target.size - target.resumed) / max(seconds, 1e-6)
        p.line("%s: %s in %.2f s, %s/s, verified (CRC-32)%s" % (
            name, human(target.size), seconds, human(rate),
            ", resumed" if target.resumed else ""), always=True)
        return self.result(name, started, target, seconds=seconds)

    def result(self, name, started, target=None, seconds=None, error=None, size=None,
               skipped=False):
        """Record how one file went (for the summary line, and printed as one JSON line with
        --json); returns whether it is here and whole. "bytes" are those fetched in this run
        (not those resumed), "retransmissions" the DATA datagrams that brought no new byte."""
        fetch = self.client.last_fetch if target is not None else None
        if seconds is None:
            seconds = time.monotonic() - started
        moved = resumed = 0
        if target is not None:
            size, resumed = target.size, target.resumed
            moved = target.size - resumed if error is None else max(
                target.done.total() - resumed, 0)
        record = {"name": name, "result": "ok" if error is None else "failed", "size": size,
                  "bytes": moved, "resumed": resumed, "seconds": round(seconds, 3),
                  "rate": int(moved / max(seconds, 1e-6)),
                  "parts": fetch.most_parts if fetch else 0,
                  "retransmissions": fetch.unneeded if fetch else 0}
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
        ok = True
        for name in names:
            if name in self.seen:
                continue
            self.seen.add(name)
            ok = self.download(name, self.s.give_up) and ok
        return ok

    def watch(self):
        """Download every new name in input.txt, checking it every poll_interval, until Ctrl-C."""
        path = self.args.input
        self.p.line("watching %s for names (Ctrl-C to stop)" % path)
        later = {}   # name -> when to try it again (the server may come back)
        stamp = None
        while True:
            try:
                st = os.stat(path)
                new_stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                new_stamp = None
            now = time.monotonic()
            due = [n for n, when in later.items() if when <= now]
            if new_stamp != stamp or due:
                stamp = new_stamp
                for name in read_names(path):
                    if name in self.seen and name not in due:
                        continue
                    self.seen.add(name)
                    later.pop(name, None)
                    self.retry.discard(name)
                    if not self.download(name, self.s.watch_give_up) and name in self.retry:
                        later[name] = time.monotonic() + self.s.watch_retry
            time.sleep(self.s.poll_interval)


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
        description="Download files from a UDP file server (protocol v2). With no names, show "
                    "the server's files, download every name in the input file and keep "
                    "watching it for new names until Ctrl-C.")
    p.add_argument("names", nargs="*", metavar="NAME", help="download these names and exit")
    p.add_argument("--host", default=config.HOST,
                   help="server address: a name, an IPv4 address or an IPv6 one such as ::1 "
                        "(default %(default)s)")
    p.add_argument("--port", type=int, default=config.PORT,
                   help="server port (default %(default)s)")
    p.add_argument("--input", default=config.INPUT_FILE,
                   help="file of names to download, one per line (default: input.txt in the "
                        "project folder)")
    p.add_argument("--out", default=config.DOWNLOADS_DIR,
                   help="folder to save into (default: downloads/ in the project folder)")
    p.add_argument("--parts", default="auto", metavar="N|auto",
                   help="ranges of one file fetched at the same time: 1 to 64, or auto "
                        "(default: auto, which opens more while they make the download faster)")
    p.add_argument("--give-up", type=float, default=config.ClientSettings().give_up,
                   metavar="SECONDS",
                   help="with --once or names: give up on a file after this long without "
                        "progress (default %(default)s; watch mode waits 10 times longer)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="download the names in the input file now, then exit")
    mode.add_argument("--list", action="store_true", help="show the server's files and exit")
    p.add_argument("--limit-rate", type=_rate_arg, metavar="RATE",
                   help="receive at most RATE bytes per second, all parts and files together, "
                        "e.g. 500K, 10M, 1G (K = 1024, M = 1024^2, G = 1024^3, as in curl and "
                        "wget; lowercase and plain bytes too); at least 64K (default: no cap)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per finished file on stdout (name, result, "
                        "size, bytes, resumed, seconds, rate, parts, retransmissions; error or "
                        "skipped); the lines meant for people go to stderr")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only result lines and errors")
    g.add_argument("-v", "--verbose", action="store_true", help="also print each part")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.names and (args.list or args.once):
        parser.error("names cannot be combined with --list or --once")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    if args.parts == "auto":
        args.parts = 0
    elif not args.parts.isdigit() or not 1 <= int(args.parts) <= 64:
        parser.error("--parts must be auto or a number from 1 to 64")
    else:
        args.parts = int(args.parts)
    if args.give_up <= 0:
        parser.error("--give-up must be more than 0")
    settings = config.ClientSettings(parts=args.parts, give_up=args.give_up,
                                     watch_give_up=10 * args.give_up,
                                     limit_rate=args.limit_rate or 0)
    # --json: stdout holds only JSON lines; what a person reads goes to stderr.
    printer = Printer(quiet=args.quiet, verbose=args.verbose,
                      stream=sys.stderr if args.json else None)
    try:
        os.makedirs(args.out, exist_ok=True)
        app = App(args, settings, printer)
        pacer = app.client.pacer
        if pacer is not None and pacer.max_parts < args.parts:
            printer.line("--limit-rate %s/s: at most %d part%s at a time" % (
                human(pacer.rate), pacer.max_parts, "" if pacer.max_parts == 1 else "s"))
        if args.names:
            ok = app.run_names(args.names)
            printer.line(app.summary(), always=True)
            return 0 if ok else 1
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
            ok = app.run_names(read_names(args.input))
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
        app.watch()
    except NoServer as exc:
        printer.line(str(exc), always=True)
        return 1
    except KeyboardInterrupt:
        printer.line("interrupted; partial downloads are kept and resume on the next run",
                     always=True)
        return 130
    except socket.gaierror as exc:
        printer.line("client: cannot resolve --host %s: %s" % (args.host, exc.strerror or exc),
                     always=True)
        return 1
    except (OSError, ProtocolError) as exc:
        printer.line("client: %s" % exc, always=True)
        return 1
    return 0


if __name__ == "__main__":
    # What the imports made lives until exit: keep the garbage collector from walking it again.
    # A full collection of it took 4 ms here: a pause in the middle of a download (the server's
    # timer is 2 ms on a fast path), and once more at exit. (Here, not in main(): callers that
    # run main() in their own process keep their collector as it is.)
    gc.freeze()
    sys.exit(main())
