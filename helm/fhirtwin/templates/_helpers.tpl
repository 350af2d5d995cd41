{{/* Names ------------------------------------------------------------------------------ */}}
{{- define "fhirtwin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fhirtwin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fhirtwin.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fhirtwin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fhirtwin
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "name" "normalize-hl7v2") */}}
{{- define "fhirtwin.selector" -}}
app.kubernetes.io/name: {{ include "fhirtwin.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "fhirtwin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fhirtwin.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fhirtwin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Kafka and Redis addresses ------------------------------------------------------------ */}}
{{- define "fhirtwin.kafkaBootstrap" -}}
{{- if .Values.demo.enabled -}}
{{- printf "%s-demo-kafka:9092" (include "fhirtwin.fullname" .) -}}
{{- else -}}
{{- required "kafka.bootstrapServers is required (or demo.enabled=true)" .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{- define "fhirtwin.kafkaSasl" -}}
{{- if hasPrefix "SASL" (upper .Values.kafka.securityProtocol) -}}true{{- end -}}
{{- end -}}

{{- define "fhirtwin.kafkaTls" -}}
{{- if hasSuffix "SSL" (upper .Values.kafka.securityProtocol) -}}true{{- end -}}
{{- end -}}

{{/* the Redis URL of one component, with $(FHIRTWIN_REDIS_PASSWORD) expanded by Kubernetes:
     (dict "root" $ "user" "normalize") */}}
{{- define "fhirtwin.redisUrl" -}}
{{- $v := .root.Values -}}
{{- $scheme := ternary "rediss" "redis" (and $v.redis.tls.enabled (not $v.demo.enabled)) -}}
{{- $host := ternary (printf "%s-demo-redis" (include "fhirtwin.fullname" .root)) $v.redis.host $v.demo.enabled -}}
{{- $port := ternary 6379 (int $v.redis.port) $v.demo.enabled -}}
{{- $auth := "" -}}
{{- if and $v.redis.auth.enabled (not $v.demo.enabled) -}}
{{- $u := default (index $v.redis.auth.users "default") (index $v.redis.auth.users .user) -}}
{{- $auth = printf "%s:$(FHIRTWIN_REDIS_PASSWORD)@" $u.username -}}
{{- end -}}
{{- if and $v.redis.cluster.enabled (not $v.demo.enabled) (ne (int $v.redis.db) 0) -}}
{{- fail "redis.db must be 0 with redis.cluster.enabled: a Redis Cluster has one database" -}}
{{- end -}}
{{- $query := "" -}}
{{- if and $v.redis.tls.enabled $v.redis.tls.caSecret (not $v.demo.enabled) -}}
{{- $query = printf "?ssl_ca_certs=/etc/fhirtwin/redis-ca/%s" $v.redis.tls.caKey -}}
{{- end -}}
{{- printf "%s://%s%s:%d/%d%s" $scheme $auth $host $port (int $v.redis.db) $query -}}
{{- end -}}

{{/* What a kind of container needs. Kinds: mllp | normalize | worker | api (Deployments),
     keys (the `keys expire` CronJob), topics (the topics Job: Kafka only, no keys) ------- */}}
{{- define "fhirtwin.usesRedis" -}}
{{- if has .kind (list "normalize" "worker" "api") -}}true{{- end -}}
{{- end -}}

{{- define "fhirtwin.usesKeys" -}}
{{- if ne .kind "topics" -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding the KEK: secrets.kek.existingSecret, else <fullname>-kek (which the
     chart creates with demo.enabled, and you create otherwise: pods wait for it) */}}
{{- define "fhirtwin.kekSecret" -}}
{{- default (printf "%s-kek" (include "fhirtwin.fullname" .)) .Values.secrets.kek.existingSecret -}}
{{- end -}}

{{/* The Secret holding the key store URL: secrets.keystore.existingSecret, else
     <fullname>-keystore; empty with demo.enabled (the demo Redis, database 1, in clear) */}}
{{- define "fhirtwin.keystoreSecret" -}}
{{- if .Values.secrets.keystore.existingSecret -}}
{{- .Values.secrets.keystore.existingSecret -}}
{{- else if not .Values.demo.enabled -}}
{{- printf "%s-keystore" (include "fhirtwin.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Demo only: the key store on the demo Redis, another database than the twin store */}}
{{- define "fhirtwin.demoKeystoreUrl" -}}
{{- printf "redis://%s-demo-redis:6379/1" (include "fhirtwin.fullname" .) -}}
{{- end -}}

{{/* Environment of every container: (dict "root" $ "c" $component "name" $name) ----------- */}}
{{- define "fhirtwin.env" -}}
{{- $v := .root.Values -}}
{{- $c := .c -}}
{{- if and (include "fhirtwin.kafkaSasl" .root) (not $v.demo.enabled) }}
- name: FHIRTWIN_KAFKA_CONF_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret is required with a SASL security protocol" $v.kafka.sasl.existingSecret }}
      key: {{ $v.kafka.sasl.usernameKey }}
- name: FHIRTWIN_KAFKA_CONF_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.kafka.sasl.existingSecret }}
      key: {{ $v.kafka.sasl.passwordKey }}
{{- end }}
{{- if and $v.redis.auth.enabled (not $v.demo.enabled) (include "fhirtwin.usesRedis" $c) }}
{{- $u := default (index $v.redis.auth.users "default") (index $v.redis.auth.users (default "default" $c.redisUser)) }}
- name: FHIRTWIN_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.auth.existingSecret is required when redis.auth.enabled" $v.redis.auth.existingSecret }}
      key: {{ $u.passwordKey }}
{{- end }}
{{- if include "fhirtwin.usesRedis" $c }}
- name: FHIRTWIN_REDIS
  value: {{ include "fhirtwin.redisUrl" (dict "root" .root "user" (default "default" $c.redisUser)) | quote }}
{{- end }}
{{- if and $c.auditSigner $v.secrets.auditSigner.existingSecret }}
- name: FHIRTWIN_AUDIT_SIGNER
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.auditSigner.existingSecret }}
      key: {{ $v.secrets.auditSigner.key }}
{{- end }}
{{- /* encryption at rest (docs/security.md): every process the same KEK and key store;
       FHIRTWIN_REQUIRE_KEYS=1: a process without them refuses to start (never a key of its own) */}}
- name: FHIRTWIN_REQUIRE_KEYS
  value: "1"
- name: FHIRTWIN_RAW_KEY_DAYS
  value: {{ int $v.keys.rawDays | toString | quote }}
{{- if include "fhirtwin.usesKeys" $c }}
- name: FHIRTWIN_KEK_FILE
  value: /etc/fhirtwin/kek/{{ $v.secrets.kek.key }}
{{- if $v.secrets.kekPrevious.existingSecret }}
- name: FHIRTWIN_KEK_PREVIOUS
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.kekPrevious.existingSecret }}
      key: {{ $v.secrets.kekPrevious.key }}
{{- end }}
{{- $ks := include "fhirtwin.keystoreSecret" .root }}
{{- if $ks }}
- name: FHIRTWIN_KEYSTORE
  valueFrom:
    secretKeyRef:
      name: {{ $ks }}
      key: {{ $v.secrets.keystore.key }}
{{- else }}
- name: FHIRTWIN_KEYSTORE
  value: {{ include "fhirtwin.demoKeystoreUrl" .root | quote }}
{{- end }}
{{- end }}
{{- range $v.extraSecretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretKey }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes and mounts ------------------------------------------------------------------- */}}
{{- define "fhirtwin.usesRules" -}}
{{- if and (has .kind (list "normalize" "worker" "api")) (ne (default "" .worker) "audit") -}}true{{- end -}}
{{- end -}}

{{- define "fhirtwin.volumes" -}}
{{- $v := .root.Values -}}
{{- $c := .c -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if and (include "fhirtwin.usesRules" $c) (ne $v.rules.source "builtin") }}
- name: rules
  emptyDir:
    sizeLimit: 64Mi
{{- if eq $v.rules.source "configMap" }}
- name: rules-src
  configMap:
    name: {{ $v.rules.configMap }}
{{- end }}
{{- end }}
{{- if and (include "fhirtwin.kafkaTls" .root) $v.kafka.tls.caSecret (not $v.demo.enabled) }}
- name: kafka-ca
  secret:
    secretName: {{ $v.kafka.tls.caSecret }}
    defaultMode: 0444
{{- end }}
{{- if and $v.redis.tls.enabled $v.redis.tls.caSecret (include "fhirtwin.usesKeys" $c) (not $v.demo.enabled) }}
- name: redis-ca
  secret:
    secretName: {{ $v.redis.tls.caSecret }}
    defaultMode: 0444
{{- end }}
{{- if include "fhirtwin.usesKeys" $c }}
- name: kek
  secret:
    secretName: {{ include "fhirtwin.kekSecret" .root }}
    defaultMode: 0400
    items:
      - key: {{ $v.secrets.kek.key }}
        path: {{ $v.secrets.kek.key }}
{{- end }}
{{- if and (eq $c.kind "api") $v.secrets.apiSigningKey.existingSecret }}
- name: api-signing-key
  secret:
    secretName: {{ $v.secrets.apiSigningKey.existingSecret }}
    defaultMode: 0400
    items:
      - key: {{ $v.secrets.apiSigningKey.key }}
        path: signing-key.jwk
{{- end }}
{{- end -}}

{{- define "fhirtwin.mounts" -}}
{{- $v := .root.Values -}}
{{- $c := .c -}}
- name: tmp
  mountPath: /tmp
{{- if and (include "fhirtwin.usesRules" $c) (ne $v.rules.source "builtin") }}
- name: rules
  mountPath: /etc/fhirtwin/rules
  readOnly: true
{{- end }}
{{- if and (include "fhirtwin.kafkaTls" .root) $v.kafka.tls.caSecret (not $v.demo.enabled) }}
- name: kafka-ca
  mountPath: /etc/fhirtwin/kafka-ca
  readOnly: true
{{- end }}
{{- if and $v.redis.tls.enabled $v.redis.tls.caSecret (include "fhirtwin.usesKeys" $c) (not $v.demo.enabled) }}
- name: redis-ca
  mountPath: /etc/fhirtwin/redis-ca
  readOnly: true
{{- end }}
{{- if include "fhirtwin.usesKeys" $c }}
- name: kek
  mountPath: /etc/fhirtwin/kek
  readOnly: true
{{- end }}
{{- if and (eq $c.kind "api") $v.secrets.apiSigningKey.existingSecret }}
- name: api-signing-key
  mountPath: /etc/fhirtwin/api-key
  readOnly: true
{{- end }}
{{- end -}}

{{/* The rules folders of a component (empty: the image's own) */}}
{{- define "fhirtwin.rulesDir" -}}
{{- if eq .Values.rules.source "builtin" -}}/app{{- else -}}/etc/fhirtwin/rules{{- end -}}
{{- end -}}

{{/* KEDA's name of the SASL mechanism: PLAIN → plaintext, SCRAM-SHA-512 → scram_sha512 */}}
{{- define "fhirtwin.kedaSasl" -}}
{{- $m := upper .Values.kafka.sasl.mechanism -}}
{{- if eq $m "PLAIN" -}}plaintext
{{- else if eq $m "SCRAM-SHA-256" -}}scram_sha256
{{- else if eq $m "SCRAM-SHA-512" -}}scram_sha512
{{- else if eq $m "OAUTHBEARER" -}}oauthbearer
{{- else -}}{{- fail (printf "kafka.sasl.mechanism %s: one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER" $m) -}}
{{- end -}}
{{- end -}}
