"""Generate commonality and difference sentences with an LLM behind an OpenAI-compatible API.

This generator is optional: the rest of capt runs on prompt files alone. For each
ordered class pair (a, b) it sends one chat completion request that prompts the model
to reason step by step about the visible attributes of both classes and to end with
a JSON object ``{"commonality": [...], "difference": [...]}``. The difference sentences
describe how a differs from b, and the last JSON object of the reply is taken as the result.

Every answer is written to a JSON cache file as soon as it arrives, and a cached pair
is never requested again, so a finished cache reproduces the prompts without the
endpoint. The cache records the model name and the prompt version. The API key is
only sent in the ``Authorization`` header. It is never logged or cached, and it is
masked as "***" wherever a server echoes it into an error message.

Cache file (format ``capt-llm-pair-cache/1``)::

    {"format": "capt-llm-pair-cache/1", "model": "...", "prompt_version": "...",
     "pairs": {a: {b: {"commonality": [...], "difference": [...], "reply": "<full reply>"}}}}
"""

from __future__ import annotations

import itertools
import json
import logging
import numbers
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from capt_lib.prompts.semantic import PairPrompts, TokenBudget, check_sentences, resolve_token_budget
from capt_lib.utils.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

BASE_URL_ENV = "CAPT_LLM_BASE_URL"  # e.g. http://127.0.0.1:8000/v1 for a local server
MODEL_ENV = "CAPT_LLM_MODEL"
API_KEY_ENV = "CAPT_LLM_API_KEY"

CACHE_FORMAT = "capt-llm-pair-cache/1"
PROMPT_VERSION = "capt-pair-cot/1"  # change it whenever the messages below change
MAX_WORDS = 14  # words per sentence, so that plain sentences fit a 24-token text context
MAX_ERROR_BODY = 300  # characters of a server's error body quoted in an exception
RETRYABLE_HTTP_CODES = (408, 429, 500, 502, 503, 504)

SYSTEM_MESSAGE = (
    "You are an expert in visual recognition. You describe how objects look in photos, "
    "so that an image classifier can tell similar classes apart."
)
USER_MESSAGE = """An image classifier often confuses the classes "{a}" and "{b}".

Reason step by step before you answer:
1. List the visible attributes of a {a}: overall shape, parts, length, openings, fastenings.
2. List the same attributes for a {b}.
3. Compare the two lists: which attributes do both share, and which tell a {a} apart from a {b}?

Then write one JSON object and nothing after it:
{{"commonality": ["2 to 4 sentences on what a {a} and a {b} share"],
 "difference": ["2 to 4 sentences on how a {a} differs from a {b}"]}}
Every sentence names the classes it talks about, uses plain words and has at most {max_words} words."""


class _RetryableError(Exception):
    """A failed attempt that may succeed when repeated: a timeout, a 5xx response or an invalid reply."""


def chat_messages(a: str, b: str) -> list[dict[str, str]]:
    """Return the chat messages that ask for the sentences of the ordered pair (a, b)."""
    return [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": USER_MESSAGE.format(a=a, b=b, max_words=MAX_WORDS)},
    ]


def last_json_object(text: str) -> dict | None:
    """Return the last top-level JSON object embedded in ``text``, or None when there is none.

    Braces that do not start valid JSON (such as "{a}" in the reasoning) are skipped.
    """
    decoder = json.JSONDecoder()
    found = None
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            found = value
        start = text.find("{", end)
    return found


def parse_answer(reply: str, budget: TokenBudget | None = None) -> dict[str, list[str]]:
    """Read the commonality and difference sentences from a reply, raising ValueError when they are invalid."""
    answer = last_json_object(reply)
    if answer is None:
        raise ValueError("the reply contains no JSON object")

    parsed = {}
    for key in ("commonality", "difference"):
        if key not in answer:
            raise ValueError(f"the reply's last JSON object has no {key!r} list")
        parsed[key] = check_sentences(answer[key], f"{key!r}", "the reply", budget)
    return parsed


def _redact(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "***") if api_key else text


def _post_chat(url: str, body: dict, api_key: str | None, timeout: float) -> str:
    """Send one chat completion request and return the reply text."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")

    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as e:
        detail = _redact(e.read().decode("utf-8", errors="replace")[:MAX_ERROR_BODY], api_key)
        message = f"{url} returned HTTP {e.code}: {detail}"
        if e.code in RETRYABLE_HTTP_CODES:
            raise _RetryableError(message) from e
        raise RuntimeError(f"{message}; check the base URL, model name and API key") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise _RetryableError(f"request to {url} failed: {_redact(str(e), api_key)}") from e

    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _RetryableError(f"{url} returned no chat completion: {e!r}") from e
    if not isinstance(content, str):
        raise _RetryableError(f"{url} returned a message whose content is not text")
    return content


def _request_pair(
    a: str,
    b: str,
    *,
    url: str,
    model: str,
    api_key: str | None,
    timeout: float,
    max_retries: int,
    retry_delay: float,
    budget: TokenBudget | None,
) -> dict[str, Any]:
    """Ask for the sentences of (a, b), retrying failed attempts, and return the cache entry."""
    body = {"model": model, "messages": chat_messages(a, b), "temperature": 0}
    attempts = 1 + max_retries

    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        if last_error is not None:
            logger.warning("retrying pair (%r vs %r), attempt %d of %d: %s", a, b, attempt, attempts, last_error)
            time.sleep(retry_delay * (attempt - 1))

        try:
            reply = _post_chat(url, body, api_key, timeout)
            answer = parse_answer(reply, budget)
        except (_RetryableError, ValueError) as e:
            last_error = e
            continue
        except RuntimeError as e:
            raise RuntimeError(f"the request for the pair ({a!r} vs {b!r}) failed: {e}") from e
        return {**answer, "reply": reply}

    raise RuntimeError(
        f"the LLM gave no valid answer for the pair ({a!r} vs {b!r}) in {attempts} attempts; "
        f"last problem: {last_error}"
    ) from last_error


def _resolve_pairs(classnames: tuple[str, ...], pairs: Sequence[tuple[Any, Any]] | None) -> list[tuple[str, str]]:
    """Return ordered (a, b) name pairs, given as class names or label indices in ``pairs``."""
    if pairs is None:
        return list(itertools.permutations(classnames, 2))

    resolved = []
    for pair in pairs:
        names = []
        for item in pair:
            if isinstance(item, numbers.Integral) and 0 <= item < len(classnames):
                names.append(classnames[item])
            elif isinstance(item, str) and item in classnames:
                names.append(item)
            else:
                raise ValueError(
                    f"pair {tuple(pair)!r} names {item!r}, which is not a class; classes: {list(classnames)}"
                )
        if len(names) != 2 or names[0] == names[1]:
            raise ValueError(f"pair {tuple(pair)!r} must name two different classes")
        resolved.append((names[0], names[1]))
    return list(dict.fromkeys(resolved))  # drops repeated pairs, keeps the order


def _load_cache(cache_path: Path, model: str | None) -> dict:
    """Read the cache or start an empty one. A cache made with another prompt version or model is rejected."""
    if not cache_path.is_file():
        return {"format": CACHE_FORMAT, "model": model, "prompt_version": PROMPT_VERSION, "pairs": {}}

    cache = read_json(cache_path)
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("pairs"), dict):
        raise ValueError(f"{cache_path} is not an LLM prompt cache (expected format {CACHE_FORMAT!r})")
    if cache.get("prompt_version") != PROMPT_VERSION:
        raise ValueError(
            f"{cache_path} was made with prompt version {cache.get('prompt_version')!r}, but this code asks "
            f"with {PROMPT_VERSION!r}; mixing them would make the sentences inconsistent, so pass a new cache_path"
        )
    if model is not None and cache.get("model") not in (None, model):
        raise ValueError(
            f"{cache_path} holds answers of model {cache.get('model')!r}, but model {model!r} was requested; "
            "pass a new cache_path for another model"
        )
    return cache


def _cached(cache: dict, a: str, b: str) -> dict | None:
    return cache["pairs"].get(a, {}).get(b)


def generate_pair_prompts(
    classnames: Sequence[str],
    pairs: Sequence[tuple[Any, Any]] | None = None,
    *,
    cache_path: str | os.PathLike,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 60,
    max_retries: int = 2,
    retry_delay: float = 1.0,
    tokenizer: Any = None,
) -> PairPrompts:
    """Return commonality and difference sentences of ordered class pairs, asking an LLM for uncached ones.

    ``pairs`` contains ordered (a, b) pairs of class names or label indices; None means
    every ordered pair of ``classnames``. The returned ``difference[(a, b)]`` comes from the
    reply for (a, b), and ``commonality`` of {a, b} joins the commonality sentences of
    (a, b) and (b, a), whichever of them were requested.

    ``base_url``, ``model`` and ``api_key`` default to the environment variables
    CAPT_LLM_BASE_URL, CAPT_LLM_MODEL and CAPT_LLM_API_KEY; requests go to
    ``{base_url}/chat/completions``. They are needed only for pairs missing from
    ``cache_path``. A failed attempt (timeout, HTTP 408/429/5xx, reply without valid
    JSON) is repeated up to ``max_retries`` times, waiting ``retry_delay`` seconds
    times the number of failed attempts so far. Other HTTP errors (400, 401, 404)
    raise at once. When ``tokenizer`` is given (see
    ``capt_lib.prompts.semantic.resolve_token_budget``), a reply with a sentence too
    long for the text context is retried as well.
    """
    classnames = tuple(classnames)
    if len(set(classnames)) != len(classnames) or len(classnames) < 2:
        raise ValueError(f"classnames must hold at least 2 distinct names, got {list(classnames)}")
    requested = _resolve_pairs(classnames, pairs)
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    model = model or os.environ.get(MODEL_ENV) or None
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    budget = resolve_token_budget(tokenizer)

    cache_path = Path(cache_path)
    cache = _load_cache(cache_path, model)
    todo = [(a, b) for a, b in requested if _cached(cache, a, b) is None]
    logger.info("%d of %d pairs are cached in %s", len(requested) - len(todo), len(requested), cache_path)

    if todo:
        if base_url is None or model is None:
            raise ValueError(
                f"{len(todo)} pairs are not cached in {cache_path} (first: {todo[0]!r}) and no LLM endpoint "
                f"is configured; pass base_url and model, or set {BASE_URL_ENV} and {MODEL_ENV}"
            )
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} is invalid; it must start with http:// or https://")
        url = base_url.rstrip("/") + "/chat/completions"
        logger.info("requesting %d pairs from %s with model %r", len(todo), url, model)

        cache["model"] = model
        for a, b in tqdm(todo, desc="LLM pair prompts"):
            cache["pairs"].setdefault(a, {})[b] = _request_pair(
                a, b, url=url, model=model, api_key=api_key, timeout=timeout,
                max_retries=max_retries, retry_delay=retry_delay, budget=budget,
            )
            atomic_write_json(cache_path, cache)

    return _pair_prompts_from_cache(cache, classnames, requested, cache_path)


def _pair_prompts_from_cache(
    cache: dict, classnames: tuple[str, ...], requested: list[tuple[str, str]], cache_path: Path
) -> PairPrompts:
    commonality: dict[tuple[str, str], list[str]] = {}
    difference: dict[tuple[str, str], list[str]] = {}
    for a, b in requested:
        entry = _cached(cache, a, b)
        difference[(a, b)] = list(entry["difference"])
        key = (a, b) if classnames.index(a) < classnames.index(b) else (b, a)
        commonality.setdefault(key, []).extend(entry["commonality"])

    source = f"LLM {cache.get('model')!r} ({PROMPT_VERSION}) cached in {cache_path}"
    return PairPrompts(classnames, commonality, difference, source=source)
