"""Draining before a stop (a Kubernetes preStop hook runs `hyserve drain`): the server
stops taking requests and reports not ready, the requests in flight finish whole, and
the drain command returns once they have. Also: request ids go back in `x-request-id`
and follow a request into the engine's logs."""

import re
import subprocess
import threading
import time

import httpx
import openai

from conftest import hyserve_bin


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(make_server):
    s = make_server("--speculation", "off", env={"HYSERVE_LOG": "info"})
    client = s.client()
    result = {}

    def long_stream():
        # ignore_eos keeps it going for every token asked for.
        stream = client.completions.create(
            model="tiny", prompt="The", max_tokens=1500, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        text, finish = [], None
        for chunk in stream:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        result["finish"] = finish
        result["done_at"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    # Wait until the stream is really in flight.
    deadline = time.time() + 30
    while s.metrics().get('hyserve_requests_running', 0) < 1:
        assert time.time() < deadline, "the streamed request never started"
        time.sleep(0.01)
    assert httpx.get(f"http://{s.http}/ready").status_code == 200

    drain = subprocess.Popen([hyserve_bin(), "drain", "--http-addr", s.http, "--timeout-secs", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # While draining: not ready, and a new request is refused with an OpenAI error.
    deadline = time.time() + 10
    while httpx.get(f"http://{s.http}/ready").status_code != 503:
        assert time.time() < deadline, "readiness did not drop while draining"
        time.sleep(0.01)
    try:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
        raise AssertionError("a request was accepted while draining")
    except openai.APIStatusError as e:
        assert e.status_code == 503, e
        assert "draining" in e.message, e.message

    out, err = drain.communicate(timeout=90)
    drained_at = time.monotonic()
    t.join(timeout=30)
    assert drain.returncode == 0, err
    assert '"status":"drained"' in err, err
    # It did wait for the stream (the stream was not over before the drain began).
    waited = int(re.search(r'"waited_ms":(\d+)', err).group(1))
    assert waited > 0, err
    # The request in flight finished whole, before the drain said so.
    assert result.get("finish") == "length", result
    assert result["done_at"] <= drained_at
    assert s.proc.poll() is None, "draining does not stop the process; SIGTERM does"


def test_drain_times_out_with_a_clear_error(make_server):
    s = make_server("--speculation", "off")
    client = s.client()
    t = threading.Thread(target=lambda: client.completions.create(
        model="tiny", prompt="The", max_tokens=2000, temperature=0, extra_body={"ignore_eos": True}))
    t.start()
    deadline = time.time() + 30
    while s.metrics().get('hyserve_requests_running', 0) < 1:
        assert time.time() < deadline
        time.sleep(0.01)
    r = subprocess.run([hyserve_bin(), "drain", "--http-addr", s.http, "--timeout-secs", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "still in flight" in r.stderr, r.stderr
    t.join(timeout=120)


def test_request_ids_come_back_and_reach_the_engine_logs(make_server):
    s = make_server(env={"HYSERVE_LOG": "info,hyserve_coordinator=debug"})
    r = httpx.post(f"{s.base_url}/completions", json={"model": "tiny", "prompt": "And", "max_tokens": 3},
                   headers={"x-request-id": "trace-abc.123"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-abc.123"
    # Without one, the server's own id comes back, the one its log lines carry.
    r2 = httpx.post(f"{s.base_url}/completions", json={"model": "tiny", "prompt": "And", "max_tokens": 3},
                    timeout=60)
    own = r2.headers["x-request-id"]
    assert own.startswith("cmpl-"), own
    # An unusable id (spaces, too long) is replaced, not echoed into the logs.
    r3 = httpx.post(f"{s.base_url}/completions", json={"model": "tiny", "prompt": "And", "max_tokens": 3},
                    headers={"x-request-id": "bad id " + "x" * 200}, timeout=60)
    assert r3.headers["x-request-id"].startswith("cmpl-")
    deadline = time.time() + 10
    while True:
        log = s.read_log()
        # The gateway's line and the scheduler's (another actor) name the same request.
        if ("trace-abc.123" in log and "sequence admitted" in log and "sequence finished" in log
                and own in log):
            break
        assert time.time() < deadline, log[-3000:]
        time.sleep(0.05)
    lines = [l for l in log.splitlines() if "trace-abc.123" in l]
    assert any("request finished" in l for l in lines), lines
    assert any("sequence admitted" in l for l in lines), lines
    assert any("sequence finished" in l for l in lines), lines
    # Prompts are not logged unless asked (--log-prompts).
    assert "prompt=" not in log
