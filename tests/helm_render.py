"""Renders the Helm chart helm/smrd offline, as `helm template` would, for the tests that need its
manifests: tests/chart (lint, schemas, cross-resource facts) and tests/podlab (the rendered pods
run in network namespaces). Uses helm-python-sdk (the Helm v4 SDK; no helm binary, no cluster).

Importable as `helm_render` because tests/chart and tests/podlab are packages: pytest then puts
tests/ itself on sys.path (its default "prepend" import mode), as for tests/e2e.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml

import helm_python  # pip install helm-python-sdk==0.2.2 (make install-test does)

CHART = Path(__file__).resolve().parents[1] / "helm" / "smrd"
SCENARIOS = sorted(CHART.glob("ci/values-*.yaml"))
RELEASE, NAMESPACE = "demo", "smrd-test"


def load_values(path: Path) -> dict:
    """A values file as a dict ({} for an empty file)."""
    return yaml.safe_load(Path(path).read_text()) or {}


@functools.lru_cache(maxsize=None)
def _chart():
    return helm_python.Chart.load(str(CHART))


@functools.lru_cache(maxsize=None)
def _render_text(values_json: str) -> str:
    cfg = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    values = json.loads(values_json)
    manifest = cfg.install(str(CHART), RELEASE, values, dry_run="client")["manifest"]  # = helm template
    # The release's manifest leaves out hooks (the helm test pod, the key Job and its RBAC): they
    # are rendered from the chart itself, every template that declares a helm.sh/hook.
    files = _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    hooks = [t for k, t in sorted(files.items())
             if k.endswith(".yaml") and '"helm.sh/hook"' in t and t.strip()]
    return "\n---\n".join([manifest, *hooks])


def render(values: dict) -> list[dict]:
    """Every manifest of release RELEASE in namespace NAMESPACE (hooks included), as dicts.
    Raises helm_python.HelmError when the chart refuses the values."""
    text = _render_text(json.dumps(values, sort_keys=True))
    return [d for d in yaml.safe_load_all(text) if d]


def render_files(values: dict, *, upgrade: bool = False) -> dict[str, str]:
    """Every template's rendered text, by path ("smrd/templates/configmap.yaml", NOTES.txt too),
    as an install or (upgrade=True) as an upgrade renders it: for byte-for-byte comparisons.
    Nothing is looked up in a cluster (`lookup` finds nothing)."""
    return dict(_chart().render(values, name=RELEASE, namespace=NAMESPACE,
                                is_install=not upgrade, is_upgrade=upgrade))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind)
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def hosts_configmap(docs: list[dict]) -> dict:
    """The ConfigMap with hosts.conf (the dashboard's ConfigMap may be rendered beside it)."""
    found = [d for d in by_kind(docs, "ConfigMap") if "hosts.conf" in d.get("data", {})]
    assert len(found) == 1, f"expected one ConfigMap with hosts.conf, got {len(found)}"
    return found[0]
