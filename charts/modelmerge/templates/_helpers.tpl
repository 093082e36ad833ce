{{/* Names ----------------------------------------------------------------------------------------------- */}}

{{- define "modelmerge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "modelmerge.fullname" -}}
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

{{/* Cluster-scoped objects carry the release namespace, so equal release names in two namespaces never clash. */}}
{{- define "modelmerge.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "modelmerge.fullname" .) }}
{{- end }}

{{- define "modelmerge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelmerge.labels" -}}
helm.sh/chart: {{ include "modelmerge.chart" . }}
app.kubernetes.io/name: {{ include "modelmerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelmerge
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "operator") */}}
{{- define "modelmerge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelmerge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modelmerge.operator.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "modelmerge.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "modelmerge.api.serviceAccountName" -}}
{{- default (printf "%s-api" (include "modelmerge.fullname" .)) .Values.api.serviceAccount.name }}
{{- end }}

{{- define "modelmerge.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Storage -------------------------------------------------------------------------------------------- */}}

{{- define "modelmerge.outputClaim" -}}
{{- if .Values.storage.output.create }}
{{- printf "%s-output" (include "modelmerge.fullname" .) }}
{{- else }}
{{- required "storage.output.existingClaim is required when storage.output.create is false" .Values.storage.output.existingClaim }}
{{- end }}
{{- end }}

{{- define "modelmerge.cacheClaim" -}}
{{- if .Values.storage.modelCache.create }}
{{- printf "%s-model-cache" (include "modelmerge.fullname" .) }}
{{- else }}
{{- required "storage.modelCache.existingClaim is required when storage.modelCache.create is false" .Values.storage.modelCache.existingClaim }}
{{- end }}
{{- end }}

{{/* A PersistentVolumeClaim: (dict "root" $ "name" "..." "volume" .Values.storage.output "component" "output") */}}
{{- define "modelmerge.pvc" -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "modelmerge.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  {{- if .volume.keepOnUninstall }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
spec:
  accessModes: [{{ .volume.accessMode }}]
  {{- if eq .volume.storageClassName "-" }}
  storageClassName: ""
  {{- else if .volume.storageClassName }}
  storageClassName: {{ .volume.storageClassName }}
  {{- end }}
  resources:
    requests:
      storage: {{ .volume.size }}
{{- end }}

{{/* Scope ---------------------------------------------------------------------------------------------- */}}

{{/* The namespaces the operator watches (namespaced mode), one per line. */}}
{{- define "modelmerge.watchNamespaces" -}}
{{- $list := .Values.watch.namespaces | default list }}
{{- if or (not $list) .Values.api.enabled }}
{{- $list = prepend $list .Release.Namespace }}
{{- end }}
{{- range (uniq $list) }}
{{ . }}
{{- end }}
{{- end }}

{{/* Merge defaults ------------------------------------------------------------------------------------- */}}

{{/* The ModelMerge spec fields the API adds to every merge it creates (--spec-defaults, JSON). The output
     claim comes from --output-pvc/--output-subpath. */}}
{{- define "modelmerge.specDefaults" -}}
{{- $m := .Values.merge }}
{{- $resources := dict "gpuResourceName" $m.gpuResourceName }}
{{- range $key := list "cpu" "memory" "gpu" "shmSize" }}
{{- if hasKey $m.resources $key }}
{{- if not (kindIs "invalid" (get $m.resources $key)) }}
{{- $_ := set $resources $key (get $m.resources $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- $spec := dict "resources" $resources "backoffLimit" $m.backoffLimit }}
{{- if not (kindIs "invalid" $m.ttlSecondsAfterFinished) }}
{{- $_ := set $spec "ttlSecondsAfterFinished" $m.ttlSecondsAfterFinished }}
{{- end }}
{{- if $m.hfTokenSecret }}
{{- $_ := set $spec "hfTokenSecret" (dict "name" $m.hfTokenSecret "key" $m.hfTokenSecretKey) }}
{{- end }}
{{- if $m.nodeSelector }}
{{- $_ := set $spec "nodeSelector" $m.nodeSelector }}
{{- end }}
{{- if $m.tolerations }}
{{- $_ := set $spec "tolerations" $m.tolerations }}
{{- end }}
{{- if $m.queueName }}
{{- $_ := set $spec "queueName" $m.queueName }}
{{- end }}
{{- with .Values.storage.modelCache }}
{{- if .enabled }}
{{- $cache := dict "pvc" (include "modelmerge.cacheClaim" $) "readOnly" .readOnly }}
{{- if .subPath }}
{{- $_ := set $cache "subPath" .subPath }}
{{- end }}
{{- $_ := set $spec "modelCache" $cache }}
{{- end }}
{{- end }}
{{- toJson (merge (deepCopy $m.extraSpecDefaults) $spec) }}
{{- end }}

{{/* The API token Secret: the user's existing one, else the chart's. */}}
{{- define "modelmerge.api.tokenSecret" -}}
{{- default (printf "%s-api-token" (include "modelmerge.fullname" .)) .Values.api.auth.existingSecret }}
{{- end }}

{{- define "modelmerge.api.tokenKey" -}}
{{- if .Values.api.auth.existingSecret }}{{ .Values.api.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* RBAC rules ----------------------------------------------------------------------------------------- */}}
{{/* Kept equal to modelmerge_operator/rbac.py (tests/test_chart.py checks it), minus kopf's peering rules:
     the chart runs one standalone operator. */}}

{{/* What the operator does in each watched namespace. */}}
{{- define "modelmerge.operator.rules" -}}
# ModelMerges: patch for cancel; create and delete for the trials of ModelMergeSweeps.
- apiGroups: [modelmerge.io]
  resources: [modelmerges]
  verbs: [get, list, watch, patch, create, delete]
- apiGroups: [modelmerge.io]
  resources: [modelmerges/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion (the Job and ConfigMap of a ModelMerge) need this where the
# OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: [modelmerge.io]
  resources: [modelmerges/finalizers]
  verbs: [update]
# ModelMergeSweeps: read, their status written; their children and cleanup Jobs are owned with blockOwnerDeletion.
- apiGroups: [modelmerge.io]
  resources: [modelmergesweeps]
  verbs: [get, list, watch]
- apiGroups: [modelmerge.io]
  resources: [modelmergesweeps/status]
  verbs: [get, patch]
- apiGroups: [modelmerge.io]
  resources: [modelmergesweeps/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
# The spec ConfigMap of each merge Job. No Secrets: the operator only references them by name.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create]
# Failure messages and progress come from the merge pods and their logs.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# Whether the claims of a merge whose pod waits for a node exist (status reason ClaimNotFound).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* What the REST API does in its namespace. */}}
{{- define "modelmerge.api.rules" -}}
- apiGroups: [modelmerge.io]
  resources: [modelmerges]
  verbs: [get, list, watch, create, patch]
# /api/sweeps: a sweep is a ModelMergeSweep (DELETE patches spec.cancel).
- apiGroups: [modelmerge.io]
  resources: [modelmergesweeps]
  verbs: [get, list, watch, create, patch]
# The Secret holding a request's hf_token: created, then handed to its ModelMerge (ownerReference), or deleted
# when the ModelMerge is rejected. Never read back: no get, list or watch.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch, delete]
# GET /api/jobs/{id}/logs: the Job's newest pod and its log.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
{{- end }}
