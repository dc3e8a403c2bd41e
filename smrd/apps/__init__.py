"""Demo and test apps that know nothing of smrd: the hashmap server (hashmap.py) and its client
(kvclient.py, `smrd kv`), and a no-op server for ordering benchmarks (noop.py). None of them
imports anything of smrd's replication; a replica reaches them over TCP like any app.
"""
