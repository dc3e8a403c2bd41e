"""What operators and tests run: the command line (cli.py), `smrd status` (status.py), `smrd admin`
(admin.py), `smrd local` and the test harness's clusters (local.py), the one Kubernetes API call
(kube.py), and metrics and health for both roles (observability.py).

Owns: presenting and operating a cluster. Never: takes part in consensus or execution, or sits on
a per-request path (observability's counters are read at scrape time).
"""
