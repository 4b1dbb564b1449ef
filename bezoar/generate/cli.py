"""Command-line pieces of ``python -m bezoar.generate``: shared pool flags and the ``requests`` command.

Any generation command (requests here; lamini, evol, orca, filter in their own modules) builds
its pool the same way::

    def add_command(subparsers):
        p = subparsers.add_parser("lamini", help="...")
        p.add_argument(...)                      # the scheme's own flags
        add_pool_arguments(p)                    # --provider --base-url --model --rpm ...
        p.set_defaults(func=run_lamini)          # func(args) -> exit code

    def run_lamini(args) -> int:
        async def main():
            async with pool_from_args(args, args.out) as pool:
                ...
        asyncio.run(main())
        return 0  # 1 when requests ended as recorded failures (schemes.exit_status)

Errors a user can cause are raised as :class:`GenerateError`; ``__main__`` prints them as one
line and exits 2.

``requests IN.jsonl --out OUT.jsonl``: one JSON object per input line::

    {"id": "q1", "messages": [{"role": "user", "content": "..."}], "system": "...",
     "max_tokens": 256, "temperature": 0.7, "top_p": 1.0, "stop": ["\\n\\n"], "model": "...",
     "meta": {...}}

``id`` is required (string or integer) and one id is one request; ``messages`` makes a chat
request, ``prompt`` (a string) a text completion; the rest is optional (``model`` overrides
``--model``, ``meta`` is copied to the output). Every line is checked before anything is sent: a
bad value (``max_tokens`` below 1, ``temperature`` below 0, ``top_p`` outside 0-1, as for the flags)
is an error naming its line. Each id gets one output line, a store record:
``{"key", "id", "ok", "response", "usage": {"input_tokens", "output_tokens"}, ...}`` or, for a
final failure, ``{"key", "id", "ok": false, "error", "error_type", ...}``. Rerun with the same
``--out`` to resume: stored ids are skipped; recorded failures too, unless ``--retry-failed``. An
id stored for a different request (its line was edited, or ``--model``, ``--max-tokens``,
``--temperature``, ``--top-p`` differ from the run that stored it) is an error, not a second line.
Exit status: 0 all answered, 1 some ended as recorded failures, 2 stopped by an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Collection
from pathlib import Path

from bezoar.generate.pool import Limits, Pool
from bezoar.generate.progress import run_summary
from bezoar.generate.providers import PROVIDERS, Endpoint
from bezoar.generate.request import GenerateError, Request
from bezoar.generate.store import FSYNC_POLICIES, JSONLStore

INPUT_FIELDS = ("id", "messages", "prompt", "system", "max_tokens", "temperature", "top_p", "stop", "model", "meta")


# ---------------------------------------------------------------------- shared pool flags
def add_pool_arguments(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """The flags every generation command shares: endpoints, limits, store, progress."""
    g = parser.add_argument_group("endpoints")
    g.add_argument("--provider", choices=PROVIDERS, default="openai",
                   help="openai / anthropic: the official SDKs; compat: any OpenAI-compatible server "
                        "(vLLM, TGI, bezoar.serve) over bezoar's own keep-alive HTTP/1.1 client (aiohttp "
                        "behind a proxy, or with BEZOAR_COMPAT_TRANSPORT=aiohttp) (default: openai)")
    g.add_argument("--base-url", action="append", metavar="URL",
                   help="API base URL, e.g. http://localhost:8000/v1; repeat to spread requests over several "
                        "servers of the same model (default: the provider's public API)")
    g.add_argument("--model", required=model_required, help="model name sent to the endpoints")
    g.add_argument("--api-key-env", metavar="NAME",
                   help="environment variable holding the API key (default: OPENAI_API_KEY for openai, "
                        "ANTHROPIC_API_KEY for anthropic; compat sends no key unless NAME is given)")
    g = parser.add_argument_group("limits")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default 64)")
    g.add_argument("--rpm", type=float, help="requests per minute (default: no limit)")
    g.add_argument("--tpm", type=float, help="tokens (in + out) per minute (default: no limit)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per attempt (default 600)")
    g.add_argument("--max-attempts", type=int, default=8, help="attempts per request (default 8)")
    g = parser.add_argument_group("output")
    g.add_argument("--retry-failed", action="store_true",
                   help="send again the requests recorded as failures in --out (they are moved to a side file)")
    g.add_argument("--fsync", choices=FSYNC_POLICIES, default="interval",
                   help="when the output is fsynced: at most once a second (default), every record, or never")
    g.add_argument("--price", nargs=2, type=float, metavar=("IN", "OUT"),
                   help="USD per million input and output tokens, to show the cost")
    g.add_argument("--no-progress", action="store_true", help="no progress line, only the summary")


def endpoints_from_args(args) -> list[Endpoint]:
    urls = args.base_url or [None]
    return [Endpoint(args.provider, url, api_key_env=args.api_key_env) for url in urls]


# Limits field -> (flag, argparse attribute, what it takes)
LIMIT_FLAGS = {"concurrency": ("--concurrency", "concurrency", "an integer >= 1"),
               "rpm": ("--rpm", "rpm", "a number > 0"), "tpm": ("--tpm", "tpm", "a number > 0"),
               "timeout_s": ("--timeout", "timeout", "a number of seconds > 0"),
               "max_attempts": ("--max-attempts", "max_attempts", "an integer >= 1")}


def limits_from_args(args) -> Limits:
    try:
        return Limits(**{field: getattr(args, attr) for field, (_, attr, _) in LIMIT_FLAGS.items()})
    except GenerateError as e:
        fields = [f for f in getattr(e, "fields", []) if f in LIMIT_FLAGS]
        if not fields:
            raise
        raise GenerateError("; ".join(f"{LIMIT_FLAGS[f][0]} must be {LIMIT_FLAGS[f][2]}, got "
                                      f"{getattr(args, LIMIT_FLAGS[f][1])!r}" for f in fields)) from None


def pool_from_args(args, out: str | Path, retry_failed: bool | Collection[str] | None = None) -> Pool:
    """A Pool for the parsed shared flags, storing into ``out`` (JSONL, resumable). ``retry_failed``
    (default: ``--retry-failed``) may name the keys whose recorded failures are sent again."""
    if args.price and not all(math.isfinite(v) and v >= 0 for v in args.price):
        raise GenerateError(f"--price must be two numbers >= 0 (USD per million tokens in, out), got "
                            f"{' '.join(map(repr, args.price))}")
    limits = limits_from_args(args)  # checked before the store is opened
    store = JSONLStore(out, fsync=args.fsync,
                       retry_failed=args.retry_failed if retry_failed is None else retry_failed)
    prices = {args.model: tuple(args.price)} if args.price and args.model else None
    return Pool(endpoints_from_args(args), limits, store, model=args.model,
                progress=not args.no_progress, prices=prices)


# ---------------------------------------------------------------------- the requests command
def jsonl_objects(path: Path, what: str):
    """``(line number, "FILE line N", object)`` for each non-blank line of a JSONL file; a line that is not
    UTF-8, not JSON or not an object is a GenerateError naming it. ``what`` names the file ("seed file")."""
    try:
        handle = open(path, "rb")  # bytes, decoded line by line: bad bytes are reported with their line
    except OSError as e:
        raise GenerateError(f"cannot read {what} {path}: {e.strerror or e}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path} line {number}"
            try:
                text = raw.decode("utf-8-sig")  # -sig: drops a byte-order mark on the first line
            except UnicodeDecodeError as e:
                raise GenerateError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise GenerateError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise GenerateError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield number, where, obj


def read_requests(path: str | Path, defaults: dict) -> tuple[list[Request], int]:
    """Requests from a JSONL file, validated up front (before anything is spent).

    Returns (requests, repeated lines). A line repeating an earlier one exactly is one request;
    an id used twice for different requests is an error naming both lines."""
    path = Path(path)
    requests: list[Request] = []
    first_line: dict[str, tuple[int, str]] = {}  # id -> (line number, key)
    repeated = 0
    for number, where, obj in jsonl_objects(path, "input"):
        unknown = sorted(set(obj) - set(INPUT_FIELDS))
        if unknown:
            raise GenerateError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(INPUT_FIELDS)}")
        rid = obj.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise GenerateError(f"{where}: 'id' is required and must be a string or an integer")
        if ("messages" in obj) == ("prompt" in obj):
            raise GenerateError(f"{where}: give either 'messages' (chat) or 'prompt' (completion)")
        fields = {k: obj[k] for k in INPUT_FIELDS if k in obj}
        for name, value in defaults.items():
            fields.setdefault(name, value)
        fields["kind"] = "chat" if "messages" in obj else "completion"
        try:  # the key too: whatever makes it fail is then named with its line
            request = Request(**fields)
            key = request.key(defaults.get("model"))
        except (ValueError, TypeError) as e:
            raise GenerateError(f"{where}: {e}") from None
        id_text = json.dumps(rid)
        seen = first_line.get(id_text)
        if seen is not None:
            if seen[1] != key:
                raise GenerateError(f"{where}: id {rid!r} was already used on line {seen[0]} for a different "
                                    "request; ids must be unique")
            repeated += 1
            continue
        first_line[id_text] = (number, key)
        requests.append(request)
    return requests, repeated


def ids_stored_for_other_requests(store, requests: list[Request], model: str | None) -> list:
    """Ids of ``requests`` that have a record in ``store`` made for a different request (and none
    for this one): sending them would pay again and give the id a second output line."""
    if not len(store):
        return []
    missing = {json.dumps(r.id): r.id for r in requests if r.key(model) not in store}
    if not missing:
        return []
    clashes = {}
    for key in store.keys():
        id_text = json.dumps(store.get(key).get("id"))
        if id_text in missing:
            clashes[id_text] = missing[id_text]
    return list(clashes.values())


def check_ids_unchanged(store, requests: list[Request], args) -> None:
    clashes = ids_stored_for_other_requests(store, requests, args.model)
    if not clashes:
        return
    shown = ", ".join(json.dumps(i) for i in clashes[:5]) + (", ..." if len(clashes) > 5 else "")
    raise GenerateError(
        f"{args.out} already holds a record for {len(clashes)} id(s) of {args.input} made for a different request "
        f"({shown}): their lines changed, or --model, --max-tokens, --temperature or --top-p differ from the run "
        "that stored them. Rerun with the same input and flags, or choose another --out (records of failures are "
        "moved aside by --retry-failed)")


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "requests", help="send arbitrary requests from a JSONL file (resumable)",
        description="Send one request per line of IN (see bezoar.generate.cli for the format) and write one "
                    "line per id to OUT. Rerun with the same --out to resume.")
    p.add_argument("input", metavar="IN.jsonl", help="requests, one JSON object per line")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="results; appended to, never rewritten")
    g = p.add_argument_group("defaults for lines that set none")
    g.add_argument("--max-tokens", type=int, help="max tokens per answer (>= 1)")
    g.add_argument("--temperature", type=float, help="sampling temperature (>= 0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (0 to 1)")
    add_pool_arguments(p)
    p.set_defaults(func=run_requests)


def run_requests(args) -> int:
    defaults = {"model": args.model}
    for name in ("model", "max_tokens", "temperature", "top_p"):
        value = getattr(args, name)
        if value is None:
            continue
        try:  # checked as a request checks it, so that the error names the flag, not a line of the input
            Request(kind="completion", prompt="", **{name: value})
        except ValueError as e:
            raise GenerateError(f"--{name.replace('_', '-')}: {e}".replace("Request.", "")) from None
        defaults[name] = value
    requests, repeated = read_requests(args.input, defaults)
    if Path(args.out).resolve() == Path(args.input).resolve():
        raise GenerateError("--out must not be the input file")
    if repeated:
        print(f"{args.input}: {repeated} lines repeat an earlier line exactly; each is sent once", file=sys.stderr)
    pool = pool_from_args(args, args.out)

    async def main() -> None:
        async with pool:
            check_ids_unchanged(pool.store, requests, args)
            async for _ in pool.map(requests, include_cached=False):
                pass

    asyncio.run(main())
    if args.no_progress:
        print(run_summary(pool.stats), file=sys.stderr)
    failed_in_store = sum(1 for key in pool.store.keys() if pool.store.failed(key))
    if failed_in_store:
        print(f"{failed_in_store} requests in {args.out} ended as failures; rerun with --retry-failed to send them "
              "again", file=sys.stderr)
        return 1
    return 0
