"""Seeded, deterministic UDP impairment proxy for end-to-end tests and benchmarks.

Strategy
--------
Clients send to ``proxy.address``; the proxy forwards every datagram to the
upstream server and every reply back to the client, applying an
``Impairment`` (drop, duplicate, delay, jitter, reorder, bit corruption,
oversize drop, test hook) independently in each direction.

* The server identifies a transfer by the client's (IP, port), so the proxy
  keeps ONE upstream socket per distinct client address (LRU-bounded).  Two
  client sockets therefore look like two different clients to the server,
  exactly as without the proxy.
* Everything runs in ONE daemon thread: a ``selectors`` loop over the
  listening socket, the upstream sockets and a wake-up socketpair, plus a heap
  of delayed datagrams.  The select timeout is the time until the earliest
  delayed datagram is due (``time.monotonic()``), so there is no busy loop
  and no sleep polling; ``close()`` wakes the loop through the socketpair.
* Determinism: each direction has its own ``random.Random`` seeded from
  ``seed``.  Whenever any probabilistic field (drop, duplicate, jitter,
  reorder, corrupt) of a direction is non-zero, every datagram received in
  that direction consumes exactly ``DRAWS_PER_DATAGRAM`` draws in a fixed
  order, before any decision is made.  So the n-th datagram's fate depends
  only on (seed, n, settings) - e.g. the drop pattern for a seed does not
  change when you also enable duplication, nor when ``drop_if``/``max_size``
  discard some datagrams.  (Wall-clock timing still decides how delayed
  datagrams interleave with fresh ones; only the decisions are seeded.)
* Speed: datagrams are received into one preallocated buffer
  (``recvfrom_into``) and, when nothing needs to be delayed or modified, sent
  straight from a memoryview of it - no per-datagram allocation or copy.  A
  copy is made only when a datagram must outlive the buffer (delay) or be
  modified (corrupt), or when ``drop_if`` needs ``bytes``.

Timing: a delayed datagram is sent when the loop next wakes at or after its
due time.  Selector timeouts are rounded up to 1 ms on Linux (epoll) and on
Windows the timer tick is ~15 ms, so delays/jitter are not sub-millisecond
accurate; they are never shorter than requested.  ``blackhole`` and the
impairments are applied when a datagram is received: datagrams already
waiting in the delay heap are still delivered.

Counters
--------
``proxy.stats["to_server"]`` / ``proxy.stats["to_client"]`` are
``DirectionStats`` objects; read fields as attributes or items
(``st.dropped`` or ``st["dropped"]``), or ``st.as_dict()`` for a snapshot.
Once the proxy is quiescent (nothing pending in the delay heap):

    rx_datagrams == fwd_datagrams + send_errors - duplicated + dropped + oversize

``dropped`` includes random drops, ``drop_if`` drops and blackhole drops
(``blackholed`` is the blackhole subset); ``oversize`` is counted separately.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
import selectors
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

__all__ = ["Impairment", "DirectionStats", "ImpairProxy"]

RECV_BUFSIZE = 65536                 # larger than any UDP payload
SOCK_BUFSIZE = 4 * 1024 * 1024       # requested SO_RCVBUF/SO_SNDBUF (best effort)
BATCH = 64                           # datagrams drained per readiness event
DRAWS_PER_DATAGRAM = 7
# Windows' select() (the only selector there) is limited to 512 sockets.
DEFAULT_MAX_CLIENTS = 500 if sys.platform == "win32" else 4096

# Used instead of random draws when no probabilistic feature is enabled: every
# "u < probability" test is then False and every jitter term is 0.
_NO_DRAWS = (1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0)

_LISTEN = object()   # selector key tags
_WAKE = object()


@dataclass
class Impairment:
    """Impairment applied to one direction.  May be mutated or replaced
    (``proxy.to_server = Impairment(...)``) while the proxy runs."""

    drop: float = 0.0             # probability a datagram is discarded
    duplicate: float = 0.0        # probability it is sent twice
    delay: float = 0.0            # fixed one-way delay (s) added to every datagram
    jitter: float = 0.0           # extra uniform 0..jitter s per datagram (reorders)
    reorder: float = 0.0          # probability it is held back an extra reorder_delay
    reorder_delay: float = 0.005  # seconds
    corrupt: float = 0.0          # probability one random bit (header too) is flipped
    max_size: Optional[int] = None   # datagrams larger than this are dropped
    drop_if: Optional[Callable[[bytes], bool]] = None   # test hook: True -> drop

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "corrupt"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError("%s must be within 0..1, got %r" % (name, v))
        for name in ("delay", "jitter", "reorder_delay"):
            if getattr(self, name) < 0:
                raise ValueError("%s must be >= 0" % name)


class DirectionStats:
    """Counters of one direction.  Plain ints, updated only by the proxy
    thread, so reading them from another thread is safe under the GIL."""

    __slots__ = ("rx_datagrams", "rx_bytes", "fwd_datagrams", "fwd_bytes",
                 "dropped", "blackholed", "duplicated", "corrupted",
                 "oversize", "send_errors")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __getitem__(self, name: str) -> int:
        if name not in self.__slots__:
            raise KeyError(name)
        return getattr(self, name)

    def __repr__(self) -> str:
        return "DirectionStats(%s)" % ", ".join(
            "%s=%d" % kv for kv in self.as_dict().items())


def _resolve(addr, prefer_family: int) -> Tuple[int, tuple]:
    """(host, port[, ...]) -> (family, sockaddr); prefers prefer_family when a
    name resolves to both IPv4 and IPv6."""
    infos = socket.getaddrinfo(addr[0], addr[1], 0, socket.SOCK_DGRAM)
    if not infos:
        raise OSError("cannot resolve %r" % (addr,))
    for family, _, _, _, sockaddr in infos:
        if family == prefer_family:
            return family, sockaddr
    return infos[0][0], infos[0][4]


def _tune(sock: socket.socket) -> None:
    # Large buffers absorb benchmark bursts (and on macOS SO_SNDBUF also caps
    # the datagram size).  The OS may clamp or refuse: best effort only.
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUFSIZE)
        except OSError:
            pass
    sock.setblocking(False)


class ImpairProxy:
    """UDP proxy between clients and ``upstream_addr`` with per-direction
    impairments.  See the module docstring for semantics."""

    def __init__(self, upstream_addr, *, seed: int = 0,
                 listen_host: str = "127.0.0.1",
                 to_server: Optional[Impairment] = None,
                 to_client: Optional[Impairment] = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.to_server = to_server if to_server is not None else Impairment()
        self.to_client = to_client if to_client is not None else Impairment()
        self.blackhole = False          # True: drop everything, both directions
        self.max_clients = max_clients
        self.last_error: Optional[BaseException] = None  # last handler exception
        self.stats = {"to_server": DirectionStats(), "to_client": DirectionStats()}
        # String seeds are hashed with SHA-512 by random.Random, so this is
        # reproducible across processes and platforms (no hash randomisation).
        self._rng_s = random.Random("impair:%r:to_server" % (seed,))
        self._rng_c = random.Random("impair:%r:to_client" % (seed,))

        family, sockaddr = _resolve((listen_host, 0), socket.AF_INET)
        self._listen = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._listen.bind(sockaddr)
            _tune(self._listen)
            self._upstream = None  # (family, sockaddr, (family, bind_host))
            self.set_upstream(upstream_addr)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listen.close()
            raise
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, _LISTEN)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)

        # client addr -> (upstream socket, bind key); order = least recently used first
        self._clients: "OrderedDict[tuple, Tuple[socket.socket, tuple]]" = OrderedDict()
        self._heap: list = []           # (due, seq, sock, data, dest, stats)
        self._seq = itertools.count()   # heap tie-breaker: FIFO for equal due times
        self._buf = bytearray(RECV_BUFSIZE)
        self._mv = memoryview(self._buf)
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._closed = False
        self._lock = threading.Lock()   # guards start/close only

    # ------------------------------------------------------------ controls
    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) clients should send to."""
        return self._listen.getsockname()[:2]

    @property
    def upstream(self) -> tuple:
        return self._upstream[1]

    @property
    def client_count(self) -> int:
        """Number of per-client upstream sockets currently open."""
        return len(self._clients)

    def set_upstream(self, addr) -> None:
        """Send future datagrams to ``addr`` (e.g. server restarted on another
        port).  Existing per-client sockets are kept, so each client keeps
        its source address, unless the address family/scope changes."""
        family, sockaddr = _resolve(addr, self._listen.family)
        try:
            loop = ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback
        except ValueError:
            loop = False
        if family == socket.AF_INET6:
            bind_host = "::1" if loop else "::"
        else:
            bind_host = "127.0.0.1" if loop else "0.0.0.0"
        # One tuple assignment: the proxy thread sees old or new, never a mix.
        self._upstream = (family, sockaddr, (family, bind_host))

    def reset_stats(self) -> None:
        """Zero all counters (exact only while no traffic is flowing)."""
        for st in self.stats.values():
            st.reset()

    def start(self) -> "ImpairProxy":
        with self._lock:
            if self._closed:
                raise RuntimeError("proxy is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ImpairProxy-%d" % self.address[1],
                    daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (promptly, via the wake-up socket), join it and
        close every socket.  Datagrams still in the delay heap are discarded.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            thread = self._thread
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        for sock, _ in self._clients.values():
            sock.close()
        self._clients.clear()
        self._heap.clear()
        self._sel.close()
        self._listen.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "ImpairProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ proxy thread
    def _run(self) -> None:
        sel = self._sel
        heap = self._heap
        monotonic = time.monotonic
        while not self._closing:
            timeout = None                      # nothing pending: sleep until I/O
            if heap:
                timeout = heap[0][0] - monotonic()
                if timeout < 0:
                    timeout = 0
            for key, _ in sel.select(timeout):
                tag = key.data
                try:
                    if tag is _LISTEN:
                        self._on_listen()
                    elif tag is _WAKE:
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    else:
                        self._on_upstream(key.fileobj, tag)
                except Exception as exc:   # e.g. a drop_if hook raised
                    self.last_error = exc
            if heap:
                now = monotonic()
                while heap and heap[0][0] <= now:
                    _, _, sock, data, dest, st = heapq.heappop(heap)
                    self._send(sock, data, dest, st)

    def _on_listen(self) -> None:
        sock = self._listen
        buf = self._buf
        st = self.stats["to_server"]
        for _ in range(BATCH):   # bounded, so replies and timers are not starved
            try:
                n, caddr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ConnectionResetError on Windows after an ICMP port
                # unreachable, or a too-large datagram: skip it.
                continue
            up = self._upstream
            usock = self._upstream_sock(caddr, up)
            if usock is None:
                st.rx_datagrams += 1
                st.rx_bytes += n
                st.send_errors += 1
                continue
            self._process(self.to_server, self._rng_s, st, usock, n, up[1])

    def _on_upstream(self, sock: socket.socket, caddr: tuple) -> None:
        buf = self._buf
        st = self.stats["to_client"]
        for _ in range(BATCH):
            try:
                n, _src = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if sock.fileno() == -1:     # evicted and closed meanwhile
                    return
                continue
            # Replies from any source go back to this socket's client.
            self._process(self.to_client, self._rng_c, st, self._listen, n, caddr)

    def _upstream_sock(self, caddr: tuple, up: tuple) -> Optional[socket.socket]:
        clients = self._clients
        entry = clients.get(caddr)
        if entry is not None:
            if entry[1] == up[2]:
                clients.move_to_end(caddr)   # LRU: evict the least recently used
                return entry[0]
            self._evict(caddr)   # upstream family/scope changed: rebind
        while len(clients) >= self.max_clients:
            self._evict(next(iter(clients)))
        family, bind_host = up[2]
        for attempt in (0, 1):
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError:
                # Out of descriptors (macOS defaults to 256): free one, retry.
                if attempt or not clients:
                    return None
                self._evict(next(iter(clients)))
                continue
            try:
                # Bind explicitly: Windows rejects select/recv on an unbound
                # UDP socket, and binding to loopback avoids firewall prompts.
                sock.bind((bind_host, 0))
                _tune(sock)
                self._sel.register(sock, selectors.EVENT_READ, caddr)
            except OSError:
                sock.close()
                return None
            clients[caddr] = (sock, up[2])
            return sock
        return None

    def _evict(self, caddr: tuple) -> None:
        sock, _ = self._clients.pop(caddr)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()   # delayed datagrams still queued for it become send_errors

    def _process(self, imp: Impairment, rng: random.Random, st: DirectionStats,
                 sock: socket.socket, n: int, dest: tuple) -> None:
        """Apply ``imp`` to the datagram in self._buf[:n]; send it or queue it."""
        st.rx_datagrams += 1
        st.rx_bytes += n
        if self.blackhole:
            st.dropped += 1
            st.blackholed += 1
            return
        view = self._mv[:n]
        drop, dup, jitter, reorder, corrupt = (
            imp.drop, imp.duplicate, imp.jitter, imp.reorder, imp.corrupt)
        random_on = drop or dup or jitter or reorder or corrupt
        if not (random_on or imp.delay or imp.max_size is not None
                or imp.drop_if is not None):
            self._send(sock, view, dest, st)     # fast path: no copy at all
            return

        # Fixed number of draws, taken before any decision (see docstring).
        if random_on:
            r = rng.random
            u = (r(), r(), r(), r(), r(), r(), r())
        else:
            u = _NO_DRAWS
        u_drop, u_dup, u_corrupt, u_bit, u_jitter, u_reorder, u_jitter2 = u

        if imp.max_size is not None and n > imp.max_size:
            st.oversize += 1
            return
        data = view
        if imp.drop_if is not None:
            data = bytes(view)
            if imp.drop_if(data):
                st.dropped += 1
                return
        if u_drop < drop:
            st.dropped += 1
            return
        if u_corrupt < corrupt and n:
            data = bytearray(view)               # only copy we make to modify
            bit = min(int(u_bit * n * 8), n * 8 - 1)
            data[bit >> 3] ^= 1 << (bit & 7)
            st.corrupted += 1

        base = imp.delay
        delay = base + u_jitter * jitter
        if u_reorder < reorder:
            delay += imp.reorder_delay
        if u_dup < dup:
            st.duplicated += 1
            # The copy gets its own jitter so the two may arrive apart.
            delay2 = base + u_jitter2 * jitter
            if (delay > 0 or delay2 > 0) and isinstance(data, memoryview):
                data = data.tobytes()   # one copy shared by both
            self._emit(sock, data, dest, st, delay)
            self._emit(sock, data, dest, st, delay2)
        else:
            self._emit(sock, data, dest, st, delay)

    def _emit(self, sock, data, dest, st, delay: float) -> None:
        if delay <= 0:
            self._send(sock, data, dest, st)
            return
        if isinstance(data, memoryview):
            data = data.tobytes()   # must outlive the shared receive buffer
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq),
                                    sock, data, dest, st))

    @staticmethod
    def _send(sock, data, dest, st: DirectionStats) -> None:
        try:
            sock.sendto(data, dest)
        except OSError:
            # Closed port / closed socket / full buffer: the datagram is lost,
            # as it would be on a real network.  Never kill the thread.
            st.send_errors += 1
            return
        st.fwd_datagrams += 1
        st.fwd_bytes += len(data)
