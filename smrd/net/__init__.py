"""What every smrd process uses to reach the others: ZeroMQ sockets (transport.py) and CURVE
keys and allow-lists (security.py).

Owns: sockets, routing ids, reconnects, heartbeats, authentication. Never: knows what a message
means (smrd.protocol.messages encodes them; the drivers act on them).
"""
