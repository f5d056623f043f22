#!/usr/bin/env bash
# Deploys Convergence on Cloud Run, on BigQuery, with the Google Cloud CLI (gcloud) only: the
# image is built by Cloud Build, so no local Docker engine is needed.
#
#   PROJECT_ID=my-project deploy/deploy.sh all          # everything below, in order
#   PROJECT_ID=my-project deploy/deploy.sh setup        # APIs, image repository, service
#                                                       # account and its roles, secrets
#   PROJECT_ID=my-project deploy/deploy.sh build        # the image (prints its TAG)
#   PROJECT_ID=my-project TAG=... deploy/deploy.sh deploy     # deploy/service.yaml, public
#   PROJECT_ID=my-project deploy/deploy.sh scheduler    # the Cloud Scheduler job
#   PROJECT_ID=my-project TAG=... deploy/deploy.sh render     # print the rendered YAML only
#
# Settings (environment): PROJECT_ID (default: gcloud's configured project), REGION
# (us-central1), BIGQUERY_LOCATION (US), TAG (the image tag; `build` and `all` default to
# the current UTC time), TOKEN_VERSION (the scheduler token's secret version the service
# reads and the job sends: 1). Every step may be run again: what exists is kept.
set -euo pipefail

cd "$(dirname "$0")/.."

PROJECT_ID="${PROJECT_ID:-$(gcloud config get-value project 2>/dev/null || true)}"
REGION="${REGION:-us-central1}"
BIGQUERY_LOCATION="${BIGQUERY_LOCATION:-US}"
TOKEN_VERSION="${TOKEN_VERSION:-1}"
# These names are also in deploy/service.yaml.
SERVICE=convergence-api
REPOSITORY=convergence
PEPPER_SECRET=convergence-key-pepper
TOKEN_SECRET=convergence-scheduler-token
SCHEDULER_JOB=convergence-all-tenants

die() {
    echo "deploy.sh: $*" >&2
    exit 1
}

[ -n "$PROJECT_ID" ] || die "set PROJECT_ID (or gcloud config set project ...)"
SERVICE_ACCOUNT="$SERVICE@$PROJECT_ID.iam.gserviceaccount.com"
IMAGE_NAME="$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY/$SERVICE"

# Sets IMAGE, the image of this TAG.
use_tag() {
    [ -n "${TAG:-}" ] || die "set TAG to the tag \`deploy.sh build\` printed"
    IMAGE="$IMAGE_NAME:$TAG"
}

# A command that may fail while a just-created service account propagates (IAM is
# eventually consistent): tried up to 6 times, 10 s apart.
retry() {
    local attempt
    for attempt in 1 2 3 4 5 6; do
        "$@" && return 0
        [ "$attempt" -eq 6 ] || sleep 10
    done
    return 1
}

# A secret of 32 random bytes (64 hex characters, no newline), created once: its first
# version is the one deploy/service.yaml names.
create_secret() {
    gcloud secrets describe "$1" --project="$PROJECT_ID" >/dev/null 2>&1 && return 0
    openssl rand -hex 32 | tr -d '\n' \
        | gcloud secrets create "$1" --project="$PROJECT_ID" \
            --replication-policy=automatic --data-file=-
}

setup() {
    gcloud services enable run.googleapis.com artifactregistry.googleapis.com \
        cloudbuild.googleapis.com secretmanager.googleapis.com bigquery.googleapis.com \
        cloudscheduler.googleapis.com iam.googleapis.com --project="$PROJECT_ID"

    gcloud artifacts repositories describe "$REPOSITORY" --project="$PROJECT_ID" \
        --location="$REGION" >/dev/null 2>&1 \
        || gcloud artifacts repositories create "$REPOSITORY" --project="$PROJECT_ID" \
            --location="$REGION" --repository-format=docker --description="Convergence images"

    gcloud iam service-accounts describe "$SERVICE_ACCOUNT" --project="$PROJECT_ID" \
        >/dev/null 2>&1 \
        || gcloud iam service-accounts create "$SERVICE" --project="$PROJECT_ID" \
            --display-name="Convergence API (Cloud Run)"
    # Create datasets and tables, read and write rows; run query, load and copy jobs.
    local role
    for role in roles/bigquery.dataEditor roles/bigquery.user roles/bigquery.jobUser; do
        retry gcloud projects add-iam-policy-binding "$PROJECT_ID" \
            --member="serviceAccount:$SERVICE_ACCOUNT" --role="$role" --condition=None \
            >/dev/null
    done

    local secret
    for secret in "$PEPPER_SECRET" "$TOKEN_SECRET"; do
        create_secret "$secret"
        retry gcloud secrets add-iam-policy-binding "$secret" --project="$PROJECT_ID" \
            --member="serviceAccount:$SERVICE_ACCOUNT" \
            --role=roles/secretmanager.secretAccessor >/dev/null
    done
}

build() {
    use_tag
    gcloud builds submit . --project="$PROJECT_ID" --tag="$IMAGE" \
        --ignore-file=.dockerignore --timeout=30m
    echo "Built $IMAGE; deploy it with: TAG=$TAG deploy/deploy.sh deploy"
}

render() {
    use_tag
    local rendered
    rendered="$(sed -e "s|\${PROJECT_ID}|$PROJECT_ID|g" \
        -e "s|\${REGION}|$REGION|g" \
        -e "s|\${IMAGE}|$IMAGE|g" \
        -e "s|\${SERVICE_ACCOUNT}|$SERVICE_ACCOUNT|g" \
        -e "s|\${BIGQUERY_LOCATION}|$BIGQUERY_LOCATION|g" \
        -e "s|\${TOKEN_VERSION}|$TOKEN_VERSION|g" \
        deploy/service.yaml)"
    # shellcheck disable=SC2016  # a literal dollar-brace: a placeholder left unfilled
    if grep -n '\${' <<<"$rendered" >&2; then
        die "deploy/service.yaml has a placeholder this script does not fill"
    fi
    echo "$rendered"
}

deploy() {
    RENDERED="$(mktemp)"
    trap 'rm -f "$RENDERED"' EXIT
    render >"$RENDERED"
    gcloud run services replace "$RENDERED" --project="$PROJECT_ID" --region="$REGION"
    # Integrators call the API with their keys: anyone may reach it (no Google sign-in).
    gcloud run services add-iam-policy-binding "$SERVICE" --project="$PROJECT_ID" \
        --region="$REGION" --member=allUsers --role=roles/run.invoker >/dev/null
    gcloud run services describe "$SERVICE" --project="$PROJECT_ID" --region="$REGION" \
        --format='value(status.url)'
}

# One job for every tenant, every minute, with the operator token (README, Schedules).
# The token is in the job's headers: whoever may view the job may read it.
scheduler() {
    local url token
    url="$(gcloud run services describe "$SERVICE" --project="$PROJECT_ID" \
        --region="$REGION" --format='value(status.url)')"
    [ -n "$url" ] || die "the service $SERVICE is not deployed in $REGION"
    token="$(gcloud secrets versions access "$TOKEN_VERSION" --secret="$TOKEN_SECRET" \
        --project="$PROJECT_ID")"
    local -a job=(
        "$SCHEDULER_JOB" --project="$PROJECT_ID" --location="$REGION"
        --schedule="* * * * *" --uri="$url/api/v1/scheduler/trigger" --http-method=POST
        --message-body="{}" --attempt-deadline=300s
    )
    local headers="Content-Type=application/json,X-Scheduler-Token=$token"
    if gcloud scheduler jobs describe "$SCHEDULER_JOB" --project="$PROJECT_ID" \
        --location="$REGION" >/dev/null 2>&1; then
        gcloud scheduler jobs update http "${job[@]}" --update-headers="$headers" >/dev/null
    else
        gcloud scheduler jobs create http "${job[@]}" --headers="$headers" >/dev/null
    fi
    echo "Cloud Scheduler job $SCHEDULER_JOB calls $url/api/v1/scheduler/trigger every minute"
}

case "${1:-}" in
    setup) setup ;;
    build)
        TAG="${TAG:-$(date -u +%Y%m%d-%H%M%S)}"
        build
        ;;
    render) render ;;
    deploy) deploy ;;
    scheduler) scheduler ;;
    all)
        TAG="${TAG:-$(date -u +%Y%m%d-%H%M%S)}"
        setup
        build
        deploy
        scheduler
        ;;
    *) die "usage: deploy/deploy.sh setup|build|deploy|scheduler|all|render" ;;
esac
