"""The ingress deployment and what it owns: routes, API keys, admission (MAX_CONCURRENCY and its
queue), request limits, the error envelope, logs and metrics. Every request passes it."""
