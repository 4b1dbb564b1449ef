"""``python -m bezoar.generate requests``: resume, SIGKILL + rerun, one clear message per user error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bezoar.generate.__main__ import main
from tests.generate.conftest import closed_port_url
from tests.generate.fake_server import Fault

REPO = Path(__file__).resolve().parents[2]


def write_input(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            if i % 3 == 2:
                line = {"id": f"r{i}", "prompt": f"p{i}", "max_tokens": 5}
            else:
                line = {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}], "meta": {"i": i}}
                if i % 3 == 1:
                    line["system"] = "short answers"
            f.write(json.dumps(line) + "\n")
    return path


def expected_response(rid: str) -> str:
    i = int(rid[1:])
    return f"echo: p{i}" if i % 3 == 2 else f"echo: q{i}"


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def cli_args(inp, out, url, *extra):
    return ["requests", str(inp), "--out", str(out), "--provider", "compat", "--base-url", url, "--model", "m",
            "--no-progress", *extra]


def run_cli(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bezoar.generate", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout)


def test_requests_then_resume(fake_server, tmp_path):
    server = fake_server()
    inp, out = write_input(tmp_path / "in.jsonl", 30), tmp_path / "out.jsonl"
    done = run_cli(cli_args(inp, out, server.openai_url))
    assert done.returncode == 0, done.stderr
    lines = read_out(out)
    assert sorted(r["id"] for r in lines) == sorted(f"r{i}" for i in range(30))
    assert all(r["ok"] and r["response"] == expected_response(r["id"]) for r in lines)
    assert all(r["usage"]["input_tokens"] > 0 for r in lines)
    assert {r["id"]: r.get("meta") for r in lines}["r3"] == {"i": 3}
    assert "finished 30 requests" in done.stderr
    before = out.read_bytes()
    server.reset_counters()
    again = run_cli(cli_args(inp, out, server.openai_url))
    assert again.returncode == 0 and server.stats()["requests"] == 0 and out.read_bytes() == before
    write_input(inp, 5, start=30)
    more = run_cli(cli_args(inp, out, server.openai_url))
    assert more.returncode == 0 and server.stats()["requests"] == 5 and len(read_out(out)) == 35


def test_sigkill_midway_then_rerun(fake_server, tmp_path):
    n, concurrency = 400, 8
    server = fake_server(latency=0.05)
    inp, out = write_input(tmp_path / "in.jsonl", n), tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "bezoar.generate",
                             *cli_args(inp, out, server.openai_url, "--concurrency", str(concurrency))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 300  # the child's start-up (imports) on a loaded machine, then 100 answers
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= n // 4:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    written = out.read_bytes().count(b"\n")
    assert n // 4 <= written < n, "the run was not stopped midway"
    with open(out, "ab") as f:  # as if the kill had hit in the middle of a write
        f.write(b'{"key":"0123abcd","id":"r999","ok":tr')

    rerun = run_cli(cli_args(inp, out, server.openai_url, "--concurrency", str(concurrency)))
    assert rerun.returncode == 0, rerun.stderr
    assert "torn" in rerun.stderr
    lines = read_out(out)
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)) == n and len({r["key"] for r in lines}) == n
    assert all(r["response"] == expected_response(r["id"]) for r in lines)
    sent_twice = server.stats()["duplicates"]
    assert sent_twice <= concurrency, f"{sent_twice} requests were sent twice; at most {concurrency} were in flight"
    assert len(list(tmp_path.glob("out.jsonl.torn-*"))) == 1


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_sigterm_stores_the_answers_in_flight_as_ctrl_c_does(fake_server, tmp_path, sigint_ignored):
    """timeout, a scheduler and docker stop send SIGTERM: it killed the command on the spot, so the requests in
    flight were paid for again on the rerun (6 of 172 in a pipeline run). It now takes Ctrl-C's path: the
    answers in flight are stored, exit status 130. A command started with & by a script has SIGINT ignored;
    SIGTERM still works there."""
    server = fake_server(latency=0.5)
    n, concurrency = 16, 4
    inp, out = write_input(tmp_path / "in.jsonl", n), tmp_path / "out.jsonl"

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-m", "bezoar.generate",
                             *cli_args(inp, out, server.openai_url, "--concurrency", str(concurrency))],
                            cwd=REPO, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_sigint if sigint_ignored else None)
    deadline = time.monotonic() + 60
    while server.stats()["requests"] < 6 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    stats = server.stats()
    assert stats["requests"] == 2 * concurrency  # the second four were at the server; none sent after SIGTERM
    assert len(read_out(out)) == stats["answered"] == 2 * concurrency  # every answer sent is stored
    assert "waiting for 4 requests in flight" in err
    server.reset_counters()
    rerun = run_cli(cli_args(inp, out, server.openai_url, "--concurrency", str(concurrency)))
    assert rerun.returncode == 0 and server.stats()["requests"] == n - 2 * concurrency
    assert sorted(r["id"] for r in read_out(out)) == sorted(f"r{i}" for i in range(n))


SECRET = "sk-live-DO-NOT-LEAK-1234567890abcdef"


@pytest.mark.parametrize("case", ["bad_key", "bad_key_sdk", "unknown_model", "unreachable"])
def test_user_errors_end_with_one_clear_message(fake_server, tmp_path, case):
    server = fake_server(api_key="right-key", models=["m"])
    inp, out = write_input(tmp_path / "in.jsonl", 40), tmp_path / "out.jsonl"
    env = {"OPENAI_API_KEY": SECRET if case.startswith("bad_key") else "right-key"}
    # compat sends a key only from the variable named (openai reads OPENAI_API_KEY by default anyway)
    args = cli_args(inp, out, closed_port_url() if case == "unreachable" else server.openai_url,
                    "--api-key-env", "OPENAI_API_KEY")
    if case == "unknown_model":
        args[args.index("--model") + 1] = "no-such-model"
    if case == "bad_key_sdk":
        args[args.index("--provider") + 1] = "openai"
    done = run_cli(args, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert done.stderr.count("error: ") == 1
    expected = {"bad_key": "rejected the API key", "bad_key_sdk": "rejected the API key",
                "unknown_model": "'no-such-model'", "unreachable": "Connection refused"}[case]
    assert expected in last
    assert "DO-NOT-LEAK" not in done.stderr + done.stdout + out.read_text()


def test_key_never_reaches_output_or_logs(fake_server, tmp_path):
    server = fake_server(api_key=SECRET, fault_rate=0.3, fault_kinds=("500", "429"), retry_after_s=0.01)
    inp, out = write_input(tmp_path / "in.jsonl", 20), tmp_path / "out.jsonl"
    done = run_cli(["-v", *cli_args(inp, out, server.openai_url, "--api-key-env", "BEZOAR_TEST_KEY")],
                   env={"BEZOAR_TEST_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    assert "retry" in done.stderr  # -v logged every retry ...
    assert "DO-NOT-LEAK" not in done.stderr + done.stdout + out.read_text()  # ... and never the key


def test_compat_sends_the_openai_key_nowhere_unless_named(fake_server, tmp_path):
    # OPENAI_API_KEY in the environment (for a judge, say) used to go to any compat --base-url, plain http too.
    server = fake_server(api_key=SECRET)
    inp, out = write_input(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    done = run_cli(cli_args(inp, out, server.openai_url), env={"OPENAI_API_KEY": SECRET})
    assert done.returncode == 2 and "requires an API key (HTTP 401) and none was sent" in done.stderr, done.stderr
    assert "--api-key-env NAME" in done.stderr and server.stats()["outcomes"].get("401") and not server.stats()["answered"]
    # Named, the key is sent (and the help says so).
    done = run_cli(cli_args(inp, out, server.openai_url, "--api-key-env", "BEZOAR_TEST_KEY"),
                   env={"BEZOAR_TEST_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    assert "DO-NOT-LEAK" not in done.stderr + done.stdout + out.read_text()
    help_text = " ".join(run_cli(["requests", "--help"]).stdout.split())
    assert "compat sends no key unless NAME is given" in help_text


def test_sdk_providers_do_not_log_every_request(fake_server, tmp_path):
    server = fake_server()
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    args = ["requests", str(inp), "--out", str(out), "--provider", "openai", "--base-url", server.openai_url,
            "--model", "m", "--no-progress"]
    done = run_cli(args, env={"OPENAI_API_KEY": "sk-test"})
    assert done.returncode == 0, done.stderr
    assert len(read_out(out)) == 6
    assert "HTTP Request" not in done.stderr, done.stderr


@pytest.mark.parametrize("content,message", [
    ('{"id": 1, "messages": [{"role": "user", "content": "x"}]}\n{"id": 2, "messages": \n', "line 2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "line 1: 'id' is required"),
    ('{"id": 1, "prompt": "x", "messages": []}\n', "line 1: give either 'messages'"),
    ('{"id": 1, "prompt": "x", "temprature": 1}\n', "line 1: unknown field(s) 'temprature'"),
    ('{"id": 1, "messages": [{"role": "user"}]}\n', "line 1: message 0 must be an object with 'role' and 'content'"),
    ('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n', "line 2: id 1 was already used on line 1"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"id": 1, "prompt": "x", "model": {"name": "m"}}\n', "line 1: Request.model must be a string"),
    ('{"id": 1, "prompt": "x", "model": 5}\n', "line 1: Request.model must be a string"),
    ('{"id": 1, "prompt": "x", "stop": 5}\n', "line 1: Request.stop must be a string or a list of strings, got 5"),
    ('{"id": 1, "prompt": "x", "stop": {"a": 1}}\n', "line 1: Request.stop must be a string or a list of strings"),
    # JSON may escape half of a surrogate pair, which no UTF-8 can hold: named, not a traceback,
    # and (in meta, which is not part of the key) refused before the call is paid
    ('{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "half \\ud83d"}\n',
     "line 2: Request.prompt holds text that is not valid Unicode ('\\ud83d'"),
    ('{"id": 1, "messages": [{"role": "user", "content": "\\udc00 x"}]}\n', "line 1: Request.messages holds text"),
    ('{"id": 1, "prompt": "x", "meta": {"note": "\\ud83d"}}\n', "line 1: Request.meta holds text"),
    ('{"id": "\\ud83d", "prompt": "x"}\n', "line 1: Request.id holds text"),
    # sampling values no provider takes: refused with their line, not sent and recorded as failures
    ('{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "y", "temperature": -0.5}\n',
     "line 2: Request.temperature must be >= 0, got -0.5"),
    ('{"id": 1, "prompt": "x", "top_p": 1.5}\n', "line 1: Request.top_p must be between 0 and 1, got 1.5"),
    ('{"id": 1, "prompt": "x", "top_p": -1}\n', "line 1: Request.top_p must be between 0 and 1, got -1"),
    ('{"id": 1, "prompt": "x", "max_tokens": 0}\n', "line 1: Request.max_tokens must be a positive integer, got 0"),
])
def test_bad_input_names_the_line(tmp_path, capsys, content, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    rc = main(cli_args(inp, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{inp} {message}" in err, err
    assert not (tmp_path / "out.jsonl").exists()  # validated before anything is opened or sent


@pytest.mark.parametrize("flag,value,message", [
    ("--max-tokens", "0", "--max-tokens: max_tokens must be a positive integer, got 0"),
    ("--temperature", "nan", "--temperature: temperature must be a finite number, got nan"),
    ("--top-p", "inf", "--top-p: top_p must be a finite number, got inf"),
    ("--temperature", "-3", "--temperature: temperature must be >= 0, got -3"),
    ("--top-p", "1.01", "--top-p: top_p must be between 0 and 1, got 1.01"),
    ("--top-p", "-0.2", "--top-p: top_p must be between 0 and 1, got -0.2"),
])
def test_a_bad_default_flag_is_named_not_a_line(tmp_path, capsys, flag, value, message):
    inp = write_input(tmp_path / "in.jsonl", 2)
    rc = main(cli_args(inp, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1", flag, value))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "line" not in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_sampling_values_at_the_edges_are_sent(tmp_path):
    # What providers take is not refused: temperature 0 (greedy), above 2 (vLLM takes any), top_p 0 and 1.
    from bezoar.generate.cli import read_requests

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x", "temperature": 0, "top_p": 0}\n'
                   '{"id": 2, "prompt": "x", "temperature": 2.5, "top_p": 1}\n')
    requests, _ = read_requests(inp, {})
    assert [(r.temperature, r.top_p) for r in requests] == [(0.0, 0.0), (2.5, 1.0)]


def test_a_model_name_that_is_not_text_is_named(tmp_path, capsys):
    # Bytes of the command line that are not UTF-8 arrive as lone surrogates: the flag is named.
    inp = write_input(tmp_path / "in.jsonl", 2)
    rc = main(cli_args(inp, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1", "--model", "m\udcff"))
    err = capsys.readouterr().err
    assert rc == 2 and "--model: model holds text that is not valid Unicode" in err and "line" not in err, err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("flags,message", [
    (["--concurrency", "0"], "--concurrency must be an integer >= 1, got 0"),
    (["--rpm", "nan"], "--rpm must be a number > 0, got nan"),
    (["--timeout", "-1", "--max-attempts", "0"],
     "--timeout must be a number of seconds > 0, got -1.0; --max-attempts must be an integer >= 1, got 0"),
    (["--price", "2.5", "nan"], "--price must be two numbers >= 0"),
    (["--price", "-1", "3"], "--price must be two numbers >= 0"),
])
def test_bad_limit_and_price_flags_are_named(tmp_path, capsys, flags, message):
    inp = write_input(tmp_path / "in.jsonl", 2)
    rc = main(cli_args(inp, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1", *flags))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "invalid limits" not in err, err
    assert not (tmp_path / "out.jsonl").exists()  # refused before the store is opened


def test_input_that_is_not_utf8_names_the_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    rc = main(cli_args(inp, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{inp} line 2: not UTF-8 text" in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(tmp_path):
    from bezoar.generate.cli import read_requests

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "y"}\n')
    requests, repeated = read_requests(inp, {})
    assert [r.id for r in requests] == [1, 2] and repeated == 0


def test_identical_lines_are_one_request(fake_server, tmp_path, capsys):
    server = fake_server()
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x"}\n' * 3 + '\n{"id": 2, "prompt": "y"}\n')
    assert main(cli_args(inp, tmp_path / "out.jsonl", server.openai_url)) == 0
    assert server.stats()["requests"] == 2 and len(read_out(tmp_path / "out.jsonl")) == 2
    assert "2 lines repeat an earlier line" in capsys.readouterr().err


def test_an_id_stored_for_another_request_is_refused(fake_server, tmp_path, capsys):
    server = fake_server()
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    assert main(cli_args(inp, out, server.openai_url, "--max-tokens", "5")) == 0
    before = out.read_bytes()
    server.reset_counters()
    capsys.readouterr()
    # Other flags for lines that set none, and one line edited: those ids were answered already.
    assert main(cli_args(inp, out, server.openai_url, "--max-tokens", "6")) == 2
    err = capsys.readouterr().err
    assert "already holds a record for 4 id(s)" in err and '"r0"' in err, err
    inp.write_text(inp.read_text().replace('"q0"', '"q0 edited"'))
    assert main(cli_args(inp, out, server.openai_url, "--max-tokens", "5")) == 2
    assert '"r0"' in capsys.readouterr().err
    assert server.stats()["requests"] == 0 and out.read_bytes() == before
    write_input(inp, 2, start=6)  # new ids beside the stored ones are fine
    inp.write_text(inp.read_text().replace('"q0 edited"', '"q0"'))
    assert main(cli_args(inp, out, server.openai_url, "--max-tokens", "5")) == 0
    assert server.stats()["requests"] == 2 and len(read_out(out)) == 8


def test_a_failed_line_fixed_then_retried(fake_server, tmp_path, capsys):
    server = fake_server(reply=lambda call: Fault("400", message="bad") if call.last_user_text == "q0" else "ok")
    inp, out = write_input(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    assert main(cli_args(inp, out, server.openai_url)) == 1
    inp.write_text(inp.read_text().replace('"q0"', '"q0 fixed"'))
    assert main(cli_args(inp, out, server.openai_url)) == 2
    assert "--retry-failed" in capsys.readouterr().err
    assert main(cli_args(inp, out, server.openai_url, "--retry-failed")) == 0
    lines = read_out(out)
    assert sorted(r["id"] for r in lines) == ["r0", "r1", "r2"] and all(r["ok"] for r in lines)


def test_failures_exit_1_then_retry_failed(fake_server, tmp_path, capsys):
    broken = fake_server(reply=lambda call: Fault("400", message="nope") if call.last_user_text == "q0" else "ok")
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    assert main(cli_args(inp, out, broken.openai_url)) == 1
    assert "--retry-failed" in capsys.readouterr().err
    fixed = fake_server()
    assert main(cli_args(inp, out, fixed.openai_url)) == 1 and fixed.stats()["requests"] == 0
    assert main(cli_args(inp, out, fixed.openai_url, "--retry-failed")) == 0 and fixed.stats()["requests"] == 1
    lines = read_out(out)
    assert len(lines) == 6 and all(r["ok"] for r in lines)


def test_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "requests" in capsys.readouterr().out
    assert main([]) == 2


def test_provider_help_names_the_compat_transport_in_use(capsys):
    # compat posts over bezoar.generate.http's own client; aiohttp only behind a proxy or when asked for
    with pytest.raises(SystemExit):
        main(["requests", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "over a lean aiohttp client" not in text
    assert "keep-alive HTTP/1.1 client" in text and "BEZOAR_COMPAT_TRANSPORT=aiohttp" in text


def test_missing_input_file(tmp_path, capsys):
    rc = main(cli_args(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", "http://127.0.0.1:9/v1"))
    assert rc == 2 and "cannot read" in capsys.readouterr().err
