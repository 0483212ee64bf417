"""udpxfer: the engine behind server.py and client.py (PROTOCOL.md).

The socket-free core takes datagrams and `now` and gives back datagrams and deadlines; it imports
no socket, select, threading or time module and opens no file, so tests drive it on a virtual clock:

    wire             the wire format: messages, parse and format, tokens, the listing, names
    rtt              the RFC 6298 estimator
    netpath          the path to one client IP: round trips, loss, datagram sizes, send order
    server_transfer  one range on the server, stop-and-wait
    limits           fair shares, pace, the token bucket for strangers
    dispatcher       the server's routing, pools, limits and timers
    client_transfer  one range on the client
    display          byte counts, durations and addresses for people

Imports only go down: the scripts import the package, the package imports config.py, and
nothing here imports a script.
"""
