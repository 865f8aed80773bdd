"""The OpenAI-compatible API of `hyserve serve`, through the official `openai` client."""

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest

from conftest import generate_cli

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
PROMPTS = [[300 + 13 * i + j for j in range(5 + i)] for i in range(8)]


def test_models_lists_the_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_completion_equals_generate(server, model_dir):
    want = generate_cli(model_dir, PROMPTS[0], 12)
    r = server.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, **GREEDY)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(PROMPTS[0]) and r.usage.completion_tokens == 12


def test_64_concurrent_greedy_requests_equal_generate(server, model_dir):
    """A sequence's output must not depend on what else shares its batch."""
    want = {i: generate_cli(model_dir, p, 16)["text"] for i, p in enumerate(PROMPTS)}
    client = server.client(timeout=300)

    def one(k):
        i = k % len(PROMPTS)
        r = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=16, **GREEDY)
        return i, r.choices[0].text

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, text in results:
        assert text == want[i], f"prompt {i} diverged under load"


def test_chat_stream_matches_non_stream_and_reports_usage(server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    client = server.client()
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, **GREEDY)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_max_completion_tokens_is_honoured(server):
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_completion_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3


def test_n_choices_and_seed_reproducibility(server):
    client = server.client()
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices], "same seed, same samples"
    assert len({c.text for c in a.choices}) > 1, "choices draw differently"
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    assert a.usage.completion_tokens == 24


def test_stop_sequence_truncates(server):
    client = server.client()
    base = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, **GREEDY).choices[0].text
    # A stop string from the middle of the greedy output.
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), base
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    s = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in s if c.choices) == base[: base.index(stop)]


def test_logprobs(server):
    client = server.client()
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=5, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        # Greedy: the chosen token is the most likely one.
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
        assert chosen <= 0
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=2, **GREEDY)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)


def test_penalties_and_extensions_are_accepted(server):
    r = server.client().completions.create(
        model="tiny", prompt=PROMPTS[4], max_tokens=6, temperature=0.7, top_p=0.9, seed=5,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=10**7), "max_tokens"),
    (dict(n=1000), "n"),
    (dict(presence_penalty=5), "presence_penalty"),
    (dict(model="no-such-model"), "model"),
    (dict(logprobs=99), "logprobs"),
])
def test_bad_parameters_get_400_naming_the_field(server, kwargs, param):
    args = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body


def test_malformed_and_oversized_bodies(server):
    url = f"http://{server.http}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": "tiny", "messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(f"http://{server.http}/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_health_and_ready(server):
    assert httpx.get(f"http://{server.http}/health").status_code == 200
    assert httpx.get(f"http://{server.http}/ready").status_code == 200


def _blocks_used(server):
    return server.metrics().get("hyserve_kv_blocks_used", -1)


def test_client_disconnect_frees_blocks(server):
    before = _blocks_used(server)
    client = server.client(timeout=60)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=2000, stream=True, **GREEDY)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    assert _blocks_used(server) > before, "the running sequence holds blocks"
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline and _blocks_used(server) != before:
        time.sleep(0.1)
    assert _blocks_used(server) == before, "blocks freed after the client left"


def test_full_queue_gets_429_with_retry_after(make_server):
    s = make_server("--max-running", "1", "--max-waiting", "1")
    client = s.client(timeout=120)

    def one(_):
        try:
            client.completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=200, **GREEDY)
            return "ok"
        except openai.RateLimitError as e:
            assert int(e.response.headers["retry-after"]) >= 1
            return 429

    with cf.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert 429 in outcomes and "ok" in outcomes, outcomes


def test_api_keys(make_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsecret-key-1\n")
    s = make_server("--api-key-file", str(keys))
    with pytest.raises(openai.AuthenticationError):
        s.client(api_key="wrong").models.list()
    r = httpx.post(f"{s.base_url}/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 401
    assert s.client(api_key="secret-key-1").models.list().data[0].id == "tiny"
    assert s.metrics()["hyserve_auth_failures_total"] >= 2
    assert httpx.get(f"http://{s.http}/health").status_code == 200, "health needs no key"
    assert "secret-key-1" not in s.read_log()


def test_prompts_and_outputs_stay_out_of_the_logs(server):
    secret = "zebra-quartz-1729 confidential"
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": secret}],
                                                max_tokens=4, **GREEDY)
    time.sleep(0.2)
    log = server.read_log()
    assert secret not in log
    assert r.choices[0].message.content not in log or not r.choices[0].message.content.strip()
