#!/bin/sh
# Container entrypoint of the image (Dockerfile); also runs from a checkout, e.g.
#   PYTHON=.venv/bin/python scripts/entrypoint.sh --rp_serve_api
#
#   RUN_MODE=runpod (default): the RunPod serverless worker, `python -m handler`: it starts a local
#                              Ray head (or joins RAY_ADDRESS), deploys the Serve app and runs
#                              runpod.serverless.start. Arguments go to it (e.g. --rp_serve_api).
#   RUN_MODE=serve:            the plain Serve app, `python -m deployments.serve_main`: the OpenAI
#                              API on SERVE_HOST:SERVE_PORT (0.0.0.0:8000 in the image).
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
    *)
        echo "entrypoint.sh: unknown RUN_MODE '$mode': use 'runpod' (the default: the RunPod worker) or 'serve' (the Serve app on port 8000)" >&2
        exit 2
        ;;
esac
