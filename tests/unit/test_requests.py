import pytest
from multidict import CIMultiDict

from gateway.api.errors import ApiError
from gateway.api.requests import parse_json, parse_request
from gateway.config import StreamsConfig

CFG = StreamsConfig()
MODELS = {"m"}


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


def parse(body, kind="chat", headers=None):
    return parse_request(body, kind, CIMultiDict(headers or {}), CFG, MODELS)


def test_defaults_and_declared_rate():
    r = parse(chat(stream=True))
    assert (r.rate, r.rate_declared, r.pacing) == (CFG.default_rate, False, "smooth")
    r = parse(chat(tokenflow={"rate": 20, "pacing": "none"}))
    assert (r.rate, r.rate_declared, r.pacing) == (20.0, True, "none")
    assert "tokenflow" not in r.engine_body
    r = parse(chat(), headers={"X-TokenFlow-Rate": "12.5"})
    assert r.rate == 12.5
    r = parse(chat(tokenflow={"rate": "listening"}))
    assert r.rate == CFG.rate_classes["listening"]


@pytest.mark.parametrize(
    "body,param",
    [
        (chat(model=5), "model"),
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=-3), "max_tokens"),
        (chat(max_tokens="10"), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(stream="yes"), "stream"),
        (chat(temperature=9), "temperature"),
        (chat(tokenflow={"rate": -1}), "tokenflow.rate"),
        (chat(tokenflow={"rate": 1e9}), "tokenflow.rate"),
        (chat(tokenflow={"rate": "fast"}), "tokenflow.rate"),
        (chat(tokenflow={"rate": float("nan")}), "tokenflow.rate"),
        (chat(tokenflow={"pacing": "bursty"}), "tokenflow.pacing"),
        (chat(tokenflow={"pacing": "phrases"}), "tokenflow.pacing"),
        (chat(tokenflow={"speed": 3}), "tokenflow"),
        (chat(tokenflow=[1]), "tokenflow"),
        (chat(n=3), "n"),
        (chat(stream_options={"include_usage": "y"}), "stream_options.include_usage"),
    ],
)
def test_rejects_malformed(body, param):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert 400 <= e.value.status < 500
    assert e.value.param == param
    assert e.value.body()["error"]["message"]


def test_unknown_model_is_404():
    with pytest.raises(ApiError) as e:
        parse(chat(model="nope"))
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_completion_prompt_forms():
    assert parse({"model": "m", "prompt": "x"}, "completion").kind == "completion"
    assert parse({"model": "m", "prompt": [1, 2, 3]}, "completion").engine_body["prompt"] == [1, 2, 3]
    for bad in (None, [], [1, "a"], ["a", "b"], 5):
        with pytest.raises(ApiError):
            parse({"model": "m", "prompt": bad}, "completion")


def test_header_rate_rejected_when_bad():
    with pytest.raises(ApiError) as e:
        parse(chat(), headers={"X-TokenFlow-Rate": "-2"})
    assert e.value.param == "X-TokenFlow-Rate"


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b"null", b"\xff"])
def test_parse_json_rejects(raw):
    with pytest.raises(ApiError) as e:
        parse_json(raw)
    assert e.value.status == 400
