"""The retransmission timer's estimator (RFC 6298): a smoothed round trip and its variance give
the RTO, doubled on each expiry and held within a minimum and a maximum.

Relies on: nothing. Must not know: what is timed (a request, a DATA) or what a timeout does.
"""


class RttEstimator:
    """Smoothed RTT and variance -> RTO, doubled on each expiry, held within [min, max]."""

    G = 0.001  # clock granularity term of RFC 6298 2.3

    def __init__(self, initial, minimum, maximum, srtt=None, rttvar=None):
        self.min, self.max = minimum, maximum
        self.srtt, self.rttvar = srtt, rttvar
        self.rto = self._clamp(initial if srtt is None else srtt + max(self.G, 4 * rttvar))

    def _clamp(self, value):
        return min(max(value, self.min), self.max)

    def sample(self, r):
        # Three of these run per ACK on the server (transfer, path, queue): written out, without
        # calls, for speed.
        srtt = self.srtt
        if srtt is None:                            # RFC 6298 2.2
            srtt, rttvar = r, r / 2
        else:                                       # RFC 6298 2.3
            d = srtt - r
            rttvar = 0.75 * self.rttvar + 0.25 * (d if d >= 0 else -d)
            srtt = 0.875 * srtt + 0.125 * r
        self.srtt, self.rttvar = srtt, rttvar
        k = 4 * rttvar
        rto = srtt + (k if k > self.G else self.G)
        self.rto = self.min if rto < self.min else (self.max if rto > self.max else rto)

    def backoff(self):                              # RFC 6298 5.5
        self.rto = min(self.rto * 2, self.max)
