"""bezoar.generate: synthetic data from teacher LLMs, through an asyncio client pool.

The pool (``bezoar.generate.pool``) sends Requests to OpenAI, Anthropic or OpenAI-compatible
endpoints within rate limits, retries what can be retried and records every Result once in a
resumable JSONL store. ``python -m bezoar.generate --help`` lists the commands.
"""

from bezoar.generate.pool import Limits, Pool, PoolError, PoolStats, run_sync
from bezoar.generate.providers import Endpoint
from bezoar.generate.request import GenerateError, Request, Result, Usage
from bezoar.generate.store import JSONLStore, MemoryStore, StoreError

__all__ = ["Pool", "Limits", "Endpoint", "Request", "Result", "Usage", "PoolError", "PoolStats", "GenerateError",
           "JSONLStore", "MemoryStore", "StoreError", "run_sync"]
