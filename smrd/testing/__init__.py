"""Test support that ships with the package (so end-to-end suites and operators can use it):
checkers and recorders. Nothing here runs inside a replica or a gateway.
"""
