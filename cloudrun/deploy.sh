#!/usr/bin/env bash
# Deploy hello-birthday to Cloud Run, safely, and safe to re-run after a
# failure at any step (tests/cloud/test_deploy.py runs every such case with the
# real gcloud against a local stand-in of the Google APIs):
#   1. find the revision that serves now, by its traffic percent
#   2. on-demand Cloud SQL backup, waited for
#   3. migration job (same image) applied and executed, waited for
#   4. the new revision deployed under a tag with 0 %: all traffic stays on
#      the serving revision (a split left by an interrupted run is undone)
#   5. smoke test of the tagged URL with an ID token of the deployer
#   6. the invoker policy set: public (allUsers) or private
#   7. traffic moved in steps, the tagged URL checked between them; a failed
#      check puts 100 % back on the previous revision and fails
#   8. the rollback command printed
# A failure before step 7 leaves the traffic where it was.
#
# Required: PROJECT_ID REGION SERVICE IMAGE (an immutable ...@sha256: reference)
#           CLOUDSQL_INSTANCE (project:region:instance) DATABASE_URL_SECRET
#           RUNTIME_SERVICE_ACCOUNT DEPLOYER_SERVICE_ACCOUNT (mints the smoke
#           test's ID token: the OIDC credential of CircleCI's orb cannot)
# Optional: TRAFFIC_STEPS (default "100", e.g. "10 50 100"), STEP_PAUSE_SECONDS
#           (default 60), INVOKER (public, the default: anonymous API clients;
#           or private: callers need roles/run.invoker and an ID token),
#           REVISION_TAG (default built from the image digest), RUNGMP_SECRET
#           (default rungmp-config: the metrics sidecar's config, made by setup.sh)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
: "${PROJECT_ID:?}" "${REGION:?}" "${SERVICE:?}" "${IMAGE:?}" "${CLOUDSQL_INSTANCE:?}"
: "${DATABASE_URL_SECRET:?}" "${RUNTIME_SERVICE_ACCOUNT:?}" "${DEPLOYER_SERVICE_ACCOUNT:?}"
TRAFFIC_STEPS=${TRAFFIC_STEPS:-100}
STEP_PAUSE_SECONDS=${STEP_PAUSE_SECONDS:-60}
INVOKER=${INVOKER:-public}

fail() { echo "deploy: $*" >&2; exit 1; }
case "$IMAGE" in
  *@sha256:*) ;;
  *) echo "deploy: IMAGE must be an immutable reference (…@sha256:<digest>), got $IMAGE" >&2
     exit 2 ;;
esac
case "$INVOKER" in
  public|private) ;;
  *) echo "deploy: INVOKER must be public or private, got $INVOKER" >&2; exit 2 ;;
esac
digest=${IMAGE##*@sha256:}
REVISION_TAG=${REVISION_TAG:-d${digest:0:12}}
REVISION="${SERVICE}-${REVISION_TAG}"
SQL_INSTANCE=${CLOUDSQL_INSTANCE##*:}
RUNGMP_SECRET=${RUNGMP_SECRET:-rungmp-config}
export PROJECT_ID SERVICE IMAGE CLOUDSQL_INSTANCE DATABASE_URL_SECRET RUNTIME_SERVICE_ACCOUNT REVISION \
  RUNGMP_SECRET

gc() { gcloud --project="$PROJECT_ID" --quiet "$@"; }
step() { printf '\n==> %s\n' "$*"; }
render() {  # substitute only our own variables, never anything else in the file
  envsubst '${PROJECT_ID} ${SERVICE} ${IMAGE} ${CLOUDSQL_INSTANCE} ${DATABASE_URL_SECRET} ${RUNTIME_SERVICE_ACCOUNT} ${REVISION} ${RUNGMP_SECRET}' <"$1"
}
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

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
field() {  # field NAME: status.url, or the URL of our tag
  python3 -c 'import json, sys
service = json.load(sys.stdin)[0]
if sys.argv[1] == "url":
    print(service["status"]["url"])
else:
    print(next(t["url"] for t in service["status"]["traffic"] if t.get("tag") == sys.argv[2]))
' "$@"
}

step "1/8 finding the serving revision of $SERVICE in $REGION"
state=$(describe) || fail "cannot read service $SERVICE in $PROJECT_ID/$REGION (permissions, project or region?); nothing was changed"
previous=$(serving_revision <<<"$state")
if [ "$state" = "[]" ]; then
  echo "no service $SERVICE yet: first deploy"
elif [ -n "$previous" ]; then
  echo "serving: $previous"
else
  echo "$REVISION already holds all traffic: re-checking it"
fi

step "2/8 backing up Cloud SQL instance $SQL_INSTANCE"
gc sql backups create --instance="$SQL_INSTANCE" --description="before deploying $REVISION"

step "3/8 migrating the schema with $IMAGE"
render "$here/migrate-job.yaml" >"$workdir/migrate-job.yaml"
gc run jobs replace "$workdir/migrate-job.yaml" --region="$REGION"
gc run jobs execute "${SERVICE}-migrate" --region="$REGION" --wait

step "4/8 deploying revision $REVISION with no traffic"
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
gc run services replace "$workdir/service.yaml" --region="$REGION"
state=$(describe)
service_url=$(field url <<<"$state")
tagged_url=$(field tag "$REVISION_TAG" <<<"$state")

step "5/8 smoke-testing $tagged_url"
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

step "6/8 invoker policy: $INVOKER"
if [ "$INVOKER" = public ]; then
  gc run services add-iam-policy-binding "$SERVICE" --region="$REGION" \
    --member=allUsers --role=roles/run.invoker >/dev/null
else
  # Read first (an error stops the deploy), so a failure to read is never
  # mistaken for "not public".
  policy=$(gc run services get-iam-policy "$SERVICE" --region="$REGION" --format=json)
  if grep -q '"allUsers"' <<<"$policy"; then
    gc run services remove-iam-policy-binding "$SERVICE" --region="$REGION" \
      --member=allUsers --role=roles/run.invoker >/dev/null
  fi
fi

step "7/8 shifting traffic to $REVISION: $TRAFFIC_STEPS"
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

step "8/8 done"
if [ -n "$previous" ]; then
  echo "Roll back with:"
  echo "  gcloud run services update-traffic $SERVICE --project=$PROJECT_ID --region=$REGION --to-revisions=$previous=100"
else
  echo "First revision: nothing to roll back to. Restore data with the backup taken in step 2."
fi
