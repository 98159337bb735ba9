"""A local chat-completions server for tests and benchmarks of the openai caption backend.

Answers ``POST /v1/chat/completions`` like an OpenAI-compatible endpoint. Per prompt, a script
of actions can make it misbehave before answering: ``429:<retry-after>``, ``500``,
``400``, ``timeout:<seconds>`` (sleep, then answer too late), ``slow:<seconds>`` (sleep,
then answer), ``malformed`` (broken JSON), ``reset`` (close the connection without a
response). Once a prompt's script is used up it answers normally, after ``latency`` seconds,
with ``output_words`` words of caption.
``chaos`` scripts prompts nobody scripted: the i-th new prompt's first attempt gets
``chaos[i % len(chaos)]`` (``ok`` for none), for runs whose prompts are not known up front.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class ChatServer:
    def __init__(self, scripts: dict[str, list[str]] | None = None, *, latency: float = 0.0,
                 output_words: int = 12, expect_key: str | None = None, chaos: tuple[str, ...] = ()):
        self.scripts = {prompt: list(actions) for prompt, actions in (scripts or {}).items()}
        self.chaos = chaos
        self.latency = latency
        self.output_words = output_words
        self.expect_key = expect_key
        self.attempts: dict[str, list[tuple[float, str]]] = defaultdict(list)  # (time, action)
        self.answered: dict[str, int] = defaultdict(int)
        self.finished: dict[str, float] = {}  # prompt -> when its last request ended
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_headers: set[str] = set()
        self.messages: list[list[dict]] = []  # every request's chat messages, as sent
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def next_action(self, prompt: str) -> str:
        with self._lock:
            if self.chaos and prompt not in self.attempts and prompt not in self.scripts:
                self.scripts[prompt] = [self.chaos[len(self.attempts) % len(self.chaos)]]
            script = self.scripts.get(prompt, [])
            action = script.pop(0) if script else "ok"
            self.attempts[prompt].append((time.monotonic(), action))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return action

    def done(self, prompt: str, answered: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.answered[prompt] += answered
            self.finished[prompt] = time.monotonic()

    def caption_for(self, prompt: str) -> str:
        """A caption unique to the prompt (by digest: prompts carry scaffolding a caption must not)."""
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        filler = " ".join(f"word{i}" for i in range(max(0, self.output_words - 3)))
        return f"caption for {digest} {filler}".strip() + "."


def _handler(server: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.auth_headers.add(self.headers.get("Authorization", ""))
            server.messages.append(body["messages"])
            content = body["messages"][0]["content"]
            prompt = content[0]["text"]
            assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
            action = server.next_action(prompt)
            answered = False
            try:
                answered = self._act(action, prompt, body)
            except OSError:  # the client gave up (timeout) and closed the socket
                pass
            finally:
                server.done(prompt, answered)

        def _act(self, action: str, prompt: str, body: dict) -> bool:
            kind, _, arg = action.partition(":")
            if kind == "reset":
                self.close_connection = True
                self.connection.shutdown(2)
                return False
            if kind == "429":
                self._send(429, b'{"error": "rate limited"}', {"Retry-After": arg or "1"})
                return False
            if kind in ("500", "400"):
                self._send(int(kind), b'{"error": "server says no"}')
                return False
            if kind == "malformed":
                self._send(200, b'{"choices": [{"message": ')
                return False
            if kind in ("timeout", "slow"):
                time.sleep(float(arg))
            elif server.latency:
                time.sleep(server.latency)
            if server.expect_key is not None and (
                self.headers.get("Authorization") != f"Bearer {server.expect_key}"
            ):
                self._send(401, b'{"error": "bad key"}')
                return False
            reply = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant",
                                         "content": server.caption_for(prompt)}}],
                "usage": {"prompt_tokens": len(prompt.split()),
                          "completion_tokens": server.output_words},
            }
            self._send(200, json.dumps(reply).encode())
            return kind != "timeout"  # a late answer reaches no one: the client gave up

        def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler
