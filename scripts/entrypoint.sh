#!/bin/sh
# Container entrypoint of the image (Dockerfile); also runs from a checkout, e.g.
#   PYTHON=.venv/bin/python scripts/entrypoint.sh --rp_serve_api
#
#   RUN_MODE=runpod (default): the RunPod serverless worker, `python -m handler`: it starts a local
#                              Ray head (or joins RAY_ADDRESS), deploys the Serve app and runs
#                              runpod.serverless.start. Arguments go to it (e.g. --rp_serve_api).
#   RUN_MODE=serve:            the plain Serve app, `python -m deployments.serve_main`: the OpenAI
#                              API on SERVE_HOST:SERVE_PORT (0.0.0.0:8000 in the image).
#   RUN_MODE=lb:               the Serve app for a RunPod load-balancing endpoint: it listens on the
#                              PORT RunPod gives (default 80) on every address, and RunPod probes
#                              its GET /ping there (200 ready, 204 loading). PORT_HEALTH, when set,
#                              must be the same port: Serve has one HTTP port.
#
# The interpreter is $PYTHON if set, else `python`, else `python3` (vLLM's image has only python3).
set -eu

if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif command -v python >/dev/null 2>&1; then
    py=python
else
    py=python3
fi

mode=${RUN_MODE:-runpod}
case "$mode" in
    runpod)
        exec "$py" -m handler "$@"
        ;;
    serve)
        exec "$py" -m deployments.serve_main "$@"
        ;;
    lb)
        port=${PORT:-80}
        if [ -n "${PORT_HEALTH:-}" ] && [ "$PORT_HEALTH" != "$port" ]; then
            echo "entrypoint.sh: PORT_HEALTH=$PORT_HEALTH differs from PORT=$port; the app answers /ping on its one port: leave PORT_HEALTH unset or equal to PORT" >&2
            exit 2
        fi
        SERVE_PORT=$port SERVE_HOST=${SERVE_HOST:-0.0.0.0} exec "$py" -m deployments.serve_main "$@"
        ;;
    *)
        echo "entrypoint.sh: unknown RUN_MODE '$mode': use 'runpod' (the default: the RunPod worker), 'serve' (the Serve app on port 8000) or 'lb' (a RunPod load-balancing endpoint on PORT)" >&2
        exit 2
        ;;
esac
