"""Client pool throughput and rate-limit tracking against the fake LLM server (CPU).

The fake server (tests/generate/fake_server.py) runs in its own process, so the client process
has one of the machine's cores to itself. Cases:

  pool-null-provider the Pool (JSONL store on) with a provider that answers at once, no HTTP:
                     the pool's own CPU per request
  pool-compat        the Pool with the compat provider (its lean HTTP/1.1 client), zero server
                     latency, JSONL store on: requests/s end to end (target >= 2,000/s on a
                     2-core machine)
  pool-compat-aiohttp the same with the compat provider forced onto aiohttp (what it uses when a
                     proxy is set; its only transport before the lean client)
  pool-openai-sdk    the same through the official openai SDK provider
  pool-anthropic-sdk the same through the official anthropic SDK provider
  raw-aiohttp        no pool: a semaphore and one aiohttp session: the transport's ceiling
  cookbook-loop      the OpenAI cookbook's parallel-processor pattern rewritten briefly here: one
                     loop that launches at most one request per pass, then sleeps 1 ms (so at
                     most ~1,000 launches/s whatever the server does)
  ratelimit-6000rpm  server latency 200 ms and a 6,000 RPM bucket (1 s burst); the Pool told
                     rpm=6000: share of the allowed rate achieved (target >= 97%), 429s seen
  refused-15pct      no limit, but 15% of the calls answered 429 naming 20 ms at random (a shared key,
                     a flaky gateway): requests/s against pool-compat's; the pool must not take
                     such refusals for a limit on its rate
  overloaded-15pct   answers taking 50 ms, 15% of the calls answered 429 naming no wait (a server's answer
                     past its limit on requests at once) at random: the pool must not take them for such a
                     limit and send fewer at once (64 at once: 3,000 requests take 2.3 s at the least)

Share of the limit = requests answered / what the server's bucket allowed between the first and
the last request it saw (burst + rate x window).

Besides wall-clock requests/s, every case reports CPU microseconds per request in the client
process (this one) and in the server process. Wall-clock figures depend on what else the machine
runs; CPU per request does much less, and n / client CPU seconds is the rate one dedicated core
could sustain (the "ceiling"), which is what the >= 2,000/s target is about.

--profile DIR writes a cProfile dump per case (nothing here runs torch, so torch.profiler would
see nothing). --only NAME --iters N repeats one case N times with no timing for an outside
profiler.
"""

from __future__ import annotations

import asyncio
import collections
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bezoar.generate.pool import Limits, Pool  # noqa: E402
from bezoar.generate.providers import CompatProvider, Endpoint, Reply, read_api_key  # noqa: E402
from bezoar.generate.request import Request  # noqa: E402

KEY = "sk-bench-not-a-real-key"


# ---------------------------------------------------------------------- the server process
class ServerProcess:
    """tests.generate.fake_server in a child process; stopped by its pid on exit."""

    def __init__(self, latency: float = 0.0, rpm: float | None = None, refused: float = 0.0,
                 refusal: str = "429ms"):
        self.latency = latency
        cmd = [sys.executable, "-m", "tests.generate.fake_server", "--latency", str(latency)]
        if rpm:
            cmd += ["--rpm", str(rpm), "--rpm-burst-s", "1.0"]
        if refused:  # that share of the calls answered 429 (naming 20 ms, or no wait), at random, whatever the rate
            cmd += ["--fault-rate", str(refused), "--fault-kinds", refusal, "--retry-after-s", "0.02"]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fake server did not start")
        info = json.loads(line)
        self.url, self.openai_url = info["url"], info["openai_url"]

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the server process has used so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Timed:
    """Wall time and CPU time of this process and of the server over a block."""

    def __init__(self, server: ServerProcess):
        self.server = server

    def __enter__(self) -> "Timed":
        self.server_cpu0 = self.server.cpu_s()
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.client_cpu_s = time.process_time() - self.cpu0
        server_cpu1 = self.server.cpu_s()
        self.server_cpu_s = None if server_cpu1 is None else server_cpu1 - self.server_cpu0

    def row(self, n: int, **extra) -> dict:
        row = {"requests": n, "seconds": self.seconds, "req_per_s": n / self.seconds,
               "client_cpu_us_per_req": self.client_cpu_s / n * 1e6,
               "client_cpu_ceiling_req_per_s": n / self.client_cpu_s if self.client_cpu_s else None}
        if self.server_cpu_s:
            row["server_cpu_us_per_req"] = self.server_cpu_s / n * 1e6
            row["server_cpu_ceiling_req_per_s"] = n / self.server_cpu_s
        row.update(extra)
        return row


def make_requests(n: int, tag: str) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"{tag} question {i}"}], max_tokens=16, id=i)
            for i in range(n)]


# ---------------------------------------------------------------------- cases
async def pool_case(provider: str, server: ServerProcess, n: int, concurrency: int, store_dir: str,
                    rpm: float | None = None, warmup: int = 200, transport: str | None = None) -> dict:
    url = server.url if provider == "anthropic" else server.openai_url
    limits = Limits(concurrency=concurrency, rpm=rpm, timeout_s=60)
    store = os.path.join(store_dir, f"{provider}-{time.time_ns()}.jsonl")
    factory = None
    if transport is not None:  # the compat provider on a chosen transport
        def factory(endpoint: Endpoint, connections: int) -> CompatProvider:
            return CompatProvider(endpoint, read_api_key(endpoint), connections, transport=transport)
    async with Pool(Endpoint(provider, url, api_key_env="BENCH_POOL_KEY"), limits, store, model="m",
                    provider_factory=factory) as pool:
        if warmup:
            await pool.run(make_requests(warmup, "warm"))
        with Timed(server) as timed:
            results = await pool.run(make_requests(n, "timed"))
        stats = pool.stats
    return timed.row(n, failed=sum(not r.ok for r in results), rate_limited=stats.rate_limited,
                     concurrency=concurrency)


class NullProvider:
    """Answers every request at once (one event-loop turn), as if the network cost nothing."""

    label = "null"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, request: Request, model: str, timeout: float) -> Reply:
        await asyncio.sleep(0)
        return Reply("an answer", 10, 3, "stop")


async def null_provider_case(n: int, concurrency: int, store_dir: str) -> dict:
    store = os.path.join(store_dir, f"null-{time.time_ns()}.jsonl")
    async with Pool(Endpoint("compat", "http://unused/v1"), Limits(concurrency=concurrency), store, model="m",
                    provider_factory=lambda endpoint, connections: NullProvider()) as pool:
        await pool.run(make_requests(200, "warm"))
        requests = make_requests(n, "timed")
        cpu0, t0 = time.process_time(), time.perf_counter()
        await pool.run(requests)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"requests": n, "seconds": seconds, "req_per_s": n / seconds, "client_cpu_us_per_req": cpu / n * 1e6,
            "client_cpu_ceiling_req_per_s": n / cpu if cpu else None, "failed": 0, "concurrency": concurrency}


async def raw_aiohttp_case(server: ServerProcess, n: int, concurrency: int, warmup: int = 200) -> dict:
    import aiohttp

    url = server.openai_url + "/chat/completions"
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {KEY}"}) as session:
        async def one(i: int, tag: str) -> str:
            body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": f"{tag} question {i}"}]}
            async with slots, session.post(url, json=body) as response:
                return (await response.json())["choices"][0]["message"]["content"]

        await asyncio.gather(*(one(i, "warm") for i in range(warmup)))
        with Timed(server) as timed:
            await asyncio.gather(*(one(i, "timed") for i in range(n)))
    return timed.row(n, failed=0, concurrency=concurrency)


async def cookbook_loop_case(server: ServerProcess, n: int, concurrency: int, store_dir: str) -> dict:
    """The cookbook's loop shape: a single pass launches at most one request, then sleeps 1 ms;
    each result is appended to the output file by reopening it, as that script does."""
    import aiohttp

    url = server.openai_url + "/chat/completions"
    out = os.path.join(store_dir, f"cookbook-{time.time_ns()}.jsonl")
    todo = collections.deque({"model": "m", "max_tokens": 16,
                              "messages": [{"role": "user", "content": f"cookbook question {i}"}]} for i in range(n))
    in_flight = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {KEY}"}) as session:
        async def call(body: dict) -> None:
            nonlocal in_flight
            async with session.post(url, json=body) as response:
                answer = await response.json()
            with open(out, "a") as f:
                f.write(json.dumps([body, answer]) + "\n")
            in_flight -= 1

        tasks = []
        with Timed(server) as timed:
            while todo or in_flight:
                if todo and in_flight < concurrency:
                    in_flight += 1
                    tasks.append(asyncio.ensure_future(call(todo.popleft())))
                await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
    return timed.row(n, failed=0, concurrency=concurrency)


async def ratelimit_case(server: ServerProcess, n: int, rpm: float, concurrency: int, store_dir: str) -> dict:
    row = await pool_case("compat", server, n, concurrency, store_dir, rpm=rpm, warmup=0)
    s = server.stats()
    window = s["last_request_at"] - s["first_request_at"]
    allowed = rpm / 60 * 1.0 + rpm / 60 * window
    row.update(latency_s=0.2, rpm=rpm, server_window_s=window, server_429=s["outcomes"].get("rate_limited", 0),
               share_of_limit=s["answered"] / allowed, achieved_rpm=s["answered"] / window * 60 if window else None)
    return row


async def refused_case(server: ServerProcess, n: int, concurrency: int, store_dir: str, refused: float,
                       refusal: str) -> dict:
    row = await pool_case("compat", server, n, concurrency, store_dir, warmup=0)
    s = server.stats()
    row.update(latency_s=server.latency, refused_share=refused, refusal=refusal,
               server_429=s["outcomes"].get("fault_" + refusal, 0))
    return row


# ---------------------------------------------------------------------- driver
def cases(smoke: bool) -> dict:
    big, sdk, loop_n = (100, 20, 50) if smoke else (20000, 2000, 5000)
    rate_n = 60 if smoke else 3000
    return {
        "pool-null-provider": dict(kind="null", n=50000 if not smoke else 1000, concurrency=128),
        "pool-compat": dict(kind="pool", provider="compat", n=big, concurrency=128),
        "pool-compat-aiohttp": dict(kind="pool", provider="compat", transport="aiohttp", n=big, concurrency=128),
        "pool-openai-sdk": dict(kind="pool", provider="openai", n=sdk, concurrency=64),
        "pool-anthropic-sdk": dict(kind="pool", provider="anthropic", n=sdk, concurrency=64),
        "raw-aiohttp": dict(kind="raw", n=big, concurrency=128),
        "cookbook-loop": dict(kind="cookbook", n=loop_n, concurrency=128),
        "ratelimit-6000rpm": dict(kind="ratelimit", n=rate_n, rpm=6000, concurrency=64),
        "refused-15pct": dict(kind="refused", n=100 if smoke else 5000, refused=0.15, concurrency=64),
        "overloaded-15pct": dict(kind="refused", n=100 if smoke else 3000, refused=0.15, concurrency=64,
                                 refusal="429bare", latency=0.05),
    }


def run_case(name: str, spec: dict, store_dir: str, server: ServerProcess | None, warmup: int) -> dict:
    """One case; zero-latency cases share ``server``, the rate-limit case starts its own."""
    if spec["kind"] == "ratelimit":
        with ServerProcess(latency=0.2, rpm=spec["rpm"]) as limited:
            row = asyncio.run(ratelimit_case(limited, spec["n"], spec["rpm"], spec["concurrency"], store_dir))
        return {"case": name, **row}
    if spec["kind"] == "refused":
        refusal = spec.get("refusal", "429ms")
        with ServerProcess(latency=spec.get("latency", 0.0), refused=spec["refused"], refusal=refusal) as refusing:
            row = asyncio.run(refused_case(refusing, spec["n"], spec["concurrency"], store_dir, spec["refused"],
                                           refusal))
        return {"case": name, **row}
    if spec["kind"] == "null":
        return {"case": name, **asyncio.run(null_provider_case(spec["n"], spec["concurrency"], store_dir))}
    if spec["kind"] == "pool":
        coro = pool_case(spec["provider"], server, spec["n"], spec["concurrency"], store_dir, warmup=warmup,
                         transport=spec.get("transport"))
    elif spec["kind"] == "raw":
        coro = raw_aiohttp_case(server, spec["n"], spec["concurrency"], warmup=warmup)
    else:
        coro = cookbook_loop_case(server, spec["n"], spec["concurrency"], store_dir)
    return {"case": name, **asyncio.run(coro)}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    os.environ.setdefault("BENCH_POOL_KEY", KEY)
    all_cases = cases(args.smoke)
    if args.only and args.only not in all_cases:
        p.error(f"--only: unknown case {args.only!r}; cases: {', '.join(all_cases)}")
    selected = {args.only: all_cases[args.only]} if args.only else all_cases
    load_before = os.getloadavg()
    rows = []
    warmup = 10 if args.smoke else 200
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as store_dir, ServerProcess() as server:
        if args.only and args.iters:
            for _ in range(args.iters):
                run_case(args.only, selected[args.only], store_dir, server, warmup)
            return
        for name, spec in selected.items():
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                profiler = cProfile.Profile()
                row = profiler.runcall(run_case, name, spec, store_dir, server, warmup)
                profiler.dump_stats(str(Path(args.profile) / f"{name}.prof"))
            else:
                row = run_case(name, spec, store_dir, server, warmup)
            rows.append(row)
            print(f"{name}: {row['req_per_s']:.0f} req/s", flush=True)
    print()
    print(common.markdown_table(rows, ["case", "requests", "concurrency", "seconds", "req_per_s",
                                       "client_cpu_us_per_req", "client_cpu_ceiling_req_per_s",
                                       "server_cpu_us_per_req", "failed", "rate_limited", "share_of_limit",
                                       "achieved_rpm", "server_429"]))
    extra = {"cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
             "server": "tests/generate/fake_server.py in a separate process",
             "targets": {"pool-compat req/s": 2000, "ratelimit share_of_limit": 0.97}}
    try:
        import aiohttp
        import anthropic
        import openai

        extra.update(aiohttp=aiohttp.__version__, openai=openai.__version__, anthropic=anthropic.__version__)
    except ImportError:
        pass
    common.write_results("pool", rows, args, extra)


if __name__ == "__main__":
    main()
