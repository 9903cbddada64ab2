{{/*
The pod templates of the three Ray groups. `role` is head, gpu (one engine replica per pod) or gateway
(one gateway replica per pod); what differs between them is decided here, in one place.
*/}}

{{- define "grok-serve.gatewayOnHead" -}}
{{- if eq .Values.gateway.placement "head" }}true{{ end }}
{{- end }}

{{/* Where the drain script of the preStop hooks is mounted (templates/configmap-drain.yaml). */}}
{{- define "grok-serve.drainDir" -}}/etc/grok-serve/drain{{- end }}

{{/* A role's section of values. */}}
{{- define "grok-serve.roleSection" -}}
{{- $v := (index . 0).Values }}
{{- $role := index . 1 }}
{{- if eq $role "head" }}head{{ else if eq $role "gpu" }}worker{{ else }}gatewayWorker{{ end }}
{{- end }}

{{- define "grok-serve.grace" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $v := $root.Values }}
{{- $g := index $v (include "grok-serve.roleSection" .) }}
{{- if and (eq $role "head") (kindIs "invalid" $g.terminationGracePeriodSeconds) }}
{{- /* GCS must outlive the workers' drains when the whole cluster goes. */}}
{{- $gpu := include "grok-serve.grace" (list $root "gpu") | int }}
{{- $gateway := include "grok-serve.grace" (list $root "gateway") | int }}
{{- max $gpu $gateway }}
{{- else }}
{{- $graceful := ternary $v.engine.gracefulShutdownTimeoutS $v.gateway.gracefulShutdownTimeoutS (eq $role "gpu") }}
{{- $g.terminationGracePeriodSeconds | default (add (int $graceful) 30) }}
{{- end }}
{{- end }}

{{/*
Seconds the preStop hook may take: the grace period less the time Ray needs to stop after SIGTERM.
Serve stops a replica on a draining node at the latest at (deadline - its graceful_shutdown_timeout_s),
so its streams finish before the deadline and the kubelet's SIGKILL.
*/}}
{{- define "grok-serve.drainDeadline" -}}
{{- sub (include "grok-serve.grace" . | int) 10 }}
{{- end }}

{{- define "grok-serve.podTemplate" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $v := $root.Values }}
{{- $g := index $v (include "grok-serve.roleSection" .) }}
{{- $component := get (dict "head" "ray-head" "gpu" "ray-worker" "gateway" "ray-gateway") $role }}
{{- $hasGateway := or (eq $role "gateway") (and (eq $role "head") (include "grok-serve.gatewayOnHead" $root)) }}
{{- $hasModel := and (ne $v.model.source "preset") (or $hasGateway (eq $role "gpu")) }}
{{- $hasKeys := and $v.auth.enabled $hasGateway }}
metadata:
  labels:
    {{- include "grok-serve.podLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
    {{- with $g.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with include "grok-serve.podAnnotations" (list $root $g.podAnnotations) | trim }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $g.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "grok-serve.grace" . }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- if and $hasModel (eq $v.model.source "objectStore") }}
  initContainers:
    {{- /* A gateway needs the tokenizer and the config, not 320 GB of experts. */}}
    {{- $only := ternary (list) (list "tokenizer.model" "config.json" "*.json") (eq $role "gpu") }}
    {{- include "grok-serve.syncInitContainer" (list $root $only) | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq $role "head") }}
      image: {{ include "grok-serve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if eq $role "head" }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        {{- end }}
        {{- include "grok-serve.servePorts" $root | nindent 8 }}
        {{- if and $hasGateway $v.grpc.enabled }}
        - name: grpc
          containerPort: {{ $v.grpc.port }}
          protocol: TCP
        {{- end }}
      env:
        # Serve's HTTP proxy on this pod reads its request callback (request-id sanitising and the
        # header-read timeout, services/gateway/proxy.py) from the environment, the only way in.
        - name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
          value: services.gateway.proxy:proxy_middlewares
        - name: GROK_SERVE_HEADER_READ_TIMEOUT_S
          value: {{ $v.gateway.headerReadTimeoutS | quote }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $resources := deepCopy $g.resources }}
      {{- if eq $role "gpu" }}
      {{- $gpus := include "grok-serve.gpusPerPod" $root | int }}
      {{- $extra := deepCopy $v.worker.extraResources }}
      {{- if gt $gpus 0 }}
      {{- $_ := set $extra $v.worker.gpuResourceName $gpus }}
      {{- end }}
      {{- range $section := list "requests" "limits" }}
      {{- $_ := set $resources $section (merge (deepCopy $extra) (get $resources $section | default dict)) }}
      {{- end }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      {{- /*
      Head and GPU pods keep KubeRay's probes (raylet, GCS, and on workers the Serve proxy): KubeRay
      submits the Serve application only once the head is Ready, so a head probe on the application
      would never pass, and a liveness probe on the engine's health would turn an engine fault, which
      Serve repairs by replacing the replica, into a restart of the whole Ray cluster.
      A gateway pod is Ready once its own gateway answers: gRPC health (which follows the engine like
      /health, and is served only by this pod's gateway) or, with gRPC off, /health through the pod's
      proxy. Liveness stays KubeRay's.
      */}}
      {{- if eq $role "gateway" }}
      readinessProbe:
        {{- if $v.grpc.enabled }}
        grpc:
          port: {{ $v.grpc.port }}
        timeoutSeconds: 3
        {{- else }}
        httpGet:
          path: /health
          port: serve
        {{- /* /health waits up to engineCallTimeoutS for the engine before answering 503. */}}
        timeoutSeconds: {{ add (int (ceil $v.gateway.engineCallTimeoutS)) 2 }}
        {{- end }}
        initialDelaySeconds: 5
        periodSeconds: 5
        successThreshold: 1
        failureThreshold: 2
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command:
              - python
              - {{ include "grok-serve.drainDir" $root }}/drain_node.py
              - --role
              - {{ ternary "head" "worker" (eq $role "head") }}
              - --deadline-s
              - {{ include "grok-serve.drainDeadline" . | quote }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: drain
          mountPath: {{ include "grok-serve.drainDir" $root }}
          readOnly: true
        {{- if $hasModel }}
        - name: model
          mountPath: {{ $v.model.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $hasKeys }}
        - name: api-keys
          mountPath: {{ include "grok-serve.apiKeyDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
    - name: drain
      configMap:
        name: {{ include "grok-serve.fullname" $root }}-drain
        defaultMode: 0444
    {{- if $hasModel }}
    {{- include "grok-serve.modelVolume" $root | nindent 4 }}
    {{- end }}
    {{- if $hasKeys }}
    {{- include "grok-serve.authVolume" $root | nindent 4 }}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (eq $role "gateway") (kindIs "invalid" $g.affinity) }}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "grok-serve.gatewaySelectorLabels" $root | nindent 16 }}
  {{- else }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
{{- end }}
