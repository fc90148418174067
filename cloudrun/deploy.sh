#!/usr/bin/env bash
# Deploy hello-birthday to Cloud Run, safely, and safe to re-run after a
# failure at any step (tests/cloud/test_deploy.py runs every such case with the
# real gcloud against a local stand-in of the Google APIs):
#   1. find the revision that serves now, by its traffic percent
#   2. validate the new service on the server (--dry-run): a revision-name
#      conflict or a refused field stops the deploy before anything changes
#   3. on-demand Cloud SQL backup, waited for; the deploy's own backups beyond
#      the newest ON_DEMAND_BACKUPS_KEPT are deleted (Cloud SQL never deletes them)
#   4. migration job (same image) applied and executed, waited for
#   5. the new revision deployed under a tag with 0 %: all traffic stays on
#      the serving revision (a split left by an interrupted run is undone)
#   6. smoke test of the tagged URL with an ID token of the deployer
#   7. the invoker policy set: public (allUsers, or the invoker check disabled
#      where an organisation policy refuses allUsers) or private
#   8. traffic moved in steps, the tagged URL checked between them; a failed
#      check puts 100 % back on the previous revision and fails
#   9. the rollback command printed
# A failure before step 8 leaves the traffic where it was.
#
# Required: PROJECT_ID REGION SERVICE IMAGE (an immutable ...@sha256: reference)
#           CLOUDSQL_INSTANCE (project:region:instance) RUNTIME_SERVICE_ACCOUNT
#           DEPLOYER_SERVICE_ACCOUNT (mints the smoke test's ID token: the OIDC
#           credential of CircleCI's orb cannot)
# Optional: DATABASE (hello), CLOUDSQL_CONNECTIVITY (private, as setup.sh made
#           it; or public), NETWORK and SUBNET (default: Direct VPC egress),
#           TRAFFIC_STEPS (default "100", e.g. "10 50 100"), STEP_PAUSE_SECONDS
#           (default 60), INVOKER (public, the default: anonymous API clients;
#           or private: callers need roles/run.invoker and an ID token),
#           CPU_THROTTLING (false, the default: instance-based billing, which
#           the metrics sidecar needs; true: request-based, cheaper at low
#           traffic, metrics may be lost: docs/operations.md),
#           ON_DEMAND_BACKUPS_KEPT (10), RUNGMP_SECRET (rungmp-config)
# `deploy.sh --render service.yaml` prints a manifest as the deploy renders it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
: "${PROJECT_ID:?}" "${REGION:?}" "${SERVICE:?}" "${IMAGE:?}" "${CLOUDSQL_INSTANCE:?}"
: "${RUNTIME_SERVICE_ACCOUNT:?}" "${DEPLOYER_SERVICE_ACCOUNT:?}"
TRAFFIC_STEPS=${TRAFFIC_STEPS:-100}
STEP_PAUSE_SECONDS=${STEP_PAUSE_SECONDS:-60}
INVOKER=${INVOKER:-public}
DATABASE=${DATABASE:-hello}
CLOUDSQL_CONNECTIVITY=${CLOUDSQL_CONNECTIVITY:-private}
NETWORK=${NETWORK:-default}
SUBNET=${SUBNET:-default}
CPU_THROTTLING=${CPU_THROTTLING:-false}
ON_DEMAND_BACKUPS_KEPT=${ON_DEMAND_BACKUPS_KEPT:-10}
RUNGMP_SECRET=${RUNGMP_SECRET:-rungmp-config}

fail() { echo "deploy: $*" >&2; exit 1; }
usage() { echo "deploy: $*" >&2; exit 2; }
case "$IMAGE" in
  *@sha256:*) ;;
  *) usage "IMAGE must be an immutable reference (…@sha256:<digest>), got $IMAGE" ;;
esac
case "$INVOKER" in public|private) ;; *) usage "INVOKER must be public or private, got $INVOKER" ;; esac
case "$CLOUDSQL_CONNECTIVITY" in
  private) PRIVATE_IP=true ;;
  public) PRIVATE_IP=false ;;
  *) usage "CLOUDSQL_CONNECTIVITY must be private or public, got $CLOUDSQL_CONNECTIVITY" ;;
esac
case "$CPU_THROTTLING" in true|false) ;; *) usage "CPU_THROTTLING must be true or false" ;; esac
digest=${IMAGE##*@sha256:}
SQL_INSTANCE=${CLOUDSQL_INSTANCE##*:}
# The runtime account's IAM database user, URL-encoded: no password anywhere.
db_user=${RUNTIME_SERVICE_ACCOUNT%.gserviceaccount.com}
DATABASE_URL="postgresql://${db_user/@/%40}@127.0.0.1:5432/${DATABASE}"
export PROJECT_ID SERVICE IMAGE CLOUDSQL_INSTANCE RUNTIME_SERVICE_ACCOUNT RUNGMP_SECRET \
  DATABASE_URL PRIVATE_IP NETWORK SUBNET CPU_THROTTLING

gc() { gcloud --project="$PROJECT_ID" --quiet "$@"; }
step() { printf '\n==> %s\n' "$*"; }
KEEP_INVOKER_CHECK_OFF=false
render() {  # substitute only our own variables, then drop the lines that do not apply
  local drop='^$'
  [ "$CLOUDSQL_CONNECTIVITY" = public ] && drop="$drop|# private IP\$"
  [ "$KEEP_INVOKER_CHECK_OFF" = true ] || drop="$drop|# invoker check off\$"
  python3 -c 'import os, re, sys
names = sys.argv[2].split()
text = open(sys.argv[1]).read()
sys.stdout.write(re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m[1]] if m[1] in names else m[0], text))
' "$1" "PROJECT_ID SERVICE IMAGE CLOUDSQL_INSTANCE RUNTIME_SERVICE_ACCOUNT REVISION RUNGMP_SECRET DATABASE_URL PRIVATE_IP NETWORK SUBNET CPU_THROTTLING" |
    grep -Ev "$drop"
}
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

# The revision's name: the image digest and a hash of the rendered service, so
# a redeploy of any earlier image, under any later configuration, has a name of
# its own, and a re-run of the same deploy reuses its revision.
config=$(REVISION=unnamed render "$here/service.yaml" | sha256sum)
REVISION_TAG=${REVISION_TAG:-d${digest:0:12}-${config:0:6}}
REVISION="${SERVICE}-${REVISION_TAG}"
export REVISION
# `deploy.sh --render FILE [KEEP_INVOKER_CHECK_OFF]`: the manifest as a deploy
# would apply it (tests/test_cloudrun.py reads them this way); nothing is called.
if [ "${1:-}" = --render ]; then
  KEEP_INVOKER_CHECK_OFF=${3:-false}
  render "$here/$2"
  exit 0
fi

describe() {  # the service as JSON, "[]" when it does not exist; any other error fails
  gc run services list --region="$REGION" --filter="metadata.name=$SERVICE" --format=json
}
# The revision holding the most traffic, other than $REVISION; empty if none.
# gcloud lists traffic entries sorted by revision name, so position means
# nothing: only the percent says which revision serves.
serving_revision() {
  python3 -c 'import json, sys
services = json.load(sys.stdin)
percents = {}
for service in services:
    for target in service.get("status", {}).get("traffic", []):
        name = target.get("revisionName")
        percents[name] = percents.get(name, 0) + int(target.get("percent") or 0)
others = sorted(((p, n) for n, p in percents.items() if n != sys.argv[1] and p > 0), reverse=True)
print(others[0][1] if others else "")' "$REVISION"
}
field() {  # field NAME: status.url, the URL of our tag, or whether the invoker check is off
  python3 -c 'import json, sys
services = json.load(sys.stdin)
if not services:
    print("false")
    sys.exit()
service = services[0]
if sys.argv[1] == "url":
    print(service["status"]["url"])
elif sys.argv[1] == "iam-check-disabled":
    print(service["metadata"].get("annotations", {}).get(  # gcloud writes "True"
        "run.googleapis.com/invoker-iam-disabled", "false").lower())
else:
    print(next(t["url"] for t in service["status"]["traffic"] if t.get("tag") == sys.argv[2]))
' "$@"
}

step "1/9 finding the serving revision of $SERVICE in $REGION"
state=$(describe) || fail "cannot read service $SERVICE in $PROJECT_ID/$REGION (permissions, project or region?); nothing was changed"
previous=$(serving_revision <<<"$state")
if [ "$state" = "[]" ]; then
  echo "no service $SERVICE yet: first deploy"
elif [ -n "$previous" ]; then
  echo "serving: $previous"
else
  echo "$REVISION already holds all traffic: re-checking it"
fi
# A public service whose invoker check was turned off stays so through the replace.
[ "$INVOKER" = public ] && KEEP_INVOKER_CHECK_OFF=$(field iam-check-disabled <<<"$state")

step "2/9 validating revision $REVISION on the server (nothing is applied)"
render "$here/service.yaml" >"$workdir/service.yaml"
if [ -n "$previous" ]; then
  # Every request stays on the serving revision; the new one is reachable by tag only.
  cat >>"$workdir/service.yaml" <<YAML
  traffic:
    - revisionName: $previous
      percent: 100
    - revisionName: $REVISION
      tag: $REVISION_TAG
      percent: 0
YAML
else
  # First deploy (or a re-run for the revision already serving). On a first
  # deploy nobody can call it yet: the invoker policy is set after the smoke test.
  cat >>"$workdir/service.yaml" <<YAML
  traffic:
    - revisionName: $REVISION
      tag: $REVISION_TAG
      percent: 100
YAML
fi
gc run services replace "$workdir/service.yaml" --region="$REGION" --dry-run ||
  fail "the server refused revision $REVISION (above); no backup, migration or traffic change was made"

step "3/9 backing up Cloud SQL instance $SQL_INSTANCE"
gc sql backups create --instance="$SQL_INSTANCE" --description="before deploying $REVISION"
# Cloud SQL keeps on-demand backups until they are deleted: keep this
# deploy's newest ON_DEMAND_BACKUPS_KEPT, never one somebody else took.
stale=$(gc sql backups list --instance="$SQL_INSTANCE" \
          --filter="type=ON_DEMAND AND description~'^before deploying'" \
          --sort-by=~windowStartTime,~id --format='value(id)' | tail -n +"$((ON_DEMAND_BACKUPS_KEPT + 1))")
for id in $stale; do
  gc sql backups delete "$id" --instance="$SQL_INSTANCE" >/dev/null
  echo "deleted on-demand backup $id (older than the newest $ON_DEMAND_BACKUPS_KEPT)"
done

step "4/9 migrating the schema with $IMAGE"
render "$here/migrate-job.yaml" >"$workdir/migrate-job.yaml"
gc run jobs replace "$workdir/migrate-job.yaml" --region="$REGION"
gc run jobs execute "${SERVICE}-migrate" --region="$REGION" --wait

step "5/9 deploying revision $REVISION with no traffic"
gc run services replace "$workdir/service.yaml" --region="$REGION"
state=$(describe)
service_url=$(field url <<<"$state")
tagged_url=$(field tag "$REVISION_TAG" <<<"$state")

step "6/9 smoke-testing $tagged_url"
# An ID token for the service's URL, minted for the deployer's service account.
# CircleCI's OIDC credential (external account) cannot mint one itself.
token=$(gcloud --project="$PROJECT_ID" auth print-identity-token \
  --impersonate-service-account="$DEPLOYER_SERVICE_ACCOUNT" --audiences="$service_url")
check() {  # the tagged revision answers /readyz and a GET
  curl --fail --silent --show-error --max-time 10 --retry 4 --retry-delay 2 --retry-all-errors \
    -H "Authorization: Bearer $token" "$tagged_url/readyz" >/dev/null || return 1
  local status
  status=$(curl --silent --output /dev/null --write-out '%{http_code}' --max-time 10 \
    -H "Authorization: Bearer $token" "$tagged_url/hello/Smoketest") || return 1
  case "$status" in
    200|404) return 0 ;;
    *) echo "GET /hello/Smoketest answered $status" >&2; return 1 ;;
  esac
}
check || fail "smoke test of $REVISION failed; traffic stays on ${previous:-nothing} (no new revision serves)"

step "7/9 invoker policy: $INVOKER"
iam_check_disabled=$(field iam-check-disabled <<<"$state")
if [ "$INVOKER" = public ]; then
  if [ "$iam_check_disabled" != true ] &&
     ! out=$(gc run services add-iam-policy-binding "$SERVICE" --region="$REGION" \
               --member=allUsers --role=roles/run.invoker 2>&1 >/dev/null); then
    case "$out" in
      *"permitted customer"*)
        # Domain Restricted Sharing refuses allUsers; Google's answer for a
        # public service is to disable the invoker check instead.
        echo "allUsers is refused by an organisation policy (Domain Restricted Sharing): disabling the invoker IAM check instead"
        gc run services update "$SERVICE" --region="$REGION" --no-invoker-iam-check ;;
      *) echo "$out" >&2; fail "cannot make $SERVICE public" ;;
    esac
  fi
else
  [ "$iam_check_disabled" = true ] &&
    gc run services update "$SERVICE" --region="$REGION" --invoker-iam-check
  # Read first (an error stops the deploy), so a failure to read is never
  # mistaken for "not public".
  policy=$(gc run services get-iam-policy "$SERVICE" --region="$REGION" --format=json)
  if grep -q '"allUsers"' <<<"$policy"; then
    gc run services remove-iam-policy-binding "$SERVICE" --region="$REGION" \
      --member=allUsers --role=roles/run.invoker >/dev/null
  fi
fi

step "8/9 shifting traffic to $REVISION: $TRAFFIC_STEPS"
if [ -n "$previous" ]; then
  for percent in $TRAFFIC_STEPS; do
    gc run services update-traffic "$SERVICE" --region="$REGION" --to-revisions="$REVISION=$percent"
    if [ "$percent" != 100 ]; then
      sleep "$STEP_PAUSE_SECONDS"
      if ! check; then
        echo "deploy: $REVISION failed its check at $percent %: putting 100 % back on $previous" >&2
        gc run services update-traffic "$SERVICE" --region="$REGION" --to-revisions="$previous=100"
        fail "rolled back to $previous after a failed check at $percent %"
      fi
    fi
  done
fi

step "9/9 done"
if [ -n "$previous" ]; then
  echo "Roll back with:"
  echo "  gcloud run services update-traffic $SERVICE --project=$PROJECT_ID --region=$REGION --to-revisions=$previous=100"
else
  echo "First revision: nothing to roll back to. Restore data with the backup taken in step 3."
fi
