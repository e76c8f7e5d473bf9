"""Tests of the LLM pair-prompt generator against a mock chat completions server on 127.0.0.1."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from capt_lib.prompts.llm_generator import (
    CACHE_FORMAT,
    PROMPT_VERSION,
    generate_pair_prompts,
    last_json_object,
    parse_answer,
)
from capt_lib.prompts.semantic import TokenBudget

API_KEY = "sk-test-secret-4d1f9a"
MODEL = "mock-model"
CLASSES = ("cat", "dog")

CAT_DOG = {
    "commonality": ["Both a cat and a dog have four legs and fur."],
    "difference": ["A cat has a shorter snout than a dog."],
}
DOG_CAT = {
    "commonality": ["Both a dog and a cat have a tail."],
    "difference": ["A dog has longer legs than a cat.", "A dog has floppy ears."],
}
REASONED_REPLY = (
    "Step 1: a {cat} is small. Attributes of a cat: {fur, whiskers}.\n"
    'A draft: {"commonality": ["draft"], "difference": ["draft"]}\n'
    "Step 3: final answer below.\n```json\n" + json.dumps(CAT_DOG) + "\n```"
)
MALFORMED_REPLY = "I think a dog is bigger, but I forgot the JSON {commonality: oops"


def _completion(content):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class MockChatServer:
    """A chat completions server on 127.0.0.1 that returns canned replies in order and records requests."""

    def __init__(self, replies):
        self.replies = list(replies)  # (status, JSON body) per request
        self.requests = []  # (path, headers, JSON body) per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                server.requests.append((self.path, dict(self.headers), body))
                status, payload = server.replies.pop(0) if server.replies else (500, {"error": "no reply left"})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Keep requests on 127.0.0.1 (no proxy) and start without endpoint settings."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("CAPT_LLM_BASE_URL", "CAPT_LLM_MODEL", "CAPT_LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _generate(server, cache_path, **kwargs):
    settings = dict(
        cache_path=cache_path, base_url=server.base_url, model=MODEL, api_key=API_KEY, timeout=5, retry_delay=0
    )
    settings.update(kwargs)
    return generate_pair_prompts(CLASSES, **settings)


def test_generator_requests_retries_and_caches(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache_path = tmp_path / "llm_cache.json"
    replies = [_completion(REASONED_REPLY), _completion(MALFORMED_REPLY), _completion(json.dumps(DOG_CAT))]

    with MockChatServer(replies) as server:
        prompts = _generate(server, cache_path, max_retries=2)
        requests = list(server.requests)

    # Three requests: (cat, dog), then (dog, cat) twice because the first reply had no JSON.
    assert len(requests) == 3
    for path, headers, body in requests:
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == f"Bearer {API_KEY}"
        assert headers["Content-Type"] == "application/json"
        assert body["model"] == MODEL
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert '"cat" and "dog"' in requests[0][2]["messages"][1]["content"]
    assert '"dog" and "cat"' in requests[1][2]["messages"][1]["content"]
    assert requests[2][2] == requests[1][2]

    assert prompts.classnames == CLASSES
    assert prompts.difference == {("cat", "dog"): CAT_DOG["difference"], ("dog", "cat"): DOG_CAT["difference"]}
    assert prompts.commonality == {("cat", "dog"): CAT_DOG["commonality"] + DOG_CAT["commonality"]}

    cache_text = cache_path.read_text()
    cache = json.loads(cache_text)
    assert cache["format"] == CACHE_FORMAT
    assert cache["model"] == MODEL
    assert cache["prompt_version"] == PROMPT_VERSION
    assert cache["pairs"]["cat"]["dog"]["commonality"] == CAT_DOG["commonality"]
    assert cache["pairs"]["cat"]["dog"]["reply"] == REASONED_REPLY
    assert cache["pairs"]["dog"]["cat"]["difference"] == DOG_CAT["difference"]
    assert API_KEY not in cache_text
    assert "retrying pair ('dog' vs 'cat'), attempt 2 of 3" in caplog.text
    assert API_KEY not in caplog.text


def test_generator_serves_cache_when_server_is_gone(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache_path = tmp_path / "llm_cache.json"
    with MockChatServer([_completion(json.dumps(CAT_DOG)), _completion(json.dumps(DOG_CAT))]) as server:
        first = _generate(server, cache_path)
        server.stop()

        # The same endpoint now refuses connections, so any request would fail.
        again = _generate(server, cache_path, max_retries=0)
        without_endpoint = generate_pair_prompts(CLASSES, cache_path=cache_path)

    assert len(server.requests) == 2
    assert again == first
    assert without_endpoint.difference == first.difference
    assert without_endpoint.commonality == first.commonality
    assert API_KEY not in caplog.text


def test_generator_reads_endpoint_from_environment(tmp_path, monkeypatch):
    with MockChatServer([_completion(json.dumps(CAT_DOG))]) as server:
        monkeypatch.setenv("CAPT_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("CAPT_LLM_MODEL", "env-model")
        monkeypatch.setenv("CAPT_LLM_API_KEY", API_KEY)
        prompts = generate_pair_prompts(CLASSES, [("cat", "dog")], cache_path=tmp_path / "cache.json", timeout=5)
        path, headers, body = server.requests[0]

    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert body["model"] == "env-model"
    assert prompts.difference == {("cat", "dog"): CAT_DOG["difference"]}


def test_generator_sends_no_key_when_none_is_set(tmp_path):
    with MockChatServer([_completion(json.dumps(CAT_DOG))]) as server:
        _generate(server, tmp_path / "cache.json", api_key=None, pairs=[(0, 1)])
        _, headers, _ = server.requests[0]
    assert "Authorization" not in headers


def test_generator_gives_up_naming_pair(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache_path = tmp_path / "cache.json"
    with MockChatServer([_completion(MALFORMED_REPLY)] * 3) as server:
        with pytest.raises(RuntimeError) as info:
            _generate(server, cache_path, pairs=[("dog", "cat")], max_retries=2)
        n_requests = len(server.requests)

    message = str(info.value)
    assert n_requests == 3
    assert "pair ('dog' vs 'cat') in 3 attempts" in message
    assert "no JSON object" in message
    assert API_KEY not in message
    assert not cache_path.exists()


def test_generator_redacts_key_in_http_error(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    reply = (401, {"error": f"invalid API key {API_KEY}"})
    with MockChatServer([reply]) as server:
        with pytest.raises(RuntimeError) as info:
            _generate(server, tmp_path / "cache.json", pairs=[("cat", "dog")], max_retries=2)
        n_requests = len(server.requests)

    message = str(info.value)
    assert n_requests == 1  # 401 is not retried
    assert "HTTP 401" in message
    assert "('cat' vs 'dog')" in message
    assert "invalid API key ***" in message
    assert API_KEY not in message
    assert API_KEY not in caplog.text


def test_generator_retries_server_error(tmp_path):
    with MockChatServer([(503, {"error": "busy"}), _completion(json.dumps(CAT_DOG))]) as server:
        prompts = _generate(server, tmp_path / "cache.json", pairs=[("cat", "dog")], max_retries=1)
    assert len(server.requests) == 2
    assert prompts.difference[("cat", "dog")] == CAT_DOG["difference"]


def test_generator_retries_too_long_sentences(tmp_path):
    too_long = {
        "commonality": ["Both are pets."],
        "difference": ["A cat is a small pet that purrs and climbs trees all day."],
    }
    # The long sentence is 13 words, 15 tokens; the longest sentence of CAT_DOG is 11 words, 13 tokens.
    budget = TokenBudget(count_tokens=lambda text: len(text.split()) + 2, context_length=14)
    replies = [_completion(json.dumps(too_long)), _completion(json.dumps(CAT_DOG))]
    with MockChatServer(replies) as server:
        prompts = _generate(server, tmp_path / "cache.json", pairs=[("cat", "dog")], tokenizer=budget)
    assert len(server.requests) == 2
    assert prompts.difference[("cat", "dog")] == CAT_DOG["difference"]


def test_generator_needs_endpoint_for_uncached_pairs(tmp_path):
    with pytest.raises(ValueError, match="2 pairs are not cached .* set CAPT_LLM_BASE_URL and CAPT_LLM_MODEL"):
        generate_pair_prompts(CLASSES, cache_path=tmp_path / "cache.json")


def test_generator_rejects_cache_of_other_model(tmp_path):
    cache_path = tmp_path / "cache.json"
    cache = {"format": CACHE_FORMAT, "model": "other-model", "prompt_version": PROMPT_VERSION, "pairs": {}}
    cache_path.write_text(json.dumps(cache))
    with pytest.raises(ValueError, match="holds answers of model 'other-model', but model 'mock-model' was requested"):
        generate_pair_prompts(CLASSES, cache_path=cache_path, base_url="http://127.0.0.1:9/v1", model=MODEL)


def test_generator_rejects_cache_of_other_prompt_version(tmp_path):
    cache_path = tmp_path / "cache.json"
    cache = {"format": CACHE_FORMAT, "model": MODEL, "prompt_version": "old-prompt", "pairs": {}}
    cache_path.write_text(json.dumps(cache))
    with pytest.raises(ValueError, match="made with prompt version 'old-prompt'"):
        generate_pair_prompts(CLASSES, cache_path=cache_path)


def test_generator_rejects_invalid_pairs_and_url(tmp_path):
    with pytest.raises(ValueError, match="names 'cow', which is not a class"):
        generate_pair_prompts(CLASSES, [("cat", "cow")], cache_path=tmp_path / "c.json")
    with pytest.raises(ValueError, match="must name two different classes"):
        generate_pair_prompts(CLASSES, [(0, 0)], cache_path=tmp_path / "c.json")
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        generate_pair_prompts(CLASSES, cache_path=tmp_path / "c.json", base_url="file:///etc", model=MODEL)


def test_last_json_object_picks_final_object():
    text = 'reasoning {x} then {"a": 1} and finally {"b": {"c": [2]}} done'
    assert last_json_object(text) == {"b": {"c": [2]}}
    assert last_json_object("no braces here") is None
    assert last_json_object("only {broken: json}") is None


def test_parse_answer_rejects_missing_list():
    with pytest.raises(ValueError, match="no 'difference' list"):
        parse_answer('{"commonality": ["Both purr."]}')
    with pytest.raises(ValueError, match="'commonality' must have a non-empty list"):
        parse_answer('{"commonality": [], "difference": ["x"]}')
