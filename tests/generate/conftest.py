"""Fixtures for the generation tests: fake LLM servers, request builders, a closed port."""

from __future__ import annotations

import socket

import pytest

from bezoar.generate.pool import Limits
from bezoar.generate.request import Request
from tests.generate.fake_server import FakeLLMServer

# Short timeouts and back-offs so fault tests finish in seconds.
FAST = dict(timeout_s=2.0, backoff_base_s=0.01, backoff_max_s=0.05)


def fast_limits(**overrides) -> Limits:
    return Limits(**{**FAST, **overrides})


def chat_requests(n: int, prefix: str = "q") -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"{prefix}{i}"}], id=i) for i in range(n)]


def closed_port_url() -> str:
    """A localhost URL nobody listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def fake_server():
    """Factory: ``fake_server(**FakeLLMServer kwargs)`` starts a server, stopped after the test."""
    servers = []

    def start(**kwargs) -> FakeLLMServer:
        server = FakeLLMServer(**kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def api_keys(monkeypatch):
    """Test keys in the default environment variables."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai-0123456789")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
