"""The client's failures: a download that failed for a reason to tell the person in one line,
and the one failure that is not about a file (no server at the address).

Relies on: display (addresses). Must not know: sockets, files or the protocol.
"""

from udpxfer.display import format_addr


class Failure(Exception):
    """A download failed for a reason to tell the user in one line. `retry`: whether trying
    again later may help (watch mode does)."""

    def __init__(self, message, retry=True):
        super().__init__(message)
        self.retry = retry


class NoServer(Failure):
    """Nothing has ever answered at the server's address: the port is closed (the OS reported
    it at once) or nothing answered within ClientSettings.no_answer_timeout. The cure is on the
    person's side (start server.py, or fix --host/--port), so it is said once, not per file."""

    def __init__(self, address, why):
        super().__init__("no server at %s (%s): start server.py first, or give its address "
                         "with --host and --port" % (format_addr(address), why))
