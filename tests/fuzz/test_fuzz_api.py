"""Fuzzing every endpoint of a real ``tokenflow serve`` process over real HTTP (hypothesis).

One gateway process (``--demo``: two embedded simulated engines and the demo's control endpoints, an API key
required on /v1/) serves every example. Bodies are built from the request schema and then mutated (wrong types,
missing fields, huge numbers, NaN and infinities, unicode, deep nesting, huge arrays, bytes that are not JSON),
sent with any content type and with odd ``X-TokenFlow-Rate``, ``X-TokenFlow-Pacing``, ``Last-Event-ID``,
``Authorization`` and ``Accept`` values. What a client relies on, for every example:

- never a 5xx;
- every 4xx is OpenAI's error format (``{"error": {"message", "type", "param", "code"}}``) as application/json;
- the server's log gains no error line and no traceback;

and after each test a valid request is still served and the process is still up. Deterministic
(``derandomize``: the same examples on every run, no example database) and bounded (about a minute on the 2-core
VM). A bug found here is fixed in the gateway and kept as an ``@example``.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.procs import Proc, free_port

KEY = "sk-fuzz-key"
OTHER_KEY = "sk-fuzz-other"
MODELS = ("sim-small", "sim-small-fcfs")  # the demo's two engines
ERROR_FIELDS = {"message", "type", "param", "code"}

FUZZ = settings(
    derandomize=True,  # the same examples on every run
    database=None,  # and nothing remembered between runs
    deadline=None,  # a real process on a shared machine: latency is not the property
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
    print_blob=True,
)


@dataclass
class Server:
    proc: Proc
    host: str
    port: int
    live_sid: str = ""  # a stream whose client never reads: live for the whole module
    done_sid: str = ""  # a stream that ended: resumable (replayed) from the session store
    live_sock: socket.socket | None = None
    log_pos: int = 0

    def new_log_problems(self) -> list[str]:
        """Error lines and tracebacks the server logged since the last call."""
        with open(self.proc.log, "rb") as f:
            f.seek(self.log_pos)
            data = f.read()
        # Only whole lines: a line being written is read next time.
        end = data.rfind(b"\n") + 1
        self.log_pos += end
        bad = []
        for line in data[:end].decode(errors="replace").splitlines():
            if "Traceback" in line:
                bad.append(line)
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the start-up banner
            if isinstance(rec, dict) and (rec.get("level") in ("error", "critical") or "exc" in rec):
                bad.append(line)
        return bad


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


def request(srv: Server, method: str, target: str, headers: list[tuple[str, bytes]] | None = None,
            body: bytes | None = None) -> Answer:
    """One request on a fresh connection, its answer read to the end (the fuzzing server's rates make streamed
    answers short). Then, unless the server closes the connection, ``GET /healthz`` on the same connection:
    aiohttp handles a connection's next request only once the previous handler has returned, so whatever that
    handler logged (after the last byte of a streamed answer, too) is in the log when :func:`check` reads it."""
    target = target.replace("@LIVE@", srv.live_sid).replace("@DONE@", srv.done_sid)
    headers = [(k, v.replace(b"@DONE@", srv.done_sid.encode())) for k, v in headers or ()]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    conn.connect()
    conn.auto_open = 0  # the sync request must go on this connection, never on a new one
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)).encode())
        conn.endheaders(body)
        resp = conn.getresponse()
        ans = Answer(resp.status, resp.getheader("Content-Type", ""), resp.read())
        if not resp.will_close:
            conn.request("GET", "/healthz")
            sync = conn.getresponse()
            sync.read()
            assert sync.status == 200, sync.status
        return ans
    finally:
        conn.close()


def check(srv: Server, ans: Answer, what: str) -> None:
    """The properties every answer has, whatever was asked."""
    problems = srv.new_log_problems()  # read first: a failing example must not leave its lines to the next one
    assert ans.status < 500, f"{what}: {ans.status} {ans.body[:300]!r}"
    if 400 <= ans.status < 500:
        assert ans.content_type.split(";")[0].strip() == "application/json", f"{what}: {ans.content_type}"
        if ans.body:  # (HEAD: no body)
            err = json.loads(ans.body)
            assert isinstance(err, dict) and set(err) == {"error"}, f"{what}: {err}"
            e = err["error"]
            assert set(e) == ERROR_FIELDS, f"{what}: {e}"
            assert isinstance(e["message"], str) and e["message"] and isinstance(e["type"], str), f"{what}: {e}"
            assert e["param"] is None or isinstance(e["param"], str), f"{what}: {e}"
            assert e["code"] is None or isinstance(e["code"], str), f"{what}: {e}"
    assert not problems, f"{what}: the server logged:\n" + "\n".join(problems[:5])


def _auth(key: str = KEY) -> tuple[str, bytes]:
    return ("Authorization", f"Bearer {key}".encode())


def _json_headers(key: str = KEY) -> list[tuple[str, bytes]]:
    return [_auth(key), ("Content-Type", b"application/json")]


def _head_of_stream(srv: Server, body: dict[str, Any]) -> tuple[socket.socket, str]:
    """POST a streamed chat request on a raw socket; the socket (unread beyond the head) and the stream id."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection((srv.host, srv.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing beyond the head is taken from the socket
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("x-tokenflow-stream-id:"):
            return sock, line.split(":", 1)[1].strip()
    raise AssertionError(head)


def valid_chat(srv: Server) -> None:
    """A good request is answered in full."""
    body = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    ans = request(srv, "POST", "/v1/chat/completions", _json_headers(), json.dumps(body).encode())
    assert ans.status == 200, ans
    assert json.loads(ans.body)["choices"][0]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logdir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = {
        **os.environ,
        "TOKENFLOW_AUTH__KEYS": json.dumps([{"name": "fuzz", "key": KEY}, {"name": "other", "key": OTHER_KEY}]),
        "TOKENFLOW_DEMO__MAX_USERS": "2",  # a burst the fuzzer starts stays small
        "TOKENFLOW_SERVER__LOG_LEVEL": "info",
        "TOKENFLOW_SCHEDULER__TICK_INTERVAL_S": "0.05",
        # Fast readers only: an accepted streamed answer is read to its end within a second or so (rates outside
        # 100-1000 tokens/s are rejected, which the fuzzing also covers).
        "TOKENFLOW_STREAMS__MIN_RATE": "100",
        "TOKENFLOW_STREAMS__DEFAULT_RATE": "500",
        "TOKENFLOW_STREAMS__RATE_CLASSES": json.dumps({"reading": 500, "listening": 300}),
    }
    proc = Proc("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--demo", "--host", "127.0.0.1",
                            "--port", str(port)], logdir, env=env, url=f"http://127.0.0.1:{port}")
    srv = Server(proc, "127.0.0.1", port)
    try:
        proc.wait_http("/readyz")
        done_sock, srv.done_sid = _head_of_stream(srv, {
            "model": MODELS[0], "messages": [{"role": "user", "content": "done"}], "stream": True,
            "max_tokens": 3, "tokenflow": {"pacing": "none"}})
        while done_sock.recv(65536):  # read it to the end: the stream ends and stays resumable
            pass
        done_sock.close()
        srv.live_sock, srv.live_sid = _head_of_stream(srv, {
            "model": MODELS[0], "messages": [{"role": "user", "content": "live"}], "stream": True,
            "max_tokens": 2000, "tokenflow": {"rate": 100}})
        yield srv
    finally:
        if srv.live_sock is not None:
            srv.live_sock.close()
        proc.stop()
        assert proc.popen.returncode == 0, f"the gateway exited with {proc.popen.returncode}:\n{proc.tail()}"


@pytest.fixture
def srv(server: Server) -> Iterator[Server]:
    """The module's server, checked after each test: still up, still serving, nothing bad in its log."""
    server.new_log_problems()
    yield server
    assert server.proc.popen.poll() is None, f"the gateway died:\n{server.proc.tail()}"
    valid_chat(server)
    assert not server.new_log_problems()


# ----- strategies -----

BIG_INTS = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400])
NUMBERS = st.one_of(st.integers(), BIG_INTS, st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 0.0, -0.0, 1e-320, 1e308]))
TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "\u0000", "²", "٣", "\ud800", "🦀" * 50, "nan",
                                                         "inf", "-inf", "1e999", "reading", "smooth", "x" * 5000]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                           max_leaves=12)


def _message() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"]),
         "content": st.one_of(st.text(max_size=40), st.just([{"type": "text", "text": "part"}]))})


TOKENFLOW = st.fixed_dictionaries({}, optional={
    "rate": st.one_of(st.floats(100, 1000), st.sampled_from(["reading", "listening", "12.5", 0.1])),
    "pacing": st.sampled_from(["smooth", "phrase", "none"]),
})


def chat_schema() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS), "messages": st.lists(_message(), min_size=1, max_size=3),
         "stream": st.booleans(), "max_tokens": st.integers(1, 6)},
        optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "tokenflow": TOKENFLOW,
                  "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "n": st.just(1),
                  "max_completion_tokens": st.integers(1, 6), "user": st.text(max_size=10),
                  "stop": st.lists(st.text(max_size=4), max_size=2)})


def completion_schema() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS),
         "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), min_size=1, max_size=1),
                             st.lists(st.integers(0, 50000), min_size=1, max_size=8)),
         "stream": st.booleans(), "max_tokens": st.integers(1, 6)},
        optional={"temperature": st.floats(0, 2), "tokenflow": TOKENFLOW, "echo": st.booleans()})


@st.composite
def mutated(draw: st.DrawFn, schema: st.SearchStrategy[dict[str, Any]]) -> Any:
    """A body from ``schema`` with up to four mutations: a field set to any JSON value, removed, added, a nested
    field (``tokenflow``, ``stream_options``, a message) changed, or the whole body replaced."""
    body: Any = draw(schema)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "delete", "add", "nested", "replace", "wrap"]))
        if not isinstance(body, dict):
            break
        keys = sorted(body)
        if op == "set" and keys:
            body[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        elif op == "delete" and keys:
            del body[draw(st.sampled_from(keys))]
        elif op == "add":
            name = draw(st.sampled_from(["tokenflow", "stream_options", "n", "priority", "vllm_xargs", "temperature",
                                         "max_completion_tokens", "top_p", "logprobs", "continue_final_message"])
                        | TEXT)
            body[name] = draw(JSON_VALUES)
        elif op == "nested":
            where = draw(st.sampled_from(["tokenflow", "stream_options", "messages"]))
            inner = body.get(where)
            if where == "messages" and isinstance(inner, list) and inner and isinstance(inner[0], dict):
                inner[0][draw(st.sampled_from(["role", "content", "name"]) | TEXT)] = draw(JSON_VALUES)
            else:
                sub = inner if isinstance(inner, dict) else {}
                sub[draw(st.sampled_from(["rate", "pacing", "include_usage"]) | TEXT)] = draw(JSON_VALUES)
                body[where] = sub
        elif op == "replace":
            body = draw(JSON_VALUES)
        elif op == "wrap":
            body = [body]
    return body


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN and Infinity as Python writes them (not JSON)


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),  # deep nesting
    st.integers(1, 3000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    st.integers(1, 200_000).map(lambda n: b"[" + b"1," * n + b"1]"),  # huge arrays
    st.sampled_from([b"", b"null", b"{}", b"[]", b"{", b'{"model": NaN}', b'{"model": "sim-small"}\x00',
                     b"\xff\xfe{\x00}\x00", b'{"a": 1e99999}', b'{"a": -}', b'\xef\xbb\xbf{"model": "sim-small"}',
                     b'{"model": "\\ud800"}', b'{"messages": [' + b'{"role":"user","content":"x"},' * 5000 + b"{}]}"]),
)


def body_bytes(schema: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(schema).map(_encode), mutated(schema).map(_encode), RAW_BODIES)


HEADER_CHARS = st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.sampled_from(["\t"])


def _bytes_of(s: str, latin: bool) -> bytes:
    try:
        return s.encode("latin-1") if latin else s.encode()
    except UnicodeEncodeError:
        return s.encode()


def header_value(interesting: list[str]) -> st.SearchStrategy[bytes]:
    """Header values a client can send (field-value: visible characters, spaces, obs-text) as ASCII, latin-1 or
    UTF-8 bytes, often an interesting value, alone or followed by arbitrary bytes (leading and trailing
    whitespace is trimmed by HTTP itself)."""
    picked = st.builds(_bytes_of, st.sampled_from(interesting), st.booleans())
    raw = st.binary(max_size=12).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
    return st.one_of(
        picked, picked,
        st.tuples(picked, raw).map(lambda t: t[0] + t[1]),
        st.builds(_bytes_of, st.text(HEADER_CHARS, max_size=30), st.booleans()),
        st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=12).map(str.encode),
        st.integers(1, 8000).map(lambda n: b"a" * n),  # long, under aiohttp's 8190-byte field limit
    ).map(bytes.strip)


RATES = ["8", "0", "-1", "nan", "NaN", "inf", "-inf", "1e999", "1e-999", "0x10", "1_000", "reading", "listening ",
         "²", "٣", "9" * 400, "1e308", "0.1", "1000", "1000.0000001", "True", "null"]
PACINGS = ["smooth", "phrase", "none", "SMOOTH", "", "null", "phrase\u00a0"]
AUTHS = [f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} ", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", KEY,
         f"Bearer {OTHER_KEY}", f"Bearer {KEY}\u00e9", "Bearer \u00ff\u00fe", "Bearer sk-é", "Bearer "]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "multipart/form-data", "application/octet-stream", "*/*", "", "application/json; charset=nope",
                 "text/event-stream", "application/x-ndjson; a=\"b"]
ACCEPTS = ["application/json", "text/html", "text/event-stream", "*/*", ""]


ODD = {  # other headers a client may send: conditional and partial requests, an expectation
    "Range": ["bytes=0-1", "bytes=999999-", "bytes=5-1", "bytes=-0", "lines=1", "bytes=0-0,1-1,2-2"],
    "If-Modified-Since": ["Thu, 01 Jan 2099 00:00:00 GMT", "yesterday", ""],
    "If-None-Match": ["*", '"x"', "W/"],
    "Expect": ["100-continue", "200-ok"],
    "X-Forwarded-For": ["1.2.3.4", "::1, unknown"],
}


@st.composite
def headers(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """An Authorization (usually the right key), a content type, and any of the gateway's own headers and a few
    more. ``@DONE@`` in a value stands for the id of a stream that ended (see :func:`request`)."""
    out: list[tuple[str, bytes]] = []
    if draw(st.integers(0, 3)) > 0:
        out.append(_auth())
    else:
        out.append(("Authorization", draw(header_value(AUTHS))))
    if draw(st.booleans()):
        out.append(("Content-Type", draw(header_value(CONTENT_TYPES))))
    else:
        out.append(("Content-Type", b"application/json"))
    if draw(st.booleans()):
        out.append(("X-TokenFlow-Rate", draw(header_value(RATES))))
    if draw(st.integers(0, 3)) == 0:
        out.append(("X-TokenFlow-Pacing", draw(header_value(PACINGS))))
    if draw(st.integers(0, 3)) == 0:
        out.append(("Last-Event-ID", draw(header_value(EVENT_IDS))))
    if draw(st.integers(0, 3)) == 0:
        out.append(("Accept", draw(header_value(ACCEPTS))))
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(ODD)))
        out.append((name, draw(header_value(ODD[name]))))
    return out


EVENT_IDS = ["@DONE@:0", "@DONE@:2", "@DONE@:3", "@DONE@:4", "@DONE@:99", "@DONE@:-1", "@DONE@:²", "@DONE@:٣",
             "@DONE@:", f"@DONE@:{'9' * 13}", "@DONE@:0x1", "@DONE@", ":1", "nope:1", "a" * 129 + ":1", "../x:1",
             " @DONE@:1 ", "x:y:1", "@DONE@:1:2", "\u00e9:1"]


def stream_ids(live: bool = True) -> st.SearchStrategy[str]:
    """A path segment: a known stream (``@LIVE@``, ``@DONE@``), an unknown one, or anything (percent-encoded)."""
    from urllib.parse import quote

    known = ["@LIVE@"] if live else []
    return st.one_of(st.sampled_from([*known, "@DONE@", "0" * 24, "x" * 129, "..", ".", "%", "%00", "%ff", "%2F",
                                      "a%2Fb"]),
                     st.text(max_size=40).map(lambda s: quote(s, safe="")))


def query(keys: list[str], values: list[str]) -> st.SearchStrategy[str]:
    from urllib.parse import quote

    pair = st.tuples(st.sampled_from(keys) | st.sampled_from(keys) | st.text(max_size=5),
                     st.sampled_from(values) | st.sampled_from(values) | st.text(max_size=12))
    return st.lists(pair, max_size=3).map(
        lambda ps: ("?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in ps)) if ps else "")


AFTERS = ["0", "1", "2", "3", "4", "99", "-1", "²", "٣", "1" * 13, "0x1", "", " 1", "1.0", "nan"]
KEYED = [("Authorization", f"Bearer {KEY}".encode())]

# ----- the tests -----
# Each @example is a bug this suite found, kept as a regression.


@FUZZ
@given(body=body_bytes(chat_schema()), hdrs=headers())
@example(body=b"{}", hdrs=[*KEYED, ("Last-Event-ID", b"@DONE@:99")])  # resumed past an ended stream's end: 500
@example(body=b"{}", hdrs=[("Authorization", b"Bearer \xff\xfe")])  # a key that is not UTF-8: 500
@example(body=b"{}", hdrs=[*KEYED, ("Last-Event-ID", "@DONE@:²".encode())])  # int('²') in the message
@example(body=b"{}", hdrs=[*KEYED, ("Expect", b"100-continue\x80")])  # aiohttp's 417 of a non-UTF-8 value: 500
@example(body=b"{}", hdrs=[*KEYED, ("Expect", b"0")])  # aiohttp's text/plain 417
def test_chat_completions(srv: Server, body: bytes, hdrs: list[tuple[str, bytes]]) -> None:
    check(srv, request(srv, "POST", "/v1/chat/completions", hdrs, body), "POST /v1/chat/completions")


@FUZZ
@given(body=body_bytes(completion_schema()), hdrs=headers())
def test_completions(srv: Server, body: bytes, hdrs: list[tuple[str, bytes]]) -> None:
    check(srv, request(srv, "POST", "/v1/completions", hdrs, body), "POST /v1/completions")


PROGRESS_BODIES = st.one_of(
    st.fixed_dictionaries({"consumed_tokens": st.one_of(st.integers(-3, 40), JSON_VALUES)}).map(_encode),
    mutated(st.fixed_dictionaries({"consumed_tokens": st.integers(0, 5)})).map(_encode),
    RAW_BODIES)


@FUZZ
@given(sid=stream_ids(), body=PROGRESS_BODIES, hdrs=headers())
def test_progress_reports(srv: Server, sid: str, body: bytes, hdrs: list[tuple[str, bytes]]) -> None:
    check(srv, request(srv, "POST", f"/v1/streams/{sid}/progress", hdrs, body), f"POST /v1/streams/{sid}/progress")


@FUZZ
@given(method=st.sampled_from(["GET", "GET", "HEAD", "DELETE", "POST", "PUT", "OPTIONS"]),
       path=stream_ids(live=False).flatmap(  # (resuming the live stream would take it from its client)
           lambda sid: st.sampled_from([f"/v1/streams/{sid}", f"/v1/streams/{sid}/events",
                                        f"/v1/streams/{sid}/events", "/v1/streams"])),
       q=query(["after", "stream", "limit"], AFTERS), hdrs=headers(), body=st.none() | RAW_BODIES)
@example(method="GET", path="/v1/streams/@DONE@/events", q="?after=%C2%B2", hdrs=KEYED, body=None)  # int('²'): 500
@example(method="GET", path="/v1/streams/@DONE@/events", q="?after=99", hdrs=KEYED, body=None)  # past the end: 500
def test_stream_state_and_events(srv: Server, method: str, path: str, q: str, hdrs: list[tuple[str, bytes]],
                                 body: bytes | None) -> None:
    if "events" not in path:
        hdrs = [h for h in hdrs if h[0] != "Last-Event-ID"]
    check(srv, request(srv, method, path + q, hdrs, body if method in ("POST", "PUT", "DELETE") else None),
          f"{method} {path + q}")


BURST = st.fixed_dictionaries({}, optional={"users": st.integers(-1, 3) | JSON_VALUES,
                                            "output_tokens": st.integers(15, 17) | JSON_VALUES,
                                            "seed": st.integers(-1, 2**31) | JSON_VALUES})


@FUZZ
@given(path=st.sampled_from([
           "/v1/models", "/healthz", "/readyz", "/metrics", "/", "/demo/info", "/demo/burst", "/demo/static/demo.js",
           "/demo/static/app.js", "/demo/static/", "/demo/static/../../pyproject.toml",
           "/demo/static/%2e%2e/%2e%2e/pyproject.toml", "/v1", "/v1/", "/v1/models/sim-small", "/v1/embeddings",
           "/v1/chat/completions", "/v1/completions", "/nope", "//v1/models", "/v1/models%00", "/%ff", "/healthz/"]),
       method=st.sampled_from(["GET", "GET", "POST", "HEAD", "DELETE", "PUT", "PATCH", "OPTIONS"]),
       q=query(["users", "x"], ["1", "-1", "²"]), hdrs=headers(),
       body=st.one_of(BURST.map(_encode), mutated(BURST).map(_encode), RAW_BODIES))
@example(path="/demo/static/app.js", method="GET", q="", hdrs=[], body=b"")  # aiohttp's empty 404
@example(path="/", method="GET", q="", hdrs=[("Range", b"bytes=999999-")], body=b"")  # aiohttp's empty 416
@example(path="/nope", method="GET", q="", hdrs=[("Expect", b"\xff")], body=b"")  # (no route) aiohttp's 417: 500
@example(path="/healthz", method="PUT", q="", hdrs=[("Expect", b"nope")], body=b"")  # (wrong method) text 417
def test_other_endpoints(srv: Server, path: str, method: str, q: str, hdrs: list[tuple[str, bytes]],
                         body: bytes) -> None:
    """Models, health, readiness, metrics, the demo's page and its burst control, unknown paths, any method."""
    check(srv, request(srv, method, path + q, hdrs, body if method in ("POST", "PUT", "PATCH", "DELETE") else None),
          f"{method} {path + q}")


def test_the_live_stream_outlived_the_fuzzing(srv: Server) -> None:
    """The stream opened first (its client never reads) is still there, its connection still measured (stalled):
    nothing the fuzzing sent (progress reports on it, resumptions of other streams) took it from its client."""
    ans = request(srv, "GET", f"/v1/streams/{srv.live_sid}", [_auth()])
    assert ans.status == 200, ans
    info = json.loads(ans.body)
    assert info["id"] == srv.live_sid and info["stalled"] and math.isfinite(info["buffer_tokens"])


MALFORMED = {  # requests aiohttp's parser rejects before any handler runs
    "header line over 8 KB": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
    "bad request line": b"GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "bad method": b"G(T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad version": b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
    "too many headers": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-H: 1\r\n" * 200 + b"\r\n",
    "invalid chunked encoding": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "content-length and chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "negative content-length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "control byte in a header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_get_a_400_and_cost_a_warning_at_most(srv: Server, name: str) -> None:
    """aiohttp answers these itself with a text/plain 400 and closes the connection (no supported way to give
    them OpenAI's JSON body: docs/operations.md, "Logs under abuse"); the gateway logs at most a warning."""
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(MALFORMED[name])
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after a protocol error
            answer += chunk
    assert answer.startswith(b"HTTP/1.") and answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert not srv.new_log_problems()


def test_expect_100_continue_still_continues(srv: Server) -> None:
    """The gateway's own ``Expect`` handler (JSON 417 for anything else) still lets a client that waits for
    ``100 Continue`` (curl with ``-H 'Expect: 100-continue'``, some SDKs for large bodies) send its body."""
    body = json.dumps({"model": MODELS[0], "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).encode()
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
                     + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, interim
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert not srv.new_log_problems()


def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(srv: Server) -> None:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request("DELETE", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        assert resp.status == 405 and set(err) == ERROR_FIELDS
        assert set(resp.getheader("Allow", "").replace(" ", "").split(",")) == {"GET", "HEAD"}
    finally:
        conn.close()
