"""Deterministic, seeded simulation of whole smrd clusters under faults (see cluster.py)."""
from .cluster import Params, Result, Simulation, Violation, run_seed

__all__ = ["Params", "Result", "Simulation", "Violation", "run_seed"]
