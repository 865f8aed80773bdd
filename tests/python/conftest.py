"""Fixtures for the end-to-end suite: real `hyserve serve` processes on free ports, with a
tiny model of the real architecture written by `hyserve init-model`, talked to by the
official `openai` client."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hyserve_bin():
    b = os.environ.get("HYSERVE_BIN") or os.path.join(ROOT, "target", "debug", "hyserve")
    if not os.path.exists(b):
        pytest.fail(f"hyserve binary not found at {b}: build it (cargo build) or set HYSERVE_BIN")
    return b


@pytest.fixture(scope="session")
def model_dir():
    d = tempfile.mkdtemp(prefix="hyserve-e2e-")
    out = os.path.join(d, "tiny")
    subprocess.run([hyserve_bin(), "init-model", "--arch", "hunyuan-large", "--preset", "tiny",
                    "--seed", "7", "--out", out], check=True, capture_output=True)
    return out


def terminate(proc, timeout=20):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """A running `hyserve serve` and how to reach it."""

    def __init__(self, model, extra_args=(), env=None):
        self.log = tempfile.NamedTemporaryFile(prefix="hyserve-serve-", suffix=".log", delete=False)
        e = dict(os.environ, HYSERVE_LOG="info", HYSERVE_THREADS="2")
        e.update(env or {})
        self.proc = subprocess.Popen(
            [hyserve_bin(), "serve", "--model", model, "--model-name", "tiny",
             "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env=e)
        self.http = None
        deadline = time.time() + 60
        while time.time() < deadline and self.http is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hyserve serve exited with {self.proc.returncode}:\n{self.read_log()}")
            m = re.search(r"OpenAI HTTP API: http://([0-9.:]+)/v1", self.read_log())
            g = re.search(r"gRPC API: +([0-9.:]+)", self.read_log())
            if m and g:
                self.http, self.grpc = m.group(1), g.group(1)
            else:
                time.sleep(0.05)
        if self.http is None:
            raise RuntimeError(f"hyserve serve did not start:\n{self.read_log()}")
        self.base_url = f"http://{self.http}/v1"

    def read_log(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def client(self, api_key="unused", **kw):
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kw)

    def metrics(self):
        text = httpx.get(f"http://{self.http}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self):
        terminate(self.proc)


@pytest.fixture(scope="session")
def server(model_dir):
    s = Server(model_dir)
    yield s
    s.stop()
    assert "panicked" not in s.read_log(), s.read_log()


@pytest.fixture()
def make_server(model_dir):
    """Starts extra servers with custom flags; stops them after the test."""
    started = []

    def make(*args, env=None):
        s = Server(model_dir, args, env)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def generate_cli(model, prompt_ids, max_tokens):
    """`hyserve generate` greedy output for the same prompt: the reference for the server."""
    import json
    out = subprocess.run([hyserve_bin(), "generate", "--model", model, "--prompt-ids",
                          ",".join(map(str, prompt_ids)), "--max-tokens", str(max_tokens),
                          "--json", "--ignore-eos"], check=True, capture_output=True,
                         env=dict(os.environ, HYSERVE_LOG="warn"))
    return json.loads(out.stdout)
