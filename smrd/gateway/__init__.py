"""What runs in a gateway (`smrd --role client`): the process outside clients reach.

Owns: the client-facing TCP server and its connections (client_connection.py), and the calls in
flight to the replicas: request ids, where requests go, reply quorum, retransmission, deadlines,
divergence (driver.py).
Never: holds state that matters after a crash (kill it at any time), or is imported by a replica.
"""
