{{/*
Names. KubeRay appends "-xxxxx" to the RayService name for its RayCluster and longer suffixes for
pods and Services, and refuses RayService names over 47 characters: 40 leaves room for ours.
*/}}
{{- define "grok-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "grok-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "grok-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "grok-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "grok-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "grok-serve.labels" -}}
helm.sh/chart: {{ include "grok-serve.chart" . }}
{{ include "grok-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: grok-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod template labels: only what never changes between chart versions. Anything that changes in the
pod template makes KubeRay build a whole new cluster (and load the weights again).
*/}}
{{- define "grok-serve.podLabels" -}}
{{ include "grok-serve.selectorLabels" . }}
app.kubernetes.io/part-of: grok-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "grok-serve.podAnnotations" -}}
{{- $root := index . 0 }}
{{- $annotations := deepCopy (index . 1 | default dict) }}
{{- with $root.Values.rayService.clusterRevision }}
{{- $_ := set $annotations "grok-serve/cluster-revision" (toString .) }}
{{- end }}
{{- with $annotations }}{{ toYaml . }}{{ end }}
{{- end }}

{{/* Pods of one role, across the clusters of an upgrade (KubeRay's own labels name one cluster). */}}
{{- define "grok-serve.headSelectorLabels" -}}
{{ include "grok-serve.selectorLabels" . }}
app.kubernetes.io/component: ray-head
{{- end }}

{{- define "grok-serve.workerSelectorLabels" -}}
{{ include "grok-serve.selectorLabels" . }}
app.kubernetes.io/component: ray-worker
{{- end }}

{{- define "grok-serve.gatewaySelectorLabels" -}}
{{ include "grok-serve.selectorLabels" . }}
app.kubernetes.io/component: ray-gateway
{{- end }}

{{- define "grok-serve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{- define "grok-serve.httpServiceName" -}}
{{- default (printf "%s-http" (include "grok-serve.fullname" .)) .Values.service.http.name }}
{{- end }}

{{- define "grok-serve.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "grok-serve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/*
A digest of what the chart knows of the keys: the given keys, the Secret's name and auth.revision.
Never the cluster's content (`lookup`): `helm template` and GitOps renderers cannot read it, and a
digest that differs between renderers would flip the Serve config at every sync.
*/}}
{{- define "grok-serve.apiKeysRevision" -}}
{{- $a := .Values.auth }}
{{- printf "%s|%s|%s" (toString $a.revision) $a.existingSecret (join "\n" $a.apiKeys) | sha256sum | trunc 16 }}
{{- end }}

{{/* Where the API keys file is mounted in every Ray container (the gateway reads it at start). */}}
{{- define "grok-serve.apiKeyDir" -}}/etc/grok-serve/auth{{- end }}

{{/*
A Ray custom resource only the pods meant for gateways advertise (one unit per gateway pod, or plenty
on the head): each gateway replica asks for one unit of it.
*/}}
{{- define "grok-serve.gatewayResource" -}}grok_gateway{{- end }}

{{/* Whether gateway replicas are pinned: always on gateway pods; on the head only for gRPC's port. */}}
{{- define "grok-serve.gatewayPinned" -}}
{{- if or (not (include "grok-serve.gatewayOnHead" .)) .Values.grpc.enabled }}true{{ end }}
{{- end }}

{{/* The `resources` rayStartParam: the quoted, escaped JSON form KubeRay passes to `ray start` and Ray's autoscaler parses. */}}
{{- define "grok-serve.rayResourcesParam" -}}
{{- printf "\"%s\"" (. | toJson | replace "\"" "\\\"") }}
{{- end }}

{{/* A Prometheus duration (1m30s, 500ms) in seconds. */}}
{{- define "grok-serve.durationSeconds" -}}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 }}
{{- $n := float64 (regexFind "^[0-9]+" .) }}
{{- $unit := regexFind "(ms|s|m|h)$" . }}
{{- $total = addf $total (mulf $n (get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{- define "grok-serve.modelDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.subPath) }}
{{- end }}

{{/* What the engine loads: a checkpoint directory, or a preset name. */}}
{{- define "grok-serve.engineModel" -}}
{{- if eq .Values.model.source "preset" }}{{ .Values.model.preset }}{{ else }}{{ include "grok-serve.modelDir" . }}{{ end }}
{{- end }}

{{- define "grok-serve.gpusPerRank" -}}
{{- if eq .Values.engine.device "cuda" }}1{{ else }}0{{ end }}
{{- end }}

{{/* Worker pod counts: engine.placement.nodesPerReplica GPU pods per engine replica (one by default). */}}
{{- define "grok-serve.workerReplicas" -}}
{{- $a := .Values.engine.autoscaling }}
{{- $nodes := int .Values.engine.placement.nodesPerReplica }}
{{- if $a.enabled }}
{{- if kindIs "invalid" $a.initialReplicas }}{{ mul $a.minReplicas $nodes }}{{ else }}{{ mul $a.initialReplicas $nodes }}{{ end }}
{{- else }}{{ mul .Values.engine.replicas $nodes }}{{ end }}
{{- end }}

{{/* GPU pods the engine replicas may need at most. */}}
{{- define "grok-serve.workerNeeded" -}}
{{- mul (ternary .Values.engine.autoscaling.maxReplicas .Values.engine.replicas .Values.engine.autoscaling.enabled) .Values.engine.placement.nodesPerReplica }}
{{- end }}

{{- define "grok-serve.workerMaxReplicas" -}}
{{- if kindIs "invalid" .Values.worker.maxReplicas }}{{ include "grok-serve.workerNeeded" . }}{{ else }}{{ .Values.worker.maxReplicas }}{{ end }}
{{- end }}

{{/* The engine's replica floor: GPU pods that exist whatever the load. */}}
{{- define "grok-serve.workerFloor" -}}
{{- mul (ternary .Values.engine.autoscaling.minReplicas .Values.engine.replicas .Values.engine.autoscaling.enabled) .Values.engine.placement.nodesPerReplica }}
{{- end }}

{{/* GPUs of one GPU pod: its share of one replica's ranks. */}}
{{- define "grok-serve.gpusPerPod" -}}
{{- mul (include "grok-serve.gpusPerRank" . | int) (div (int .Values.engine.parallelSize) (int .Values.engine.placement.nodesPerReplica)) }}
{{- end }}

{{/* The placement-group strategy of a replica's ranks: STRICT_PACK on one pod, PACK across pods. */}}
{{- define "grok-serve.placementStrategy" -}}
{{- $p := .Values.engine.placement }}
{{- if $p.strategy }}{{ $p.strategy }}{{ else if gt (int $p.nodesPerReplica) 1 }}PACK{{ else }}STRICT_PACK{{ end }}
{{- end }}

{{- define "grok-serve.gatewayMaxReplicas" -}}
{{- if kindIs "invalid" .Values.gatewayWorker.maxReplicas }}{{ .Values.gateway.replicas }}{{ else }}{{ .Values.gatewayWorker.maxReplicas }}{{ end }}
{{- end }}

{{/*
PodDisruptionBudget minAvailable per role: an explicit value, else the pods expected less one, so a
drain evicts one at a time (RayCluster has no scale subresource, so only an integer minAvailable
works; see values.yaml).
*/}}
{{- define "grok-serve.minAvailable" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $p := index $root.Values.podDisruptionBudget $role }}
{{- if not (kindIs "invalid" $p.minAvailable) }}{{ $p.minAvailable }}
{{- else if eq $role "head" }}{{ ternary 0 1 $root.Values.gcsFaultTolerance.enabled }}
{{- else if eq $role "worker" }}{{ max 0 (sub (include "grok-serve.workerFloor" $root | int) 1) }}
{{- else }}{{ max 0 (sub (int $root.Values.gateway.replicas) 1) }}
{{- end }}
{{- end }}

{{/* Checks the schema cannot express. */}}
{{- define "grok-serve.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) }}
{{- fail "model.source is pvc: set model.pvc.claimName to the PersistentVolumeClaim holding the checkpoint" }}
{{- end }}
{{- if and (eq $v.model.source "objectStore") (not $v.model.objectStore.uri) }}
{{- fail "model.source is objectStore: set model.objectStore.uri (s3://bucket/prefix/)" }}
{{- end }}
{{- if and (eq $v.model.source "objectStore") (not (hasPrefix "s3://" $v.model.objectStore.uri)) }}
{{- fail (printf "model.objectStore.uri must start with s3:// (S3-compatible stores: set model.objectStore.endpointUrl), got %q" $v.model.objectStore.uri) }}
{{- end }}
{{- $a := $v.engine.autoscaling }}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- fail (printf "engine.autoscaling.minReplicas (%v) is above maxReplicas (%v)" $a.minReplicas $a.maxReplicas) }}
{{- end }}
{{- if and $a.enabled (not (kindIs "invalid" $a.initialReplicas)) }}
{{- if or (lt (int $a.initialReplicas) (int $a.minReplicas)) (gt (int $a.initialReplicas) (int $a.maxReplicas)) }}
{{- fail (printf "engine.autoscaling.initialReplicas (%v) must be within [minReplicas, maxReplicas]" $a.initialReplicas) }}
{{- end }}
{{- end }}
{{- $needed := include "grok-serve.workerNeeded" . | int }}
{{- if and (not (kindIs "invalid" $v.worker.maxReplicas)) (lt (int $v.worker.maxReplicas) $needed) }}
{{- fail (printf "worker.maxReplicas (%v) is below the GPU pods the engine replicas need (%v)" $v.worker.maxReplicas $needed) }}
{{- end }}
{{- $p := $v.engine.placement }}
{{- if ne (mod (int $v.engine.parallelSize) (int $p.nodesPerReplica)) 0 }}
{{- fail (printf "engine.placement.nodesPerReplica (%v) must divide engine.parallelSize (%v): each GPU pod holds the same number of ranks" $p.nodesPerReplica $v.engine.parallelSize) }}
{{- end }}
{{- if and (gt (int $p.nodesPerReplica) 1) (eq (include "grok-serve.placementStrategy" .) "STRICT_PACK") }}
{{- fail (printf "engine.placement.strategy STRICT_PACK keeps a replica on one node, but nodesPerReplica is %v: use PACK (or SPREAD)" $p.nodesPerReplica) }}
{{- end }}
{{- if and (not (kindIs "invalid" $p.maxReplicasPerNode)) (gt (int $v.engine.parallelSize) 1) }}
{{- fail "engine.placement.maxReplicasPerNode applies to one-rank replicas (parallelSize 1): a parallel group's placement group decides where its ranks go" }}
{{- end }}
{{- if and $a.enabled (gt (float64 $a.targetOngoingRequests) (float64 $v.engine.maxOngoingRequests)) }}
{{- fail (printf "engine.autoscaling.targetOngoingRequests (%v) is above engine.maxOngoingRequests (%v): a replica never gets that many, so Serve would never scale up" $a.targetOngoingRequests $v.engine.maxOngoingRequests) }}
{{- end }}
{{- if and (eq $v.rayService.upgradeStrategy.type "NewClusterWithIncrementalUpgrade") (not $a.enabled) }}
{{- fail "rayService.upgradeStrategy.type NewClusterWithIncrementalUpgrade needs engine.autoscaling.enabled (KubeRay requires its autoscaler)" }}
{{- end }}
{{- if and (eq $v.engine.device "cpu") (eq $v.model.dtype "float16") }}
{{- fail "model.dtype float16 is not supported on CPU: use float32 or bfloat16" }}
{{- end }}
{{- if not (regexMatch "^(localhost(:[0-9]+)?|[^/]*[.:][^/]*)/" $v.image.repository) }}
{{- fail (printf "image.repository %q is a short name: give the registry host too (registry.example.com/ml/grok-serve), so that no registry search list decides which image runs" $v.image.repository) }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.apiKeys) }}
{{- fail "auth is enabled but has no keys: set auth.existingSecret to a Secret you manage (recommended) or auth.apiKeys; the chart does not generate one, since a generated key would change at every render" }}
{{- end }}
{{- if and $v.auth.existingSecret $v.auth.apiKeys }}
{{- fail "auth.existingSecret and auth.apiKeys are both set: the keys come from one of them" }}
{{- end }}
{{- if and $v.gcsFaultTolerance.enabled (not $v.gcsFaultTolerance.redisAddress) }}
{{- fail "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress (host:port of a Redis the pods reach)" }}
{{- end }}
{{- if and (not (include "grok-serve.gatewayOnHead" .)) (not $v.grpc.enabled) $v.auth.enabled (not $v.auth.openHealth) }}
{{- fail "with gRPC off the gateway pods' readiness probe reads /health: keep auth.openHealth true, or turn gRPC on (its health service needs no key)" }}
{{- end }}
{{- range $role := list "gpu" "gateway" }}
{{- $graceful := ternary $v.engine.gracefulShutdownTimeoutS $v.gateway.gracefulShutdownTimeoutS (eq $role "gpu") }}
{{- $deadline := include "grok-serve.drainDeadline" (list $ $role) | int }}
{{- if lt (float64 $deadline) (addf $graceful 5) }}
{{- fail (printf "the %s pods' terminationGracePeriodSeconds leaves a drain deadline of %d s, under the replicas' graceful shutdown (%v s) + 5 s: their streams would be cut. Raise it or leave it null" $role $deadline $graceful) }}
{{- end }}
{{- end }}
{{- if $v.monitoring.serviceMonitor.enabled }}
{{- $timeout := include "grok-serve.durationSeconds" $v.monitoring.serviceMonitor.scrapeTimeout | float64 }}
{{- $interval := include "grok-serve.durationSeconds" $v.monitoring.serviceMonitor.interval | float64 }}
{{- if lt $timeout (addf $v.gateway.engineCallTimeoutS 5) }}
{{- fail (printf "monitoring.serviceMonitor.scrapeTimeout (%s) must exceed gateway.engineCallTimeoutS (%v s, what /metrics may wait for the engine) by 5 s, or a busy engine reads as a dead gateway" $v.monitoring.serviceMonitor.scrapeTimeout $v.gateway.engineCallTimeoutS) }}
{{- end }}
{{- if gt $timeout $interval }}
{{- fail (printf "monitoring.serviceMonitor.scrapeTimeout (%s) is longer than its interval (%s): Prometheus refuses that" $v.monitoring.serviceMonitor.scrapeTimeout $v.monitoring.serviceMonitor.interval) }}
{{- end }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.openMetrics) $v.monitoring.serviceMonitor.enabled (not $v.monitoring.serviceMonitor.authorization) }}
{{- fail "auth.openMetrics is false: give monitoring.serviceMonitor.authorization (a Bearer credential) or disable the ServiceMonitor" }}
{{- end }}
{{- end }}

{{/*
The Serve application's `args`: the same keys as deploy/local-cpu.yaml, read by
services.gateway.config.load_config in build_app. Serve hashes the args into the application's code
version, so any change here restarts every replica of both deployments (and the engine reloads the
weights). Options Serve can change on running replicas are therefore left out of the args (the
loader's defaults apply to the build) and set in the per-deployment overrides below instead.
*/}}
{{- define "grok-serve.serveArgs" -}}
{{- $v := .Values }}
{{- $e := $v.engine }}
{{- $g := $v.gateway }}
{{- $engine := dict
  "model" (include "grok-serve.engineModel" .)
  "dtype" $v.model.dtype
  "expert_dtype" ($v.model.expertDtype | default "auto")
  "load_format" (ternary "dummy" $v.model.loadFormat (eq $v.model.source "preset"))
  "device" $e.device
  "seed" $e.seed
  "block_size" $e.blockSize
  "kv_cache_memory_bytes" $e.kvCacheMemoryBytes
  "num_kv_blocks" $e.numKvBlocks
  "max_num_seqs" $e.maxNumSeqs
  "max_num_batched_tokens" $e.maxNumBatchedTokens
  "max_model_len" $v.model.maxModelLen
  "enable_prefix_caching" $e.enablePrefixCaching
  "parallel_size" $e.parallelSize
  "collective_timeout_s" $e.collectiveTimeoutS
  "placement_strategy" (include "grok-serve.placementStrategy" .)
  "backend" $e.backend }}
{{- /* What placement needs: a change means new replicas anyway. */}}
{{- $engineDeployment := dict
  "parallel_size" $e.parallelSize
  "num_cpus" $e.numCpusPerRank
  "num_gpus" (include "grok-serve.gpusPerRank" . | int)
  "max_replicas_per_node" $e.placement.maxReplicasPerNode }}
{{- /* The gRPC server reads the shutdown timeout at run time. */}}
{{- $gatewayDeployment := dict
  "num_cpus" $g.numCpus
  "graceful_shutdown_timeout_s" $g.gracefulShutdownTimeoutS }}
{{- $auth := dict "api_key_env" nil "api_key_file" nil "open_health" $v.auth.openHealth "open_metrics" $v.auth.openMetrics }}
{{- if $v.auth.enabled }}
{{- $_ := set $auth "api_key_file" (printf "%s/%s" (include "grok-serve.apiKeyDir" .) $v.auth.secretKey) }}
{{- end }}
{{- $args := dict
  "host" "0.0.0.0"
  "port" 8000
  "grpc_port" (ternary $v.grpc.port nil $v.grpc.enabled)
  "served_model_name" (default nil $v.model.servedName)
  "chat_template" $g.chatTemplate
  "chat_template_stop" $g.chatTemplateStop
  "max_body_bytes" $g.maxBodyBytes
  "header_read_timeout_s" $g.headerReadTimeoutS
  "retry_after_s" $g.retryAfterS
  "engine_call_timeout_s" $g.engineCallTimeoutS
  "engine" $engine
  "auth" $auth
  "engine_deployment" $engineDeployment
  "gateway_deployment" $gatewayDeployment }}
{{- toYaml (mergeOverwrite $args (deepCopy $v.extraServeArgs)) }}
{{- end }}

{{/*
Per-deployment overrides: Serve applies these over the options the code sets, and reconfigures
running replicas for them (replica counts, autoscaling, limits, timeouts) without restarting them.
*/}}
{{- define "grok-serve.deploymentOverrides" -}}
{{- $v := .Values }}
{{- $e := $v.engine }}
{{- $engine := dict
  "name" "GrokEngine"
  "max_ongoing_requests" $e.maxOngoingRequests
  "max_queued_requests" $e.maxQueuedRequests
  "graceful_shutdown_timeout_s" $e.gracefulShutdownTimeoutS
  "health_check_period_s" $e.healthCheckPeriodS
  "health_check_timeout_s" $e.healthCheckTimeoutS
  "max_surge_percent" $e.maxSurgePercent }}
{{- if $e.autoscaling.enabled }}
{{- $a := $e.autoscaling }}
{{- $autoscaling := dict
  "min_replicas" $a.minReplicas
  "max_replicas" $a.maxReplicas
  "target_ongoing_requests" $a.targetOngoingRequests
  "upscale_delay_s" $a.upscaleDelayS
  "downscale_delay_s" $a.downscaleDelayS
  "look_back_period_s" $a.lookBackPeriodS }}
{{- if not (kindIs "invalid" $a.initialReplicas) }}
{{- $_ := set $autoscaling "initial_replicas" $a.initialReplicas }}
{{- end }}
{{- $_ := set $engine "autoscaling_config" $autoscaling }}
{{- else }}
{{- $_ := set $engine "num_replicas" $e.replicas }}
{{- end }}
{{- /*
The gateway's ray_actor_options replace the code's whole: the same CPUs, the resource that pins it to
the gateway pods (or to the head, for gRPC's port), and the keys' revision, whose change restarts just the gateway replicas (they read the
keys file at start).
*/}}
{{- $gatewayOptions := dict "num_cpus" $v.gateway.numCpus }}
{{- if include "grok-serve.gatewayPinned" . }}
{{- $_ := set $gatewayOptions "resources" (dict (include "grok-serve.gatewayResource" .) 1) }}
{{- end }}
{{- if $v.auth.enabled }}
{{- $_ := set $gatewayOptions "runtime_env" (dict "env_vars" (dict "GROK_SERVE_API_KEYS_REVISION" (include "grok-serve.apiKeysRevision" .))) }}
{{- end }}
{{- $gateway := dict
  "name" "GrokGateway"
  "num_replicas" $v.gateway.replicas
  "max_ongoing_requests" $v.gateway.maxOngoingRequests
  "ray_actor_options" $gatewayOptions }}
{{- toYaml (list $engine $gateway) }}
{{- end }}

{{/* The whole Serve config (Ray's ServeDeploySchema), as KubeRay submits it to the dashboard. */}}
{{- define "grok-serve.serveConfig" -}}
{{- $app := dict
  "name" "grok-serve"
  "route_prefix" "/"
  "import_path" "services.serve_app:build_app"
  "args" (include "grok-serve.serveArgs" . | fromYaml)
  "deployments" (include "grok-serve.deploymentOverrides" . | fromYamlArray) }}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" 8000)
  "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/* Volumes shared by head and workers. */}}
{{- define "grok-serve.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "objectStore" }}
- name: model
  emptyDir:
    sizeLimit: {{ .Values.model.objectStore.sizeLimit }}
{{- end }}
{{- end }}

{{- define "grok-serve.authVolume" -}}
{{- if .Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "grok-serve.apiKeySecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.secretKey }}
        path: {{ .Values.auth.secretKey }}
{{- end }}
{{- end }}

{{/*
The object-store copy. `only` limits it to the named files (the head needs the tokenizer and the
config, not 320 GB of experts).
*/}}
{{- define "grok-serve.syncInitContainer" -}}
{{- $root := index . 0 }}
{{- $only := index . 1 }}
{{- $o := $root.Values.model.objectStore }}
- name: fetch-weights
  image: {{ $o.image }}
  imagePullPolicy: IfNotPresent
  command: [aws, s3, sync]
  args:
    - {{ $o.uri | quote }}
    - {{ include "grok-serve.modelDir" $root | quote }}
    - --only-show-errors
    - --no-progress
    {{- if $o.endpointUrl }}
    - --endpoint-url
    - {{ $o.endpointUrl | quote }}
    {{- end }}
    {{- if $only }}
    - --exclude
    - "*"
    {{- range $only }}
    - --include
    - {{ . | quote }}
    {{- end }}
    {{- end }}
    {{- range $o.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    # The aws CLI writes its cache under HOME; the image's HOME is root's.
    - name: HOME
      value: /tmp
  {{- with $o.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  resources:
    {{- toYaml $o.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $root.Values.model.mountPath }}
{{- end }}

{{/* Ports every Ray container opens: the Serve proxy and Ray's metrics exporter. */}}
{{- define "grok-serve.servePorts" -}}
- name: serve
  containerPort: 8000
  protocol: TCP
- name: metrics
  containerPort: 8080
  protocol: TCP
{{- end }}

{{/* An alert's runbook: a URL when a base is configured, else the section of docs/operations.md. */}}
{{- define "grok-serve.runbook" -}}
{{- $root := index . 0 }}
{{- $alert := index . 1 }}
{{- with $root.Values.monitoring.prometheusRule.runbookBaseUrl }}
runbook_url: {{ printf "%s#%s" (trimSuffix "/" .) (lower $alert) }}
{{- else }}
runbook: {{ printf "docs/operations.md#%s" (lower $alert) }}
{{- end }}
{{- end }}
