"""Configuration: hosts.conf (hosts.py) and every other setting (settings.py), layered file <
environment (SMRD_*) < flags and validated once.

Owns: parsing, defaults, validation and the generated docs of the settings. Never: starts
anything, opens sockets or resolves names.
"""
