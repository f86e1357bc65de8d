{{- define "kvpool.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvpool.selectorLabels" -}}
app.kubernetes.io/name: kvpool
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvpool.labels" -}}
{{ include "kvpool.selectorLabels" . }}
app.kubernetes.io/part-of: kvpool
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvpool.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kvpool.webhookName" -}}
{{- printf "%s-%s" (include "kvpool.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvpool.webhookService" -}}
{{- printf "%s-webhook" (include "kvpool.fullname" .) -}}
{{- end -}}

{{- define "kvpool.certSecret" -}}
{{- printf "%s-webhook-tls" (include "kvpool.fullname" .) -}}
{{- end -}}

{{- /* Non-empty when the operator keeps the webhook's caBundle itself (its own CA, no cert-manager). */}}
{{- define "kvpool.keepsCABundle" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.certManager.enabled) -}}true{{- end -}}
{{- end -}}

{{- /* Non-empty when a KVCachePool can be part of this release: Helm builds every object before it
creates any, so on the install that brings the CRD (crds.install) the API is not served yet. */}}
{{- define "kvpool.poolAPIServed" -}}
{{- if or (not .Values.crds.install) (.Capabilities.APIVersions.Has "kvpool.io/v1alpha1") -}}true{{- end -}}
{{- end -}}
