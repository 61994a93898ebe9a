"""Serve many P-Tuning v2 tasks from one deployed ONNX graph: each task is a prefix adapter file, chosen per request.

    ptv2-export --model BASE --adapter runs/sst2 --output graph --prefix-as adapter_inputs \
        --adapter-file adapters/sst2.onnx_adapter
    ptv2-export --model BASE --adapter runs/topic --adapter-file adapters/topic.onnx_adapter
    python -m examples.serve --model-dir graph --adapter sst2=adapters/sst2.onnx_adapter \\
        --adapter topic=adapters/topic.onnx_adapter --port 8000
    curl -s localhost:8000/v1/classify -d '{"task": "sst2", "texts": ["a gorgeous , witty film"]}'
    curl -s localhost:8000/metrics

Endpoints: ``POST /v1/classify {"task", "texts" | "input_ids"}`` (classification graphs), ``POST /v1/generate
{"task", "texts" | "input_ids", "max_new_tokens"}`` (decoder graphs), ``GET /metrics`` (latency p50/p90/p99, counts,
batches), ``GET /health``. Unknown tasks, too many or too long inputs and malformed JSON get a 4xx with a JSON
``{"error": ...}``. ``input_ids`` lets a deployment without tokenizer files send token ids.

Batching: request threads put their rows on one queue; a single batching thread collects rows for up to
``--max-wait-ms`` or ``--max-batch`` rows, groups them by task and runs one ONNX Runtime call per task with that
task's adapter bound (``adapter=task``: no session rebuild, the backbone exists once in memory).

Why the Python standard library (``http.server.ThreadingHTTPServer``, ``json``, ``threading``) and not FastAPI +
uvicorn: the serving image needs nothing beyond what the runtime already installs (onnxruntime, numpy, and
transformers for the tokenizer), so the example runs from the project's locked environments with zero extra
dependencies; and the part that matters here, cross-request batching by task, is our code with any framework. A
production deployment would put this behind a real front end (TLS, auth, connection limits); the batcher and the
adapter handling carry over unchanged.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from exporters.onnx import load, swappable_session_options

_STOP = object()


class RequestError(Exception):
    """A client mistake: answered with ``status`` and a JSON message, never a stack trace."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_texts: int = 32  # per request
    max_tokens: int = 128  # per text, after tokenization
    max_new_tokens: int = 32
    max_body_bytes: int = 1 << 20
    timeout_s: float = 30.0  # a request waiting longer for its batch gets 503


# ----------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Latencies of answered requests (a bounded window) and counters, safe to update from every request thread."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._counts: Counter = Counter()

    def record(self, latency_s: float | None = None, **counts: int) -> None:
        with self._lock:
            if latency_s is not None:
                self._latencies.append(latency_s)
            self._counts.update(counts)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latencies = sorted(self._latencies)
            counts = dict(self._counts)
        return {"requests": counts.pop("requests", 0), "latency_ms": percentiles(latencies), **counts}


def percentiles(sorted_values: Sequence[float], points: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds, plus count; empty when nothing was measured."""
    if not sorted_values:
        return {"count": 0}
    result: dict[str, float] = {"count": len(sorted_values)}
    for point in points:
        index = min(len(sorted_values) - 1, max(0, -(-point * len(sorted_values) // 100) - 1))
        result[f"p{point}"] = round(sorted_values[index] * 1000, 3)
    return result


# ---------------------------------------------------------------------------------------------------- batching
@dataclass
class Job:
    kind: str  # "classify" | "generate"
    task: str
    rows: list[list[int]]
    options: tuple = ()
    future: Future = field(default_factory=Future)


class TaskBatcher:
    """One thread that turns concurrent jobs into few model calls: it collects jobs for up to ``max_wait_s`` (or
    ``max_batch`` rows), groups them by (kind, task, options) and runs each group as one call."""

    def __init__(self, run: Callable[[str, str, list[list[int]], tuple], list[Any]], metrics: Metrics,
                 max_batch: int = 32, max_wait_s: float = 0.005) -> None:
        self._run, self._metrics = run, metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._lock, self._closed = threading.Lock(), False
        self._thread = threading.Thread(target=self._loop, name="task-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._lock:  # no job can slip in behind the stop marker and wait forever
            if self._closed:
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the service is shutting down")
            self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs already collected, fail the rest with 503, and join the thread."""
        with self._lock:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the batching thread did not stop")
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not _STOP:
                job.future.set_exception(RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the service shut down"))

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, rows = [first], len(first.rows)
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
                rows += len(job.rows)
            self._run_groups(jobs)

    def _run_groups(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.kind, job.task, job.options), []).append(job)
        self._metrics.record(batches=1, model_calls=len(groups), rows=sum(len(j.rows) for j in jobs))
        for (kind, task, options), group in groups.items():
            try:
                results = self._run(kind, task, [row for job in group for row in job.rows], options)
            except Exception as error:  # the model failed: every request of the group learns why
                for job in group:
                    job.future.set_exception(error)
                continue
            start = 0
            for job in group:
                job.future.set_result(results[start : start + len(job.rows)])
                start += len(job.rows)


# ----------------------------------------------------------------------------------------------------- service
class PrefixService:
    """One ONNX graph, one prefix adapter per task, a tokenizer (optional) and the batcher.

    ``tasks`` maps a task name to its adapter file, or to None for the graph's own prefix (the only task a graph
    with the prefix baked in as constants can serve)."""

    def __init__(self, model, tasks: dict[str, str | Path | None], tokenizer=None, limits: Limits | None = None,
                 max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        self.model, self.tokenizer, self.limits = model, tokenizer, limits or Limits()
        self.kind = "generate" if model.task == "CAUSAL_LM" else "classify"
        self._adapter = {task: None if path is None else model.load_prefix_adapter(path, task)
                         for task, path in tasks.items()}
        self.tasks = sorted(tasks)
        self.pad_id = _pad_id(model.config, tokenizer)
        self.metrics = Metrics()
        self.batcher = TaskBatcher(self._run, self.metrics, max_batch, max_wait_ms / 1000)

    # -- requests
    def handle(self, kind: str, body: dict) -> dict:
        if kind != self.kind:
            raise RequestError(HTTPStatus.NOT_FOUND, f"this deployment serves /v1/{self.kind} ({self.model.task})")
        task = body.get("task")
        if task not in self.tasks:
            raise RequestError(HTTPStatus.NOT_FOUND, f"unknown task {task!r}; this deployment serves {self.tasks}")
        rows = self._rows(body)
        options: tuple = ()
        if kind == "generate":
            new = body.get("max_new_tokens", 16)
            if not isinstance(new, int) or isinstance(new, bool) or not 1 <= new <= self.limits.max_new_tokens:
                raise RequestError(HTTPStatus.BAD_REQUEST,
                                   f"max_new_tokens must be an integer in [1, {self.limits.max_new_tokens}]")
            options = (new,)
        job = self.batcher.submit(Job(kind, task, rows, options))
        try:
            results = job.result(timeout=self.limits.timeout_s)
        except FutureTimeout as error:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "timed out waiting for a batch") from error
        self.metrics.record(**{f"task.{task}": 1})
        if kind == "classify":
            return {"task": task, "labels": [int(np.argmax(r)) for r in results], "logits": results}
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in results] if self.tokenizer else None
        return {"task": task, "tokens": results, **({"texts": texts} if texts is not None else {})}

    def _rows(self, body: dict) -> list[list[int]]:
        texts, ids = body.get("texts"), body.get("input_ids")
        if (texts is None) == (ids is None):
            raise RequestError(HTTPStatus.BAD_REQUEST, 'pass "texts" (a list of strings) or "input_ids" (a list of '
                                                       "lists of token ids), not both")
        items = texts if texts is not None else ids
        if not isinstance(items, list) or not items:
            raise RequestError(HTTPStatus.BAD_REQUEST, "texts/input_ids must be a non-empty list")
        if len(items) > self.limits.max_texts:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(items)} inputs in one request; the limit is {self.limits.max_texts}")
        if texts is not None:
            if self.tokenizer is None:
                raise RequestError(HTTPStatus.BAD_REQUEST, "this deployment has no tokenizer; send input_ids")
            if not all(isinstance(t, str) for t in texts):
                raise RequestError(HTTPStatus.BAD_REQUEST, "texts must be strings")
            rows = [list(r) for r in self.tokenizer(texts)["input_ids"]]
        else:
            vocab = int(self.model.config.vocab_size)
            if not all(isinstance(r, list) and r and all(type(t) is int and 0 <= t < vocab for t in r) for r in ids):
                raise RequestError(HTTPStatus.BAD_REQUEST,
                                   f"input_ids must be non-empty lists of integers in [0, {vocab})")
            rows = ids
        longest = max(len(r) for r in rows)
        if longest > self.limits.max_tokens:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"an input has {longest} tokens; the limit is {self.limits.max_tokens}")
        return rows

    # -- model calls (batching thread only)
    def _run(self, kind: str, task: str, rows: list[list[int]], options: tuple) -> list[Any]:
        ids, mask = pad_rows(rows, self.pad_id, left=kind == "generate")
        if kind == "classify":
            return self.model(input_ids=ids, attention_mask=mask, adapter=self._adapter[task]).logits.tolist()
        out = self.model.generate(ids, mask, adapter=self._adapter[task], max_new_tokens=options[0])
        return [row[ids.shape[1] :] for row in out.tolist()]

    def close(self) -> None:
        self.batcher.close()


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) for rows of different lengths: right-padded for encoders, left-padded for decoding."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def _pad_id(config, tokenizer) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


# -------------------------------------------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    server: ServiceHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        service = self.server.service
        if self.path == "/metrics":
            self._reply(HTTPStatus.OK, service.metrics.snapshot())
        elif self.path == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok", "task": service.model.task, "tasks": service.tasks})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try /metrics or /health"})

    def do_POST(self) -> None:  # noqa: N802
        service = self.server.service
        started = time.perf_counter()
        try:
            kind = {"/v1/classify": "classify", "/v1/generate": "generate"}.get(self.path)
            if kind is None:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")
            answer = service.handle(kind, self._json_body(service.limits.max_body_bytes))
        except RequestError as error:
            service.metrics.record(**{f"status.{error.status.value}": 1})
            self._reply(error.status, {"error": str(error)})
            return
        except Exception as error:  # a bug or a model failure: 500 with the reason, the server keeps serving
            service.metrics.record(**{"status.500": 1})
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})
            return
        service.metrics.record(time.perf_counter() - started, requests=1)
        self._reply(HTTPStatus.OK, answer)

    def _json_body(self, limit: int) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as error:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header") from error
        if length > limit:
            self.close_connection = True  # the body is not read
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {limit}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {error}") from error
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet; /metrics has the numbers
        pass


class ServiceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: PrefixService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """Stop accepting, close the socket, then stop the batcher (call from another thread than serve_forever)."""
        self.shutdown()
        self.server_close()
        self.service.close()


def build_service(model_dir: str | Path, adapters: dict[str, str | Path | None], *,
                  tokenizer_dir: str | Path | None = None, threads: int = 0, limits: Limits | None = None,
                  max_batch: int = 32, max_wait_ms: float = 5.0) -> PrefixService:
    """Load the graph (one session), every task's adapter file and the tokenizer (if the folder has one)."""
    model = load(model_dir, session_options=swappable_session_options(threads))
    tokenizer = _tokenizer(Path(tokenizer_dir or model_dir))
    return PrefixService(model, adapters, tokenizer, limits, max_batch, max_wait_ms)


def _tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a graph exported with --prefix-as adapter_inputs")
    parser.add_argument("--adapter", action="append", default=[], metavar="TASK=FILE",
                        help="a task and its .onnx_adapter file (repeatable)")
    parser.add_argument("--graph-task", metavar="TASK",
                        help="also serve the graph's own prefix as TASK (a constants graph serves only this)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: ORT's default)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    adapters: dict[str, str | None] = dict(item.split("=", 1) for item in args.adapter)
    if args.graph_task:
        adapters[args.graph_task] = None
    if not adapters:
        parser.error("name at least one task: --adapter TASK=FILE or --graph-task TASK")
    service = build_service(args.model_dir, adapters, tokenizer_dir=args.tokenizer, threads=args.threads,
                            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    server = ServiceHTTPServer(service, args.host, args.port)
    print(f"Serving {service.model.task} tasks {service.tasks} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()


if __name__ == "__main__":  # pragma: no cover
    main()
