{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "raresignal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name alone when it already holds the chart name. */}}
{{- define "raresignal.fullname" -}}
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

{{- define "raresignal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release (a Deployment selector is immutable). */}}
{{- define "raresignal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raresignal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/* The Kubernetes recommended labels, plus helm.sh/chart. */}}
{{- define "raresignal.labels" -}}
helm.sh/chart: {{ include "raresignal.chart" . }}
{{ include "raresignal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: raresignal
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of objects that are not the server itself (dashboards, rules). */}}
{{- define "raresignal.monitoringLabels" -}}
helm.sh/chart: {{ include "raresignal.chart" . }}
app.kubernetes.io/name: {{ include "raresignal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: monitoring
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: raresignal
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "raresignal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raresignal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "raresignal.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the server's tokens file. */}}
{{- define "raresignal.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "raresignal.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Name of the Secret holding the TLS certificate and key. */}}
{{- define "raresignal.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "raresignal.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* Whether the monitoring.coreos.com CRDs can be used: the API is served and the values ask. */}}
{{- define "raresignal.hasMonitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/* The in-cluster gRPC address training pods dial. */}}
{{- define "raresignal.grpcAddress" -}}
{{- printf "%s.%s.svc:%d" (include "raresignal.fullname" .) .Release.Namespace (int .Values.service.ports.grpc) }}
{{- end }}

{{/* Name of the Secret holding the /metrics scrape token, and its key. */}}
{{- define "raresignal.metricsTokenSecretName" -}}
{{- default (printf "%s-metrics-token" (include "raresignal.fullname" .)) .Values.metrics.auth.existingSecret }}
{{- end }}

{{- define "raresignal.metricsTokenSecretKey" -}}
{{- if .Values.metrics.auth.existingSecret }}{{ .Values.metrics.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* Non-empty when the server stores on an external PostgreSQL. */}}
{{- define "raresignal.postgres" -}}
{{- if eq .Values.database.backend "postgresql" }}true{{ end }}
{{- end }}

{{/* Fails the rendering on a database setup that cannot work. */}}
{{- define "raresignal.checkDatabase" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "raresignal.postgres" .)) }}
{{- fail (printf "replicaCount=%d needs database.backend=postgresql: SQLite allows a single writer, so more than one replica cannot share its file" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (include "raresignal.postgres" .) (not .Values.database.postgresql.existingSecret) }}
{{- fail "database.backend=postgresql needs database.postgresql.existingSecret: a Secret holding the URL (key database.postgresql.urlKey) and the password (key database.postgresql.passwordKey)" }}
{{- end }}
{{- end }}
