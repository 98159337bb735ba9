"""Caption engine backed by any OpenAI-compatible chat-completions endpoint.

GPT-4V/4o for the meta dataset, or a vLLM/SGLang server the user runs. Requests run
concurrently (bounded), each retried with exponential backoff and jitter on what a busy or
flaky server does (429, 5xx, timeouts, dropped connections, malformed JSON), honouring
``Retry-After``. A request that still fails becomes a Caption with ``finish_reason="error"``:
one sample's failure, never an exception. The API key is read from ``OPENAI_API_KEY`` only
and goes nowhere but the ``Authorization`` header.

HTTP runs on the standard library (urllib in a bounded thread pool driven by asyncio), so
the backend needs no extra package. The ``--api-concurrency`` bound is one
:class:`~models.caption.window.RequestWindow` shared by every caller and batch, so the
endpoint is kept busy across batches without ever being sent more.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import http.client
import io
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.caption.base import SamplingParams
from models.caption.chat import user_turn
from models.caption.journal import CaptionJournal, request_digest
from models.caption.window import RequestWindow
from models.errors import ConfigError
from models.records import Caption

log = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class ApiSettings:
    """What the engine's ``--api-*`` options say (engine/core/config.py explains each)."""

    base: str  # endpoint URL, e.g. http://host:8000/v1
    model: str  # the model name the endpoint serves
    concurrency: int
    max_retries: int
    timeout: float
    backoff: float
    max_backoff: float
    image_detail: str
    jpeg_quality: int
    journal: str = ""  # JSON-lines file of finished captions (the engine says where); "" = none

    def require_endpoint(self) -> None:
        if not self.base or not self.model:
            raise ConfigError(
                "--caption-backend openai needs --api-base URL and --api-model NAME "
                "(and the key, if the endpoint wants one, in $OPENAI_API_KEY)"
            )


# --- request building and response parsing (pure) ----------------------------------------


def jpeg_data_url(image: np.ndarray, quality: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_request(
    model: str, prompt: str, image_url: str, params: SamplingParams, detail: str
) -> dict[str, Any]:
    """The chat-completions body: the conversation every backend sends (the prompt, then the
    image it ends with); the endpoint applies its model's chat template."""
    body: dict[str, Any] = {
        "model": model,
        "messages": user_turn(prompt, {"type": "image_url", "image_url": {"url": image_url, "detail": detail}}),
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.min_new_tokens:
        body["min_tokens"] = params.min_new_tokens  # vLLM/SGLang extension; benchmarks only
    return body


class MalformedResponse(ValueError):
    pass


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str


def parse_completion(payload: bytes) -> Completion:
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise MalformedResponse(f"malformed response ({type(exc).__name__}: {exc})") from None
    usage = data.get("usage") or {}
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return Completion(
        text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), finish
    )


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` is either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so clients spread."""
    ceiling = min(cap, base * 2**attempt)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# --- the engine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    message: str
    retryable: bool
    retry_after: float | None = None


class OpenAIEngine:
    backend = "openai"

    def __init__(self, cfg: ApiSettings, journal: CaptionJournal | None = None):
        cfg.require_endpoint()
        self.cfg = cfg
        self.journal = journal
        self.model = cfg.model
        self.device = "remote"
        self._url = cfg.base.rstrip("/") + "/chat/completions"
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="openai")
        self._window = RequestWindow(cfg.concurrency, "openai")
        self._rng = random.Random()
        self._counts = {"requests": 0, "retries": 0, "errors": 0, "from_journal": 0}

    def generate(
        self, prompts: list[str], images: list[np.ndarray], /, *, params: SamplingParams
    ) -> list[Caption]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        return self._window.run(self._generate_all(prompts, images, params))

    async def _generate_all(self, prompts, images, params) -> list[Caption]:
        jobs = [self._caption(p, im, params) for p, im in zip(prompts, images)]
        return list(await asyncio.gather(*jobs))

    async def _caption(self, prompt, image, params) -> Caption:
        if self.journal is None:
            return await self._request(prompt, image, params)
        digest = request_digest(self.model, prompt, image, params)
        known = self.journal.get(digest)
        if known is not None:
            self._counts["from_journal"] += 1
            return known
        caption = await self._request(prompt, image, params)
        if caption.finish_reason != "error":
            self.journal.add(digest, caption)
        return caption

    async def _request(self, prompt, image, params) -> Caption:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            url = await loop.run_in_executor(
                self._pool, jpeg_data_url, image, self.cfg.jpeg_quality
            )
        except Exception as exc:  # noqa: BLE001 - a bad image is this sample's failure
            return self._error(f"image encoding failed: {exc}", start)
        body = json.dumps(
            chat_request(self.model, prompt, url, params, self.cfg.image_detail)
        ).encode()
        failure = _Failure("no attempt made", retryable=False)
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._counts["retries"] += 1
                wait = failure.retry_after
                if wait is None:
                    wait = backoff_seconds(
                        attempt - 1, self.cfg.backoff, self.cfg.max_backoff, self._rng
                    )
                await asyncio.sleep(min(wait, self.cfg.max_backoff))
            async with self._window.slot():
                self._counts["requests"] += 1
                outcome = await loop.run_in_executor(self._pool, self._post, body)
            if isinstance(outcome, Completion):
                return Caption(
                    outcome.text,
                    outcome.prompt_tokens,
                    outcome.output_tokens,
                    outcome.finish_reason,
                    time.monotonic() - start,
                    self.model,
                    self.backend,
                )
            failure = outcome
            if not failure.retryable:
                break
        attempts = attempt + 1
        return self._error(f"{failure.message} (after {attempts} attempt(s))", start)

    def _post(self, body: bytes) -> Completion | _Failure:
        """One HTTP request, in a pool thread; every way it can go wrong becomes a _Failure."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = _read_quietly(exc)
            return _Failure(
                f"HTTP {exc.code}: {detail}",
                retryable=exc.code in RETRYABLE_STATUS,
                retry_after=retry_after_seconds(exc.headers.get("Retry-After")),
            )
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            # timeouts, refused/reset connections, DNS, truncated bodies
            reason = getattr(exc, "reason", exc)
            return _Failure(f"{type(exc).__name__}: {reason}", retryable=True)
        try:
            return parse_completion(payload)
        except MalformedResponse as exc:
            return _Failure(str(exc), retryable=True)

    def _error(self, message: str, start: float) -> Caption:
        self._counts["errors"] += 1
        log.warning("openai caption request failed: %s", message)
        return Caption(message, 0, 0, "error", time.monotonic() - start, self.model, self.backend)

    def metrics(self) -> dict[str, float]:
        return {f"api_{name}": float(n) for name, n in self._counts.items()}

    def close(self) -> None:
        self._window.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()


def load(model: str, path: str, device: str, settings: ApiSettings) -> OpenAIEngine:
    journal = CaptionJournal(Path(settings.journal)) if settings.journal else None  # keyed by model too
    return OpenAIEngine(settings, journal)  # the model is the endpoint's: --api-model


def _read_quietly(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read()[:200].decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return exc.reason or ""
