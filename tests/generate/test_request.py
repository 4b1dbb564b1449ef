"""Request validation and the stable key."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from bezoar.generate.request import Request, Result, Usage

BASE = dict(messages=[{"role": "user", "content": "hello"}], system="be brief", max_tokens=16, temperature=0.5,
            top_p=0.9, stop=["\n"], id="a")


def test_key_is_stable_and_hex():
    a, b = Request(**BASE), Request(**BASE)
    assert a.key("m") == b.key("m")
    assert len(a.key("m")) == 32 and int(a.key("m"), 16) >= 0
    # A golden value: the key must not change between versions, or reruns would resend everything.
    assert Request(messages=[{"role": "user", "content": "x"}], id=1).key("m") == "d6c3d25fb363717fac2457780fa3f94f"


@pytest.mark.parametrize("field,value", [
    ("messages", [{"role": "user", "content": "hello!"}]),
    ("system", "be long"), ("max_tokens", 17), ("temperature", 0.6), ("top_p", 0.8), ("stop", ["."]),
    ("id", "b"), ("model", "other"),
])
def test_every_part_of_the_key_matters(field, value):
    assert Request(**{**BASE, field: value}).key("m") != Request(**BASE).key("m")


def test_what_is_not_in_the_key():
    assert Request(**BASE, meta={"x": 1}).key("m") == Request(**BASE).key("m")
    # the pool's default model and a request naming the same model are the same request
    assert Request(**BASE, model="m").key(None) == Request(**BASE).key("m")
    # 1 and 1.0 are the same temperature; a single stop string is a list of one
    assert Request(**{**BASE, "temperature": 1}).key("m") == Request(**{**BASE, "temperature": 1.0}).key("m")
    assert Request(**{**BASE, "stop": "\n"}).key("m") == Request(**BASE).key("m")


def test_kind_is_in_the_key():
    chat = Request(messages=[{"role": "user", "content": "x"}])
    completion = Request(kind="completion", prompt="x")
    assert chat.key("m") != completion.key("m")


@pytest.mark.parametrize("kwargs,match", [
    (dict(messages=[]), "non-empty"),
    (dict(messages=[{"content": "x"}]), "role"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "unknown role"),
    (dict(kind="completion"), "prompt"),
    (dict(kind="completion", prompt="x", system="s"), "prompt only"),
    (dict(kind="poem", prompt="x"), "kind"),
    (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "user", "content": "x"}], temperature="hot"), "temperature"),
    (dict(messages=[{"role": "user", "content": "x"}], stop=[1]), "stop"),
])
def test_bad_requests_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Request(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(meta={"day": datetime.date(2024, 1, 1)}), "Request.meta must be JSON data.*date"),
    (dict(meta={1, 2}), "Request.meta must be JSON data.*set"),
    (dict(meta={"file": Path("a.txt")}), "Request.meta must be JSON data"),
    (dict(meta={"note": "\ud83d"}), r"Request.meta holds text that is not valid Unicode \('\\ud83d'"),
    (dict(id=Path("a")), "Request.id must be JSON data"),
    (dict(messages=[{"role": "user", "content": "half \ud83d"}]), "Request.messages holds text"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), "Request.messages holds"),
    (dict(kind="completion", prompt="\ud83d", messages=None), "Request.prompt holds text"),
    (dict(system="\ud83d rules"), "Request.system holds text"),
    (dict(stop=["\udc80"]), "Request.stop holds text"),
])
def test_data_that_cannot_be_stored_is_refused_up_front(kwargs, match):
    # Found only when the answer is stored, the call would be paid for, its answer lost, and
    # every rerun would pay again.
    with pytest.raises(ValueError, match=match):
        Request(**{"messages": [{"role": "user", "content": "x"}], "id": 1, **kwargs})


def test_the_model_name_given_to_key_must_be_text():
    with pytest.raises(ValueError, match="not valid Unicode"):
        Request(messages=[{"role": "user", "content": "x"}]).key("m\udcff")


def test_result_record_round_trip():
    ok = Result("k1", id=3, response="hi", usage=Usage(5, 2), attempts=2, latency_s=0.123456, model="m",
                endpoint="compat:x", finish_reason="stop", meta={"a": 1})
    record = ok.to_record()
    assert list(record)[:3] == ["key", "id", "ok"] and record["ok"] is True
    back = Result.from_record(record)
    assert (back.response, back.usage, back.meta, back.attempts, back.cached) == ("hi", Usage(5, 2), {"a": 1}, 2, True)
    bad = Result("k2", id=4, error="HTTP 400: no", error_type="request", attempts=1).to_record()
    assert bad["ok"] is False and bad["error"] == "HTTP 400: no" and "response" not in bad
    assert not Result.from_record(bad).ok
