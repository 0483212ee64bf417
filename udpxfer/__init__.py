"""udpxfer: the engine behind server.py and client.py (PROTOCOL.md).

The socket-free core takes datagrams and `now` and gives back datagrams and deadlines; it imports
no socket, select, threading or time module and opens no file, so tests drive it on a virtual
clock: wire (the wire format), rtt (RFC 6298), netpath (the path to one client IP), limits (fair
shares), server_transfer and dispatcher (the server), client_transfer and planner (the client),
ranges, ratelimit, display and errors. Beside it, the modules that do I/O for the scripts: folder
(the served folder), partial (a download's partial file and record) and fetch (the client's
socket loop).

Imports only go down: the scripts import the package, the package imports config.py, and
nothing here imports a script (tests/test_layout.py checks it). Nothing is imported here, so a
script pays only for the modules it uses.
"""
