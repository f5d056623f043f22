#!/bin/sh
# The container's entrypoint: the gRPC server and Envoy together (`convergence-server
# stack`), which stops both, in order, on SIGTERM; Cloud Run sends it and kills the
# container 10 s later, and the server's own stop bound (CONVERGENCE_SHUTDOWN_SECONDS,
# default 8) fits within that.
#
# Environment (every CONVERGENCE_* variable is in README.md, Configuration):
#   PORT                   Cloud Run's port for the container (8080); when set, Envoy's
#                          listener port: it replaces CONVERGENCE_HTTP_PORT.
#   CONVERGENCE_HTTP_PORT  used when PORT is not set (default 8080).
#   CONVERGENCE_HTTP_HOST  address Envoy's listener binds; default here 0.0.0.0, so that
#                          traffic from outside the container reaches it (the server's
#                          default is 127.0.0.1).
# The gRPC server stays on 127.0.0.1 (CONVERGENCE_GRPC_HOST): only Envoy reaches it.
#
# Arguments: none runs the service; anything else is a convergence-server command run in
# the image's setting (e.g. `validate`, `keys issue TENANT --name recovery`).
set -eu

CONVERGENCE_HTTP_PORT="${PORT:-${CONVERGENCE_HTTP_PORT:-8080}}"
CONVERGENCE_HTTP_HOST="${CONVERGENCE_HTTP_HOST:-0.0.0.0}"
export CONVERGENCE_HTTP_PORT CONVERGENCE_HTTP_HOST

if [ "$#" -eq 0 ]; then
    set -- stack
fi
# exec: the launcher becomes this process (PID 1 in the container) and receives SIGTERM itself.
exec python -m convergence_server "$@"
