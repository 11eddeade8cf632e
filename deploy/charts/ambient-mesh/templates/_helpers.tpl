{{- define "mesh.image" -}}
{{ .Values.image.registry }}/{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "mesh.labels" -}}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
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
