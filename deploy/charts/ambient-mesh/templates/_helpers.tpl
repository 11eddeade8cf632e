{{- define "mesh.image" -}}
{{ .Values.image.registry }}/{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "mesh.labels" -}}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* ztunnel.handoverMaxAge (a duration: 90s, 30m, 1h) in whole seconds. */}}
{{- define "ztunnel.handoverMaxAgeSeconds" -}}
{{- $v := toString .Values.ztunnel.handoverMaxAge | trim -}}
{{- if not (regexMatch "^[0-9]+(ms|s|m|h)?$" $v) -}}
{{- fail (printf "ztunnel.handoverMaxAge %q is not a duration like 90s, 30m or 1h" $v) -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $v | int -}}
{{- if hasSuffix "ms" $v -}}{{ div $n 1000 }}
{{- else if hasSuffix "h" $v -}}{{ mul $n 3600 }}
{{- else if hasSuffix "m" $v -}}{{ mul $n 60 }}
{{- else -}}{{ $n }}
{{- end -}}
{{- end }}

{{- define "mesh.controlHost" -}}
mesh-control.{{ .Release.Namespace }}.svc
{{- end }}

{{- define "mesh.caSecret" -}}
{{ .Values.control.ca.existingSecret | default "mesh-ca" }}
{{- end }}

{{/* The projected service-account token every node program presents to the CA. */}}
{{- define "mesh.tokenVolume" -}}
- name: mesh-token
  projected:
    sources:
      - serviceAccountToken:
          path: mesh-token
          audience: istio-ca
          expirationSeconds: 43200
{{- end }}

{{- define "mesh.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
