#!/usr/bin/env python3
"""UDP file server: serves the files of one folder with protocol v3 (PROTOCOL.md; version 2
clients too).

Strategy: one blocking loop on one socket. Each turn it receives one datagram (the socket timeout
is the time to the nearest retransmission deadline), hands it to the dispatcher
(udpxfer/dispatcher.py) with the current time, sends what the dispatcher returns, then lets the
dispatcher read ahead the next chunk of each transfer while the clients are busy with the last
one. Files are streamed from disk: an active transfer holds at most two chunks. This module owns
the socket and the clock; the served folder and file_list.txt are udpxfer/folder.py's.
"""

import argparse
import errno
import gc
import logging
import select
import socket
import sys
import time

import config
from udpxfer.dispatcher import ServerDispatcher
from udpxfer.display import human
from udpxfer.folder import Folder
from udpxfer.wire import RECV_BUFSIZE

log = logging.getLogger("udpxfer.server")

# Scatter-gather send (header and payload without concatenating them) where the OS has it.
_HAVE_SENDMSG = hasattr(socket.socket, "sendmsg")

# getsockopt names for the path MTU of a connected socket (Linux); None where unknown.
_IP_MTU = getattr(socket, "IP_MTU", 14 if sys.platform.startswith("linux") else None)
_IPV6_MTU = getattr(socket, "IPV6_MTU", 24 if sys.platform.startswith("linux") else None)


def path_mtu(ip):
    """The MTU of the route to a client IP, or None where the OS does not say (then the
    protocol assumes Ethernet's 1500). Connecting a UDP socket sends nothing: it only looks up
    the route. Once per client IP, so loopback (MTU 65536: nothing fragments) is told apart
    from an Ethernet path, where big datagrams are dozens of IP fragments."""
    v6 = ":" in ip
    opt = _IPV6_MTU if v6 else _IP_MTU
    if opt is None:
        return None
    try:
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return s.getsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, opt)
    except OSError:
        return None


def explain_bind_error(exc, host, port):
    """One line saying what a failed bind means and what to do about it."""
    where = "%s port %d" % (host, port)
    code = getattr(exc, "winerror", None) or exc.errno   # Windows: WSAEADDRINUSE is 10048
    if code in (errno.EADDRINUSE, 10048):
        return ("%s is already in use (another server.py running?): stop it, or choose "
                "another port with --port N (--port 0 picks a free one)" % where)
    if code in (errno.EACCES, 10013):
        return ("not allowed to use %s (ports below 1024 need administrator rights, and "
                "some are reserved): choose another with --port N (--port 0 picks a free one)"
                % where)
    if code in (errno.EADDRNOTAVAIL, 10049):
        return ("%s is not an address of this machine: use --host 127.0.0.1 (this machine "
                "only), 0.0.0.0 (all IPv4) or :: (all IPv6)" % host)
    if isinstance(exc, socket.gaierror):
        return "cannot resolve --host %s: %s" % (host, exc.strerror or exc)
    return "cannot listen on %s: %s" % (where, exc.strerror or exc)


def _bind(host, port):
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
        try:   # "::" also serves IPv4 clients where the OS allows it
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            pass
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:   # room for many small ACKs arriving together, and for big datagrams going out
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        except OSError:
            pass
    sock.bind(addr)
    return sock


class Server:
    """The server loop. `server_address` is read back from the socket, so port 0 works."""

    def __init__(self, folder, host=config.HOST, port=config.PORT, settings=None):
        self.folder = folder
        self.settings = settings or config.ServerSettings()
        self.sock = _bind(host, port)
        self.server_address = self.sock.getsockname()
        self.dispatcher = ServerDispatcher(folder, self.settings, log, path_mtu=path_mtu)
        self._stop = False
        self.send_errors = 0
        self.started = time.monotonic()

    def shutdown(self):
        """Ask serve_forever() to return (from another thread), and wake it up."""
        self._stop = True
        try:
            with socket.socket(self.sock.family, socket.SOCK_DGRAM) as s:
                s.sendto(b"", self.server_address)
        except OSError:
            pass   # it still notices within 0.5 s

    def _send(self, now):
        sock = self.sock
        debug = log.isEnabledFor(logging.DEBUG)
        for datagram, addr in self.dispatcher.datagrams_to_send():
            if debug:
                log.debug("-> %s %r (%d bytes)", addr, bytes(datagram[0][:40]),
                          sum(map(len, datagram)))
            try:
                if _HAVE_SENDMSG and len(datagram) > 1:
                    sock.sendmsg(datagram, (), 0, addr)
                else:
                    sock.sendto(datagram[0] if len(datagram) == 1 else b"".join(datagram), addr)
            except OSError as exc:
                self.send_errors += 1
                if exc.errno == errno.EMSGSIZE:   # e.g. macOS refuses > 9216 bytes by default
                    self.dispatcher.too_big(addr, datagram, now)
                else:
                    log.debug("send to %s failed: %s", addr, exc)

    # Due timers wait while datagrams are queued (one of them may be the very ACK a timer is
    # about: resending then is needless), but for this many datagrams at most, so that a flood
    # cannot hold them off.
    DRAIN_LIMIT = 64

    def serve_forever(self):
        """Receive without blocking while datagrams are waiting (one system call each); when
        none is, do the idle work (timers, read-ahead, the folder check) and sleep in select()
        until the next deadline. Timers that fall due under load are handled after at most
        DRAIN_LIMIT datagrams."""
        d = self.dispatcher
        sock = self.sock
        sock.setblocking(False)
        buf = bytearray(RECV_BUFSIZE)
        view = memoryview(buf)
        recv, monotonic = sock.recvfrom_into, time.monotonic
        self.folder.maybe_rescan(monotonic())   # scans unless main() just did
        debug = log.isEnabledFor(logging.DEBUG)
        overdue = 0   # datagrams handled while a timer was due
        try:
            while not self._stop:
                try:
                    n, addr = recv(buf)
                except BlockingIOError:
                    overdue = 0
                    self._idle()
                    continue
                except ConnectionResetError:
                    # Windows: ICMP port unreachable from a client that went away.
                    continue
                except OSError as exc:
                    log.warning("receive failed: %s", exc)
                    self._idle()   # waits (or stops, if the socket is gone): no spinning
                    continue
                if self._stop:
                    break
                if debug:
                    log.debug("<- %s %r", addr, bytes(view[:min(n, 40)]))
                now = monotonic()
                try:
                    d.receive_datagram(view[:n], addr, now)
                    self._send(now)
                    d.read_ahead()   # the next chunk, while the client handles this one
                    deadline = d.get_timer()
                    if deadline is not None and deadline <= now:
                        overdue += 1
                        if overdue >= self.DRAIN_LIMIT:
                            overdue = 0
                            d.handle_timer(now)
                            self._send(now)
                except Exception:   # a bug must not take down every other transfer
                    log.exception("internal error on a datagram from %s", addr)
                self.folder.maybe_rescan(now)
        finally:
            d.close()

    def _idle(self):
        """Nothing to receive: timers, read-ahead, the folder check, then wait (at most 0.5 s,
        so a stop is noticed) until a datagram comes or the next deadline."""
        d = self.dispatcher
        now = time.monotonic()
        try:
            d.handle_timer(now)
            self._send(now)
            d.read_ahead()
            self.folder.maybe_rescan(now)
        except Exception:
            log.exception("internal error while handling timers")
        deadline = d.get_timer()
        timeout = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if timeout > 0:
            try:
                select.select([self.sock], [], [], timeout)
            except (OSError, ValueError):   # the socket was closed under us: stop
                self._stop = True

    def summary(self):
        """One line on what this server did, for the person stopping it (after close(): the
        files cut short by the stop count too)."""
        served = self.dispatcher.served
        what = "served nothing" if not served.lines else "served %d file%s, %s" % (
            served.lines, "" if served.lines == 1 else "s", human(served.bytes))
        return "stopped after %s: %s" % (_uptime(time.monotonic() - self.started), what)

    def close(self):
        self.dispatcher.close()
        self.sock.close()


def _uptime(seconds):
    seconds = int(seconds + 0.5)
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def build_parser():
    p = argparse.ArgumentParser(
        description="Serve the files of a folder over UDP (protocol v3; version 2 clients too).",
        epilog="exit status: 0 stopped with Ctrl-C; 2 it could not start (the command line, "
               "the folder, the port or address: the line before says which)")
    p.add_argument("--host", default=config.HOST,
                   help="address to listen on (default %(default)s: this machine only; "
                        "0.0.0.0: every IPv4 address; ::1: IPv6 loopback; ::: every IPv6 "
                        "address, and IPv4 too where the OS allows)")
    p.add_argument("--port", type=int, default=config.PORT,
                   help="UDP port (default %(default)s; 0 picks a free one)")
    p.add_argument("--dir", default=config.FILES_DIR,
                   help="folder to serve (default: files/ in the project folder)")
    p.add_argument("--file-list", default=config.FILE_LIST, metavar="FILE",
                   help="where to write the listing (default: file_list.txt in the project "
                        "folder)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="log every datagram")
    g.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535 (0 picks a free one)")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        folder = Folder(args.dir, args.file_list)
    except (OSError, ValueError) as exc:
        print("server: %s" % exc, file=sys.stderr)
        return 2
    try:
        server = Server(folder, args.host, args.port)
    except OSError as exc:
        print("server: %s" % explain_bind_error(exc, args.host, args.port), file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print("listening on %s:%d" % ("[%s]" % host if ":" in host else host, port), flush=True)
    try:
        found = folder.scan()
        log.info("serving %d file%s from %s", len(found), "" if len(found) == 1 else "s",
                 folder.root)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print(server.summary(), flush=True)
    return 0


if __name__ == "__main__":
    gc.freeze()   # what the imports made lives on: full collections need not walk it (client.py)
    sys.exit(main())
