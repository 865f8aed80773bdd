"""Speculative decoding through the real server and the official `openai` client, on the
trained default model (`model/assets/hunyuan-tiny`) and its draft: the same answers with
and without speculation, greedy and seeded sampling alike; metrics that count proposals;
a per-request opt-out."""

import concurrent.futures as cf
import json
import os

import openai
import pytest

from conftest import ROOT, Server

ASSETS = os.path.join(ROOT, "model", "assets")
TINY = os.path.join(ASSETS, "hunyuan-tiny")
DRAFT = os.path.join(ASSETS, "hunyuan-tiny-draft")


def passages(n):
    with open(os.path.join(TINY, "heldout.jsonl")) as f:
        return [json.loads(line)["prompt_edit"] for line in f][:n]


# Plain decoding, and each proposer at a fixed depth (so every decode step speculates)
# and adaptively (the engine decides).
CONFIGS = {
    "off": ["--speculation", "off"],
    "ngram": ["--speculation", "ngram", "--spec-depth", "3"],
    "draft": ["--draft-model", DRAFT, "--speculation", "draft", "--spec-depth", "3"],
    "auto": ["--draft-model", DRAFT],
}


@pytest.fixture(scope="module")
def servers():
    started = {name: Server(TINY, args) for name, args in CONFIGS.items()}
    yield started
    for s in started.values():
        s.stop()
        assert "panicked" not in s.read_log(), s.read_log()


def answers(server, prompts, **kw):
    client = server.client(timeout=300)

    def one(p):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                           max_tokens=48, **kw)
        return r.choices[0].message.content, r.usage.completion_tokens

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_greedy_answers_are_the_same_with_every_proposer(servers):
    prompts = passages(8)
    want = answers(servers["off"], prompts, temperature=0)
    # The trained model really edits: it copies the passage and modernises a word.
    assert any("you" in text.split() for text, _ in want), want
    for name in ("ngram", "draft", "auto"):
        assert answers(servers[name], prompts, temperature=0) == want, name


def test_seeded_sampling_is_the_same_with_every_proposer(servers):
    # Verification draws each position exactly as plain sampling does (same seed, same
    # position), so a seeded request's answer does not depend on speculation.
    prompts = passages(4)
    kw = dict(temperature=0.8, top_p=0.95, seed=1234)
    want = answers(servers["off"], prompts, **kw)
    for name in ("ngram", "draft"):
        assert answers(servers[name], prompts, **kw) == want, name


def test_speculation_metrics_count_proposals(servers):
    answers(servers["ngram"], passages(2), temperature=0)
    for name in ("ngram", "draft"):
        m = servers[name].metrics()
        proposed = m["hyserve_spec_proposed_tokens_total"]
        accepted = m["hyserve_spec_accepted_tokens_total"]
        assert 0 < accepted <= proposed, (name, proposed, accepted)
        assert m["hyserve_spec_accepted_length_tokens_count"] > 0
        assert m['hyserve_spec_accepted_length_tokens_bucket{le="+Inf"}'] == \
            m["hyserve_spec_accepted_length_tokens_count"]
        assert "hyserve_spec_time_saved_seconds" in m
    off = servers["off"].metrics()
    assert off["hyserve_spec_proposed_tokens_total"] == 0


def test_a_request_can_opt_out(servers):
    s = servers["ngram"]
    before = s.metrics()["hyserve_spec_proposed_tokens_total"]
    r = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": passages(1)[0]}],
                                           max_tokens=32, temperature=0, extra_body={"speculation": "off"})
    assert r.usage.completion_tokens > 0
    assert s.metrics()["hyserve_spec_proposed_tokens_total"] == before
    with pytest.raises(openai.BadRequestError) as e:
        s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=4, extra_body={"speculation": "sometimes"})
    assert e.value.body["param"] == "speculation"
