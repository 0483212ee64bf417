"""Defaults for server.py and client.py: data only, no side effects at import.

Every tunable lives here once, with the reason for its value. The command lines override the
common ones; tests build `ServerSettings` / `ClientSettings` with their own values.
Limits that are part of the wire format itself (datagram size, error length) live in protocol.py.
"""

import os
from dataclasses import dataclass

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


@dataclass
class ServerSettings:
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

    # Retransmission timer, RFC 6298, with two deliberate departures: a 2 ms floor instead of
    # 1 s, and a smaller first RTO. With one datagram in flight a spurious retransmission costs
    # one datagram, while a 1 s floor is exactly what makes TFTP tools crawl on lossy links; on
    # slower paths the RTO follows the measured RTT and the floor never applies. (2 ms is twice
    # the 1 ms resolution of poll(); 5 ms halved the speed at 5% loss on loopback.)
    rto_initial: float = 0.25
    rto_min: float = 0.002
    rto_max: float = 2.0
    # Retransmissions of one datagram before the transfer is forgotten (about 15 s of silence
    # with the values above): a client that vanished frees its slot.
    max_retransmits: int = 12

    # Pools (PROTOCOL.md "Hostile input"). Active transfers hold an open file and up to two
    # chunks (about 128 KiB): 128 of them stay within 20 MB, enough for 32 clients of 4 parts.
    max_transfers: int = 128
    # Requests whose SIZE is not yet acknowledged: small entries, no file opened, oldest evicted.
    max_pending: int = 96            # smaller than max_transfers (PROTOCOL.md)
    # Everything sent to an address that never acknowledges SIZE, retransmissions included:
    # at most this many bytes; by timer, at most amplification_factor times what it sent or
    # two SIZEs, whichever is more (a spoofed source must not turn the server into an
    # amplifier; RFC 9000 8.1 uses 3 for QUIC).
    pending_byte_budget: int = 256
    amplification_factor: int = 3
    # A request whose SIZE is not acknowledged is forgotten after this many timer expiries
    # (about 3.75 s with the RTOs above), so it is also sent at most this many times by timer.
    pending_max_sends: int = 4

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


@dataclass
class ClientSettings:
    parts: int = 4                 # parallel ranges per file (--parts)
    # Ranges are cut to about size / (2 * parts) so that parts finish together, but no smaller
    # than this (a new range costs two round trips) and no larger than the max (balance).
    min_part_size: int = 1 * MiB
    max_part_size: int = 64 * MiB

    # Request retransmission: starts here (then at the RTO of the RTTs measured from earlier
    # requests), doubles up to the max. A request repeated too early costs one small SIZE.
    request_timeout: float = 0.1
    request_timeout_min: float = 0.02
    request_timeout_max: float = 2.0
    # Nothing new from the server for this long: the transfer is stalled and is asked again.
    # Longer than the server's largest RTO, so a slow but live server is not abandoned.
    idle_timeout: float = 5.0
    # A server that never answered (no SIZE, no ERROR) after this long is reported as missing
    # ("no server at HOST:PORT"), where the OS did not already say the port is closed (ICMP
    # may be filtered). Six requests go out meanwhile; one that answered once is waited for.
    no_answer_timeout: float = 4.0
    # Back-off between attempts after a stall or BUSY.
    retry_initial: float = 0.25
    retry_max: float = 5.0
    # Give up on a file after this long without progress (--give-up); watch mode waits longer.
    give_up: float = 60.0
    watch_give_up: float = 600.0

    # The partial file's progress record is saved this often (in the background, and at every
    # end): a client killed with -9 fetches again at most this long's worth of bytes.
    record_interval: float = 0.5
    # input.txt is checked this often in watch mode.
    poll_interval: float = 0.5
    # In watch mode a download that failed for a reason that may pass (the server is away) is
    # tried again this long after; a name the server does not have is not.
    watch_retry: float = 30.0
    # A listing larger than this is refused (a hostile server must not make us hold gigabytes).
    max_list_bytes: int = 16 * MiB
    # Restarts of one file because it changed on the server, before giving up.
    max_restarts: int = 20
    # --limit-rate: bytes per second this process receives, all parts and files together
    # (0: no cap). At least 64 KiB/s, and files then run at most rate / 64 KiB parts at once,
    # so that an ACK is never held back long (client.Pacer explains why).
    limit_rate: int = 0
