#!/usr/bin/env bash
# One-time setup of a Google Cloud project for hello-birthday on Cloud Run.
# Idempotent: every resource is looked up first and created only when missing,
# every role binding is added only when absent, so a second run changes
# nothing (tests/cloud/test_setup.py runs it twice against the stand-in).
#
# Required: PROJECT_ID REGION DEPLOYER_SERVICE_ACCOUNT (the identity CircleCI's
#           OIDC provider maps to; created here if missing)
# Optional: INSTANCE (hello-birthday) DATABASE (hello) DB_USER (hello)
#           REPOSITORY (apps) SECRET (database-url) RUNTIME_NAME (hello-birthday)
#           RUNGMP_SECRET (rungmp-config: the metrics sidecar's RunMonitoring)
#           TIER (db-custom-1-3840: max_connections 100, see docs/capacity.md)
#           PRIVATE_NETWORK (a VPC: the instance gets a private IP only, as the
#           GKE chart's Cloud SQL Auth Proxy with privateIp expects)
set -euo pipefail
: "${PROJECT_ID:?}" "${REGION:?}" "${DEPLOYER_SERVICE_ACCOUNT:?}"
INSTANCE=${INSTANCE:-hello-birthday}
DATABASE=${DATABASE:-hello}
DB_USER=${DB_USER:-hello}
REPOSITORY=${REPOSITORY:-apps}
SECRET=${SECRET:-database-url}
RUNTIME_NAME=${RUNTIME_NAME:-hello-birthday}
RUNGMP_SECRET=${RUNGMP_SECRET:-rungmp-config}
TIER=${TIER:-db-custom-1-3840}
RUNTIME="${RUNTIME_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"

gc() { gcloud --project="$PROJECT_ID" --quiet "$@"; }
step() { printf '\n==> %s\n' "$*"; }
exists() { "$@" >/dev/null 2>&1; }

step "APIs"
gc services enable run.googleapis.com sqladmin.googleapis.com \
  artifactregistry.googleapis.com secretmanager.googleapis.com \
  iamcredentials.googleapis.com iam.googleapis.com monitoring.googleapis.com

step "Artifact Registry repository $REPOSITORY"
exists gc artifacts repositories describe "$REPOSITORY" --location="$REGION" ||
  gc artifacts repositories create "$REPOSITORY" --repository-format=docker --location="$REGION"

step "Cloud SQL instance $INSTANCE (daily backups, point-in-time recovery)"
if ! exists gc sql instances describe "$INSTANCE"; then
  network=(--assign-ip)
  [ -n "${PRIVATE_NETWORK:-}" ] && network=(--network="$PRIVATE_NETWORK" --no-assign-ip)
  gc sql instances create "$INSTANCE" --database-version=POSTGRES_16 --tier="$TIER" \
    --region="$REGION" --backup-start-time=03:00 --enable-point-in-time-recovery \
    --retained-backups-count=14 "${network[@]}"
fi
exists gc sql databases describe "$DATABASE" --instance="$INSTANCE" ||
  gc sql databases create "$DATABASE" --instance="$INSTANCE"

step "database user $DB_USER and the DATABASE_URL secret $SECRET"
if ! exists gc secrets describe "$SECRET"; then
  # The password exists only in the secret: generated here, never printed.
  password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
  if gc sql users list --instance="$INSTANCE" --format='value(name)' | grep -qx "$DB_USER"; then
    gc sql users set-password "$DB_USER" --instance="$INSTANCE" --password="$password"
  else
    gc sql users create "$DB_USER" --instance="$INSTANCE" --password="$password"
  fi
  printf 'postgresql://%s:%s@/%s?host=/cloudsql/%s:%s:%s' "$DB_USER" "$password" "$DATABASE" \
    "$PROJECT_ID" "$REGION" "$INSTANCE" |
    gc secrets create "$SECRET" --replication-policy=automatic --data-file=-
fi

step "the metrics sidecar's configuration, secret $RUNGMP_SECRET"
exists gc secrets describe "$RUNGMP_SECRET" ||
  gc secrets create "$RUNGMP_SECRET" --replication-policy=automatic \
    --data-file="$(dirname "$0")/rungmp-config.yaml"

step "service accounts: runtime $RUNTIME, deployer $DEPLOYER_SERVICE_ACCOUNT"
for account in "$RUNTIME" "$DEPLOYER_SERVICE_ACCOUNT"; do
  exists gc iam service-accounts describe "$account" ||
    gc iam service-accounts create "${account%%@*}" --display-name="${account%%@*}"
done

step "roles"
project_role() {  # member role: added only when absent
  gc projects get-iam-policy "$PROJECT_ID" --format=json |
    python3 -c 'import json, sys
policy = json.load(sys.stdin)
sys.exit(0 if any(b["role"] == sys.argv[2] and sys.argv[1] in b.get("members", [])
                  for b in policy.get("bindings", [])) else 1)' "$1" "$2" ||
    gc projects add-iam-policy-binding "$PROJECT_ID" --member="$1" --role="$2" \
      --condition=None >/dev/null
}
project_role "serviceAccount:$RUNTIME" roles/cloudsql.client
# The metrics sidecar writes to Managed Service for Prometheus as the runtime account.
project_role "serviceAccount:$RUNTIME" roles/monitoring.metricWriter
for role in roles/run.admin roles/cloudsql.editor roles/artifactregistry.writer; do
  project_role "serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" "$role"
done
for secret in "$SECRET" "$RUNGMP_SECRET"; do
  gc secrets add-iam-policy-binding "$secret" --member="serviceAccount:$RUNTIME" \
    --role=roles/secretmanager.secretAccessor >/dev/null
done
# The deployer deploys revisions that run as the runtime account, and mints
# the smoke test's ID token by impersonating itself.
gc iam service-accounts add-iam-policy-binding "$RUNTIME" \
  --member="serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" --role=roles/iam.serviceAccountUser >/dev/null
gc iam service-accounts add-iam-policy-binding "$DEPLOYER_SERVICE_ACCOUNT" \
  --member="serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" \
  --role=roles/iam.serviceAccountTokenCreator >/dev/null

step "done"
echo "Deploy with cloudrun/deploy.sh: CLOUDSQL_INSTANCE=$PROJECT_ID:$REGION:$INSTANCE" \
  "DATABASE_URL_SECRET=$SECRET RUNGMP_SECRET=$RUNGMP_SECRET RUNTIME_SERVICE_ACCOUNT=$RUNTIME"
