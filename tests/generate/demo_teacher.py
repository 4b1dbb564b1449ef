"""A scripted teacher and judge for demos and pipeline tests: plausible answers to every scheme's prompts.

The fake server's default echo is useless as a teacher (an echoed list prompt parses as the seed
examples themselves, which de-duplication then drops). ``demo_teacher(call)`` recognises the
shipped templates and answers each kind of prompt in kind, deterministically from the prompt's
content (so reruns and resumed runs get the same answers):

- LaMini list prompts: a numbered list of the requested number of tasks, built from the topics
  or the example tasks' words and a pool of task patterns;
- Evol-Instruct rewrites: the original instruction plus one added requirement (breadth: a new
  question on a related, rarer theme); equality checks: DIFFERENT;
- judge prompts: ``Reason: ...`` and ``Score: N`` with N from 4 to 10 (most records pass 7);
- anything else (responses to instructions and Orca queries): a short answer that restates
  the question.

Serve it for a pipeline run (prints one JSON line with the URLs, then serves until SIGTERM)::

    python -m tests.generate.demo_teacher [--port N] [--latency S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import signal
import sys
import threading

from tests.generate.fake_server import FakeLLMServer

PATTERNS = (
    "Explain the basics of {x} to a curious twelve-year-old.",
    "Write three quiz questions about {x}, with answers.",
    "List five common misconceptions about {x} and correct each one.",
    "Describe a typical day for someone whose job involves {x}.",
    "Summarise the history of {x} in one paragraph.",
    "Give two arguments for and two against investing more public money in {x}.",
    "Write a short story of about 100 words in which {x} plays a central role.",
    "Compare {x} with a related field and name one key difference.",
    "Suggest a weekend project for a beginner interested in {x}.",
    "Write a haiku about {x}.",
    "What questions should I ask an expert in {x}? Give four.",
    "Create a simple glossary of five terms used in {x}.",
)
SETTINGS = (
    "for a school newsletter", "as if talking to a new colleague", "in the style of a travel guide",
    "for someone who has never heard of it", "keeping it under one hundred words", "with a surprising fact at the end",
    "for a radio programme aimed at farmers", "as a numbered checklist", "from the point of view of a historian",
    "for a poster in a public library",
)
REQUIREMENTS = (
    "Answer in no more than four sentences.",
    "Include one concrete example.",
    "Explain your reasoning step by step before the final answer.",
    "Present the answer as a table with two columns.",
    "Mention one common mistake to avoid.",
    "Use language a ten-year-old would understand.",
)
STOP = {"the", "a", "an", "of", "to", "and", "in", "is", "for", "on", "with", "how", "what", "why", "write", "explain",
        "describe", "give", "make", "name", "this", "that", "these", "three", "your", "me", "about", "from", "are"}


def _rng(text: str) -> random.Random:
    return random.Random(hashlib.sha256(text.encode("utf-8")).hexdigest())


def _subjects(text: str) -> list[str]:
    """Topic names if the prompt lists them, else content words of the example tasks."""
    if "these topics:" in text:
        block = text.split("these topics:", 1)[1].split("\n\n", 1)[0]
        topics = [re.sub(r"^\s*\d+\.\s*", "", line).strip() for line in block.splitlines() if line.strip()]
        if topics:
            return [t.lower() for t in topics]
    words = [w for w in re.findall(r"[a-zA-Z]{4,}", text.split("Here are some example tasks:", 1)[-1])
             if w.lower() not in STOP]
    return [w.lower() for w in words[:40]] or ["everyday science"]


def _original(text: str) -> str:
    return text.split("#Original Instruction#", 1)[1].split("\n\nReply with", 1)[0].strip()


def demo_teacher(call) -> str:
    text = call.last_user_text
    rng = _rng(text)
    if "Reply with a numbered list only" in text:
        count = int(re.search(r"Write (\d+) new tasks", text).group(1))
        subjects = _subjects(text)
        return "\n".join(f"{i}. " + rng.choice(PATTERNS).format(x=rng.choice(subjects)).rstrip(".?") + ", "
                         + rng.choice(SETTINGS) + "." for i in range(1, count + 1))
    if "#Original Instruction#" in text:
        original = _original(text)
        if "brand-new instruction" in text:
            words = [w for w in re.findall(r"[a-zA-Z]{5,}", original) if w.lower() not in STOP] or ["puzzles"]
            return rng.choice(PATTERNS).format(x="the lesser-known side of " + rng.choice(words).lower())
        return f"{original} {rng.choice(REQUIREMENTS)}"
    if "SAME or DIFFERENT" in text:
        return "DIFFERENT"
    if "Score: <a whole number from 1 to 10>" in text:
        score = rng.choice((4, 6, 7, 8, 8, 9, 9, 10))
        return f"Reason: the response is {'accurate and on task' if score >= 7 else 'vague in places'}.\nScore: {score}"
    first_line = text.strip().splitlines()[0] if text.strip() else "the question"
    return (f"Here is an answer to \"{first_line[:120]}\". The key point is explained first, then one example "
            f"follows, and a short summary closes it. ({rng.randrange(1000)})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the scripted demo teacher and judge (OpenAI-compatible, localhost).")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    args = p.parse_args(argv)
    server = FakeLLMServer(reply=demo_teacher, port=args.port, latency=args.latency).start()
    print(json.dumps({"url": server.url, "openai_url": server.openai_url}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
