"""Schemas for the chart's Prometheus Operator objects (ServiceMonitor, PrometheusRule), which
kubernetes-validate does not have (it ships the built-in kinds only) and no offline package here
provides. Written from the Operator's v1 API reference for the fields the chart renders: every
object that has additionalProperties false lists the Operator's field names at that level, so a
misspelt or misplaced field fails, as the API server's structural schema would prune or refuse it.
Durations use the Operator's own pattern."""
from __future__ import annotations

import jsonschema

DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": STRINGS, "matchExpressions": {"type": "array"}}}
METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": NAME, "labels": STRINGS, "annotations": STRINGS}}

ENDPOINT_FIELDS = ("port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                   "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels",
                   "honorTimestamps", "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings",
                   "relabelings", "proxyUrl", "followRedirects", "enableHttp2", "filterRunning")

SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                 "properties": {
                     "jobLabel": {"type": "string"}, "targetLabels": {"type": "array", "items": {"type": "string"}},
                     "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                     "selector": LABEL_SELECTOR,
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": NAME}}},
                     "sampleLimit": {"type": "integer"}, "targetLimit": {"type": "integer"},
                     "attachMetadata": {"type": "object"}, "scrapeProtocols": {"type": "array"},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False,
                         "properties": {**{f: {} for f in ENDPOINT_FIELDS},
                                        "port": {"type": "string"},
                                        "path": {"type": "string", "pattern": "^/"},
                                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                        "interval": DURATION, "scrapeTimeout": DURATION}}}}}}}

RULE = {"type": "object", "additionalProperties": False, "required": ["expr"],
        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
        "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                       "record": {"type": "string"}, "expr": {"type": "string", "minLength": 1},
                       "for": DURATION, "keep_firing_for": DURATION, "labels": STRINGS, "annotations": STRINGS}}

PROMETHEUS_RULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": DURATION,
                               "limit": {"type": "integer"}, "partial_response_strategy": {"type": "string"},
                               "labels": STRINGS, "query_offset": DURATION,
                               "rules": {"type": "array", "minItems": 1, "items": RULE}}}}}}}}

SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
           ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE}


def is_crd(doc: dict) -> bool:
    return doc["apiVersion"].startswith("monitoring.coreos.com/")


def validate(doc: dict) -> None:
    """Raises jsonschema.ValidationError (or KeyError for a kind not covered here)."""
    jsonschema.validate(doc, SCHEMAS[(doc["apiVersion"], doc["kind"])])
