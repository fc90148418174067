#!/usr/bin/env bash
# Deploy hello-birthday to Cloud Run, safely and repeatably:
#   1. on-demand Cloud SQL backup, waited for
#   2. migration job (same image) applied and executed, waited for
#   3. new revision deployed with no traffic, under a revision tag
#   4. smoke test of the tagged URL (/readyz, a GET)
#   5. traffic shifted to the new revision, in steps
#   6. the rollback command printed
# Any failing step stops the script before traffic moves (set -e).
#
# Required: PROJECT_ID REGION SERVICE IMAGE (an immutable ...@sha256: reference)
#           CLOUDSQL_INSTANCE (project:region:instance) DATABASE_URL_SECRET
#           RUNTIME_SERVICE_ACCOUNT
# Optional: TRAFFIC_STEPS (default "100", e.g. "10 50 100"), STEP_PAUSE_SECONDS
#           (default 60), REVISION_TAG (default built from the image digest)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
: "${PROJECT_ID:?}" "${REGION:?}" "${SERVICE:?}" "${IMAGE:?}" "${CLOUDSQL_INSTANCE:?}"
: "${DATABASE_URL_SECRET:?}" "${RUNTIME_SERVICE_ACCOUNT:?}"
TRAFFIC_STEPS=${TRAFFIC_STEPS:-100}
STEP_PAUSE_SECONDS=${STEP_PAUSE_SECONDS:-60}

case "$IMAGE" in
  *@sha256:*) ;;
  *) echo "deploy: IMAGE must be an immutable reference (…@sha256:<digest>), got $IMAGE" >&2
     exit 2 ;;
esac
digest=${IMAGE##*@sha256:}
REVISION_TAG=${REVISION_TAG:-d${digest:0:12}}
REVISION="${SERVICE}-${REVISION_TAG}"
SQL_INSTANCE=${CLOUDSQL_INSTANCE##*:}
export PROJECT_ID SERVICE IMAGE CLOUDSQL_INSTANCE DATABASE_URL_SECRET RUNTIME_SERVICE_ACCOUNT REVISION

gc() { gcloud --project="$PROJECT_ID" --quiet "$@"; }
step() { printf '\n==> %s\n' "$*"; }
render() {  # substitute only our own variables, never anything else in the file
  envsubst '${PROJECT_ID} ${SERVICE} ${IMAGE} ${CLOUDSQL_INSTANCE} ${DATABASE_URL_SECRET} ${RUNTIME_SERVICE_ACCOUNT} ${REVISION}' <"$1"
}
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

step "1/6 backing up Cloud SQL instance $SQL_INSTANCE"
gc sql backups create --instance="$SQL_INSTANCE" --description="before deploying $REVISION"

step "2/6 migrating the schema with $IMAGE"
render "$here/migrate-job.yaml" >"$workdir/migrate-job.yaml"
gc run jobs replace "$workdir/migrate-job.yaml" --region="$REGION"
gc run jobs execute "${SERVICE}-migrate" --region="$REGION" --wait

step "3/6 deploying revision $REVISION with no traffic"
current=$(gc run services describe "$SERVICE" --region="$REGION" \
  --format='value(status.traffic[0].revisionName)' 2>/dev/null || true)
render "$here/service.yaml" >"$workdir/service.yaml"
if [ -n "$current" ] && [ "$current" != "$REVISION" ]; then
  # Keep every request on the serving revision; the new one is reachable by tag only.
  cat >>"$workdir/service.yaml" <<YAML
  traffic:
    - revisionName: $current
      percent: 100
    - revisionName: $REVISION
      tag: $REVISION_TAG
      percent: 0
YAML
else
  # First deploy (or a re-run for the revision already serving): nothing to protect.
  cat >>"$workdir/service.yaml" <<YAML
  traffic:
    - revisionName: $REVISION
      tag: $REVISION_TAG
      percent: 100
YAML
fi
gc run services replace "$workdir/service.yaml" --region="$REGION"

step "4/6 smoke-testing the tagged URL"
tagged_url=$(gc run services describe "$SERVICE" --region="$REGION" --format=json |
  python3 -c 'import json, sys
tag = sys.argv[1]
print(next(t["url"] for t in json.load(sys.stdin)["status"]["traffic"] if t.get("tag") == tag))
' "$REVISION_TAG")
token=$(gcloud auth print-identity-token)
smoke() { curl --fail-with-body --silent --show-error --max-time 10 --retry 5 --retry-all-errors \
  -H "Authorization: Bearer $token" "$@"; }
smoke "$tagged_url/readyz" >/dev/null
status=$(curl --silent --output /dev/null --write-out '%{http_code}' --max-time 10 \
  -H "Authorization: Bearer $token" "$tagged_url/hello/Smoketest")
case "$status" in
  200|404) echo "GET /hello/Smoketest -> $status" ;;
  *) echo "deploy: smoke GET answered $status; traffic stays on ${current:-nothing}" >&2; exit 1 ;;
esac

step "5/6 shifting traffic to $REVISION: $TRAFFIC_STEPS"
if [ -n "$current" ] && [ "$current" != "$REVISION" ]; then
  for percent in $TRAFFIC_STEPS; do
    gc run services update-traffic "$SERVICE" --region="$REGION" --to-revisions="$REVISION=$percent"
    if [ "$percent" != 100 ]; then
      sleep "$STEP_PAUSE_SECONDS"
      smoke "$tagged_url/readyz" >/dev/null
    fi
  done
fi

step "6/6 done"
if [ -n "$current" ] && [ "$current" != "$REVISION" ]; then
  echo "Roll back with:"
  echo "  gcloud run services update-traffic $SERVICE --project=$PROJECT_ID --region=$REGION --to-revisions=$current=100"
else
  echo "First revision: nothing to roll back to. Restore data with the backup taken in step 1."
fi
