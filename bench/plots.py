# PNG plots of an experiments run, in the style of the paper's figures 3-6: throughput and latency
# against the number of clients, one line per gateway count (figures 3, 4) or per replica count
# (figures 5, 6); plus framing (smrd against the unreplicated app in both framings) and the
# ordering microbenchmark. Points repeated at one client count are drawn as their median.
# Never: draws a point that was not measured, or joins points from different configurations.
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The configuration every line of the sweeps shares unless it is the varied one.
BASE = {"system": "smrd", "app": "hashmap", "framing": "line", "durability": "fsync",
        "storage": "tmpfs", "mix": "mixed"}


def _series(points, **match):
    by_clients = {}
    for p in points:
        if all(p.get(k) == v for k, v in match.items()):
            by_clients.setdefault(p["clients"], []).append(p)
    xs = sorted(by_clients)
    ops = [statistics.median(p["ops_per_s"] for p in by_clients[x]) for x in xs]
    lat = [statistics.median(p["latency_us"]["trimmed_mean"] for p in by_clients[x]) / 1000 for x in xs]
    return xs, ops, lat


def _axes(title):
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig, ax


def _save(fig, ax, path, written):
    if ax.lines:
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        written.append(path)
    plt.close(fig)


def _clients_ticks(ax, xs):
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])


def _sweep_figures(points, out, vary, label, numbers, written):
    """Throughput and latency against clients, one line per value of `vary`."""
    values = sorted({p[vary] for p in points if p.get("system") == "smrd" and p.get("app") == "hashmap"})
    fixed = dict(BASE, **({"replicas": 3} if vary == "gateways" else {"gateways": 1}))
    direct = _series(points, system="direct", app="hashmap", framing="line", mix="mixed")
    for n, metric, ylabel, idx in ((numbers[0], "throughput", "ops/s", 1),
                                   (numbers[1], "latency", "latency, trimmed mean (ms)", 2)):
        fig, ax = _axes(f"Fig. {n}: {metric} vs clients, by {label} "
                        f"({'3 replicas' if vary == 'gateways' else '1 gateway'}, line, fsync)")
        xs_all = []
        for v in values:
            s = _series(points, **dict(fixed, **{vary: v}))
            if s[0]:
                ax.plot(s[0], s[idx], marker="o", label=f"{v} {label if v != 1 else label[:-1]}")
                xs_all += s[0]
        if direct[0] and metric == "throughput":
            ax.plot(direct[0], direct[idx], linestyle="--", color="gray", marker=".",
                    label="unreplicated app")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        _clients_ticks(ax, sorted(set(xs_all)))
        _save(fig, ax, out / f"fig{n}_{metric}_{label}.png", written)


def plot_all(results, out):
    points = [p for p in results["points"] if p.get("ops")]
    written = []
    _sweep_figures(points, out, "gateways", "gateways", (3, 4), written)
    _sweep_figures(points, out, "replicas", "replicas", (5, 6), written)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, idx, ylabel in ((axes[0], 1, "ops/s"), (axes[1], 2, "latency, trimmed mean (ms)")):
        for framing in ("line", "close"):
            for system, style in (("smrd", "-"), ("direct", "--")):
                s = _series(points, system=system, app="hashmap", framing=framing, mix="mixed",
                            **({"replicas": 3, "gateways": 1, "durability": "fsync", "storage": "tmpfs"}
                               if system == "smrd" else {}))
                if s[0]:
                    ax.plot(s[0], s[idx], linestyle=style, marker="o",
                            label=f"{'smrd (3 replicas)' if system == 'smrd' else 'unreplicated'} {framing}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        _clients_ticks(ax, sorted({x for line in ax.lines for x in line.get_xdata()}))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("Framing: one connection per request (close) vs persistent (line)", fontsize=10)
    fig.tight_layout()
    if axes[0].lines:
        fig.savefig(out / "framing.png")
        written.append(out / "framing.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for system, label in (("smrd", "smrd, 3 replicas, 1 gateway"), ("direct", "no-op app alone")):
        s = [p for p in points if p.get("app") == "noop" and p["system"] == system]
        xs = sorted({p["clients"] for p in s})
        if not xs:
            continue
        med = lambda f: [statistics.median(f(p) for p in s if p["clients"] == x) for x in xs]  # noqa: E731
        axes[0].plot(xs, med(lambda p: p["ops_per_s"]), marker="o", label=label)
        axes[1].plot(xs, med(lambda p: p["latency_us"]["p50"]), marker="o", label=label)
    for ax, ylabel in ((axes[0], "ops/s"), (axes[1], "p50 latency (µs)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        _clients_ticks(ax, sorted({x for line in ax.lines for x in line.get_xdata()}))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("Ordering microbenchmark: 64-byte requests and replies, no-op app", fontsize=10)
    fig.tight_layout()
    if axes[0].lines:
        fig.savefig(out / "ordering.png")
        written.append(out / "ordering.png")
    plt.close(fig)
    return written


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path
    run_dir = Path(sys.argv[1])
    for path in plot_all(json.loads((run_dir / "results.json").read_text()), run_dir):
        print(path)
