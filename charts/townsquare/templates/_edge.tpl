{{/* Names and labels of the edge (the join gateway), apart from the operator's. */}}

{{- define "townsquare.edge.fullname" -}}
{{- printf "%s-edge" (include "townsquare.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Its own name label, so the operator's Service and budget never select edge pods. */}}
{{- define "townsquare.edge.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-edge" (include "townsquare.name" .) }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "townsquare.edge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "townsquare.edge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: edge
app.kubernetes.io/part-of: townsquare
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "townsquare.edge.prometheusUrl" -}}
{{- default .Values.prometheus.url .Values.edge.prometheusUrl }}
{{- end }}

{{/* The edge runs when enabled and it knows where the relays report their listeners. */}}
{{- define "townsquare.edge.enabled" -}}
{{- if and .Values.edge.enabled (include "townsquare.edge.prometheusUrl" .) }}true{{ end }}
{{- end }}

{{- define "townsquare.edge.secretName" -}}
{{- default (printf "%s-tickets" (include "townsquare.fullname" .)) .Values.edge.ticketKey.existingSecret }}
{{- end }}

{{/* Replicas that share each relay's spare room: the autoscaler's maximum when there is one. */}}
{{- define "townsquare.edge.peers" -}}
{{- if .Values.edge.autoscaling.enabled }}{{ .Values.edge.autoscaling.maxReplicas }}{{ else }}{{ .Values.edge.replicas }}{{ end }}
{{- end }}

{{/* Namespaces whose relays get a copy of the generated ticket key: those listed, or the
watched ones. As a JSON list (fromJsonArray). */}}
{{- define "townsquare.edge.relayKeyNamespaces" -}}
{{- toJson (default .Values.watch.namespaces .Values.edge.ticketKey.relayNamespaces) }}
{{- end }}
