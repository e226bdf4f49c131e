{{/* Names */}}
{{- define "flowlog.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowlog.fullname" -}}
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

{{- define "flowlog.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flowlog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flowlog
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "sidecar") */}}
{{- define "flowlog.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowlog.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flowlog.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "flowlog.sidecar.serviceAccountName" -}}
{{- if .Values.sidecar.serviceAccount.create -}}
{{- default (printf "%s-sidecar" (include "flowlog.fullname" .)) .Values.sidecar.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.sidecar.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "flowlog.enricher.serviceAccountName" -}}
{{- if .Values.enricher.serviceAccount.create -}}
{{- default (printf "%s-enricher" (include "flowlog.fullname" .)) .Values.enricher.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.enricher.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
TOML rendering. Helm's own toToml writes every number from values.yaml as a
float (4194304 -> 4.194304e+06), which the binaries' integer settings refuse,
so the settings files are written by these helpers: integral numbers as
integers, strings JSON-quoted (a subset of TOML basic strings), null dropped.
*/}}
{{- define "flowlog.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "flowlog.toml.value" -}}
{{- $k := kindOf . -}}
{{- if eq $k "string" -}}{{ toJson . }}
{{- else if eq $k "bool" -}}{{ . }}
{{- else if or (eq $k "float64") (eq $k "float32") -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if or (eq $k "int") (eq $k "int64") (eq $k "int32") (eq $k "uint64") -}}{{ . }}
{{- else if eq $k "slice" -}}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "flowlog.toml.value" $e }}{{ end }}]
{{- else if eq $k "map" -}}{ {{- $first := true -}}{{ range $key, $v := . }}{{ if not (kindIs "invalid" $v) }}{{ if not $first }}, {{ end }}{{ $first = false }}{{ include "flowlog.toml.key" $key }} = {{ include "flowlog.toml.value" $v }}{{ end }}{{ end }} }
{{- else -}}{{ fail (printf "flowlog.toml.value: cannot write a %s as TOML" $k) }}
{{- end -}}
{{- end -}}

{{/* A table: call with (dict "path" "kafka" "table" $map); scalars first, then sub-tables. */}}
{{- define "flowlog.toml.table" -}}
{{- $path := .path -}}
{{- $t := .table -}}
{{- if $path }}
[{{ $path }}]
{{- end }}
{{- range $key, $v := $t }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v)) }}
{{ include "flowlog.toml.key" $key }} = {{ include "flowlog.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $key, $v := $t }}
{{- if kindIs "map" $v }}
{{- $sub := include "flowlog.toml.key" $key }}
{{- include "flowlog.toml.table" (dict "path" (ternary $sub (printf "%s.%s" $path $sub) (eq $path "")) "table" $v) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The sidecar's settings: values + the shared Kafka settings + what the pod spec fixes. */}}
{{- define "flowlog.sidecar.config" -}}
{{- $c := deepCopy .Values.sidecar.config -}}
{{- $k := deepCopy (default dict $c.kafka) -}}
{{- $_ := set $k "brokers" .Values.kafka.brokers -}}
{{- $_ := set $k "flow_topic" .Values.kafka.flowTopic -}}
{{- $_ := set $k "identity_topic" .Values.kafka.identityTopic -}}
{{- $_ := set $k "properties" (deepCopy (default dict .Values.kafka.properties)) -}}
{{- $_ := set $c "kafka" $k -}}
{{- $s := deepCopy (default dict $c.spool) -}}
{{- $_ := set $s "dir" "/var/lib/flowlog/spool" -}}
{{- $_ := set $c "spool" $s -}}
{{- $_ := set $c "metrics_listen" (printf "%s:%d" .Values.sidecar.metrics.bindAddress (int .Values.sidecar.metrics.port)) -}}
{{- /* workload.kubernetes.enabled and node_name come from the pod's environment (the node's name is only known there). */ -}}
{{- $w := deepCopy (default dict $c.workload) -}}
{{- $kube := deepCopy (default dict $w.kubernetes) -}}
{{- $_ := set $kube "labels" .Values.sidecar.kubernetes.labels -}}
{{- $_ := set $w "kubernetes" $kube -}}
{{- $_ := set $c "workload" $w -}}
# flowlog-sidecar settings, rendered by the flowlog Helm chart (sidecar.config in values.yaml).
{{- include "flowlog.toml.table" (dict "path" "" "table" $c) }}
{{- end -}}

{{- define "flowlog.enricher.config" -}}
{{- $c := deepCopy .Values.enricher.config -}}
{{- $_ := set $c "brokers" .Values.kafka.brokers -}}
{{- $_ := set $c "flow_topic" .Values.kafka.flowTopic -}}
{{- $_ := set $c "identity_topic" .Values.kafka.identityTopic -}}
{{- $_ := set $c "kafka_properties" (deepCopy (default dict .Values.kafka.properties)) -}}
{{- $o := .Values.enricher.output -}}
{{- if eq $o.type "s3" -}}
{{- $_ := set $c "output" (include "flowlog.enricher.s3Url" .) -}}
{{- $s3 := deepCopy (default dict $c.s3) -}}
{{- with $o.endpointUrl }}{{ $_ := set $s3 "endpoint_url" . }}{{ end -}}
{{- with $o.region }}{{ $_ := set $s3 "region" . }}{{ end -}}
{{- $_ := set $c "s3" $s3 -}}
{{- else -}}
{{- $_ := set $c "output" "/data" -}}
{{- end -}}
{{- $_ := set $c "output_formats" $o.formats -}}
{{- $_ := set $c "metrics_listen" (printf "0.0.0.0:%d" (int .Values.enricher.metrics.port)) -}}
{{- if .Values.enricher.staticMap -}}
{{- $_ := set $c "static_map" "/etc/flowlog/static/cidrs.toml" -}}
{{- end -}}
# flowlog-enricher settings, rendered by the flowlog Helm chart (enricher.config in values.yaml).
{{- include "flowlog.toml.table" (dict "path" "" "table" $c) }}
{{- end -}}

{{/* The enricher's output values, checked; fails the render on a mistake. */}}
{{- define "flowlog.enricher.validateOutput" -}}
{{- $o := .Values.enricher.output -}}
{{- if not (has $o.type (list "s3" "pvc" "emptyDir")) -}}
{{- fail "enricher.output.type must be s3, pvc or emptyDir" -}}
{{- end -}}
{{- if and (eq $o.type "s3") (not $o.bucket) -}}
{{- fail "enricher.output.bucket is required with enricher.output.type s3 (or use type pvc)" -}}
{{- end -}}
{{- if or (not $o.formats) (not (kindIs "slice" $o.formats)) -}}
{{- fail "enricher.output.formats must be a list: [avro], [parquet] or [avro, parquet]" -}}
{{- end -}}
{{- range $o.formats -}}
{{- if not (has . (list "avro" "parquet")) -}}
{{- fail (printf "enricher.output.formats: %v is not avro or parquet" .) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $o.type "pvc") (not (has $o.accessMode (list "ReadWriteMany" "ReadWriteOnce"))) -}}
{{- fail "enricher.output.accessMode must be ReadWriteMany or ReadWriteOnce" -}}
{{- end -}}
{{- if and (eq $o.type "pvc") (eq $o.accessMode "ReadWriteOnce") (gt (int (include "flowlog.enricher.maxReplicas" .)) 1) -}}
{{- fail "enricher.output.accessMode ReadWriteOnce holds one replica: set autoscaling.mode none and replicas 1 (or maxReplicas 1), or use ReadWriteMany" -}}
{{- end -}}
{{- end -}}

{{/* The most enricher replicas that can run at once (apart from a rollout's surge). */}}
{{- define "flowlog.enricher.maxReplicas" -}}
{{- if eq .Values.enricher.autoscaling.mode "none" -}}{{ .Values.enricher.replicas }}{{- else -}}{{ .Values.enricher.autoscaling.maxReplicas }}{{- end -}}
{{- end -}}

{{/* s3://<bucket>/<prefix> of enricher.output. */}}
{{- define "flowlog.enricher.s3Url" -}}
{{- list .Values.enricher.output.bucket (trimAll "/" (default "" .Values.enricher.output.prefix)) | compact | join "/" | printf "s3://%s" -}}
{{- end -}}
