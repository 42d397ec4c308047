{{/*
RBAC rules shared by the ClusterRole (watch.mode=cluster) and the per-namespace Roles
(watch.mode=namespaced), so both modes grant exactly the same namespaced permissions.
*/}}

{{/* What the operator does inside a watched namespace. */}}
{{- define "loraplex.operatorRules" -}}
# The resources it reconciles: kopf keeps its progress in annotations and adds finalizers (patch);
# the operator labels experiments with their pool and replica.
- apiGroups: ["loraplex.dev"]
  resources: ["loraexperiments", "sharedbasepools"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["loraplex.dev"]
  resources: ["loraexperiments/status", "sharedbasepools/status"]
  verbs: ["get", "patch"]
# The scheduler scales pools through /scale, like an HPA would.
- apiGroups: ["loraplex.dev"]
  resources: ["sharedbasepools/scale"]
  verbs: ["get", "patch", "update"]
# What a pool renders: the trainer StatefulSet, its headless and metrics Services, the serving
# Deployment and Service (spec.serving), the
# promoted-adapters ConfigMap.
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# Replica readiness is read from the trainer pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if and .Values.operator.ha.enabled (not (include "loraplex.clusterWide" .)) }}
# kopf peering between the HA replicas of a namespaced operator.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* What a trainer replica does in its own namespace. */}}
{{- define "loraplex.trainerRules" -}}
# It watches the experiments placed on it and reports their training progress and candidates.
- apiGroups: ["loraplex.dev"]
  resources: ["loraexperiments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["loraplex.dev"]
  resources: ["loraexperiments/status"]
  verbs: ["patch"]
# It reads its pool and writes the model facts it measured (status.model).
- apiGroups: ["loraplex.dev"]
  resources: ["sharedbasepools"]
  verbs: ["get"]
- apiGroups: ["loraplex.dev"]
  resources: ["sharedbasepools/status"]
  verbs: ["patch"]
# Datasets and reward code may live in ConfigMaps.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
{{- end }}

{{- define "loraplex.servingRules" -}}
# It follows the pool's promoted-adapters ConfigMap (read every few seconds); nothing else.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
{{- end }}
