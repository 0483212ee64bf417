"""The bookkeeping behind the server's limits (PROTOCOL.md "Hostile input"): who a fair
share belongs to (client_of: an IPv4 address, or an IPv6 /64), entries counted per client with
the heaviest found in O(1) (IpCounts), how much a transfer advanced lately (Pace), and a token
bucket for replies to strangers.

Relies on: nothing. Must not know: transfers, the wire format, sockets or the clock (`now`
comes in).
"""

import functools


class TokenBucket:
    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, None

    def take(self, now):
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@functools.lru_cache(maxsize=4096)
def _client_of_host(host):
    if ":" not in host:
        return host
    import ipaddress
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def client_of(addr):
    """Who a fair share belongs to: the IPv4 address, or the IPv6 /64 (a host, or a site, is
    usually given a whole /64, so one IPv6 client can send from 2**64 addresses)."""
    return _client_of_host(addr[0])


class IpCounts:
    """Entries (transfers, by their key) grouped by client (client_of: IP, or IPv6 /64), oldest
    first, with the client that holds the most found in O(1): groups[k] holds the clients with
    at least k entries, in the order they got there (so only the top group can empty when an
    entry goes). Every operation is O(1)."""

    def __init__(self):
        self.by_ip = {}        # ip -> {entry: None}, oldest first
        self.groups = [{}]     # groups[k]: {ip: None} of IPs holding >= k entries (k >= 1)
        self.size = 0

    def held(self, ip):
        entries = self.by_ip.get(ip)
        return len(entries) if entries else 0

    def most(self):
        """How many entries the IP holding the most has (0 when empty)."""
        return len(self.groups) - 1

    def heaviest(self):
        """The IP holding the most entries (of those, the first to get there), or None."""
        return next(iter(self.groups[-1])) if self.size else None

    def add(self, entry, ip):
        entries = self.by_ip.setdefault(ip, {})
        entries[entry] = None
        k = len(entries)
        if k == len(self.groups):
            self.groups.append({})
        self.groups[k][ip] = None
        self.size += 1

    def discard(self, entry, ip):
        entries = self.by_ip.get(ip)
        if entries is None or entry not in entries:
            return
        del self.groups[len(entries)][ip]
        del entries[entry]
        if not entries:
            del self.by_ip[ip]
        if len(self.groups) > 1 and not self.groups[-1]:
            self.groups.pop()
        self.size -= 1

    def oldest_of_heaviest(self):
        """The oldest entry of the IP that holds the most: who is dropped from a full pool."""
        return next(iter(self.by_ip[self.heaviest()]))

    def clear(self):
        self.__init__()


class Pace:
    """How much an active transfer advanced lately: datagrams acknowledged in the last complete
    window of slow_window seconds (None until one window has passed), and when it last moved."""

    __slots__ = ("start", "acks", "pos", "last_acks", "advanced")

    def __init__(self, t, now):
        self.start = self.advanced = now
        self.acks = 0
        self.pos = t.pos
        self.last_acks = None

    def update(self, t, now, window):
        if t.pos != self.pos:
            self.pos, self.advanced = t.pos, now
            self.acks += 1
        if now - self.start >= window:
            self.last_acks, self.acks, self.start = self.acks, 0, now
