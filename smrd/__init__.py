"""smrd: a state-machine-replication daemon.

Replicas (``smrd --role server``) agree on one total order of requests and feed them to an
unmodified, deterministic TCP app; gateways (``smrd --role client``) are what outside clients reach.
"""
from .__version__ import __version__

__all__ = ["__version__"]
