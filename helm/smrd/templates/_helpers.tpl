{{/* Chart name, truncated to 63 characters (the DNS label limit). */}}
{{- define "smrd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: RELEASE-NAME, truncated to 63 characters. If the release name already contains the
chart name it is used as is.
*/}}
{{- define "smrd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "smrd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The replicas' StatefulSet name (pods: NAME-0..n-1); short enough for the pod-name label. */}}
{{- define "smrd.replicasName" -}}
{{- include "smrd.fullname" . | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "smrd.headlessName" -}}
{{- printf "%s-headless" (include "smrd.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "smrd.gatewayName" -}}
{{- printf "%s-gateway" (include "smrd.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "smrd.configName" -}}
{{- printf "%s-hosts" (include "smrd.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "smrd.labels" -}}
helm.sh/chart: {{ include "smrd.chart" . }}
{{ include "smrd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "smrd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smrd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: replica or gateway. Call with (dict "ctx" . "component" "x"). */}}
{{- define "smrd.componentSelectorLabels" -}}
{{ include "smrd.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "smrd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "smrd.appImage" -}}
{{- if .Values.app.image.repository }}
{{- printf "%s:%s" .Values.app.image.repository (default "latest" .Values.app.image.tag) }}
{{- else }}
{{- include "smrd.image" . }}
{{- end }}
{{- end }}

{{/* Quorum of the replicas: floor(n/2)+1. */}}
{{- define "smrd.quorum" -}}
{{- add (div (int .Values.replicaCount) 2) 1 }}
{{- end }}

{{/* Refuse what the schema cannot say clearly. */}}
{{- define "smrd.validate" -}}
{{- $n := int .Values.replicaCount }}
{{- if or (lt $n 3) (eq (mod $n 2) 0) }}
{{- fail (printf "replicaCount must be an odd integer >= 3 (n = 2f+1), got %d: an even count tolerates no more failures than one replica fewer, and fewer than 3 tolerate none" $n) }}
{{- end }}
{{- if and .Values.security.enabled (not (and .Values.security.existingSecret .Values.security.publicKeysConfigMap)) }}
{{- fail "security.enabled needs security.existingSecret (replica-<i>.key, gateway-0.key) and security.publicKeysConfigMap (the *.pub allow-list); see docs/security.md" }}
{{- end }}
{{- $ports := list .Values.ports.peer .Values.ports.client .Values.ports.metrics .Values.app.port }}
{{- if ne (len (uniq $ports)) 4 }}
{{- fail (printf "ports.peer, ports.client, ports.metrics and app.port share the replica pod's network and must differ, got %v" $ports) }}
{{- end }}
{{- if eq .Values.ports.gateway .Values.ports.gatewayMetrics }}
{{- fail "ports.gateway and ports.gatewayMetrics must differ" }}
{{- end }}
{{- end }}

{{/* SMRD_* settings common to replicas and gateways. */}}
{{- define "smrd.settingsEnv" -}}
- name: SMRD_FRAMING
  value: {{ .Values.settings.framing | quote }}
- name: SMRD_LOG_LEVEL
  value: {{ .Values.settings.logLevel | quote }}
- name: SMRD_LOG_FORMAT
  value: {{ .Values.settings.logFormat | quote }}
{{- range $k, $v := .Values.settings.extra }}
- name: {{ printf "SMRD_%s" (upper $k) }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- if .Values.security.enabled }}
- name: SMRD_CURVE_SECRET_KEY
  value: "/etc/smrd-curve/key/<name>.key"
- name: SMRD_CURVE_PUBLIC_KEYS
  value: "/etc/smrd-curve/allow"
{{- end }}
{{- end }}

{{- define "smrd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}
