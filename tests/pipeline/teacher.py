"""The scripted teacher and judges of the pipeline: the demo teacher, plus MT-Bench ratings.

``tests.generate.demo_teacher`` answers every generation prompt and the filter's judge prompts;
MT-Bench judge prompts (they ask for a ``[[rating]]``) get a short verdict with a rating from 3 to 9,
drawn from the prompt's content, so the same answer always gets the same rating and a resumed run
grades like an uninterrupted one.

Serve it for ``--recipe openbezoar_tiny`` (prints one JSON line with the URLs, serves until SIGTERM)::

    python -m tests.pipeline.teacher --port 8765
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading

from tests.generate.demo_teacher import demo_teacher
from tests.generate.fake_server import FakeLLMServer

RATING_PROMPT = "[[rating]]"


def _all_text(call) -> str:
    parts = [call.system or "", call.prompt or ""]
    for message in call.messages:
        content = message.get("content")
        parts.append(content if isinstance(content, str) else json.dumps(content))
    return "\n".join(parts)


def pipeline_teacher(call) -> str:
    text = _all_text(call)
    if RATING_PROMPT in text:  # MT-Bench: in the user text (turn 1) or the system prompt (turn 2)
        digest = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)
        rating = 3 + digest % 7
        tone = "on topic and clear" if rating >= 6 else "short and partly off topic"
        return f"The answer is {tone}. Rating: [[{rating}]]"
    return demo_teacher(call)


def start(port: int = 0, latency: float = 0.0) -> FakeLLMServer:
    return FakeLLMServer(reply=pipeline_teacher, port=port, latency=latency).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the pipeline's scripted teacher and judges (OpenAI-compatible, "
                                            "127.0.0.1).")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = p.parse_args(argv)
    server = start(args.port, args.latency)
    print(json.dumps({"url": server.url, "openai_url": server.openai_url}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
