"""examples/serve.py in-process on the loopback interface, checked with a real HTTP client (urllib): concurrent
requests over several tasks each match PyTorch with that task's adapter, bad requests get 4xx, shutdown is clean."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it

pytest.importorskip("onnxruntime")

from examples.serve import Job, Limits, Metrics, ServiceHTTPServer, TaskBatcher, build_service  # noqa: E402
from exporters.onnx import export, export_prefix_adapter  # noqa: E402
from tests.child_process import run_python  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_prefix_adapters import several_adapters  # noqa: E402

TASKS = ("sst2", "topic", "nli")
WORDS = "the a film movie plot was is great awful boring fine witty match team food soup not very".split()
TIMEOUT = 60


def word_tokenizer():
    """A tiny word-level tokenizer (ids 3.. < the tiny models' vocabulary of 128); no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def deploy(tmp_path, arch: str):
    model = several_adapters(arch, names=TASKS)
    folder = export(model, tmp_path / "graph", adapter_name=TASKS[0], prefix_as="adapter_inputs")
    files = {task: export_prefix_adapter(model, tmp_path / f"{task}.onnx_adapter", adapter_name=task)
             for task in TASKS}
    return model, folder, files


class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def oversize_body(self, path: str, length: int) -> int:
        """Announce a body over the limit and send none: the server must answer from the headers alone."""
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(self.url).netloc, timeout=TIMEOUT)
        try:
            connection.putrequest("POST", path)
            connection.putheader("Content-Length", str(length))
            connection.endheaders()
            response = connection.getresponse()
            assert "limit" in json.loads(response.read())["error"]
            return response.status
        finally:
            connection.close()


@pytest.fixture
def serving():
    """Start a service on 127.0.0.1:0 in a thread; on exit shut it down and check that every thread stopped."""
    started = []

    def start(service):
        server = ServiceHTTPServer(service, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, name="serve-forever")
        thread.start()
        started.append((server, thread))
        return Client(server.url), server

    yield start
    for server, thread in started:
        server.close()
        thread.join(TIMEOUT)
        assert not thread.is_alive() and not server.service.batcher._thread.is_alive()
        with pytest.raises(urllib.error.URLError):  # the port no longer answers
            urllib.request.urlopen(server.url + "/health", timeout=5)


def test_concurrent_classification_over_tasks_matches_pytorch(tmp_path, serving):
    model, folder, files = deploy(tmp_path, "bert")
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(folder)
    service = build_service(folder, files, threads=1, max_wait_ms=10, limits=Limits(max_texts=4, max_tokens=12))
    client, _ = serving(service)
    sentences = ["the film was great", "a very boring plot", "the match", "soup was not fine at all",
                 "witty movie", "the team is awful"]
    requests = [(TASKS[i % 3], [sentences[i % 6], sentences[(i * 5 + 1) % 6]][: 1 + i % 2]) for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda r: client.call("/v1/classify", {"task": r[0], "texts": r[1]}), requests))
    for (task, texts), (status, answer) in zip(requests, answers):
        assert status == 200 and answer["task"] == task, answer
        model.set_adapter(task)
        for text, logits, label in zip(texts, answer["logits"], answer["labels"]):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            assert_parity(torch.tensor(logits), expected, context=(task, text))
            assert label == int(expected.argmax())

    status, metrics = client.call("/metrics")
    assert status == 200 and metrics["requests"] == 24 and metrics["latency_ms"]["count"] == 24
    assert 0 < metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p90"] <= metrics["latency_ms"]["p99"]
    assert metrics["rows"] == sum(len(texts) for _, texts in requests)
    assert {metrics[f"task.{task}"] for task in TASKS} == {8}

    bad = {
        "unknown task": ({"task": "nope", "texts": ["the film"]}, 404, "unknown task 'nope'"),
        "too many texts": ({"task": "sst2", "texts": ["the"] * 5}, 413, "limit is 4"),
        "too long": ({"task": "sst2", "texts": [" ".join(["film"] * 13)]}, 413, "13 tokens"),
        "malformed JSON": (b'{"task": "sst2", "texts": [', 400, "malformed JSON"),
        "not an object": (b"[1, 2]", 400, "JSON object"),
        "texts and ids": ({"task": "sst2", "texts": ["a"], "input_ids": [[3]]}, 400, "not both"),
        "ids out of range": ({"task": "sst2", "input_ids": [[3, 999]]}, 400, "integers in [0, 128)"),
        "empty": ({"task": "sst2", "texts": []}, 400, "non-empty"),
    }
    for case, (body, code, message) in bad.items():
        status, answer = client.call("/v1/classify", body)
        assert status == code and message in answer["error"], (case, status, answer)
    status, answer = client.call("/v1/generate", {"task": "sst2", "texts": ["the"]})
    assert status == 404 and "/v1/classify" in answer["error"]
    assert client.oversize_body("/v1/classify", service.limits.max_body_bytes + 1) == 413
    status, answer = client.call("/v1/classify", {"task": "sst2", "input_ids": [[3, 4, 5]]})
    assert status == 200  # the server still serves after bad requests


def test_generate_endpoint_matches_pytorch_per_task(tmp_path, serving):
    model, folder, files = deploy(tmp_path, "llama")
    client, _ = serving(build_service(folder, files, threads=1, max_wait_ms=10))
    prompts = [[5, 9, 13, 17], [7, 11]]
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda task: client.call("/v1/generate", {"task": task, "input_ids": prompts,
                                                                          "max_new_tokens": 4}), TASKS))
    for task, (status, answer) in zip(TASKS, answers):
        assert status == 200, answer
        model.set_adapter(task)
        for prompt, tokens in zip(prompts, answer["tokens"]):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                          do_sample=False, pad_token_id=0)
            assert tokens == expected[0, len(prompt) :].tolist(), task
    status, answer = client.call("/v1/generate", {"task": "sst2", "input_ids": [[5]], "max_new_tokens": 0})
    assert status == 400 and "max_new_tokens" in answer["error"]


def test_batcher_groups_waiting_requests_by_task():
    """Deterministic: the first call blocks until six more jobs over three tasks wait; they become one batch of
    three calls, one per task, with each job's rows routed back to it."""
    entered, release, calls = threading.Event(), threading.Event(), []

    def run(kind, task, rows, options):
        calls.append((task, [row[0] for row in rows]))
        if len(calls) == 1:
            entered.set()
            assert release.wait(TIMEOUT)
        return [row[0] * 10 for row in rows]

    batcher = TaskBatcher(run, Metrics(), max_batch=32, max_wait_s=0.0)
    first = batcher.submit(Job("classify", "a", [[1]]))
    assert entered.wait(TIMEOUT)  # the batching thread is inside the first call
    jobs = [batcher.submit(Job("classify", task, [[value], [value + 1]]))
            for value, task in zip(range(10, 70, 10), "abcabc")]
    release.set()
    assert first.result(TIMEOUT) == [10]
    assert [job.result(TIMEOUT) for job in jobs] == [[v * 10, v * 10 + 10] for v in range(10, 70, 10)]
    assert calls == [("a", [1]), ("a", [10, 11, 40, 41]), ("b", [20, 21, 50, 51]), ("c", [30, 31, 60, 61])]
    batcher.close()
    assert not batcher._thread.is_alive()


def test_serving_imports_no_exporter():
    """The served example loads graphs and adapter files only: the tracer and the exporters stay out of the process
    (peft imports torch.onnx on its own, so that is not ours to check)."""
    output = run_python("import sys\nimport examples.serve\n"
                        "print(sorted(m for m in sys.modules if m.startswith(('exporters.onnx.export', "
                        "'exporters.onnx.trace', 'exporters.onnx.model_patcher', 'exporters.onnx.adapter_export', "
                        "'exporters.onnx.seq2seq', 'exporters.onnx.plan'))))",
                        timeout=120)
    assert output.strip().splitlines()[-1] == "[]"
