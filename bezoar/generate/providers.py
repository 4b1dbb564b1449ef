"""Providers: how one endpoint sends a Request, and what its errors mean for the pool.

Three providers, chosen by ``Endpoint.provider``:

- ``openai``: the official ``openai`` async client (``AsyncOpenAI(max_retries=0)``), chat and
  completions. For OpenAI proper, or any server when SDK behaviour is wanted.
- ``anthropic``: the official ``anthropic`` async client (``AsyncAnthropic(max_retries=0)``),
  messages API (chat only).
- ``compat``: any OpenAI-compatible server (vLLM, TGI, bezoar.serve, OpenAI itself) over the
  lean keep-alive HTTP/1.1 client of ``bezoar.generate.http`` (aiohttp when a proxy is set),
  chat and completions. The SDKs spend 3 to 5 ms of CPU per call, aiohttp about 0.45 ms, the
  lean client much less (bench/pool.py): the SDKs are fine against a rate-limited API, a
  bottleneck against local inference servers.

Retries are the pool's, never the SDK's. Every provider failure is raised as a
:class:`ProviderError` of one of three kinds:

- ``retry``: 429 (with Retry-After / retry-after-ms honoured), 408, 409, 5xx and 529, timeouts,
  dropped connections, malformed response bodies;
- ``request``: a 4xx that says this request cannot succeed (400, 413, 422, a 429 "Request too
  large" for the whole tokens-per-minute limit, ...): recorded as this request's failure, with
  the provider's message;
- ``fatal``: nothing can succeed (401/403 bad key, 404 unknown model or wrong URL, 429 with
  ``insufficient_quota``): the pool stops with one message.

API keys come from environment variables only (:func:`read_api_key`); every key read is
remembered and scrubbed from every error message (:func:`redact`), so a provider echoing the key
back cannot put it in a log or a store. ``compat`` sends a key only when the endpoint names its
variable (``api_key_env``, ``--api-key-env``): never OPENAI_API_KEY unasked, which would hand the
user's OpenAI key to whatever server the base URL names.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import json
import math
import netrc
import os
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bezoar.generate.http import HTTPClient, HTTPConnectError, HTTPConnectionError, HTTPTimeout
from bezoar.generate.request import GenerateError, Request

PROVIDERS = ("openai", "anthropic", "compat")
# The variable a provider reads its key from when the endpoint names none. compat has none: its server is
# whatever --base-url says (often plain http), and the user's OpenAI key is not for it; it sends a key only
# from the variable the endpoint names (--api-key-env).
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
RETRY, REQUEST, FATAL = "retry", "request", "fatal"

_SECRETS: set[str] = set()
_MIN_FRAGMENT = 8  # runs of this many key characters or more are scrubbed from messages


def redact(text: str) -> str:
    """``text`` with every known API key, and every run of 8+ of its characters, replaced by ***.

    A secret shorter than 8 characters (a local server's placeholder key such as ``x`` or ``none``) is
    replaced only where it stands as a token of its own: replaced inside words, it would garble every
    message that holds its letters and hide nothing."""
    for secret in _SECRETS:
        if len(secret) < _MIN_FRAGMENT:
            text = re.sub(rf"(?<![\w.~+/-]){re.escape(secret)}(?![\w.~+/-])", "***", text)
        elif secret in text:
            text = text.replace(secret, "***")
        if len(secret) >= _MIN_FRAGMENT:
            for i in range(len(secret) - _MIN_FRAGMENT + 1):
                window = secret[i:i + _MIN_FRAGMENT]
                if window in text:
                    text = text.replace(window, "***")
    return text


@dataclass
class Endpoint:
    """Where requests go. Several Endpoints for one model are spread by least outstanding requests.

    provider: "openai" | "anthropic" | "compat" (see the module doc)
    base_url: e.g. "http://gpu1:8000/v1"; None means the provider's public API
    api_key_env: name of the environment variable with the key (default OPENAI_API_KEY or
        ANTHROPIC_API_KEY; "compat" has no default: it sends no key unless this names a variable,
        which must then be set)
    models: the models this endpoint serves; None means any
    name: a label for progress and records (default: provider and host)
    """

    provider: str = "compat"
    base_url: str | None = field(default=None, repr=False)  # may hold user:password and keys: see __repr__
    api_key_env: str | None = None
    models: tuple[str, ...] | None = None
    name: str | None = None

    def __repr__(self) -> str:
        # The URL without user:password and query string, as the label and every error show it:
        # a repr ends up in tracebacks, debug prints and logs.
        url = None if self.base_url is None else _safe_url(self.base_url)
        return (f"Endpoint(provider={self.provider!r}, base_url={url!r}, api_key_env={self.api_key_env!r}, "
                f"models={self.models!r}, name={self.name!r})")

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise GenerateError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if self.provider == "compat" and not self.base_url:
            raise GenerateError("the compat provider needs a base URL (e.g. http://localhost:8000/v1)")
        if self.base_url is not None:
            parts = urllib.parse.urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise GenerateError(f"base URL {_safe_url(self.base_url)!r} is not an http(s) URL")
            try:
                parts.port
            except ValueError as e:  # "Port out of range 0-65535", "Port could not be cast ..."
                shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
                raise GenerateError(f"base URL {shown!r}: {e}") from None
        if self.models is not None:
            self.models = tuple(self.models)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"{self.provider}:{_safe_url(self.base_url) if self.base_url else 'default'}"

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models


def _safe_url(url: str) -> str:
    """The URL without user:password and query string (either may hold a credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


_URL_IN_TEXT = re.compile(r"https?://[^\s'\"<>]+")


def _without_url_secrets(text: str) -> str:
    """``text`` on one line, with every URL in it cut down by :func:`_safe_url`: aiohttp's exception
    texts quote the request URL whole, query string included, and run over several lines."""

    def safe(match: re.Match) -> str:
        try:
            return _safe_url(match.group())
        except ValueError:  # not a URL after all (a bad port, say)
            return "<url>"

    return " ".join(_URL_IN_TEXT.sub(safe, text).split())


def read_api_key(endpoint: Endpoint) -> str | None:
    """The endpoint's key from the environment (never from a file or an argument)."""
    if endpoint.provider == "compat" and not endpoint.api_key_env:
        return None  # no key unless the user names its variable (see DEFAULT_KEY_ENV)
    env = endpoint.api_key_env or DEFAULT_KEY_ENV[endpoint.provider]
    key = os.environ.get(env, "").strip()
    if not key:
        state = "is empty" if env in os.environ else "is not set"
        raise GenerateError(f"no API key for {endpoint.label}: environment variable {env} {state}"
                            + ("" if endpoint.api_key_env else " (or name another one with --api-key-env)"))
    _SECRETS.add(key)
    return key


def check_key_for_header(endpoint: Endpoint, api_key: str | None) -> None:
    """Refuse a key that no HTTP header can carry (a space, a line break, a character outside
    printable ASCII, as a key pasted from a web page may hold): every call would fail, and the
    HTTP libraries' errors quote the header. The message names the variable, never the key."""
    if api_key is None or all("!" <= c <= "~" for c in api_key):
        return
    env = endpoint.api_key_env or DEFAULT_KEY_ENV[endpoint.provider]
    raise GenerateError(f"{endpoint.label}: the API key in environment variable {env} cannot be sent as an HTTP "
                        "header (Authorization, x-api-key): it holds a space, a line break or a character outside "
                        f"printable ASCII; set {env} again")


class Reply(NamedTuple):
    text: str
    input_tokens: int | None
    output_tokens: int | None
    finish_reason: str | None


class ProviderError(Exception):
    """A failed call, classified for the pool (kind: "retry" | "request" | "fatal")."""

    def __init__(self, message: str, kind: str, *, status: int | None = None, retry_after: float | None = None,
                 connect: bool = False, rate_limited: bool = False, reason: str | None = None,
                 retry_after_rounded: bool = False):
        super().__init__(redact(message))
        self.message = redact(message)
        self.kind = kind
        # A short tag for counters: "HTTP 429", "timeout", "connect", "connection", "malformed", ...
        self.reason = reason or (f"HTTP {status}" if status else "connect" if connect else "error")
        self.status = status
        self.retry_after = retry_after
        # Retry-After in whole seconds (an integer or an HTTP date) is rounded up: the server's real wait is
        # somewhere in the second before it. retry-after-ms and a fractional value are exact.
        self.retry_after_rounded = retry_after_rounded
        self.connect = connect  # could not reach the endpoint at all
        self.rate_limited = rate_limited


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred) or ``retry-after`` (seconds or HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            seconds = float(value) / 1000.0
        except ValueError:
            seconds = math.nan
        if not math.isnan(seconds):  # "NaN" is no wait at all, not a wait of none: the next header decides
            return min(max(seconds, 0.0), 3600.0)
    value = headers.get("retry-after")
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            if when.tzinfo is None:  # HTTP dates are GMT; a zone-less one is not the machine's local time
                when = when.replace(tzinfo=datetime.timezone.utc)
            seconds = when.timestamp() - time.time()
        if math.isnan(seconds):
            return None
        return min(max(seconds, 0.0), 3600.0)
    return None


def retry_after_is_rounded(headers: Any) -> bool:
    """True when the wait :func:`parse_retry_after` reads is given to the whole second: ``retry-after`` as an
    integer (Anthropic sends ``1`` for a bucket that refills in milliseconds) or as an HTTP date, with no
    usable ``retry-after-ms``."""
    if headers is None or parse_retry_after(headers) is None:
        return False
    value = headers.get("retry-after-ms")
    if value:
        try:
            if not math.isnan(float(value)):
                return False
        except ValueError:
            pass
    value = (headers.get("retry-after") or "").strip()
    try:
        return float(value).is_integer()
    except ValueError:
        return True  # an HTTP date: one-second resolution


def _error_fields(body: Any) -> tuple[str | None, str | None, str | None]:
    """(message, type, code) from an OpenAI- or Anthropic-style error body (outer or inner dict)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return None, None, None
    message, etype, code = body.get("message"), body.get("type"), body.get("code")
    return (str(message) if message is not None else None, str(etype) if etype is not None else None,
            str(code) if code is not None else None)


def status_error(status: int, body: Any, text: str, headers: Any, label: str, model: str) -> ProviderError:
    """Classify an HTTP error answer (see the module doc)."""
    message, etype, code = _error_fields(body)
    detail = message or (text.strip()[:300] if text else "") or f"HTTP {status}"
    if status == 429:
        if "insufficient_quota" in (etype, code):
            return ProviderError(f"{label}: quota exhausted (HTTP 429): {detail}", FATAL, status=status)
        if detail.lower().startswith("request too large"):
            # OpenAI's answer to one request above the whole tokens-per-minute limit: no wait makes it fit
            return ProviderError(f"request larger than the rate limit (HTTP 429): {detail}", REQUEST, status=status)
        return ProviderError(f"rate limited (HTTP 429): {detail}", RETRY, status=status,
                             retry_after=parse_retry_after(headers), rate_limited=True,
                             retry_after_rounded=retry_after_is_rounded(headers))
    if status in (408, 409, 425) or status >= 500:
        return ProviderError(f"HTTP {status}: {detail}", RETRY, status=status, retry_after=parse_retry_after(headers),
                             retry_after_rounded=retry_after_is_rounded(headers))
    if status == 400 and "credit balance is too low" in detail.lower():
        # Anthropic's answer to an exhausted balance: every other request would fail the same way (OpenAI's
        # insufficient_quota is fatal too); as a request error each input was sent and recorded as failed
        return ProviderError(f"{label}: credit balance exhausted (HTTP 400): {detail}", FATAL, status=status)
    if status == 401:
        return ProviderError(f"{label} rejected the API key (HTTP 401): {detail}", FATAL, status=status)
    if status == 403:
        return ProviderError(f"{label} refused access (HTTP 403): {detail}", FATAL, status=status)
    if status == 404:
        return ProviderError(f"{label} answered 404 for model {model!r} (unknown model or wrong base URL): {detail}",
                             FATAL, status=status)
    return ProviderError(f"HTTP {status}: {detail}", REQUEST, status=status)


def _chat_messages(request: Request) -> list:
    if request.system is None:
        return list(request.messages)
    return [{"role": "system", "content": request.system}, *request.messages]


def _openai_params(request: Request) -> dict:
    params = {}
    if request.max_tokens is not None:
        params["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.top_p is not None:
        params["top_p"] = request.top_p
    if request.stop is not None:
        params["stop"] = request.stop
    return params


def _text_of_content(content: Any) -> Any:
    """A chat answer's text: the content as sent, or the text parts of a list of parts joined (some compatible
    servers send one: the openai provider stored the list, compat retried it as malformed until it gave up)."""
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) else getattr(p, "text", None) for p in content
                 if (p.get("type") if isinstance(p, dict) else getattr(p, "type", None)) == "text"]
        if not all(isinstance(p, str) for p in parts):
            raise TypeError("a text part of the answer holds no text")
        return "".join(parts)
    return content


def _openai_reply(payload: Any, kind: str) -> Reply:
    """Text and usage from an OpenAI chat / completion JSON body (raises KeyError etc. if malformed)."""
    choice = payload["choices"][0]
    text = _text_of_content(choice["message"]["content"]) if kind == "chat" else choice["text"]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise TypeError(f"answer text is {type(text).__name__}, not a string")
    usage = payload.get("usage")
    if not isinstance(usage, dict):  # absent, null, or not what OpenAI sends: the answer still counts
        usage = {}
    return Reply(text, _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")),
                 choice.get("finish_reason"))


def _token_count(value: Any) -> int | None:
    """A token count from a usage field: an int (also sent as "12" or 12.0 by some servers), else None."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def proxy_for(url: str) -> str | None:
    """The proxy the environment (http_proxy, https_proxy, all_proxy, no_proxy) names for ``url``."""
    proxies = urllib.request.getproxies_environment()
    parts = urllib.parse.urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxy


def _basic_auth(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    _SECRETS.update(secret for secret in (token, password) if secret)  # scrubbed from messages, like keys
    return "Basic " + token


def _url_or_netrc_auth(url: str) -> str | None:
    """An Authorization value from credentials in the URL, else from ~/.netrc (or $NETRC) for its
    host, else None. Read once per provider, not per request."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:
        return _basic_auth(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not parts.hostname or not os.path.exists(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(parts.hostname)
    except (OSError, netrc.NetrcParseError):
        return None  # an unreadable .netrc is not this request's business
    if entry is None:
        return None
    login, _, password = entry
    return _basic_auth(login or "", password or "")


class CompatProvider:
    """OpenAI-compatible HTTP API over the lean keep-alive client in ``bezoar.generate.http``
    (at most ``connections`` connections), or over aiohttp when a proxy variable applies to the
    endpoint (the lean client speaks only directly to the server). Neither transport follows a
    redirect: it is a fatal error naming the target (see ``send``).

    transport: "auto" (as just said), "lean" or "aiohttp" (to force one, e.g. in tests); None reads
    the environment variable BEZOAR_COMPAT_TRANSPORT (default "auto"), so a user can fall back to
    aiohttp without code changes
    """

    TRANSPORTS = ("auto", "lean", "aiohttp")

    def __init__(self, endpoint: Endpoint, api_key: str | None, connections: int, transport: str | None = None):
        if transport is None:
            transport = os.environ.get("BEZOAR_COMPAT_TRANSPORT", "").strip() or "auto"
            if transport not in self.TRANSPORTS:
                raise GenerateError(f"BEZOAR_COMPAT_TRANSPORT={transport!r}: choose one of "
                                    f"{', '.join(self.TRANSPORTS)}")
        if transport not in self.TRANSPORTS:
            raise GenerateError(f"unknown compat transport {transport!r}; choose one of {', '.join(self.TRANSPORTS)}")
        self.endpoint, self.label = endpoint, endpoint.label
        self._api_key = api_key
        self._sends_credentials = False  # a key, or Basic credentials from the URL or ~/.netrc (set by open)
        self._connections = connections
        self._transport = transport
        base = endpoint.base_url.rstrip("/")
        self._paths = {"chat": "/chat/completions", "completion": "/completions"}
        self._urls = {kind: base + path for kind, path in self._paths.items()}  # for aiohttp
        self._http: HTTPClient | None = None
        self._session = None
        self._timeouts: dict[float, Any] = {}

    def __repr__(self) -> str:
        return f"CompatProvider({self.label!r})"

    @property
    def transport(self) -> str | None:
        """"lean" or "aiohttp" once open, else None."""
        return "lean" if self._http is not None else "aiohttp" if self._session is not None else None

    async def open(self) -> None:
        check_key_for_header(self.endpoint, self._api_key)
        url = self.endpoint.base_url
        # Basic credentials from the URL or ~/.netrc (aiohttp finds the same ones itself): read here
        # on either transport, so that an answer quoting them has them scrubbed.
        authorization = "Bearer " + self._api_key if self._api_key else _url_or_netrc_auth(url)
        self._sends_credentials = authorization is not None
        use_aiohttp = self._transport == "aiohttp" or (self._transport == "auto" and proxy_for(url) is not None)
        if use_aiohttp:
            import aiohttp

            self._aiohttp = aiohttp
            headers = {"Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = "Bearer " + self._api_key
            connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0, ttl_dns_cache=300,
                                             keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, headers=headers, trust_env=True)
            return
        try:
            self._http = HTTPClient(url, headers={"Authorization": authorization} if authorization else None,
                                    connections=self._connections)
        except ValueError as e:  # a key with a line break in it; the message names the header only
            raise GenerateError(f"{self.label}: {e}") from None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: Request, model: str, timeout: float) -> Reply:
        body: dict = {"model": model}
        if request.kind == "chat":
            body["messages"] = _chat_messages(request)
        else:
            body["prompt"] = request.prompt
        body.update(_openai_params(request))
        data = json.dumps(body).encode()
        if self._http is not None:
            try:
                status, headers, raw = await self._http.post(self._paths[request.kind], data, timeout)
            except HTTPTimeout:
                raise _timeout_error(self.label, timeout) from None
            except HTTPConnectError as e:
                raise ProviderError(f"cannot connect: {e}", RETRY, connect=True) from None
            except HTTPConnectionError as e:
                raise ProviderError(f"connection to {self.label} failed: {e}", RETRY, reason="connection") from None
        else:
            status, headers, raw = await self._post_aiohttp(request.kind, data, timeout)
        if 300 <= status < 400:
            # Neither transport follows redirects (aiohttp would turn a 301/302 POST into a GET): every
            # call would get the same answer, so retrying cannot help. The base URL is the thing to fix.
            target = headers.get("location")  # names are lower-case (lean) or case-blind (aiohttp)
            try:
                where = f" to {_safe_url(urllib.parse.urljoin(self._urls[request.kind], target))}" if target else ""
            except ValueError:  # a Location that is not a URL (a bad port, say)
                where = ""
            raise ProviderError(f"{self.label} answered HTTP {status}, a redirect{where}: set the base URL to where "
                                "the API really is", FATAL, status=status)
        if status >= 400:
            text = raw.decode("utf-8", "replace")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            error = status_error(status, parsed, text, headers, self.label, model)
            if status == 401 and not self._sends_credentials:
                # The server wants a key and none went: compat sends one only when its variable is named.
                error = ProviderError(f"{self.label} requires an API key (HTTP 401) and none was sent: compat sends "
                                      "one only when --api-key-env NAME (a recipe's api_key_env) names the variable "
                                      f"that holds it (the server said: {_error_fields(parsed)[0] or text.strip()[:300] or 'HTTP 401'})",
                                      FATAL, status=status)
            raise error
        try:
            return _openai_reply(json.loads(raw), request.kind)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ProviderError(f"malformed answer from {self.label}: {type(e).__name__}: {e}", RETRY,
                                reason="malformed") from None

    async def _post_aiohttp(self, kind: str, data: bytes, timeout: float) -> tuple[int, Any, bytes]:
        aiohttp = self._aiohttp
        client_timeout = self._timeouts.get(timeout)
        if client_timeout is None:
            client_timeout = self._timeouts[timeout] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._session.post(self._urls[kind], data=data, timeout=client_timeout,
                                          allow_redirects=False) as response:
                return response.status, response.headers, await response.read()
        except getattr(aiohttp, "ConnectionTimeoutError", ()) as e:  # aiohttp >= 3.10: no connection at all
            raise ProviderError(f"cannot connect: {_without_url_secrets(str(e) or 'timed out')}", RETRY,
                                connect=True) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise _timeout_error(self.label, timeout) from None
        except aiohttp.ClientConnectorError as e:
            raise ProviderError(f"cannot connect: {_without_url_secrets(_os_reason(e))}", RETRY,
                                connect=True) from None
        except aiohttp.ClientError as e:
            reason = _without_url_secrets(f"{type(e).__name__}: {e}")
            raise ProviderError(f"connection to {self.label} failed: {reason}", RETRY, reason="connection") from None


def _os_reason(e: BaseException) -> str:
    """The operating system's words for a connection failure ("Connection refused", ...), found
    along the exception chain; else the exception's own text."""
    seen = e
    for _ in range(8):
        if seen is None:
            break
        for candidate in (seen, getattr(seen, "os_error", None)):
            if isinstance(candidate, OSError) and candidate.errno:
                # errno > 0: the OS's text; DNS failures (socket.gaierror) carry their own
                return os.strerror(candidate.errno) if candidate.errno > 0 else str(candidate.strerror)
        seen = seen.__cause__ or seen.__context__
    return f"{type(e).__name__}: {e}"


def _timeout_error(label: str, timeout: float) -> ProviderError:
    return ProviderError(f"no answer from {label} within {timeout:g} s", RETRY, reason="timeout")


def _sdk_connection_error(e: BaseException, label: str) -> ProviderError:
    cause = e.__cause__ or e.__context__
    if type(cause).__name__ in ("ConnectError", "ConnectTimeout"):
        return ProviderError(f"cannot connect: {_os_reason(cause)}", RETRY, connect=True)
    reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
    return ProviderError(f"connection to {label} failed: {reason}", RETRY, reason="connection")


class OpenAISDKProvider:
    """The official ``openai`` async client, with its own retries off."""

    def __init__(self, endpoint: Endpoint, api_key: str | None, connections: int):
        self.endpoint, self.label = endpoint, endpoint.label
        self._api_key = api_key
        self._client = None

    def __repr__(self) -> str:
        return f"OpenAISDKProvider({self.label!r})"

    async def open(self) -> None:
        check_key_for_header(self.endpoint, self._api_key)
        import openai

        self._openai = openai
        self._client = openai.AsyncOpenAI(api_key=self._api_key or "none", base_url=self.endpoint.base_url,
                                          max_retries=0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def send(self, request: Request, model: str, timeout: float) -> Reply:
        openai = self._openai
        params = _openai_params(request)
        if request.kind == "chat" and "max_tokens" in params and _official_openai(str(self._client.base_url)):
            # OpenAI's chat API: max_tokens is deprecated and refused by its reasoning models (o-series, gpt-5:
            # "Use 'max_completion_tokens' instead"); a compatible server behind base_url gets max_tokens
            params["max_completion_tokens"] = params.pop("max_tokens")
        try:
            if request.kind == "chat":
                response = await self._client.chat.completions.create(
                    model=model, messages=_chat_messages(request), timeout=timeout, **params)
                choice = response.choices[0]
                text = _text_of_content(choice.message.content)
            else:
                response = await self._client.completions.create(model=model, prompt=request.prompt,
                                                                 timeout=timeout, **params)
                choice = response.choices[0]
                text = choice.text
            if text is not None and not isinstance(text, str):
                raise ValueError(f"answer text is {type(text).__name__}, not a string")
            usage = response.usage
            reply = Reply(text or "", getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None),
                          choice.finish_reason)
        except TypeError as e:
            if "unexpected keyword argument" in str(e):  # the SDK, not the answer: every call would fail the same way
                raise ProviderError(f"the installed openai SDK refused the call ({e}); upgrade it "
                                    "(pip install -U openai)", FATAL) from None
            raise ProviderError(f"malformed answer from {self.label}: TypeError: {e}", RETRY,
                                reason="malformed") from None
        except openai.APITimeoutError:
            raise _timeout_error(self.label, timeout) from None
        except openai.APIConnectionError as e:
            raise _sdk_connection_error(e, self.label) from None
        except openai.APIStatusError as e:
            raise status_error(e.status_code, e.body, "", e.response.headers, self.label, model) from None
        except (ValueError, IndexError, AttributeError, KeyError) as e:
            # a body not JSON or not the expected shape (an error object or null choices in a 200): a TypeError got
            # through, stopped the run and lost the answers in flight (TypeError: above)
            raise ProviderError(f"malformed answer from {self.label}: {type(e).__name__}: {e}", RETRY,
                                reason="malformed") from None
        return reply


def _official_openai(base_url: str | None) -> bool:
    """Whether an ``openai`` endpoint is OpenAI's own API (no base_url, or api.openai.com)."""
    if base_url is None:
        return True
    from urllib.parse import urlsplit

    return (urlsplit(base_url).hostname or "").lower() == "api.openai.com"


class AnthropicSDKProvider:
    """The official ``anthropic`` async client (messages API), with its own retries off.

    System messages inside ``messages`` are moved into Anthropic's ``system`` field (see
    :func:`_anthropic_system`); a request without ``max_tokens`` gets ``default_max_tokens`` (the
    API requires one)."""

    default_max_tokens = 1024

    def __init__(self, endpoint: Endpoint, api_key: str | None, connections: int):
        self.endpoint, self.label = endpoint, endpoint.label
        self._api_key = api_key
        self._client = None

    def __repr__(self) -> str:
        return f"AnthropicSDKProvider({self.label!r})"

    async def open(self) -> None:
        check_key_for_header(self.endpoint, self._api_key)
        import anthropic

        self._anthropic = anthropic
        self._client = anthropic.AsyncAnthropic(api_key=self._api_key, base_url=self.endpoint.base_url,
                                                max_retries=0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def send(self, request: Request, model: str, timeout: float) -> Reply:
        anthropic = self._anthropic
        if request.kind != "chat":
            raise ProviderError("the anthropic provider has no text-completion endpoint", REQUEST,
                                reason="unsupported")
        params: dict = {"max_tokens": request.max_tokens or self.default_max_tokens}
        system, messages = _anthropic_system(request)
        if system:
            params["system"] = system
        if request.stop is not None:
            blank = [stop for stop in request.stop if not stop.strip()]
            if blank:  # the API answers 400 to each: refused here, before a paid attempt
                raise ProviderError(f"stop sequences {blank!r}: Anthropic takes none that is only whitespace",
                                    REQUEST, reason="unsupported")
            params["stop_sequences"] = request.stop
        # Sampling parameters go in extra_body: recent SDK releases dropped them from the
        # signature of messages.create, while the API still takes them.
        sampling = {name: getattr(request, name) for name in ("temperature", "top_p")
                    if getattr(request, name) is not None}
        if sampling:
            params["extra_body"] = sampling
        try:
            response = await self._client.messages.create(model=model, messages=messages, timeout=timeout, **params)
        except anthropic.APITimeoutError:
            raise _timeout_error(self.label, timeout) from None
        except anthropic.APIConnectionError as e:
            raise _sdk_connection_error(e, self.label) from None
        except anthropic.APIStatusError as e:
            raise status_error(e.status_code, e.body, "", e.response.headers, self.label, model) from None
        except (ValueError, IndexError, AttributeError, TypeError, KeyError) as e:  # a body the SDK cannot parse
            raise ProviderError(f"malformed answer from {self.label}: {type(e).__name__}: {e}", RETRY,
                                reason="malformed") from None
        try:  # the reply's shape, checked as the OpenAI one is (a text or null 200 body raised out of the pool)
            text = "".join(block.text for block in response.content if block.type == "text")
            if not isinstance(text, str):
                raise TypeError(f"answer text is {type(text).__name__}, not a string")
            usage = response.usage
            # input_tokens counts the tokens after the last cache breakpoint; the tokens written to the cache are
            # billed (1.25x) and limited as input too: added. Cache reads (0.1x, not in the input-token rate limit
            # of current models) are left out: added at the full price, a cached prompt's cost read 10x the bill.
            prompt = _token_count(getattr(usage, "input_tokens", None))
            if prompt is not None:
                prompt += _token_count(getattr(usage, "cache_creation_input_tokens", None)) or 0
            reply = Reply(text, prompt, _token_count(getattr(usage, "output_tokens", None)), response.stop_reason)
        except (ValueError, IndexError, AttributeError, TypeError, KeyError) as e:
            raise ProviderError(f"malformed answer from {self.label}: {type(e).__name__}: {e}", RETRY,
                                reason="malformed") from None
        return reply


def _anthropic_system(request: Request) -> tuple[str | list | None, list]:
    """Anthropic's ``system`` for a chat request, and its messages without the system ones.

    The request's ``system`` and its system (and developer) messages, in order: joined by a blank
    line when all are strings; otherwise as Anthropic's list of text blocks (a string becomes one
    block, a message's blocks are passed as they are, ``cache_control`` and all). Anything but text
    in a system message (an image, say) is a ProviderError of kind ``request``: the API takes text
    only there, so this request is recorded as failed and the run goes on."""
    parts: list = [request.system] if request.system else []
    messages = []
    for i, message in enumerate(request.messages):
        if message["role"] not in ("system", "developer"):
            messages.append(message)
            continue
        content = message["content"]
        if isinstance(content, list):
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                if kind != "text" or not isinstance(block.get("text"), str):
                    raise ProviderError(f"message {i} ({message['role']}): the anthropic provider takes only text "
                                        f"blocks in a system message, got a {kind!r} block", REQUEST,
                                        reason="unsupported")
        elif not isinstance(content, str):
            raise ProviderError(f"message {i} ({message['role']}): the content of a system message must be text "
                                f"or a list of text blocks, got {type(content).__name__}", REQUEST,
                                reason="unsupported")
        parts.append(content)
    if not parts:
        return None, messages
    if all(isinstance(part, str) for part in parts):
        return "\n\n".join(parts), messages
    blocks = []
    for part in parts:
        blocks.extend([{"type": "text", "text": part}] if isinstance(part, str) else part)
    return blocks, messages


def make_provider(endpoint: Endpoint, connections: int):
    """The provider object for an endpoint (reads its key from the environment now)."""
    api_key = read_api_key(endpoint)
    cls = {"openai": OpenAISDKProvider, "anthropic": AnthropicSDKProvider, "compat": CompatProvider}[endpoint.provider]
    return cls(endpoint, api_key, connections)
