{{/* Labels that select a component's pods (never change them on upgrade: selectors are immutable). */}}
{{- define "cosyvoice2.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cosyvoice2.labels" -}}
{{ include "cosyvoice2.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* A component's container image and pull policy: its own `image` values over the global `image`. */}}
{{- define "cosyvoice2.image" -}}
{{- $own := .image | default dict -}}
image: {{ printf "%s:%s" ($own.repository | default (printf "%s/%s" .root.Values.image.registry .component)) (toString ($own.tag | default .root.Values.image.tag)) | quote }}
imagePullPolicy: {{ $own.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end }}

{{/* Pod-level settings every component shares: the non-root user of the images, pull secrets, scheduling. */}}
{{- define "cosyvoice2.podSpec" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "cosyvoice2.redisUrl" -}}
{{- if .Values.redis.url -}}
{{ .Values.redis.url }}
{{- else if .Values.redis.enabled -}}
redis://{{ .Release.Name }}-redis:6379/0
{{- else -}}
{{ fail "redis.enabled is false: set redis.url to the Redis the gateway and the seed fronts use" }}
{{- end }}
{{- end }}

{{/* What the gateway and the seed fronts need to reach the stages and Redis: MODEL_DIR, REDIS_URL,
     {STAGE}_URLS (each a headless Service name, which resolves to every ready pod of the stage). */}}
{{- define "cosyvoice2.clientEnv" -}}
- name: MODEL_DIR
  value: /models/cosyvoice2
- name: REDIS_URL
  value: {{ include "cosyvoice2.redisUrl" . | quote }}
{{- range $stage, $s := .Values.stages }}
- name: {{ upper $stage }}_URLS
  value: "{{ $.Release.Name }}-{{ $stage }}:{{ $s.grpcPort }}"
{{- end }}
{{- end }}

{{/* The model directory, read-only, and the in-memory /dev/shm a Triton Python backend needs. */}}
{{- define "cosyvoice2.modelVolume" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.claimName }}
    readOnly: true
{{- end }}

{{- define "cosyvoice2.shmVolume" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}
