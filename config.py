"""Defaults for server.py and client.py: data only, no side effects at import.

Every tunable lives here once, with the reason for its value. The command lines override the
common ones; tests build `ServerSettings` / `ClientSettings` with their own values.
Limits that are part of the wire format itself (datagram size, error length) live in
udpxfer/wire.py.
"""

import os
from typing import NamedTuple

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))

# --- Where things are (relative paths on the command line are relative to the current folder;
#     these defaults are anchored to the project folder so the scripts work from anywhere).
HOST = "127.0.0.1"          # loopback by default; "0.0.0.0" or "::" to serve other machines
PORT = 12345
FILES_DIR = os.path.join(PROJECT_DIR, "files")
FILE_LIST = os.path.join(PROJECT_DIR, "file_list.txt")
INPUT_FILE = os.path.join(PROJECT_DIR, "input.txt")
DOWNLOADS_DIR = os.path.join(PROJECT_DIR, "downloads")

MiB = 1024 * 1024


class ServerSettings(NamedTuple):
    # Largest DATA datagram (header + payload). 65507 is the IPv4 UDP maximum: on loopback and on
    # paths that pass IP fragments, big datagrams are what makes stop-and-wait fast.
    datagram_size: int = 65507
    # After repeated losses of the same big datagram the server falls back to this size, which
    # fits the IPv6 minimum MTU (1280 - 40 - 8), so it crosses any path that drops fragments.
    safe_datagram_size: int = 1232
    # Consecutive timeouts of one big DATA before shrinking to the safe size (3: two in a row
    # happen often enough on a merely lossy path).
    shrink_after: int = 3
    # After shrinking, try a big datagram again after this many good small ones; doubled after
    # each failed probe (like PLPMTUD, RFC 8899), so a fragment-dropping path costs little.
    probe_after: int = 32
    probe_after_max: int = 8192

    # Datagram size for the path (Path in udpxfer/netpath.py): the size from a ladder of
    # whole-fragment sizes that moves the most bytes per second given the estimated per-packet
    # loss rate.
    # The cost of one datagram to both ends (system calls, parsing) and of one byte (the CRC
    # and copies), measured on a 2-core development machine; only their ratio to the loss
    # detection delay matters, so they need not be exact.
    datagram_cost: float = 40e-6
    byte_cost: float = 2e-9
    # The loss estimate starts as if this many fragments had crossed without loss (so one
    # spurious timeout on loopback does not shrink datagrams), and forgets old events by this
    # factor per fragment sent (about 2,000 fragments of memory: 45 big datagrams, or 2,000
    # small ones).
    loss_prior: int = 2000
    loss_decay: float = 0.9995
    # Above this estimated per-packet loss, datagrams of at most lossy_max_fragments are sent
    # (see Path in udpxfer/netpath.py: lost fragments fill the receiver's reassembly buffer).
    # Two losses in the prior's worth of fragments cross it; a spurious timeout, once
    # recognised, does not.
    fragment_loss_limit: float = 0.0008
    # On such a path, datagrams of at most this many fragments (each loss leaves the others in the
    # receiver's reassembly buffer), at most heavy_loss_fragments above an estimated loss of
    # heavy_loss, and none fragmented for a while once most of them are lost: the buffer is full
    # (Linux frees it after ipfrag_time, 30 s), or a queue overflowed (over at once). So first
    # unfragmented_first seconds, twice as long each time it comes again, up to reassembly_backoff.
    # (A flat 30 s turned one burst of congestion at the start of a 64 MiB download, 200 Mbit/s and
    # 50 ms, into 47 s of 1472-byte datagrams.) On the MTU-1500 path, 1% loss, 32 MiB: three
    # fragments 103 MB/s against two's 81, four 0.303 s against three's 0.341 (pairwise 1.17); at 5%
    # loss, 16 MiB: three 60 MB/s against two's 51, four 0.317 s against three's 0.308 (more of them
    # lost). The estimate reads 1.3% to 1.7% at 1% loss each way (a lost ACK counts), 4% to 11% at
    # 5%.
    lossy_max_fragments: int = 4
    heavy_loss: float = 0.03
    heavy_loss_fragments: int = 3
    reassembly_backoff: float = 30.0
    unfragmented_first: float = 1.0
    # On a path whose round trip is wan_rtt or more (a WAN: its bottleneck is likely shared,
    # and a queue that overflows loses one fragment of many datagrams at once), datagrams carry
    # at most start_fragments (8: 11,832 bytes on Ethernet, 10,600 a second at 1 Gbit/s);
    # losses in a burst (over wan_burst_loss of the recent fragmented datagrams) halve them,
    # once a round trip, and they double back after grow_after acknowledged at their first try,
    # up to wan_max_fragments. (Growing from 4 to 16 during startup multiplied what the client's
    # lanes had in flight fourfold within a round trip, and overflowed the queue.) A LAN starts
    # at the largest, as before.
    wan_rtt: float = 0.005
    start_fragments: int = 8
    grow_after: int = 32
    wan_max_fragments: int = 8
    wan_burst_loss: float = 0.15
    # More fragments spend that buffer faster per byte (three: two orphans per loss, a third
    # more bytes per datagram than two), and once it is full only unfragmented datagrams pass.
    # So k fragments only while the orphans the server caused in the last reassembly_backoff
    # (Path.orphans in udpxfer/netpath.py), plus those k - 1 would leave for the rest of the
    # client's downloads, stay within this budget; then fewer (two at the least on a LAN; on a
    # long path none fragmented once the orphans counted pass it). Linux over veth here
    # (/proc/net/sockstat, FRAG, in the client's namespace): 2.4 to 2.5 KB per orphan
    # counted, 4 MB full at about 1,600 (after two downloads of 64 MiB at 1% loss, 200 Mbit/s
    # and 50 ms, 30 s apart, when the budget was 1,400 and the floor two fragments, the buffer
    # was full and the third download lost every fragmented datagram: 21 s instead of 4).
    # 1,100 (2.6 to 2.9 MB measured) leave a quarter for other traffic and the estimate's
    # error. At 1% loss a 32 MiB download orphans about 500 with three fragments and 750 with
    # four.
    orphan_budget: int = 1100
    # (What the IP's downloads still need, for that, is counted again at most this often.)
    to_come_every: float = 0.02
    # Early retransmission (PROTOCOL.md, RFC 9002 6.1.2): a DATA overtaken by an acknowledged
    # later one is lost once reorder_factor round trips have passed since it was sent, and at
    # least reorder_min (QUIC's timer granularity: a busy client may answer out of order), and
    # reorder_min (or the smoothed RTT, if shorter) after the evidence at the soonest (a client
    # answers a backlog in any order).
    reorder_factor: float = 9 / 8
    reorder_min: float = 0.001
    # An early resend that proves needless (the client acknowledges both copies) doubles the
    # window, up to this factor; it returns to 1 only after this many early resends without a
    # needless one (RFC 8985 6.2 adapts its reordering window the same way, and keeps it for 16
    # loss recoveries). Counting clean DATAs instead narrowed it every 60 ms on loopback, where
    # nothing is lost, and the next burst of out-of-order answers found it narrow again.
    # Widened, the window is at most one round trip, or reorder_wide_min if longer, beyond the
    # 9/8 (SendOrder.loss_threshold); it widens once a round trip at most.
    reorder_mult_max: int = 16
    reorder_persist: int = 16
    reorder_wide_min: float = 0.005

    # Retransmission timer, RFC 6298, with two deliberate departures: a 2 ms floor instead of
    # 1 s, and a smaller first RTO. With one datagram in flight a spurious retransmission costs
    # one datagram, while a 1 s floor is exactly what makes TFTP tools crawl on lossy links; on
    # slower paths the RTO follows the measured RTT and the floor never applies. (2 ms is twice
    # the 1 ms resolution of poll(); 5 ms halved the speed at 5% loss on loopback.)
    rto_initial: float = 0.25
    rto_min: float = 0.002
    rto_max: float = 2.0
    # On a lane, never under this many smoothed round trips: a version 3 client paces its lanes
    # by holding ACKs back, longer when it slows down (by a third when it drains a queue), and
    # the RTT variance of a steady path would not cover that. (Losses on lanes are mostly found
    # by evidence from the others, not by the timer.)
    lane_rto_factor: float = 1.5
    # A client that acknowledges nothing for this long is given up and its slot freed: about
    # when the client gives up itself (ClientSettings.idle_timeout, 5 s: it then asks again on
    # a new socket, so the old transfer is of no use to anyone).
    client_silence: float = 5.0
    # And in any case after this many timeouts of one datagram (early retransmissions, evidence
    # of a loss and not of silence, do not count). Alone, that would be 21.75 s of silence from
    # the first RTO (0.25 + 0.5 + 1 + 10 x 2 s) and about 8 s after a loopback RTT (2 ms
    # doubled up to 2 s); with client_silence it only bounds the datagrams sent on paths whose
    # RTO is short.
    max_retransmits: int = 12

    # Pools (PROTOCOL.md "Hostile input"). An active transfer holds no payload of its own (a
    # sent one is let go and read again if it must be resent) and shares the open file with the
    # other transfers of that file: about 3 KB each, so 2,048 of them stay within 10 MB. A
    # client on a long fat path runs hundreds of lanes (200 Mbit/s and 50 ms: over 200 of
    # 6 KB datagrams); when slots are scarce each IP keeps its fair share.
    max_transfers: int = 2048
    # The next chunk of a transfer is read ahead (while its client handles this one: two
    # cores) into buffers of a pool that holds at most this many bytes, shared by all
    # transfers: memory for payloads is bounded in bytes, not per transfer.
    read_ahead_bytes: int = 8 * 1024 * 1024
    # Requests whose SIZE is not yet acknowledged: small entries, no file opened, oldest evicted.
    # From a stranger: in this pool; from a client socket that has transfers running, or had
    # until validated_seconds ago (its other lanes): in a pool of their own, at most the IP's
    # fair share (a client opens many lanes at once on a long path). Short, since a closed
    # socket's port may soon be another's.
    max_pending: int = 96            # smaller than max_transfers (PROTOCOL.md)
    validated_seconds: float = 3.0
    # IPs that completed a transfer keep this share of the pending pool: requests from other
    # addresses (a flood, perhaps from forged ones) can never evict them from it.
    pending_reserved: float = 0.25
    # Client IPs remembered as having completed a transfer (for pending_reserved).
    known_max: int = 1024

    # Fairness between client IPs (an IPv6 client is its /64; PROTOCOL.md "Hostile input").
    # When slots are scarce (no more free than IPs refused one that still wait: none free when
    # nobody waits), an IP gets at most max_transfers // (IPs holding or waiting for one):
    # beyond that, BUSY for another.
    # An IP refused a slot while holding none counts as waiting this long (the client tries
    # again within ClientSettings.retry_max, 5 s).
    busy_wait_seconds: float = 10.0
    # A transfer that acknowledged fewer than slow_acks datagrams in its last slow_window
    # seconds (fewer than 2 a second: ACKs held back until just before each timeout, or a
    # round trip over half a second) gives its slot up to a waiting client of another IP.
    # A transfer younger than slow_window is never judged, so slow ones take turns of at least
    # that long.
    slow_window: float = 5.0
    slow_acks: int = 10

    # Everything sent to an address that never acknowledges SIZE, retransmissions included:
    # at most this many bytes; by timer, at most amplification_factor times what it sent or
    # two SIZEs, whichever is more (a spoofed source must not turn the server into an
    # amplifier; RFC 9000 8.1 uses 3 for QUIC).
    pending_byte_budget: int = 256
    amplification_factor: int = 3
    # A request whose SIZE is not acknowledged is forgotten after this many timer expiries
    # (about 3.75 s with the RTOs above), so it is also sent at most this many times by timer,
    # but not before pending_keep seconds: the RTO comes from the round trips of the client's
    # IP, and a new client there (another host behind the same NAT, a path that changed) may
    # be far slower than the one measured. With a loopback RTO the expiries alone took 30 ms,
    # and a client 40 ms away could never start (found by a clean-room client).
    pending_max_sends: int = 4
    pending_keep: float = 3.75

    # Replies to strangers (malformed datagrams, ACKs of unknown transfers, refused requests):
    # at most one per datagram, at most amplification_factor times its size, and this many
    # per second.
    error_rate: float = 100.0
    error_burst: float = 100.0

    # Finished transfers are remembered this long so late copies of their datagrams are ignored.
    recent_seconds: float = 3.0
    recent_max: int = 1024
    # Smoothed RTTs remembered per client IP, to start a new transfer with a realistic RTO.
    rtt_cache_max: int = 1024

    # Folder rescans: on LIST (at most this often), and to keep file_list.txt fresh: when the
    # folder's mtime changed (checked this often; a scan of thousands of files stalls the
    # loop for tens of milliseconds), and in any case at the full interval.
    list_rescan_interval: float = 1.0
    scan_interval: float = 2.0
    full_scan_interval: float = 30.0


class ClientSettings(NamedTuple):
    # Lanes (PROTOCOL.md "Lanes"): transfers over the client's one socket, each carrying one
    # datagram per round trip. parts (--parts N): N at once, fixed and unpaced; 0: automatic
    # (udpxfer/lanes.py: enough for the path's bandwidth-delay product, as BBR sizes its
    # window, in bytes counted in lanes of the server's datagram size). Automatic starts with
    # lanes_start; never fewer than lanes_min (on loopback 4 lanes keep both cores busy, and a
    # lossy path needs other lanes' ACKs to reveal a loss), never more than lanes_max (200
    # Mbit/s and 50 ms take about 80 lanes of 11,832 bytes at cwnd_gain 1.5, and hundreds
    # where losses make the datagrams small).
    parts: int = 0
    lanes_start: int = 4
    lanes_min: int = 4
    lanes_max: int = 1024
    # Beside the window's lanes, others may be asking (a lane brings nothing for two round
    # trips) or ending: at most the window again, and this many more.
    lanes_extra: int = 8
    # The controller's model (udpxfer/lanes.py, after BBR): the bottleneck rate is the most
    # delivered in one of the last bw_rounds round trips (none shorter than round_min; a round's
    # bytes over the longer of the time they took to come and the time their ACKs took to go);
    # the path's round trip the least seen in min_rtt_seconds. Startup paces at startup_gain
    # times the rate with a window of startup_cwnd_gain times the bandwidth-delay product, at
    # most doubling each round, and opens startup_lanes times the window's lanes (a new lane
    # brings data only after two round trips); it ends when the rate stops growing by 25% for
    # full_rounds rounds, or when the least round trip of two updates in a row (a quarter round
    # trip apart, each with queue_samples samples) is over queue_factor times the path's plus
    # queue_margin (a queue); from careful_factor and careful_margin on (a queue forming) it
    # paces at careful_gain only: what was sent in the last round trip is still on its way, and
    # a 1,000-packet queue (1.2 bandwidth-delay products at 200 Mbit/s and 50 ms) overflowed at
    # twice the rate. Drain paces at drain_gain until the round trip is back to the path's
    # (careful_factor), or for drain_rounds_max rounds (harder, the held ACKs outlived the
    # server's timer). Then cwnd_gain, and a pace cycling 1.25, 0.75 and 1. No pace below
    # pacing_min_rtt (loopback, a LAN: there the lanes double while the rate grows, up to
    # lan_lanes_max, and stay at what last made it grow). A datagram is taken to carry
    # lanes_datagram_guess bytes until one has been seen, then the mean of the whole ones (not
    # a range's last) of a round that had at least size_samples (at once, a quarter of a round
    # trip, when they grew).
    bw_rounds: int = 10
    round_min: float = 0.005
    min_rtt_seconds: float = 10.0
    startup_gain: float = 2.5
    startup_cwnd_gain: float = 2.0
    startup_lanes: float = 2.0
    full_rounds: int = 5
    # (One lost datagram's late answer is not a queue: at 1% loss per packet a datagram of
    # eight fragments, or its ACK, is lost 9% of the time.)
    queue_samples: int = 4
    careful_gain: float = 1.25
    careful_factor: float = 1.05
    careful_margin: float = 0.0005
    queue_factor: float = 1.125
    queue_margin: float = 0.002
    drain_gain: float = 0.75
    drain_rounds_max: int = 8
    cwnd_gain: float = 1.5
    # A lane whose DATA has not come flight_limit_min after twice the path's round trip (and
    # 1.5 times the smoothed one) no longer counts as in flight: its ACK or the DATA was lost,
    # and the server's timer, not the window, will bring it.
    flight_limit_min: float = 0.002
    pacing_min_rtt: float = 0.002
    lan_lanes_max: int = 64
    lanes_datagram_guess: int = 8192
    size_samples: int = 4
    # Files at once: downloads open together (each holds its partial file and its lock);
    # a small file gets a lane of its own at once beside a big one.
    files_at_once: int = 32
    # Finished lanes whose token is kept, to answer a late EOF (its ACK EOF was lost).
    finished_lanes: int = 4096
    # The socket's receive buffer: room for the datagrams of many lanes arriving together.
    receive_buffer: int = 4 * MiB
    # Housekeeping (timers, lanes, records, progress) runs a quarter of a round trip apart,
    # at most this far apart.
    housekeeping: float = 0.05
    # An ACK held back by the pace or the window goes after this long whatever they say
    # (fetch.py _release; not under --limit-rate).
    hold_max: float = 1.5
    # A range is a lane's share of what is left of the file (guided self-scheduling, so that
    # lanes end together), no longer than max_part_size or range_seconds at a lane's rate
    # (first_range before any rate is known), and no shorter than part_seconds at a lane's rate
    # or tail_min_size: a range costs a request, a round trip or two (hidden when the next one
    # starts before it ends) and some 0.1 ms of CPU on each side, while the last ranges must be
    # short for the lanes to end together (at 50 ms a lane moves one datagram per round trip: a
    # floor of 32 datagrams left one lane alone for the last 1.3 s of 4.4, and at 1% loss ranges
    # of 256 KB cut in the first round trips, when the datagrams were twice as big, ran 4 s
    # after the rest: the first range, asked for before anything is known, was the last to end,
    # 89 datagrams of 2,952 bytes). Before the size is known, the first range is first_range
    # long (or cut from the listing's size). At the end of the files, a range with more than
    # split_datagrams datagrams left is cut in two, its second half on a lane of its own
    # (fetch.py; the server resends to the cut lane until it gives up, so only where something
    # went wrong).
    split_datagrams: int = 64
    first_range: int = 64 * 1024
    max_part_size: int = 64 * MiB
    range_seconds: float = 0.5
    part_seconds: float = 0.05
    tail_min_size: int = 16 * 1024

    # Request retransmission: starts here (then at the RTO of the RTTs measured from earlier
    # requests), doubles up to the max. A request repeated too early costs one small SIZE,
    # while each lost one idles its part for the whole timeout: at 5% loss a download of 25
    # ranges loses one or two requests (20 ms each with a 20 ms floor).
    request_timeout: float = 0.1
    request_timeout_min: float = 0.005
    request_timeout_max: float = 2.0
    # Nothing new from the server for this long: the transfer is stalled and is asked again.
    # Longer than the server's largest RTO, so a slow but live server is not abandoned.
    idle_timeout: float = 5.0
    # A server that never answered (no SIZE, no ERROR) after this long is reported as missing
    # ("no server at HOST:PORT"), where the OS did not already say the port is closed (ICMP
    # may be filtered). Six requests go out meanwhile; one that answered once is waited for.
    no_answer_timeout: float = 4.0
    # A port that refuses in the first refused_grace seconds is most often a server still
    # starting (the quick start runs both at once): the request goes again every
    # refused_retry, and only then is it "no server".
    refused_grace: float = 2.0
    refused_retry: float = 0.05
    # A tagged request (version 3) sent this many times without an answer is sent untagged as
    # well, on a socket of its own: a version 2 server may drop a tagged request unanswered
    # (0.7 s with the timers above; a version 3 server answers long before, unless the round
    # trip is longer).
    probe_after: int = 4
    # The progress line says "waiting for the server" after this long without a datagram;
    # such time does not count in a result's rate.
    silence_note: float = 2.0
    # Back-off between attempts after a stall or BUSY.
    retry_initial: float = 0.25
    retry_max: float = 5.0
    # Give up on a file after this long without progress (--give-up); watch mode waits longer.
    give_up: float = 60.0
    watch_give_up: float = 600.0

    # The partial file's progress record is saved this often (in the background, and at every
    # end): a client killed with -9, or a power cut, costs at most this long's worth of bytes.
    # Each save fsyncs the data first, and on ext4 the journal commit that fsync starts holds
    # the client's own writes for several ms (7-8 ms measured with 40 MB to flush): time in
    # which it acknowledges nothing. Every 2 s that is under 0.5% of the time.
    record_interval: float = 2.0
    # input.txt is checked this often in watch mode.
    poll_interval: float = 0.5
    # In watch mode a download that failed for a reason that may pass (the server is away) is
    # tried again this long after; a name the server does not have is not.
    watch_retry: float = 30.0
    # A listing larger than this is refused (a hostile server must not make us hold gigabytes).
    max_list_bytes: int = 16 * MiB
    # Restarts of one file because it changed on the server, before giving up.
    max_restarts: int = 20
    # --limit-rate: bytes per second this process receives, all lanes and files together
    # (0: no cap). At least 64 KiB/s, and then at most rate / 64 KiB lanes at once (fewer if
    # the path needs fewer), so that an ACK is never held back long (udpxfer/ratelimit.py
    # explains why).
    limit_rate: int = 0
