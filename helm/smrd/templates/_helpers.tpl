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

{{/* The replicas' ServiceAccount, Role and RoleBinding (membership.scaleDownLeave). */}}
{{- define "smrd.serviceAccountName" -}}
{{- include "smrd.replicasName" . }}
{{- end }}

{{/* The CURVE Secret and allow-list ConfigMap: the user's own, or the ones the key Job makes. */}}
{{- define "smrd.curveSecretName" -}}
{{- .Values.security.existingSecret | default (printf "%s-curve-keys" (include "smrd.fullname" . | trunc 52 | trimSuffix "-")) }}
{{- end }}

{{- define "smrd.curveAllowName" -}}
{{- .Values.security.publicKeysConfigMap | default (printf "%s-curve-allow" (include "smrd.fullname" . | trunc 51 | trimSuffix "-")) }}
{{- end }}

{{/* True (non-empty) when the key Job makes the keys: CURVE on, no keys of the user's own. */}}
{{- define "smrd.keyJobEnabled" -}}
{{- if and .Values.security.enabled (not .Values.security.existingSecret) (not .Values.security.publicKeysConfigMap) }}true{{ end }}
{{- end }}

{{- define "smrd.keyJobName" -}}
{{- printf "%s-keygen" (include "smrd.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/*
The pod's topologySpreadConstraints: the user's own (topologySpreadConstraints) if any, else the
chart's spread over nodes (and zones) among this release's pods of one component. Call with
(dict "ctx" . "component" "replica"|"gateway"); renders nothing when there is nothing to spread.
*/}}
{{- define "smrd.topologySpread" -}}
{{- $v := .ctx.Values }}
{{- if $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $v.topologySpreadConstraints | nindent 2 }}
{{- else if and $v.spread.enabled (or (eq .component "replica") $v.spread.gateways) }}
{{- $hard := ternary $v.spread.whenUnsatisfiable "ScheduleAnyway" (eq .component "replica") }}
{{- $zoneHard := ternary $v.spread.zone.whenUnsatisfiable "ScheduleAnyway" (eq .component "replica") }}
topologySpreadConstraints:
  - maxSkew: {{ $v.spread.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $hard }}
    labelSelector:
      matchLabels:
        {{- include "smrd.componentSelectorLabels" . | nindent 8 }}
  {{- if $v.spread.zone.enabled }}
  - maxSkew: {{ $v.spread.maxSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ $zoneHard }}
    labelSelector:
      matchLabels:
        {{- include "smrd.componentSelectorLabels" . | nindent 8 }}
  {{- end }}
{{- end }}
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

{{/* Quorum of replicaCount voters: floor(n/2)+1 (once every pod is a voter: docs/kubernetes.md). */}}
{{- define "smrd.quorum" -}}
{{- add (div (int .Values.replicaCount) 2) 1 }}
{{- end }}

{{/* Refuse what the schema cannot say clearly. */}}
{{- define "smrd.validate" -}}
{{- $n := int .Values.replicaCount }}
{{- $max := int .Values.maxReplicas }}
{{- $boot := int .Values.membership.bootstrapVoters }}
{{- if or (lt $max 1) (gt $max 64) }}
{{- fail (printf "maxReplicas must be 1..64 (replica ids are 0..63), got %d" $max) }}
{{- end }}
{{- if or (lt $n 1) (gt $n $max) }}
{{- fail (printf "replicaCount must be 1..maxReplicas, got replicaCount=%d with maxReplicas=%d: hosts.conf lists the candidate replicas 0..maxReplicas-1 and is fixed at install (see docs/kubernetes.md, \"Scaling\")" $n $max) }}
{{- end }}
{{- if or (lt $boot 1) (gt $boot $max) }}
{{- fail (printf "membership.bootstrapVoters must be 1..maxReplicas, got %d with maxReplicas=%d: the first voters are ordinals 0..bootstrapVoters-1 of hosts.conf" $boot $max) }}
{{- end }}
{{- if and .Release.IsInstall (gt $boot $n) }}
{{- fail (printf "membership.bootstrapVoters=%d is more than replicaCount=%d at install: the voters 0..%d would never all exist and the cluster would start with no spare voter; install with bootstrapVoters <= replicaCount (the pods beyond it join by themselves)" $boot $n (sub $boot 1)) }}
{{- end }}
{{- if and .Values.membership.scaleDownLeave (lt (int .Values.server.terminationGracePeriodSeconds) (add (int .Values.membership.leaveTimeoutSeconds) 10)) }}
{{- fail (printf "server.terminationGracePeriodSeconds=%d is too short for membership.leaveTimeoutSeconds=%d: the pod would be killed while leaving; give it at least leaveTimeoutSeconds + 10 (the Kubernetes API check and the shutdown after the leave)" (int .Values.server.terminationGracePeriodSeconds) (int .Values.membership.leaveTimeoutSeconds)) }}
{{- end }}
{{- if and .Values.security.enabled (ne (empty .Values.security.existingSecret) (empty .Values.security.publicKeysConfigMap)) }}
{{- fail "security.existingSecret and security.publicKeysConfigMap go together: give both (your own keys: the secret keys and the allow-list that matches them) or neither (the chart's key Job makes both); see docs/security.md" }}
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

{{/*
The replica's preStop script (membership.scaleDownLeave): leave the membership if this pod's
StatefulSet was scaled down below it, else do nothing. `smrd admin` has no role, so the replica id
and (with CURVE) the replica's own key file are given explicitly.
*/}}
{{- define "smrd.preStopScript" -}}
id="${POD_NAME##*-}"; export SMRD_ID="$id";
{{- if .Values.security.enabled }} export SMRD_CURVE_SECRET_KEY="/etc/smrd-curve/key/replica-$id.key";{{ end }}
{{- printf " exec smrd admin leave --self --if-scaled-down -c /etc/smrd/hosts.conf --timeout %d" (int .Values.membership.leaveTimeoutSeconds) }}
{{- end }}

{{/* SMRD_VOTERS: the bootstrap voters 0..bootstrapVoters-1, e.g. "0,1,2". */}}
{{- define "smrd.bootstrapVoters" -}}
{{- until (int .Values.membership.bootstrapVoters) | join "," }}
{{- end }}

{{/*
Upgrades may not change what is fixed for the cluster's life: the candidate list in hosts.conf (it
decides which replica leads each view, on every replica alike) and the bootstrap voters. The running
release's ConfigMap and StatefulSet come from `lookup`, which finds nothing in `helm template`,
`--dry-run=client` and on install; smrd.checkUnchanged takes them as arguments (tests pass their
own).
*/}}
{{- define "smrd.upgradeChecks" -}}
{{- include "smrd.checkUnchanged" (dict "ctx" .
      "configMap" (lookup "v1" "ConfigMap" .Release.Namespace (include "smrd.configName" .))
      "statefulSet" (lookup "apps/v1" "StatefulSet" .Release.Namespace (include "smrd.replicasName" .))) }}
{{- end }}

{{- define "smrd.checkUnchanged" -}}
{{- $ctx := .ctx }}
{{- $data := dig "data" "hosts.conf" "" (default dict .configMap) }}
{{- if $data }}
{{- $had := len (regexFindAll "(?m)^[ \t]*replica[ \t]" $data -1) }}
{{- if ne $had (int $ctx.Values.maxReplicas) }}
{{- fail (printf "maxReplicas=%d, but this release's hosts.conf lists %d replicas: the candidate list is fixed for the cluster's life (it decides which replica leads each view, on every replica alike); upgrade with --set maxReplicas=%d (docs/kubernetes.md, \"Upgrading the chart\")" (int $ctx.Values.maxReplicas) $had $had) }}
{{- end }}
{{- $containers := dig "spec" "template" "spec" "containers" list (default dict .statefulSet) }}
{{- if $containers }}
{{- /* A release of chart 0.1.0 has no SMRD_VOTERS: all its hosts.conf replicas were voters. */}}
{{- $was := until $had | join "," }}
{{- range $c := $containers }}
{{- if eq $c.name "smrd" }}
{{- range $e := (default list $c.env) }}
{{- if eq $e.name "SMRD_VOTERS" }}{{ $was = $e.value }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- $now := include "smrd.bootstrapVoters" $ctx }}
{{- if ne $was $now }}
{{- fail (printf "membership.bootstrapVoters=%d (voters %s), but this release started with voters %s: the bootstrap voters are fixed at install; upgrade with --set membership.bootstrapVoters=%d (docs/kubernetes.md, \"Upgrading the chart\")" (int $ctx.Values.membership.bootstrapVoters) $now $was (len (splitList "," $was))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "smrd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}
