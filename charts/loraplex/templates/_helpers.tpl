{{/* The chart name, for the app.kubernetes.io/name label. */}}
{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-loraplex, or the release name if it already says loraplex. */}}
{{- define "loraplex.fullname" -}}
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

{{- define "loraplex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "loraplex.labels" -}}
helm.sh/chart: {{ include "loraplex.chart" . }}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplex
{{- end }}

{{/* Labels that select the operator's pods; never change them, Deployment selectors are immutable. */}}
{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraplex.operatorSelectorLabels" -}}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraplex.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "loraplex.peeringName" -}}
{{- default (include "loraplex.fullname" .) .Values.operator.ha.peeringName }}
{{- end }}

{{- define "loraplex.clusterWide" -}}
{{- if eq .Values.watch.mode "cluster" }}true{{ end }}
{{- end }}

{{/* Watched namespaces as a JSON list (namespaced mode); use with fromJsonArray. */}}
{{- define "loraplex.watchNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* Namespaces that get the trainer ServiceAccount and RoleBinding, as a JSON list. */}}
{{- define "loraplex.trainerNamespaces" -}}
{{- if .Values.trainer.namespaces }}
{{- .Values.trainer.namespaces | uniq | toJson }}
{{- else if include "loraplex.clusterWide" . }}
{{- list .Release.Namespace | toJson }}
{{- else }}
{{- include "loraplex.watchNamespaces" . }}
{{- end }}
{{- end }}
