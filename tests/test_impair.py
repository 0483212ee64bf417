"""Tests for tests/impair.py: an echo server behind the proxy, plain client
sockets with timeouts, every wait bounded.  Run from the repo root:

    python3 -m unittest tests.test_impair -v
"""

import socket
import threading
import time
import unittest

from tests import support
from tests.support import wait_for
from tests.impair import ImpairProxy, Impairment

RECV_TIMEOUT = 1.0      # when a datagram is expected
SILENCE_TIMEOUT = 0.15  # when proving that nothing arrives


class EchoServer:
    """UDP echo server on an ephemeral port; records (data, source addr)."""

    def __init__(self, host="127.0.0.1", family=socket.AF_INET):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            # macOS caps a UDP datagram at SO_SNDBUF (9216 by default).
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.02)   # bounds how long stop() waits
        self.address = self.sock.getsockname()[:2]
        self.received = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                if self._stop:
                    return
                continue
            self.received.append((data, addr))
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def stop(self):
        self._stop = True
        self._thread.join(timeout=1.0)
        self.sock.close()


class ProxyTestCase(unittest.TestCase):
    def setUp(self):
        self.echo = EchoServer()
        self.addCleanup(self.echo.stop)
        self._sockets = []

    def make_proxy(self, **kwargs):
        proxy = ImpairProxy(self.echo.address, **kwargs).start()
        self.addCleanup(proxy.close)
        return proxy

    def client(self, family=socket.AF_INET, host="127.0.0.1"):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.settimeout(RECV_TIMEOUT)
        self.addCleanup(sock.close)
        return sock

    def recv_all(self, sock, count, timeout=RECV_TIMEOUT):
        """Receive up to count datagrams; stop early after a quiet timeout."""
        out = []
        sock.settimeout(timeout)
        try:
            while len(out) < count:
                out.append(sock.recv(65536))
        except socket.timeout:
            pass
        return out

    def assert_silent(self, sock):
        sock.settimeout(SILENCE_TIMEOUT)
        with self.assertRaises(socket.timeout):
            sock.recv(65536)


class TestPassThrough(ProxyTestCase):
    def test_both_ways(self):
        proxy = self.make_proxy()
        c = self.client()
        c.sendto(b"hello", proxy.address)
        self.assertEqual(c.recv(65536), b"hello")
        s, r = proxy.stats["to_server"], proxy.stats["to_client"]
        self.assertTrue(wait_for(lambda: r.fwd_datagrams == 1))
        self.assertEqual((s.rx_datagrams, s.rx_bytes, s.fwd_datagrams, s.fwd_bytes),
                         (1, 5, 1, 5))
        self.assertEqual((r.rx_datagrams, r.fwd_bytes), (1, 5))
        self.assertEqual(s["dropped"], 0)
        self.assertEqual(s.as_dict()["fwd_datagrams"], 1)
        # The echo server sees the proxy's upstream socket, not the client.
        self.assertNotEqual(self.echo.received[0][1], c.getsockname())

    def test_large_datagram(self):
        proxy = self.make_proxy()
        c = self.client()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # macOS
        payload = bytes(range(256)) * 250        # 64000 bytes
        c.sendto(payload, proxy.address)
        self.assertEqual(c.recv(65536), payload)

    def test_per_client_upstream_sockets(self):
        proxy = self.make_proxy()
        a, b = self.client(), self.client()
        for _ in range(2):   # second round reuses the same upstream sockets
            a.sendto(b"from-a", proxy.address)
            b.sendto(b"from-b", proxy.address)
            self.assertEqual(a.recv(65536), b"from-a")
            self.assertEqual(b.recv(65536), b"from-b")
        sources = {}
        for data, addr in self.echo.received:
            sources.setdefault(data, set()).add(addr)
        self.assertEqual(len(sources[b"from-a"]), 1)
        self.assertEqual(len(sources[b"from-b"]), 1)
        self.assertNotEqual(sources[b"from-a"], sources[b"from-b"])
        self.assertEqual(proxy.client_count, 2)

    def test_client_limit_evicts_oldest(self):
        proxy = self.make_proxy(max_clients=2)
        socks = [self.client() for _ in range(3)]
        for i, sock in enumerate(socks):
            sock.sendto(b"%d" % i, proxy.address)
            self.assertEqual(sock.recv(65536), b"%d" % i)
        self.assertEqual(proxy.client_count, 2)
        # Client 0 was evicted: it gets a new upstream socket (new source).
        socks[0].sendto(b"again", proxy.address)
        self.assertEqual(socks[0].recv(65536), b"again")
        srcs = [addr for data, addr in self.echo.received if data in (b"0", b"again")]
        self.assertNotEqual(srcs[0], srcs[1])


class TestImpairments(ProxyTestCase):
    def test_drop_all(self):
        proxy = self.make_proxy(to_server=Impairment(drop=1.0))
        c = self.client()
        for i in range(10):
            c.sendto(b"x%d" % i, proxy.address)
        st = proxy.stats["to_server"]
        self.assertTrue(wait_for(lambda: st.rx_datagrams == 10))
        self.assert_silent(c)
        self.assertEqual((st.dropped, st.fwd_datagrams), (10, 0))
        self.assertEqual(self.echo.received, [])

    def _drop_pattern(self, seed, count=40):
        echo = EchoServer()
        try:
            with ImpairProxy(echo.address, seed=seed,
                             to_server=Impairment(drop=0.5)) as proxy:
                c = self.client()
                for i in range(count):
                    c.sendto(b"%d" % i, proxy.address)
                st = proxy.stats["to_server"]
                self.assertTrue(wait_for(lambda: st.rx_datagrams == count))
                delivered = count - st.dropped
                self.assertTrue(wait_for(lambda: len(echo.received) == delivered))
                return sorted(int(d) for d, _ in echo.received)
        finally:
            echo.stop()

    def test_seeded_drop_is_reproducible(self):
        first = self._drop_pattern(seed=42)
        second = self._drop_pattern(seed=42)
        self.assertEqual(first, second)
        self.assertTrue(5 < len(first) < 35, first)   # really ~50 %
        self.assertNotEqual(first, self._drop_pattern(seed=43))

    def test_drop_pattern_independent_of_other_settings(self):
        def pattern(**extra):
            proxy = ImpairProxy(("127.0.0.1", 9), seed=7,
                                to_server=Impairment(drop=0.5, **extra))
            self.addCleanup(proxy.close)
            dropped = []
            for i in range(50):   # drive the decision path directly, no I/O
                before = proxy.stats["to_server"].dropped
                proxy._buf[:2] = b"%02d" % i
                proxy._process(proxy.to_server, proxy._rng_s,
                               proxy.stats["to_server"], proxy._listen, 2,
                               proxy._listen.getsockname())
                if proxy.stats["to_server"].dropped != before:
                    dropped.append(i)
            return dropped
        self.assertEqual(pattern(), pattern(duplicate=0.3, corrupt=0.2))

    def test_duplicate_all(self):
        proxy = self.make_proxy(to_server=Impairment(duplicate=1.0))
        c = self.client()
        c.sendto(b"twice", proxy.address)
        self.assertEqual(self.recv_all(c, 3, timeout=SILENCE_TIMEOUT),
                         [b"twice", b"twice"])
        st = proxy.stats["to_server"]
        self.assertEqual((st.rx_datagrams, st.duplicated, st.fwd_datagrams), (1, 1, 2))

    def test_corrupt_flips_exactly_one_bit(self):
        proxy = self.make_proxy(to_server=Impairment(corrupt=1.0))
        c = self.client()
        payload = bytes(64)
        positions = set()
        for _ in range(20):
            c.sendto(payload, proxy.address)
            got = c.recv(65536)
            self.assertEqual(len(got), len(payload))
            diff = int.from_bytes(got, "big") ^ int.from_bytes(payload, "big")
            self.assertEqual(bin(diff).count("1"), 1)
            positions.add(diff.bit_length())
        self.assertGreater(len(positions), 1)   # random position, not fixed
        self.assertEqual(proxy.stats["to_server"].corrupted, 20)

    def test_max_size(self):
        proxy = self.make_proxy(to_server=Impairment(max_size=100))
        c = self.client()
        c.sendto(b"a" * 101, proxy.address)
        c.sendto(b"b" * 100, proxy.address)
        self.assertEqual(self.recv_all(c, 2, timeout=SILENCE_TIMEOUT), [b"b" * 100])
        st = proxy.stats["to_server"]
        self.assertEqual((st.oversize, st.dropped, st.fwd_datagrams), (1, 0, 1))

    def test_drop_if_hook(self):
        seen = []

        def third(data):
            seen.append(data)
            return len(seen) == 3
        proxy = self.make_proxy(to_server=Impairment(drop_if=third))
        c = self.client()
        for i in range(5):
            c.sendto(b"%d" % i, proxy.address)
        self.assertEqual(self.recv_all(c, 5, timeout=SILENCE_TIMEOUT),
                         [b"0", b"1", b"3", b"4"])
        self.assertEqual(proxy.stats["to_server"].dropped, 1)

    def test_delay(self):
        proxy = self.make_proxy(to_server=Impairment(delay=0.05),
                                to_client=Impairment(delay=0.05))
        c = self.client()
        for i in range(3):   # fixed delay keeps FIFO order
            c.sendto(b"%d" % i, proxy.address)
        t0 = time.monotonic()
        got = self.recv_all(c, 3)
        self.assertGreaterEqual(time.monotonic() - t0, 0.1 - 0.002)
        self.assertEqual(got, [b"0", b"1", b"2"])

    def _burst(self, proxy, count=40):
        c = self.client()
        for i in range(count):
            c.sendto(b"%d" % i, proxy.address)
        return [int(d) for d in self.recv_all(c, count)]

    def test_jitter_reorders(self):
        proxy = self.make_proxy(seed=1, to_server=Impairment(jitter=0.05))
        got = self._burst(proxy)
        self.assertEqual(sorted(got), list(range(40)))
        self.assertNotEqual(got, list(range(40)))

    def test_reorder_reorders(self):
        # reorder_delay well above the burst's send time keeps this robust.
        proxy = self.make_proxy(seed=1, to_server=Impairment(
            reorder=0.3, reorder_delay=0.05))
        got = self._burst(proxy)
        self.assertEqual(sorted(got), list(range(40)))
        self.assertNotEqual(got, list(range(40)))

    def test_counter_invariant_mixed(self):
        imp = Impairment(drop=0.3, duplicate=0.3, corrupt=0.3, jitter=0.01,
                         max_size=150)
        proxy = self.make_proxy(seed=5, to_server=imp)
        c = self.client()
        for i in range(60):
            c.sendto(bytes(100 + i), proxy.address)   # 100..159 bytes
        st = proxy.stats["to_server"]
        self.assertTrue(wait_for(lambda: st.rx_datagrams == 60
                                 and len(self.echo.received) == st.fwd_datagrams
                                 and not proxy._heap))
        self.assertEqual(st.oversize, 9)
        self.assertTrue(st.dropped and st.duplicated and st.corrupted, st)
        self.assertEqual(st.rx_datagrams, st.fwd_datagrams + st.send_errors
                         - st.duplicated + st.dropped + st.oversize)

    def test_runtime_mutation(self):
        proxy = self.make_proxy()
        c = self.client()
        proxy.to_server.drop = 1.0
        c.sendto(b"lost", proxy.address)
        self.assert_silent(c)
        proxy.to_server = Impairment()
        c.sendto(b"ok", proxy.address)
        self.assertEqual(c.recv(65536), b"ok")

    def test_invalid_probability(self):
        with self.assertRaises(ValueError):
            Impairment(drop=1.5)


class TestControls(ProxyTestCase):
    def test_blackhole(self):
        proxy = self.make_proxy()
        c = self.client()
        proxy.blackhole = True
        c.sendto(b"outage", proxy.address)
        self.assert_silent(c)
        self.assertEqual(self.echo.received, [])
        proxy.blackhole = False
        c.sendto(b"back", proxy.address)
        self.assertEqual(c.recv(65536), b"back")
        st = proxy.stats["to_server"]
        self.assertEqual((st.blackholed, st.dropped, st.fwd_datagrams), (1, 1, 1))

    def test_blackhole_drops_replies_too(self):
        # The request sits 50 ms in the delay heap; the blackhole starts while
        # it is in flight, so it still reaches the server but the reply is lost.
        proxy = self.make_proxy(to_server=Impairment(delay=0.05))
        c = self.client()
        c.sendto(b"x", proxy.address)
        self.assertTrue(wait_for(lambda: proxy.stats["to_server"].rx_datagrams == 1))
        proxy.blackhole = True
        self.assertTrue(wait_for(lambda: proxy.stats["to_client"].blackholed == 1))
        self.assert_silent(c)
        self.assertEqual(len(self.echo.received), 1)

    def test_set_upstream(self):
        proxy = self.make_proxy()
        c = self.client()
        c.sendto(b"one", proxy.address)
        self.assertEqual(c.recv(65536), b"one")
        other = EchoServer()
        self.addCleanup(other.stop)
        proxy.set_upstream(other.address)
        self.assertEqual(proxy.upstream[:2], other.address)
        c.sendto(b"two", proxy.address)
        self.assertEqual(c.recv(65536), b"two")
        self.assertEqual([d for d, _ in self.echo.received], [b"one"])
        self.assertEqual([d for d, _ in other.received], [b"two"])
        # Same upstream socket, so the server sees the same client address.
        self.assertEqual(self.echo.received[0][1], other.received[0][1])

    def test_closed_upstream_port_does_not_kill_thread(self):
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        dead_addr = dead.getsockname()
        dead.close()
        proxy = self.make_proxy()
        proxy.set_upstream(dead_addr)
        c = self.client()
        for _ in range(3):
            c.sendto(b"void", proxy.address)
        self.assert_silent(c)
        proxy.set_upstream(self.echo.address)   # thread survived ICMP errors
        c.sendto(b"alive", proxy.address)
        self.assertEqual(c.recv(65536), b"alive")
        self.assertIsNone(proxy.last_error)

    def test_reset_stats(self):
        proxy = self.make_proxy()
        c = self.client()
        c.sendto(b"x", proxy.address)
        c.recv(65536)
        self.assertTrue(wait_for(lambda: proxy.stats["to_client"].fwd_datagrams == 1))
        proxy.reset_stats()
        self.assertTrue(all(v == 0 for v in proxy.stats["to_server"].as_dict().values()))
        self.assertTrue(all(v == 0 for v in proxy.stats["to_client"].as_dict().values()))

    def test_close_stops_thread_and_sockets(self):
        before = set(threading.enumerate())
        proxy = ImpairProxy(self.echo.address,
                            to_server=Impairment(delay=10.0))  # long heap timeout
        with proxy:
            c = self.client()
            c.sendto(b"pending", proxy.address)
            self.assertTrue(wait_for(lambda: proxy.stats["to_server"].rx_datagrams == 1))
            thread = proxy._thread
            self.assertTrue(thread.is_alive())
            t0 = time.monotonic()
        self.assertLess(time.monotonic() - t0, 0.5)
        self.assertFalse(thread.is_alive())
        self.assertEqual(set(threading.enumerate()) - before, set())
        self.assertEqual(proxy._listen.fileno(), -1)
        self.assertEqual(proxy.client_count, 0)
        proxy.close()   # idempotent
        with self.assertRaises(RuntimeError):
            proxy.start()

    def test_close_without_start(self):
        proxy = ImpairProxy(self.echo.address)
        proxy.close()
        self.assertEqual(proxy._listen.fileno(), -1)




@unittest.skipUnless(support.ipv6_loopback(), "no IPv6 loopback")
class TestIPv6(ProxyTestCase):
    def test_ipv6_round_trip(self):
        echo6 = EchoServer("::1", socket.AF_INET6)
        self.addCleanup(echo6.stop)
        proxy = ImpairProxy(echo6.address, listen_host="::1").start()
        self.addCleanup(proxy.close)
        self.assertEqual(proxy.address[0], "::1")
        c = self.client(socket.AF_INET6, "::1")
        c.sendto(b"v6", proxy.address)
        self.assertEqual(c.recv(65536), b"v6")


if __name__ == "__main__":
    unittest.main()
