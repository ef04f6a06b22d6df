{{/* Names, labels and the RBAC rules shared by the chart's templates. */}}

{{- define "townsquare.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "townsquare.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "townsquare.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "townsquare.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Cluster-scoped objects carry the release namespace: one release name, many namespaces. */}}
{{- define "townsquare.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "townsquare.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The node headroom PriorityClass: one per release, so releases never contend for it. */}}
{{- define "townsquare.headroomPriorityClass" -}}
{{- default (printf "%s-headroom" (include "townsquare.clusterName" .)) .Values.nodeHeadroom.priorityClass.name }}
{{- end }}

{{- define "townsquare.selectorLabels" -}}
app.kubernetes.io/name: {{ include "townsquare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "townsquare.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "townsquare.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: townsquare
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "townsquare.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "townsquare.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "townsquare.peeringName" -}}
{{- default (include "townsquare.fullname" .) .Values.highAvailability.peeringName }}
{{- end }}

{{- /* Names of partition p's Deployments and peering object: the plain names for p = 0. */}}
{{- define "townsquare.partitionName" -}}
{{- if eq (int .partition) 0 }}{{ include "townsquare.fullname" .root }}{{ else }}{{ printf "%s-p%d" (include "townsquare.fullname" .root) (int .partition) }}{{ end }}
{{- end }}

{{- define "townsquare.partitionPeeringName" -}}
{{- if eq (int .partition) 0 }}{{ include "townsquare.peeringName" .root }}{{ else }}{{ printf "%s-p%d" (include "townsquare.peeringName" .root) (int .partition) }}{{ end }}
{{- end }}

{{- define "townsquare.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "townsquare.metricsServiceName" -}}
{{- printf "%s-metrics" (include "townsquare.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
What the operator does in the namespaces it serves, and nothing more:
- AudioRooms: watched; patched for kopf's annotations and finalizer; status written.
- Children (StatefulSet, Service, ConfigMap, PodDisruptionBudget): written by server-side
  apply (create + patch) and watched by label; none is ever deleted by the operator
  (owner references let the garbage collector do it). StatefulSet status is read for
  readiness, the shard map ConfigMap to carry it across restarts, relay pods are watched
  (one shared index) for their readiness, start-up times and template revision.
- Relay pods: deleted one drained relay at a time during a rollout, so that the StatefulSet
  (updateStrategy OnDelete) brings it back with the new template.
- Node headroom placeholder pods: created ahead of a pre-warm and deleted as relays take
  their place (the only pods the operator creates).
- Events: created on AudioRooms; listed to read the StatefulSet's FailedCreate (the API
  server's reason for refusing relay pods).
Secrets are absent on purpose.
*/}}
{{- define "townsquare.rules.namespaced" -}}
- apiGroups: ["townsquare.dev"]
  resources: ["audiorooms"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["townsquare.dev"]
  resources: ["audiorooms/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets/status"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}

{{/* kopf's own scanning: CRDs (to notice the AudioRoom CRD change) and, when limited to
namespaces, the namespaces themselves. Read-only, cluster-scoped by nature. */}}
{{- define "townsquare.rules.scanning" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watch.namespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/* Peering: replicas read the peering resource and patch only their own object. */}}
{{- define "townsquare.rules.peering" -}}
{{- $resource := ternary "kopfpeerings" "clusterkopfpeerings" (gt (len .Values.watch.namespaces) 0) }}
- apiGroups: ["kopf.dev"]
  resources: [{{ $resource | quote }}]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: [{{ $resource | quote }}]
  resourceNames:
    {{- range $partition := until (int .Values.partitions) }}
    - {{ include "townsquare.partitionPeeringName" (dict "root" $ "partition" $partition) | quote }}
    {{- end }}
  verbs: ["get", "patch"]
{{- end }}
