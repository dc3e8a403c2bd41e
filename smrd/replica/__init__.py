"""What runs in a replica (`smrd --role server`): one process beside its app.

Owns: the driver's Ready loop and timers (driver.py); execution on the app, checkpoints and
healing the app (executor.py); the connection to the app (app_adapter.py) and knowing which
process it is (app_watch.py, sockdiag.py, app_reset.py); checkpoint files (checkpoints.py) and
fetching them from peers (state_transfer.py); the write-ahead log (wal/).
Never: decides order (smrd.protocol does), talks to outside clients (smrd.gateway does), or is
imported by a gateway.
"""
