{{/* vim: set filetype=mustache: */}}

{{/* Chart name, cut to 63 characters. */}}
{{- define "ultramem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: release-chart unless the release name already contains the chart name. Cut to 40
characters because shard objects append "-shard-<k>" and StatefulSet pods a revision hash.
*/}}
{{- define "ultramem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ultramem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "ultramem.labels" -}}
helm.sh/chart: {{ include "ultramem.chart" . }}
{{ include "ultramem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ultramem
{{- end -}}

{{- define "ultramem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ultramem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels of every value-shard pod, whoever creates it (this chart, the operator, KubeRay):
PodDisruptionBudgets, the NetworkPolicy and the ServiceMonitor select on these.
*/}}
{{- define "ultramem.shardPodLabels" -}}
app.kubernetes.io/component: value-shard
ultramem.io/store: {{ include "ultramem.fullname" . }}
{{- end -}}

{{- define "ultramem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A standalone shard pod's image: the torch-free shard-cpu tag when set and the pod has no
GPU (image.shardCpuTag), else the full image. */}}
{{- define "ultramem.shardImage" -}}
{{- if and .Values.image.shardCpuTag (not (gt (int .Values.shard.gpus) 0)) -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.shardCpuTag -}}
{{- else -}}
{{- include "ultramem.image" . -}}
{{- end -}}
{{- end -}}

{{- define "ultramem.operatorImage" -}}
{{- $repo := default .Values.image.repository .Values.operator.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.operator.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "ultramem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-shard" (include "ultramem.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ultramem.operatorName" -}}
{{- printf "%s-operator" (include "ultramem.fullname" .) -}}
{{- end -}}

{{/* Layout label value, as the operator writes it: s<shards> (row) or s<shards>-dim. */}}
{{- define "ultramem.layout" -}}
{{- if eq .Values.store.sharding "row" -}}
{{- printf "s%d" (int .Values.store.shards) -}}
{{- else -}}
{{- printf "s%d-%s" (int .Values.store.shards) .Values.store.sharding -}}
{{- end -}}
{{- end -}}

{{/* Store root inside the containers. */}}
{{- define "ultramem.storeRoot" -}}
{{- if .Values.store.pvc.claimName -}}
{{- default .Values.store.pvc.mountPath .Values.store.path -}}
{{- else if .Values.store.path -}}
{{- .Values.store.path -}}
{{- else -}}
{{- fail "store: set store.pvc.claimName (a PVC holding the store) or store.path (inside the image)" -}}
{{- end -}}
{{- end -}}

{{/* Does this release render the shard StatefulSets itself? */}}
{{- define "ultramem.helmShards" -}}
{{- if and (eq .Values.mode "standalone") (eq .Values.standalone.managedBy "helm") -}}true{{- end -}}
{{- end -}}

{{/*
Does this chart start the shard servers itself, so that it can hand them TLS and token files?
standalone + managedBy=helm: its StatefulSets; ray without the operator: its placement Job.
*/}}
{{- define "ultramem.chartSecuresShards" -}}
{{- if or (include "ultramem.helmShards" .) (and (eq .Values.mode "ray") (not .Values.operator.enabled)) -}}true{{- end -}}
{{- end -}}

{{/* Does this release render a ValueStore? */}}
{{- define "ultramem.renderValueStore" -}}
{{- if and .Values.valueStore.create (or (eq .Values.mode "ray") (eq .Values.standalone.managedBy "operator")) -}}true{{- end -}}
{{- end -}}

{{/* Replicas of shard $k: (dict "root" $ "k" $k). */}}
{{- define "ultramem.shardReplicas" -}}
{{- $v := .root.Values.store -}}
{{- $o := index $v.replicaOverrides (toString .k) -}}
{{- if $o -}}{{ $o }}{{- else -}}{{ $v.replicas }}{{- end -}}
{{- end -}}

{{/* Cross-field checks that a JSON schema cannot express. */}}
{{- define "ultramem.validate" -}}
{{- $shards := int .Values.store.shards -}}
{{- range $k, $_ := .Values.store.replicaOverrides -}}
{{- if ge (atoi $k) $shards -}}
{{- fail (printf "store.replicaOverrides: shard %s does not exist (store.shards=%d)" $k $shards) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.mode "ray") .Values.store.replicaOverrides -}}
{{- fail "store.replicaOverrides needs mode=standalone (ray places equal replicas per shard)" -}}
{{- end -}}
{{- if and (eq .Values.ray.auth.mode "token") (not .Values.ray.auth.secretName) -}}
{{- fail "ray.auth.mode=token needs ray.auth.secretName (a Secret holding the Ray auth token)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not (include "ultramem.helmShards" .)) -}}
{{- fail "autoscaling.enabled needs mode=standalone with standalone.managedBy=helm (the operator owns replicas in operator mode, the KubeRay autoscaler in ray mode: ray.autoscaling.enabled)" -}}
{{- end -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and (or .Values.tls.enabled .Values.auth.tokenSecretName) (not (include "ultramem.chartSecuresShards" .)) -}}
{{- fail "tls.enabled / auth.tokenSecretName need shards this chart starts itself: mode=standalone with standalone.managedBy=helm, or mode=ray with operator.enabled=false (the operator passes no TLS or token settings to the shards yet)" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and .Values.tls.enabled (eq (int .Values.tls.healthPort) (int .Values.ports.grpc)) -}}
{{- fail "tls.healthPort must differ from ports.grpc" -}}
{{- end -}}
{{- $_ := include "ultramem.storeRoot" . -}}
{{- end -}}

{{/*
serve-shard flags for TLS and bearer tokens (files from the mounted Secrets). `ultramem-dist up`
takes the same flags and hands them to every shard actor (ray mode: the files are read on the
worker pods, which mount the Secrets at the same paths).
*/}}
{{- define "ultramem.serverSecurityArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/ultramem/tls/tls.crt
- --tls-key
- /etc/ultramem/tls/tls.key
{{- if .Values.tls.mutual }}
- --tls-client-ca
- /etc/ultramem/tls/ca.crt
{{- end }}
- --health-port
- {{ .Values.tls.healthPort | quote }}
{{- end }}
{{- if .Values.auth.tokenSecretName }}
- --auth-token-file
- {{ printf "/etc/ultramem/auth/%s" .Values.auth.tokenKey }}
{{- end }}
{{- end -}}

{{/* lookup/loadtest client flags matching the server's security. */}}
{{- define "ultramem.clientSecurityArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-ca
- /etc/ultramem/tls/ca.crt
{{- if .Values.tls.mutual }}
- --tls-cert
- /etc/ultramem/tls/tls.crt
- --tls-key
- /etc/ultramem/tls/tls.key
{{- end }}
{{- with .Values.tls.serverName }}
- --tls-server-name
- {{ . | quote }}
{{- end }}
{{- end }}
{{- if .Values.auth.tokenSecretName }}
- --auth-token-file
- {{ printf "/etc/ultramem/auth/%s" .Values.auth.tokenKey }}
{{- end }}
{{- end -}}

{{/* Secret volumes (and their mounts) for TLS material and the token file. */}}
{{- define "ultramem.securityVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.auth.tokenSecretName }}
- name: auth
  secret:
    secretName: {{ .Values.auth.tokenSecretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "ultramem.securityMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/ultramem/tls
  readOnly: true
{{- end }}
{{- if .Values.auth.tokenSecretName }}
- name: auth
  mountPath: /etc/ultramem/auth
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes / mounts for the store and a writable /tmp. */}}
{{- define "ultramem.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.store.pvc.claimName }}
- name: store
  persistentVolumeClaim:
    claimName: {{ .Values.store.pvc.claimName }}
    readOnly: {{ .Values.store.pvc.readOnly }}
{{- end }}
{{- end -}}

{{- define "ultramem.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.store.pvc.claimName }}
- name: store
  mountPath: {{ .Values.store.pvc.mountPath }}
  readOnly: {{ .Values.store.pvc.readOnly }}
{{- end }}
{{- end -}}

{{- define "ultramem.env" -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: ULTRAMEM_STORE
  value: {{ include "ultramem.fullname" . | quote }}
- name: ULTRAMEM_TABLE_VERSION
  value: {{ .Values.store.version | quote }}
{{- end -}}

{{/* Shard container resources with the GPU count merged in. */}}
{{- define "ultramem.shardResources" -}}
{{- $res := deepCopy .Values.shard.resources -}}
{{- if gt (int .Values.shard.gpus) 0 -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.shard.gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "ultramem.grpcProbe" -}}
grpc:
  port: {{ if .root.Values.tls.enabled }}{{ .root.Values.tls.healthPort }}{{ else }}{{ .root.Values.ports.grpc }}{{ end }}
  service: ""
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ default 2 .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* Comma-separated per-shard headless targets host:port for `ultramem-dist lookup`. */}}
{{- define "ultramem.shardTargets" -}}
{{- $full := include "ultramem.fullname" . -}}
{{- $port := .Values.ports.grpc -}}
{{- $ns := .Release.Namespace -}}
{{- $out := list -}}
{{- range $k := until (int .Values.store.shards) -}}
{{- $out = append $out (printf "%s-shard-%d.%s.svc:%v" $full $k $ns $port) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}
