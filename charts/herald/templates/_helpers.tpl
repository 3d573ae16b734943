{{/* Names */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* herald.component: fullname-<component>; call with (dict "root" $ "c" "edge") */}}
{{- define "herald.component" -}}
{{- printf "%s-%s" (include "herald.fullname" .root | trunc 52 | trimSuffix "-") .c -}}
{{- end -}}

{{- define "herald.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component; (dict "root" $ "c" "edge") */}}
{{- define "herald.componentLabels" -}}
{{ include "herald.labels" .root }}
app.kubernetes.io/component: {{ .c }}
{{- end -}}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .c }}
{{- end -}}

{{- define "herald.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Whole seconds (rounded up) of a duration written like 500ms, 5s or 2m. */}}
{{- define "herald.seconds" -}}
{{- $d := toString . -}}
{{- if regexMatch "^[0-9]+ms$" $d -}}{{ div (add (trimSuffix "ms" $d | atoi) 999) 1000 }}
{{- else if regexMatch "^[0-9]+s$" $d -}}{{ trimSuffix "s" $d | atoi }}
{{- else if regexMatch "^[0-9]+m$" $d -}}{{ mul (trimSuffix "m" $d | atoi) 60 }}
{{- else -}}{{ fail (printf "cannot read the duration %q: write it like 500ms, 5s or 2m" $d) }}
{{- end -}}
{{- end -}}

{{/*
The grace period must cover preStop sleep + drain delay (+ drain window) and a
margin of 5 s for the last reports to reach NATS; otherwise the kubelet kills
the process in the middle of its drain. (dict "root" $ "c" "edge")
*/}}
{{- define "herald.checkGrace" -}}
{{- $v := index .root.Values .c -}}
{{- $need := add $v.drain.preStopSeconds (include "herald.seconds" $v.drain.delay | atoi) 5 -}}
{{- if hasKey $v.drain "window" -}}
{{- $need = add $need (include "herald.seconds" $v.drain.window | atoi) -}}
{{- end -}}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds is %d, but the %s needs at least %d: preStopSeconds + drain delay%s + 5 s margin. Raise it or shorten the drain." .c (int $v.terminationGracePeriodSeconds) .c (int $need) (ternary " + drain window" "" (hasKey $v.drain "window"))) -}}
{{- end -}}
{{- end -}}

{{- define "herald.jwtSecretName" -}}
{{- default (printf "%s-jwt" (include "herald.fullname" .)) .Values.jwt.existingSecret -}}
{{- end -}}

{{- define "herald.natsCredsSecretName" -}}
{{- default (printf "%s-nats-creds" (include "herald.fullname" .)) .Values.nats.credentials.existingSecret -}}
{{- end -}}

{{- define "herald.natsTlsSecretName" -}}
{{- default (printf "%s-nats-tls" (include "herald.fullname" .)) .Values.nats.tls.existingSecret -}}
{{- end -}}

{{- define "herald.natsCredsEnabled" -}}
{{- if or .Values.nats.credentials.creds .Values.nats.credentials.existingSecret }}true{{ end -}}
{{- end -}}

{{/* Environment shared by the three services; (dict "root" $ "c" "edge") */}}
{{- define "herald.commonEnv" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .c -}}
- name: HERALD_NATS
  value: {{ $root.Values.nats.url | quote }}
- name: HERALD_LOG_FORMAT
  value: {{ $root.Values.logFormat | quote }}
{{- if $root.Values.config }}
- name: HERALD_CONFIG
  value: /etc/herald/herald.toml
{{- end }}
- name: HERALD_DRAIN_DELAY
  value: {{ $v.drain.delay | quote }}
{{- if include "herald.natsCredsEnabled" $root }}
- name: HERALD_NATS_CREDS
  value: /etc/herald/nats-creds/{{ $root.Values.nats.credentials.key }}
{{- end }}
{{- if $root.Values.nats.tls.enabled }}
- name: HERALD_NATS_TLS_CA
  value: /etc/herald/nats-tls/{{ $root.Values.nats.tls.caKey }}
{{- if $root.Values.nats.tls.clientCert }}
- name: HERALD_NATS_TLS_CERT
  value: /etc/herald/nats-tls/{{ $root.Values.nats.tls.certKey }}
- name: HERALD_NATS_TLS_KEY
  value: /etc/herald/nats-tls/{{ $root.Values.nats.tls.keyKey }}
{{- end }}
{{- end }}
{{- if gt (int $v.workerThreads) 0 }}
- name: HERALD_WORKER_THREADS
  value: {{ $v.workerThreads | quote }}
{{- end }}
{{- if $v.usePresenceService }}
- name: HERALD_PRESENCE
  value: {{ printf "%s://%s:%d" (ternary "https" "http" (ne $root.Values.grpcTls.secretName "")) (include "herald.component" (dict "root" $root "c" "presence")) (int $root.Values.presence.service.grpcPort) | quote }}
{{- if $root.Values.grpcTls.secretName }}
- name: HERALD_PRESENCE_TLS_CA
  value: /etc/herald/grpc-tls/ca.crt
- name: HERALD_PRESENCE_TLS_CERT
  value: /etc/herald/grpc-tls/tls.crt
- name: HERALD_PRESENCE_TLS_KEY
  value: /etc/herald/grpc-tls/tls.key
{{- end }}
{{- end }}
{{- range $name, $value := $v.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Volume mounts shared by the three services */}}
{{- define "herald.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.config }}
- name: config
  mountPath: /etc/herald/herald.toml
  subPath: herald.toml
  readOnly: true
{{- end }}
{{- if include "herald.natsCredsEnabled" . }}
- name: nats-creds
  mountPath: /etc/herald/nats-creds
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  mountPath: /etc/herald/nats-tls
  readOnly: true
{{- end }}
{{- if .Values.grpcTls.secretName }}
# Whole-volume mount (no subPath): renewed files are swapped in and re-read.
- name: grpc-tls
  mountPath: /etc/herald/grpc-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "herald.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.config }}
- name: config
  configMap:
    name: {{ include "herald.fullname" . }}-config
{{- end }}
{{- if include "herald.natsCredsEnabled" . }}
- name: nats-creds
  secret:
    secretName: {{ include "herald.natsCredsSecretName" . }}
    items:
      - key: {{ .Values.nats.credentials.key }}
        path: {{ .Values.nats.credentials.key }}
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ include "herald.natsTlsSecretName" . }}
{{- end }}
{{- if .Values.grpcTls.secretName }}
- name: grpc-tls
  secret:
    secretName: {{ .Values.grpcTls.secretName }}
{{- end }}
{{- end -}}

{{- define "herald.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Pod-level scheduling: (dict "root" $ "c" "edge") */}}
{{- define "herald.scheduling" -}}
{{- $v := index .root.Values .c -}}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $v.topologySpread.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $v.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "herald.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
{{- end }}
{{- end -}}

{{/* Pod annotations: config checksum, scrape hints; (dict "root" $ "c" "edge" "port" 8080) */}}
{{- define "herald.podAnnotations" -}}
{{- $v := index .root.Values .c -}}
checksum/config: {{ include "herald.toml" .root | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- if .https }}
prometheus.io/scheme: https
{{- end }}
{{- end }}
{{- with $v.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "herald.preStop" -}}
{{- if gt (int .drain.preStopSeconds) 0 }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ .drain.preStopSeconds }}
{{- end }}
{{- end -}}

{{/*
herald.toml from the `config` value. Helm's toToml writes every number as a
float (YAML numbers arrive as float64), and Herald reads history_size as an
integer, so the file is written here: whole numbers as integers.
(dict "path" "" "m" .Values.config)
*/}}
{{- define "herald.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end -}}

{{- define "herald.toml.value" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}{{ if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $i, $x := . }}{{ if $i }}, {{ end }}{{ include "herald.toml.value" $x }}{{ end }}]
{{- else if kindIs "map" . }}{ {{- $first := true }}{{ range $k, $x := . }}{{ if not $first }}, {{ end }}{{ $first = false }}{{ include "herald.toml.key" $k }} = {{ include "herald.toml.value" $x }}{{ end }} }
{{- else }}{{ fail (printf "config: cannot write %v (%s) to herald.toml" . (kindOf .)) }}
{{- end -}}
{{- end -}}

{{- define "herald.toml.table" -}}
{{- $path := .path -}}
{{- range $k, $v := .m }}
{{- if not (kindIs "map" $v) }}
{{ include "herald.toml.key" $k }} = {{ include "herald.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := .m }}
{{- if kindIs "map" $v }}
{{- $sub := ternary (include "herald.toml.key" $k) (printf "%s.%s" $path (include "herald.toml.key" $k)) (eq $path "") }}
{{- if or (eq $path "") (not (empty $v)) }}

[{{ $sub }}]
{{- end }}
{{- include "herald.toml.table" (dict "path" $sub "m" $v) }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "herald.toml" -}}
# herald.toml, rendered by the Herald chart from the `config` value.
{{- include "herald.toml.table" (dict "path" "" "m" .Values.config) }}
{{- end -}}

{{/* --api-tokens for the routers and presence replicas: env, mount, volume. */}}
{{- define "herald.apiTokensEnv" -}}
{{- if .Values.apiTokens.secretName }}
- name: HERALD_API_TOKENS
  value: /etc/herald/api/{{ .Values.apiTokens.key }}
{{- end }}
{{- end -}}

{{- define "herald.apiTokensMount" -}}
{{- if .Values.apiTokens.secretName }}
- name: api-tokens
  mountPath: /etc/herald/api
  readOnly: true
{{- end }}
{{- end -}}

{{- define "herald.apiTokensVolume" -}}
{{- if .Values.apiTokens.secretName }}
- name: api-tokens
  secret:
    secretName: {{ .Values.apiTokens.secretName }}
{{- end }}
{{- end -}}

{{/* --presence-api-token for a component that asks the presence Service directly. */}}
{{- define "herald.presenceTokenEnv" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .c -}}
{{- if and $v.usePresenceService $root.Values.apiTokens.secretName $root.Values.apiTokens.presenceTokenKey }}
- name: HERALD_PRESENCE_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.apiTokens.secretName }}
      key: {{ $root.Values.apiTokens.presenceTokenKey }}
{{- end }}
{{- end -}}

{{/* The gRPC API's TLS (router and presence). */}}
{{- define "herald.grpcTlsEnv" -}}
{{- if .Values.grpcTls.secretName }}
- name: HERALD_GRPC_TLS_CERT
  value: /etc/herald/grpc-tls/tls.crt
- name: HERALD_GRPC_TLS_KEY
  value: /etc/herald/grpc-tls/tls.key
{{- if .Values.grpcTls.clientAuth }}
- name: HERALD_GRPC_CLIENT_CA
  value: /etc/herald/grpc-tls/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* Readiness of a gRPC service: the kubelet's gRPC probe speaks plain
text only, so over TLS /readyz answers instead (it turns not ready with
the gRPC health statuses). (dict "root" $ "port" 50051) */}}
{{- define "herald.grpcReadiness" -}}
readinessProbe:
  {{- if .root.Values.grpcTls.secretName }}
  httpGet:
    path: /readyz
    port: http
  {{- else }}
  grpc:
    port: {{ .port }}
  {{- end }}
  periodSeconds: 2
  timeoutSeconds: 1
  failureThreshold: 2
{{- end -}}
