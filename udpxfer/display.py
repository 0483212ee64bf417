"""How numbers and addresses are written for people: byte counts, durations, host:port.

Relies on: nothing. Must not know: anything else.
"""


def human(n):
    """A byte count for people: 512 B, 1.5 KiB, 12.4 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0


def format_addr(addr):
    """host:port, or [v6-host]:port, for people."""
    return "[%s]:%d" % addr[:2] if ":" in addr[0] else "%s:%d" % addr[:2]


def duration(seconds):
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    seconds = int(seconds + 0.5)
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60) \
        if seconds >= 3600 else "%d:%02d" % (seconds // 60, seconds % 60)
