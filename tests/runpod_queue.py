"""A stand-in for RunPod's job queue, so tests drive the runpod SDK's production worker loop (the
one that really marks jobs FAILED): it hands out jobs, receives streamed partial results and final
results, and long-polls stop signals. Loopback only."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse


class RunPodQueue:
    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.taken: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.streams: dict[str, list[Any]] = {}
        self.to_stop: list[str] = []
        self.max_in_progress = 0
        self._lock = threading.Lock()
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, payload: Any = None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = urlparse(self.path).path
                if path.startswith("/job-take-batch/") or path.startswith("/job-take/"):
                    query = urlparse(self.path).query
                    size = 1
                    for part in query.split("&"):
                        if part.startswith("batch_size="):
                            size = int(part.split("=", 1)[1])
                    jobs = queue._take(size)
                    if not jobs:
                        time.sleep(0.2)
                        return self._reply(204)
                    return self._reply(200, jobs if path.startswith("/job-take-batch/") else jobs[0])
                if path.startswith("/job-stop/"):
                    deadline = time.monotonic() + 2
                    while time.monotonic() < deadline:
                        with queue._lock:
                            if queue.to_stop:
                                ids, queue.to_stop = queue.to_stop, []
                                return self._reply(200, {"jobsToStop": ids})
                        time.sleep(0.05)
                    return self._reply(204)
                return self._reply(200, {})  # heartbeat ping and anything else

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                payload = json.loads(self.rfile.read(length) or b"null")
                parts = urlparse(self.path).path.strip("/").split("/")
                kind, job_id = parts[0], parts[-1]
                with queue._lock:
                    if kind == "job-stream":
                        queue.streams.setdefault(job_id, []).append(payload)
                    elif kind == "job-done":
                        queue.results[job_id] = payload
                        queue.taken.pop(job_id, None)
                self._reply(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take(self, size: int) -> list[dict[str, Any]]:
        with self._lock:
            jobs, self.pending = self.pending[:size], self.pending[size:]
            for job in jobs:
                self.taken[job["id"]] = time.monotonic()
            self.max_in_progress = max(self.max_in_progress, len(self.taken))
            return jobs

    def submit(self, job_id: str, job_input: Any) -> None:
        with self._lock:
            self.pending.append({"id": job_id, "input": job_input})

    def stop(self, job_id: str) -> None:
        with self._lock:
            self.to_stop.append(job_id)

    def wait_result(self, job_id: str, timeout: float = 300) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if job_id in self.results:
                    return self.results[job_id]
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} has no result after {timeout} s")

    def worker_env(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.port}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?token=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?token=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?token=test",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?token=test",
            "RUNPOD_POD_ID": "test-worker",
            "RUNPOD_AI_API_KEY": "test",
        }

    def close(self) -> None:
        self.server.shutdown()
