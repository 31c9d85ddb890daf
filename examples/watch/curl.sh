#!/usr/bin/env bash
# Follows a fleet's transitions with curl: the server-sent events of GET /api/watch (docs/contract.md, "HTTP").
#
#   FLEET_URL=http://127.0.0.1:3000 FLEET_TOKEN=lft_... examples/watch/curl.sh
#
# LAST_EVENT_ID resumes after a cursor (the last `id:` line you read); DEPLOYMENT_ID and STATE filter (each may be a
# comma-separated list). The headers reach curl through a file descriptor (`-H @<(...)`), not on its command line,
# where `ps` would show the token. curl does not reconnect: when the stream ends, run it again with the last `id:` as LAST_EVENT_ID.
set -euo pipefail

url="${FLEET_URL:-http://127.0.0.1:3000}/api/watch"
query=()
[[ -n "${DEPLOYMENT_ID:-}" ]] && query+=("deploymentId=${DEPLOYMENT_ID}")
[[ -n "${STATE:-}" ]] && query+=("state=${STATE}")
if ((${#query[@]} > 0)); then url="${url}?$(IFS='&'; echo "${query[*]}")"; fi

headers="Accept: text/event-stream"
[[ -n "${FLEET_TOKEN:-}" ]] && headers+=$'\n'"Authorization: Bearer ${FLEET_TOKEN}"
[[ -n "${LAST_EVENT_ID:-}" ]] && headers+=$'\n'"Last-Event-ID: ${LAST_EVENT_ID}"

# -N: print each event as it arrives (no output buffering); --fail-with-body: a refusal (401, 403, 400) exits 22
# with the fleet's JSON error printed
exec curl -sS -N --fail-with-body -H @<(printf '%s\n' "${headers}") "${url}"
