{{/* Chart name, truncated for DNS. */}}
{{- define "hello-birthday.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release + chart), 63 characters at most. */}}
{{- define "hello-birthday.fullname" -}}
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

{{- define "hello-birthday.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels. */}}
{{- define "hello-birthday.labels" -}}
helm.sh/chart: {{ include "hello-birthday.chart" . }}
{{ include "hello-birthday.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hello-birthday
{{- end }}

{{- define "hello-birthday.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hello-birthday.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The serving pods only: hook and test pods carry other components, so the
Service, PodDisruptionBudget, anti-affinity and NetworkPolicy never count them. */}}
{{- define "hello-birthday.serverSelectorLabels" -}}
{{ include "hello-birthday.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "hello-birthday.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hello-birthday.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image by digest when one is given, else by its (never "latest") tag. */}}
{{- define "hello-birthday.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if eq (toString $tag) "latest" }}{{ fail "image.tag must not be latest: use an immutable tag or image.digest" }}{{ end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "hello-birthday.databaseSecretName" -}}
{{- required "database.existingSecret names the Secret holding DATABASE_URL" .Values.database.existingSecret }}
{{- end }}

{{/* Annotations that make a resource run before the release's pods: a Helm
hook, or an ArgoCD PreSync hook with a sync wave. Argument: (list $ weight). */}}
{{- define "hello-birthday.preDeployHook" -}}
{{- $root := index . 0 }}{{- $weight := index . 1 }}
{{- if $root.Values.argocd.enabled }}
argocd.argoproj.io/hook: PreSync
argocd.argoproj.io/sync-wave: {{ $weight | quote }}
argocd.argoproj.io/hook-delete-policy: BeforeHookCreation
{{- else }}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ $weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation
{{- end }}
{{- end }}

{{/* "true" when the pods log in with IAM database authentication through the proxy. */}}
{{- define "hello-birthday.iamAuthn" -}}
{{- if and .Values.cloudSqlProxy.enabled .Values.cloudSqlProxy.autoIamAuthn }}true{{ end }}
{{- end }}

{{/* The Cloud SQL IAM user of the pods' Google service account: its email without
".gserviceaccount.com" (Cloud SQL's naming; setup.sh creates that user). */}}
{{- define "hello-birthday.iamDatabaseUser" -}}
{{- $account := required "serviceAccount.gcpServiceAccount is required with cloudSqlProxy.autoIamAuthn: its Cloud SQL IAM user is the database login" .Values.serviceAccount.gcpServiceAccount }}
{{- if not (hasSuffix ".iam.gserviceaccount.com" $account) }}
{{- fail (printf "serviceAccount.gcpServiceAccount (%s) must be a service account email, NAME@PROJECT.iam.gserviceaccount.com" $account) }}
{{- end }}
{{- trimSuffix ".gserviceaccount.com" $account }}
{{- end }}

{{/* DATABASE_URL: with IAM authentication a plain value (the proxy's listener, the IAM
user, no password), else from the Secret. */}}
{{- define "hello-birthday.databaseEnv" -}}
- name: DATABASE_URL
{{- if include "hello-birthday.iamAuthn" . }}
  value: {{ printf "postgresql://%s@127.0.0.1:5432/%s" (include "hello-birthday.iamDatabaseUser" . | urlquery) (required "database.name is required" .Values.database.name) | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ include "hello-birthday.databaseSecretName" . }}
      key: {{ .Values.database.existingSecretKey }}
{{- end }}
{{- end }}

{{/* Pod-template annotations that change when the database credentials do, so a
change rolls the pods: the chart-made Secret's checksum, or database.secretRevision
for a Secret made outside the chart. IAM authentication has no credential to change. */}}
{{- define "hello-birthday.databaseRollout" -}}
{{- if not (include "hello-birthday.iamAuthn" .) }}
{{- if .Values.database.url }}
checksum/database: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- else if .Values.database.secretRevision }}
rollout/database-secret: {{ .Values.database.secretRevision | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Cloud SQL Auth Proxy as a native sidecar (an init container that keeps running).
It shares the pod's network with the app: its listeners are the database on
127.0.0.1:5432 and the health server on cloudSqlProxy.httpPort (never its 9090
default, the app's metrics port); tests/cloud_sql_proxy.py models them. */}}
{{- define "hello-birthday.cloudSqlProxy" -}}
{{- if .Values.cloudSqlProxy.enabled }}
{{- $proxy := .Values.cloudSqlProxy }}
{{- $httpPort := int $proxy.httpPort }}
{{- $taken := list 8080 5432 }}
{{- if .Values.metrics.port }}{{ $taken = append $taken (int .Values.metrics.port) }}{{ end }}
{{- if has $httpPort $taken }}
{{- fail (printf "cloudSqlProxy.httpPort (%d) is taken in the pod: the app listens on 8080 and metrics.port (%d), the proxy itself on 5432" $httpPort (int .Values.metrics.port)) }}
{{- end -}}
- name: cloud-sql-proxy
  image: {{ $proxy.image }}
  restartPolicy: Always
  args:
    - --structured-logs
    - --port=5432
    - --health-check
    - --http-address=0.0.0.0
    - --http-port={{ $httpPort }}
    {{- if $proxy.privateIp }}
    - --private-ip
    {{- end }}
    {{- if $proxy.autoIamAuthn }}
    - --auto-iam-authn
    {{- end }}
    - {{ required "cloudSqlProxy.instanceConnectionName is required" $proxy.instanceConnectionName | quote }}
  ports:
    - name: proxy-health
      containerPort: {{ $httpPort }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /startup
      port: proxy-health
    periodSeconds: 1
    failureThreshold: 60
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $proxy.resources | nindent 4 }}
{{- end }}
{{- end }}

{{/* The volume the dumps live on: the claim, or the bucket mounted by GKE's Cloud
Storage FUSE CSI driver. The migration Job writes there, the restore Job reads. */}}
{{- define "hello-birthday.backupVolume" -}}
{{- $backup := .Values.migration.backup -}}
- name: backup
  {{- if eq $backup.destination "pvc" }}
  persistentVolumeClaim:
    # Created once outside the chart (helm/backup-pvc.yaml): no Helm or
    # ArgoCD operation owns it, so none can delete it or its dumps.
    claimName: {{ required "migration.backup.pvc.existingClaim: create the claim once with helm/backup-pvc.yaml and name it here" $backup.pvc.existingClaim }}
  {{- else }}
  # The bucket itself: no gcloud image to pin, nothing copied twice.
  csi:
    driver: gcsfuse.csi.storage.gke.io
    volumeAttributes:
      bucketName: {{ required "migration.backup.gcs.bucket is required" $backup.gcs.bucket | quote }}
      mountOptions: {{ printf "uid=%v,gid=%v" .Values.podSecurityContext.runAsUser .Values.podSecurityContext.runAsGroup | quote }}
  {{- end }}
{{- end }}
