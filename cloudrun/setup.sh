#!/usr/bin/env bash
# One-time setup of a Google Cloud project for hello-birthday, for Cloud Run and
# GKE alike (both start from the one Cloud SQL instance made here).
#
# Idempotent: every resource is looked up first and created only when missing,
# every role binding is added only when absent, so a second run changes
# nothing. What it cannot do (an organisation policy, a permission the caller
# lacks, a GKE cluster that does not exist yet) it says, with the reason and
# what to do, and exits non-zero after doing everything else.
# tests/cloud/test_setup.py runs it twice against the stand-in, which refuses
# what Google refuses (tests/cloud/README.md).
#
# Required: PROJECT_ID REGION DEPLOYER_SERVICE_ACCOUNT (CircleCI's deploy identity)
# Optional (default):
#   INSTANCE (hello-birthday) DATABASE (hello) REPOSITORY (apps)
#   RUNTIME_NAME (hello-birthday: the runtime service account, also the
#     database's IAM user on both targets) RUNGMP_SECRET (rungmp-config)
#   EDITION (ENTERPRISE) TIER (db-custom-1-3840): Enterprise accepts custom
#     and shared-core tiers; PostgreSQL 16 without an edition is Enterprise
#     Plus, which refuses them. The production choice: docs/operations.md.
#   AVAILABILITY (REGIONAL: a standby in a second zone; ZONAL halves the cost)
#   MAINTENANCE_DAY (SUN) MAINTENANCE_HOUR (4, UTC: after the 03:00 backup)
#   BACKUPS_KEPT (14 daily backups) LOG_DAYS (7 days of point-in-time
#     recovery, Enterprise's maximum)
#   CLOUDSQL_CONNECTIVITY (private: a private IP only, through Private Services
#     Access on NETWORK; or public) NETWORK (default) SUBNET (default: Cloud
#     Run's Direct VPC egress) SUBNET_RANGE (10.8.0.0/20, if SUBNET is created)
#   ALERT_EMAIL: where the alerting policies notify (without it they notify
#     nobody, and setup says so)
#   CIRCLECI_ORG_ID CIRCLECI_PROJECT_ID: the workload identity pool and
#     provider for CircleCI's OIDC tokens (WIF_POOL circleci, WIF_PROVIDER
#     circleci-oidc), main only
#   GKE_CLUSTER GKE_LOCATION: the GKE steps (nodes' registry access, the
#     deployer's role, Workload Identity, static IP, backup bucket)
#   AR_KEEP (20 newest images kept) AR_DELETE_AFTER_DAYS (90)
#   GKE_BACKUP_DAYS (30: the backup bucket's lifecycle)
set -euo pipefail
: "${PROJECT_ID:?}" "${REGION:?}" "${DEPLOYER_SERVICE_ACCOUNT:?}"
INSTANCE=${INSTANCE:-hello-birthday}
DATABASE=${DATABASE:-hello}
REPOSITORY=${REPOSITORY:-apps}
RUNTIME_NAME=${RUNTIME_NAME:-hello-birthday}
RUNGMP_SECRET=${RUNGMP_SECRET:-rungmp-config}
EDITION=${EDITION:-ENTERPRISE}
TIER=${TIER:-db-custom-1-3840}
AVAILABILITY=${AVAILABILITY:-REGIONAL}
MAINTENANCE_DAY=${MAINTENANCE_DAY:-SUN}
MAINTENANCE_HOUR=${MAINTENANCE_HOUR:-4}
BACKUPS_KEPT=${BACKUPS_KEPT:-14}
LOG_DAYS=${LOG_DAYS:-7}
CLOUDSQL_CONNECTIVITY=${CLOUDSQL_CONNECTIVITY:-private}
NETWORK=${NETWORK:-default}
SUBNET=${SUBNET:-default}
SUBNET_RANGE=${SUBNET_RANGE:-10.8.0.0/20}
PSA_RANGE=${PSA_RANGE:-google-managed-services-$NETWORK}
WIF_POOL=${WIF_POOL:-circleci}
WIF_PROVIDER=${WIF_PROVIDER:-circleci-oidc}
AR_KEEP=${AR_KEEP:-20}
AR_DELETE_AFTER_DAYS=${AR_DELETE_AFTER_DAYS:-90}
GKE_BACKUP_DAYS=${GKE_BACKUP_DAYS:-30}
RUNTIME="${RUNTIME_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
# Cloud SQL's name for a service account's IAM user: the email without
# ".gserviceaccount.com" (PostgreSQL).
DB_IAM_USER="${RUNTIME%.gserviceaccount.com}"
SETUP_BUCKET="${PROJECT_ID}-hello-birthday-setup"
BACKUP_BUCKET="${PROJECT_ID}-hello-birthday-backups"
here=$(cd "$(dirname "$0")" && pwd)
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

gc() { gcloud --project="$PROJECT_ID" --quiet "$@"; }
step() { printf '\n==> %s\n' "$*"; }
exists() { "$@" >/dev/null 2>&1; }
not_done=()
# A step that failed: what, gcloud's own words, and what to do. Setup goes on
# with what does not depend on it and exits 1 at the end.
cannot() {
  local what=$1 why=$2 error=${3:-}
  printf '\n!!! NOT DONE: %s\n    %s\n' "$what" "$why" >&2
  [ -z "$error" ] || printf '    gcloud said: %s\n' "$(tail -n 3 <<<"$error" | tr '\n' ' ')" >&2
  not_done+=("$what: $why")
}
# Run a command; a failure is explained with cannot() and setup goes on.
try() {
  local what=$1 why=$2 out
  shift 2
  out=$("$@" 2>&1) || cannot "$what" "$why" "$out"
}
fatal() { printf '\n!!! STOPPED: %s\n' "$*" >&2; exit 1; }
# Why a failure happened, when gcloud's message names a known cause.
explain() {
  case "$1" in
    *PERMISSION_DENIED*|*"does not have"*|*"Permission "*) echo "the account running setup lacks a permission: roles/owner, or the admin role of that service, is needed for the one-time setup" ;;
    *"permitted customer"*|*constraints/*) echo "an organisation policy forbids it (the message names the constraint); ask the organisation's admin, or use the fallback named here" ;;
    *) echo "see gcloud's message" ;;
  esac
}

project_has_role() {  # member role: true when the project policy binds it
  gc projects get-iam-policy "$PROJECT_ID" --format=json |
    python3 -c 'import json, sys
policy = json.load(sys.stdin)
sys.exit(0 if any(b["role"] == sys.argv[2] and sys.argv[1] in b.get("members", [])
                  for b in policy.get("bindings", [])) else 1)' "$1" "$2"
}
project_role() {  # member role: added only when absent
  project_has_role "$1" "$2" && return 0
  local out
  out=$(gc projects add-iam-policy-binding "$PROJECT_ID" --member="$1" --role="$2" \
        --condition=None 2>&1 >/dev/null) || cannot "$2 for $1" "$(explain "$out")" "$out"
}
# resource-kind name member role [extra flags]: add-iam-policy-binding on a resource
# (gcloud reads the policy and writes it back only with the binding added); a
# failure is named (cannot) and setup goes on.
resource_role() {
  local kind=$1 name=$2 member=$3 role=$4 out
  shift 4
  out=$(gc $kind add-iam-policy-binding "$name" --member="$member" --role="$role" "$@" \
        2>&1 >/dev/null) || cannot "$role for $member on $name" "$(explain "$out")" "$out"
}

step "APIs"
apis=(run.googleapis.com sqladmin.googleapis.com artifactregistry.googleapis.com
      secretmanager.googleapis.com iamcredentials.googleapis.com iam.googleapis.com
      sts.googleapis.com monitoring.googleapis.com storage.googleapis.com
      compute.googleapis.com servicenetworking.googleapis.com
      cloudresourcemanager.googleapis.com)
[ -n "${GKE_CLUSTER:-}" ] && apis+=(container.googleapis.com)
out=$(gc services enable "${apis[@]}" 2>&1) || fatal "enabling the APIs failed: $(explain "$out"). $out"

step "service accounts: runtime $RUNTIME, deployer $DEPLOYER_SERVICE_ACCOUNT"
for account in "$RUNTIME" "$DEPLOYER_SERVICE_ACCOUNT"; do
  exists gc iam service-accounts describe "$account" ||
    gc iam service-accounts create "${account%%@*}" --display-name="${account%%@*}" >/dev/null ||
    fatal "cannot create the service account $account"
done

step "Artifact Registry repository $REPOSITORY, cleaned up: the newest $AR_KEEP kept, others deleted after $AR_DELETE_AFTER_DAYS days"
exists gc artifacts repositories describe "$REPOSITORY" --location="$REGION" ||
  gc artifacts repositories create "$REPOSITORY" --repository-format=docker \
    --location="$REGION" >/dev/null || fatal "cannot create the repository $REPOSITORY"
# Delete rules apply unless a keep rule matches; a revision that still runs an
# image is not known to the registry, so the newest are always kept (a
# rollback or redeploy needs its image).
cat >"$workdir/cleanup.json" <<JSON
[
  {"name": "delete-old", "action": {"type": "Delete"},
   "condition": {"tagState": "any", "olderThan": "$((AR_DELETE_AFTER_DAYS * 86400))s"}},
  {"name": "keep-newest", "action": {"type": "Keep"},
   "mostRecentVersions": {"keepCount": $AR_KEEP}}
]
JSON
try "the repository's cleanup policy" "needs artifactregistry.repositories.update" \
  gc artifacts repositories set-cleanup-policies "$REPOSITORY" --location="$REGION" \
    --policy="$workdir/cleanup.json" --no-dry-run

if [ "$CLOUDSQL_CONNECTIVITY" = private ]; then
  step "private IP: VPC $NETWORK, subnet $SUBNET, Private Services Access range $PSA_RANGE"
  if ! exists gc compute networks describe "$NETWORK"; then
    # A project whose organisation skips the default network has none.
    gc compute networks create "$NETWORK" --subnet-mode=custom >/dev/null ||
      fatal "cannot create the VPC network $NETWORK"
  fi
  exists gc compute networks subnets describe "$SUBNET" --region="$REGION" ||
    gc compute networks subnets create "$SUBNET" --network="$NETWORK" --region="$REGION" \
      --range="$SUBNET_RANGE" >/dev/null || fatal "cannot create the subnet $SUBNET"
  exists gc compute addresses describe "$PSA_RANGE" --global ||
    gc compute addresses create "$PSA_RANGE" --global --purpose=VPC_PEERING \
      --prefix-length=16 --network="$NETWORK" >/dev/null ||
    fatal "cannot reserve the range $PSA_RANGE for Private Services Access"
  peered=$(gc services vpc-peerings list --network="$NETWORK" \
             --service=servicenetworking.googleapis.com --format='value(reservedPeeringRanges)') ||
    fatal "cannot read the VPC peerings of $NETWORK"
  if [ -z "$peered" ]; then
    gc services vpc-peerings connect --service=servicenetworking.googleapis.com \
      --ranges="$PSA_RANGE" --network="$NETWORK" >/dev/null ||
      fatal "cannot connect $NETWORK to Google's services (Private Services Access)"
  elif ! tr ',;' '\n\n' <<<"$peered" | grep -qx "$PSA_RANGE"; then
    echo "Private Services Access on $NETWORK already uses ranges $peered: Cloud SQL takes its address from them"
  fi
  network=(--network="projects/$PROJECT_ID/global/networks/$NETWORK" --no-assign-ip)
elif [ "$CLOUDSQL_CONNECTIVITY" = public ]; then
  network=(--assign-ip)
else
  fatal "CLOUDSQL_CONNECTIVITY must be private or public, got $CLOUDSQL_CONNECTIVITY"
fi

step "Cloud SQL instance $INSTANCE: PostgreSQL 16, $EDITION $TIER, $AVAILABILITY, $CLOUDSQL_CONNECTIVITY IP"
if ! exists gc sql instances describe "$INSTANCE"; then
  gc sql instances create "$INSTANCE" --database-version=POSTGRES_16 \
    --edition="$EDITION" --tier="$TIER" --region="$REGION" \
    --availability-type="$AVAILABILITY" \
    --backup-start-time=03:00 --retained-backups-count="$BACKUPS_KEPT" \
    --enable-point-in-time-recovery --retained-transaction-log-days="$LOG_DAYS" \
    --maintenance-window-day="$MAINTENANCE_DAY" --maintenance-window-hour="$MAINTENANCE_HOUR" \
    --deletion-protection --database-flags=cloudsql.iam_authentication=on \
    "${network[@]}" || fatal "cannot create the Cloud SQL instance $INSTANCE (gcloud's message above)"
fi
# An instance made before (by hand, or an older setup) is checked, not changed
# blindly: --database-flags on patch replaces every flag.
settings=$(gc sql instances describe "$INSTANCE" --format=json) || fatal "cannot read $INSTANCE"
python3 - "$settings" "$AVAILABILITY" <<'PY' || not_done+=("the instance $INSTANCE differs from what setup makes (above)")
import json, sys
instance, availability = json.loads(sys.argv[1]), sys.argv[2]
settings = instance.get("settings", {})
flags = {f["name"]: f.get("value") for f in settings.get("databaseFlags", [])}
problems = []
if flags.get("cloudsql.iam_authentication") != "on":
    problems.append("the flag cloudsql.iam_authentication is not on: IAM logins fail. "
                    "gcloud sql instances patch INSTANCE --database-flags=cloudsql.iam_authentication=on,"
                    "<every other flag it has>")
if not settings.get("deletionProtectionEnabled"):
    problems.append("deletion protection is off: gcloud sql instances patch INSTANCE --deletion-protection")
if settings.get("availabilityType") != availability:
    problems.append(f"availability is {settings.get('availabilityType')}, not {availability}: "
                    f"gcloud sql instances patch INSTANCE --availability-type={availability}")
for problem in problems:
    print("!!! " + problem, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

step "database $DATABASE, its IAM user $DB_IAM_USER"
exists gc sql databases describe "$DATABASE" --instance="$INSTANCE" ||
  gc sql databases create "$DATABASE" --instance="$INSTANCE" >/dev/null ||
  fatal "cannot create the database $DATABASE"
gc sql users list --instance="$INSTANCE" --format='value(name)' | grep -qx "$DB_IAM_USER" ||
  gc sql users create "$DB_IAM_USER" --instance="$INSTANCE" \
    --type=cloud_iam_service_account >/dev/null || fatal "cannot create the IAM user $DB_IAM_USER"

step "the IAM user may create the schema: GRANT on schema public, imported as postgres"
# PostgreSQL 15+ gives PUBLIC no CREATE on schema public, and a new IAM user
# has no privileges. An import runs SQL as the named user on Cloud SQL's side:
# no network path to the instance and no postgres password are needed. Every
# table is then owned by this one role, whichever target migrated.
exists gc storage buckets describe "gs://$SETUP_BUCKET" ||
  gc storage buckets create "gs://$SETUP_BUCKET" --location="$REGION" \
    --uniform-bucket-level-access --public-access-prevention >/dev/null ||
  fatal "cannot create the bucket gs://$SETUP_BUCKET"
printf 'GRANT USAGE, CREATE ON SCHEMA public TO "%s";\n' "$DB_IAM_USER" >"$workdir/grants.sql"
gc storage cp "$workdir/grants.sql" "gs://$SETUP_BUCKET/grants.sql" >/dev/null ||
  fatal "cannot upload grants.sql to gs://$SETUP_BUCKET"
sql_account=$(gc sql instances describe "$INSTANCE" --format='value(serviceAccountEmailAddress)')
gc storage buckets add-iam-policy-binding "gs://$SETUP_BUCKET" \
  --member="serviceAccount:$sql_account" --role=roles/storage.objectViewer >/dev/null ||
  fatal "Cloud SQL's account cannot be let read gs://$SETUP_BUCKET, so the grants cannot be imported"
gc sql import sql "$INSTANCE" "gs://$SETUP_BUCKET/grants.sql" --database="$DATABASE" \
  --user=postgres >/dev/null || fatal "the grants import failed (gcloud's message above)"

step "the metrics sidecar's configuration, secret $RUNGMP_SECRET"
exists gc secrets describe "$RUNGMP_SECRET" ||
  gc secrets create "$RUNGMP_SECRET" --replication-policy=automatic \
    --data-file="$here/rungmp-config.yaml" >/dev/null || fatal "cannot create the secret $RUNGMP_SECRET"

step "roles"
# The runtime connects through the Cloud SQL Auth Proxy and logs in as its IAM user.
project_role "serviceAccount:$RUNTIME" roles/cloudsql.client
project_role "serviceAccount:$RUNTIME" roles/cloudsql.instanceUser
# The metrics sidecar writes to Managed Service for Prometheus as the runtime account.
project_role "serviceAccount:$RUNTIME" roles/monitoring.metricWriter
for role in roles/run.admin roles/cloudsql.editor roles/artifactregistry.writer; do
  project_role "serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" "$role"
done
resource_role secrets "$RUNGMP_SECRET" "serviceAccount:$RUNTIME" roles/secretmanager.secretAccessor
# The deployer deploys revisions that run as the runtime account, and mints
# the smoke test's ID token by impersonating itself.
resource_role "iam service-accounts" "$RUNTIME" "serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" \
  roles/iam.serviceAccountUser
resource_role "iam service-accounts" "$DEPLOYER_SERVICE_ACCOUNT" \
  "serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" roles/iam.serviceAccountTokenCreator

step "alerting policies (cloudrun/alert-policies/, from helm/hello-birthday/files/alerts.yaml)"
channel=""
if [ -n "${ALERT_EMAIL:-}" ]; then
  channel=$(gc beta monitoring channels list --filter="type=\"email\" AND labels.email_address=\"$ALERT_EMAIL\"" \
              --format='value(name)' | head -n 1)
  if [ -z "$channel" ]; then
    channel=$(gc beta monitoring channels create --type=email \
                --display-name="hello-birthday alerts" \
                --channel-labels="email_address=$ALERT_EMAIL" --format='value(name)') ||
      cannot "the notification channel $ALERT_EMAIL" "needs roles/monitoring.notificationChannelEditor"
  fi
else
  cannot "a notification channel" "ALERT_EMAIL is not set: the alerting policies are created but notify nobody; run setup again with ALERT_EMAIL=you@example.com"
fi
for file in "$here"/alert-policies/*.json; do
  rendered="$workdir/$(basename "$file")"
  name=$(python3 - "$file" "$rendered" "$channel" <<'PY'
import json, sys
policy = json.load(open(sys.argv[1]))
policy["notificationChannels"] = [sys.argv[3]] if sys.argv[3] else []
json.dump(policy, open(sys.argv[2], "w"))
print(policy["displayName"])
PY
)
  existing=$(gc alpha monitoring policies list --filter="displayName=\"$name\"" --format='value(name)')
  if [ -z "$existing" ]; then
    try "the alerting policy $name" "needs roles/monitoring.alertPolicyEditor" \
      gc alpha monitoring policies create --policy-from-file="$rendered"
  else
    try "the alerting policy $name" "needs roles/monitoring.alertPolicyEditor" \
      gc alpha monitoring policies update "$existing" --policy-from-file="$rendered"
  fi
done

step "CircleCI's workload identity federation (pool $WIF_POOL, provider $WIF_PROVIDER)"
if [ -n "${CIRCLECI_ORG_ID:-}" ] && [ -n "${CIRCLECI_PROJECT_ID:-}" ]; then
  number=$(gc projects describe "$PROJECT_ID" --format='value(projectNumber)') ||
    fatal "cannot read the project number"
  exists gc iam workload-identity-pools describe "$WIF_POOL" --location=global ||
    try "the workload identity pool $WIF_POOL" "needs roles/iam.workloadIdentityPoolAdmin" \
      gc iam workload-identity-pools create "$WIF_POOL" --location=global \
        --display-name="CircleCI"
  # Only this CircleCI project's pipelines on main may become the deployer.
  condition="attribute.project_id=='$CIRCLECI_PROJECT_ID' && attribute.vcs_ref=='refs/heads/main'"
  mapping="google.subject=assertion.sub,attribute.project_id=assertion['oidc.circleci.com/project-id'],attribute.vcs_ref=assertion['oidc.circleci.com/vcs-ref']"
  provider=(--location=global --workload-identity-pool="$WIF_POOL"
            --issuer-uri="https://oidc.circleci.com/org/$CIRCLECI_ORG_ID"
            --allowed-audiences="$CIRCLECI_ORG_ID" --attribute-mapping="$mapping"
            --attribute-condition="$condition")
  current=$(gc iam workload-identity-pools providers describe "$WIF_PROVIDER" \
              --location=global --workload-identity-pool="$WIF_POOL" \
              --format='value(attributeCondition)' 2>/dev/null) || current="<none>"
  if [ "$current" = "<none>" ]; then
    try "the OIDC provider $WIF_PROVIDER" "needs roles/iam.workloadIdentityPoolAdmin" \
      gc iam workload-identity-pools providers create-oidc "$WIF_PROVIDER" "${provider[@]}"
  elif [ "$current" != "$condition" ]; then
    try "the OIDC provider $WIF_PROVIDER's condition" "needs roles/iam.workloadIdentityPoolAdmin" \
      gc iam workload-identity-pools providers update-oidc "$WIF_PROVIDER" "${provider[@]}"
  fi
  resource_role "iam service-accounts" "$DEPLOYER_SERVICE_ACCOUNT" \
    "principalSet://iam.googleapis.com/projects/$number/locations/global/workloadIdentityPools/$WIF_POOL/attribute.project_id/$CIRCLECI_PROJECT_ID" \
    roles/iam.workloadIdentityUser
  echo "CircleCI context: GOOGLE_PROJECT_NUMBER=$number OIDC_WIP_ID=$WIF_POOL OIDC_WIP_PROVIDER_ID=$WIF_PROVIDER OIDC_SERVICE_ACCOUNT_EMAIL=$DEPLOYER_SERVICE_ACCOUNT"
else
  cannot "CircleCI's workload identity federation" "CIRCLECI_ORG_ID and CIRCLECI_PROJECT_ID are not both set (CircleCI: Organization Settings > Overview, Project Settings > Overview)"
fi

if [ -n "${GKE_CLUSTER:-}" ]; then
  step "GKE: cluster $GKE_CLUSTER in ${GKE_LOCATION:?GKE_LOCATION is required with GKE_CLUSTER}"
  project_role "serviceAccount:$DEPLOYER_SERVICE_ACCOUNT" roles/container.developer
  exists gc compute addresses describe hello-birthday-ip --global ||
    try "the static IP hello-birthday-ip" "needs compute.addresses.create" \
      gc compute addresses create hello-birthday-ip --global --ip-version=IPV4
  if ! exists gc storage buckets describe "gs://$BACKUP_BUCKET"; then
    cat >"$workdir/lifecycle.json" <<JSON
{"rule": [{"action": {"type": "Delete"}, "condition": {"age": $GKE_BACKUP_DAYS}}]}
JSON
    try "the backup bucket gs://$BACKUP_BUCKET" "needs storage.buckets.create" \
      gc storage buckets create "gs://$BACKUP_BUCKET" --location="$REGION" \
        --uniform-bucket-level-access --public-access-prevention \
        --lifecycle-file="$workdir/lifecycle.json"
  fi
  resource_role "storage buckets" "gs://$BACKUP_BUCKET" "serviceAccount:$RUNTIME" roles/storage.objectUser
  if cluster=$(gc container clusters describe "$GKE_CLUSTER" --location="$GKE_LOCATION" \
                 --format=json 2>&1); then
    read -r pool nodes < <(python3 -c 'import json, sys
c = json.loads(sys.argv[1])
print(c.get("workloadIdentityConfig", {}).get("workloadPool", "-"),
      c.get("nodeConfig", {}).get("serviceAccount", "default"))' "$cluster")
    if [ "$nodes" = default ]; then
      number=${number:-$(gc projects describe "$PROJECT_ID" --format='value(projectNumber)')}
      nodes="${number}-compute@developer.gserviceaccount.com"
    fi
    resource_role "artifacts repositories" "$REPOSITORY" "serviceAccount:$nodes" \
      roles/artifactregistry.reader --location="$REGION"
    if [ "$pool" = "-" ]; then
      cannot "Workload Identity bindings" "the cluster has no Workload Identity pool: gcloud container clusters update $GKE_CLUSTER --location=$GKE_LOCATION --workload-pool=$PROJECT_ID.svc.id.goog, then run setup again"
    else
      for ksa in hello-birthday hello-birthday-migrate; do
        resource_role "iam service-accounts" "$RUNTIME" "serviceAccount:$pool[hello-birthday/$ksa]" \
          roles/iam.workloadIdentityUser
      done
    fi
  else
    cannot "the GKE steps that need the cluster" "cluster $GKE_CLUSTER was not found in $GKE_LOCATION: create it (docs/deploy-gke.md), then run setup again" "$cluster"
  fi
fi

step "done"
connection="$PROJECT_ID:$REGION:$INSTANCE"
echo "Deploy with cloudrun/deploy.sh: CLOUDSQL_INSTANCE=$connection DATABASE=$DATABASE" \
  "CLOUDSQL_CONNECTIVITY=$CLOUDSQL_CONNECTIVITY NETWORK=$NETWORK SUBNET=$SUBNET" \
  "RUNGMP_SECRET=$RUNGMP_SECRET RUNTIME_SERVICE_ACCOUNT=$RUNTIME"
echo "DATABASE_URL on both targets: postgresql://${DB_IAM_USER/@/%40}@127.0.0.1:5432/$DATABASE" \
  "(the Cloud SQL Auth Proxy with --auto-iam-authn; no password)"
if [ "${#not_done[@]}" -gt 0 ]; then
  printf '\nNOT DONE (%d):\n' "${#not_done[@]}" >&2
  printf '  - %s\n' "${not_done[@]}" >&2
  exit 1
fi
