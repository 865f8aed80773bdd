"""Metrics, end to end: `/metrics` of a real `hyserve serve` under real traffic from the
official `openai` client (promtool's linter, the catalogue of `hyserve metrics-catalogue`,
values that move with the traffic), a real Prometheus (Debian's `prometheus`) scraping it,
the Grafana dashboards' and the alert rules' queries run on that Prometheus, and the alert
rules' own unit tests (`promtool test rules`)."""

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

from conftest import ROOT, Server, hyserve_bin, terminate

PROMETHEUS_DIR = os.path.join(ROOT, "deploy", "prometheus")
ALERTS = os.path.join(PROMETHEUS_DIR, "alerts.yml")
GRAFANA_DIR = os.path.join(ROOT, "deploy", "grafana")

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
PROMPTS = [[300 + 17 * i + j for j in range(4 + 3 * i)] for i in range(6)]
CHATS = ["Name a colour.", "Put this into modern English:\nAnd the LORD spake unto Moses, saying,",
         "Count to three.", "Say hello."]

# The alerts the rules file must define (the unit tests make each fire and stay quiet).
ALERT_NAMES = {"HyserveHighErrorRate", "HyserveTTFTSLO", "HyserveKVCacheExhausted",
               "HyserveExpertImbalance", "HyserveWorkerDown", "HyserveStalled",
               "HyserveOverloaded", "HyserveDown"}


def tool(name):
    """Path of `promtool` or `prometheus` (Debian's `prometheus` package has both)."""
    env = "HYSERVE_" + name.upper() + "_BIN"
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install Debian's prometheus package (scripts/test.sh does) "
                    f"or set {env}")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The text exposition format.

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?[0-9]+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """One `/metrics` page: `# TYPE` lines and samples."""

    def __init__(self, text):
        self.text = text
        self.types = {}
        self.samples = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind.strip()
            elif line and not line.startswith("#"):
                m = SAMPLE.match(line)
                assert m, f"unparsable exposition line {line!r}"
                self.samples.append((m.group(1), dict(LABEL.findall(m.group(2) or "")),
                                     float(m.group(3))))

    def series(self, name, **match):
        return [(labels, v) for n, labels, v in self.samples
                if n == name and all(labels.get(k) == want for k, want in match.items())]

    def total(self, name, **match):
        return sum(v for _, v in self.series(name, **match))

    def family_samples(self, name, kind):
        """Samples of a metric family: a histogram's `_bucket`, `_sum` and `_count` series."""
        names = {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
        return [(n, labels) for n, labels, _ in self.samples if n in names]


def scrape(server):
    r = httpx.get(f"http://{server.http}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return Scrape(r.text)


# PromQL: which metrics an expression reads.

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "bool", "offset", "inf", "nan", "start", "end"}


def metric_names(expr):
    """Metric names an expression selects: identifiers that are not functions or aggregations
    (followed by `(`), keywords, label names (inside `{}` or `by`/`without`/`on`/`ignoring`/
    `group_left`/`group_right` lists), strings, durations or numbers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def catalogue_metric(name, catalogue):
    """The catalogue metric a series name belongs to (a histogram's `_bucket`, `_sum` and
    `_count` series map to it), or None."""
    if name in catalogue:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and catalogue.get(base, {}).get("type") == "histogram":
            return base
    return None


def unknown_names(expr, catalogue, allowed=("up",)):
    names = metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    return sorted(n for n in names if n not in allowed and catalogue_metric(n, catalogue) is None)


def grafana_substitute(expr):
    """Grafana's template variables, as a query Prometheus can run: built-in intervals
    (`$__rate_interval`, `${__interval}`, ...) become 1m, dashboard variables match all."""
    expr = re.sub(r"\$\{__\w+(?::\w+)?\}|\$__\w+", "1m", expr)
    return re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\]", ".*", expr)


def dashboard_panels(doc):
    """Every panel of a dashboard file (API `{"dashboard": ...}` form or bare), rows' nested
    panels included."""
    dash = doc.get("dashboard", doc)
    stack, out = list(dash.get("panels", [])), []
    while stack:
        p = stack.pop(0)
        out.append(p)
        stack.extend(p.get("panels", []))
    return dash, out


# Fixtures.

@pytest.fixture(scope="module")
def catalogue():
    out = subprocess.run([hyserve_bin(), "metrics-catalogue"], capture_output=True, text=True)
    assert out.returncode == 0, f"hyserve metrics-catalogue failed:\n{out.stderr}"
    metrics = json.loads(out.stdout)
    names = [m["name"] for m in metrics]
    assert len(names) == len(set(names)), "a metric is in the catalogue twice"
    assert len(names) >= 30, names
    for m in metrics:
        assert m["type"] in ("counter", "gauge", "histogram"), m
        assert m["help"], m
        assert isinstance(m["labels"], list), m
    return {m["name"]: m for m in metrics}


class Traffic:
    """What was sent to the server and what it answered."""

    def __init__(self):
        self.ok = {"completions": 0, "chat_completions": 0}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.invalid = 0

    def count(self, endpoint, usage):
        assert usage is not None, f"{endpoint}: no usage in the response"
        self.ok[endpoint] += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens

    @property
    def ok_total(self):
        return sum(self.ok.values())


def send_traffic(server):
    """Completions and chat completions, streaming and not, and one invalid request."""
    client = server.client(timeout=120)
    sent = Traffic()
    for i in range(3):
        r = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=5 + 3 * i, **GREEDY)
        sent.count("completions", r.usage)
    for i in range(3, 5):
        chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=9, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
        sent.count("completions", chunks[-1].usage)
    for text in CHATS[:2]:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                           max_tokens=7, **GREEDY)
        sent.count("chat_completions", r.usage)
    for text in CHATS[2:]:
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": text}], max_tokens=11, stream=True,
            stream_options={"include_usage": True}, **GREEDY))
        sent.count("chat_completions", chunks[-1].usage)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=-1.0)
    sent.invalid += 1
    return sent


@pytest.fixture(scope="module")
def metered(model_dir):
    """A server of its own (the counts must be only this module's traffic): its page at
    startup, the traffic sent, and its page once every request has been counted."""
    server = Server(model_dir)
    try:
        before = scrape(server)
        sent = send_traffic(server)
        # A streamed request is counted when the server finishes it, which may be just
        # after the client has read its last chunk.
        deadline = time.time() + 20
        while True:
            after = scrape(server)
            done = after.total("hyserve_requests_total")
            if done >= sent.ok_total + sent.invalid or time.time() > deadline:
                break
            time.sleep(0.1)
        yield server, before, sent, after
    finally:
        server.stop()
    assert "panicked" not in server.read_log(), server.read_log()


class Prometheus:
    """A real Prometheus scraping one hyserve every second, with alerts.yml loaded."""

    def __init__(self, target):
        self.dir = tempfile.mkdtemp(prefix="hyserve-prometheus-")
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
                    f"rule_files:\n  - {json.dumps(ALERTS)}\n"
                    "scrape_configs:\n  - job_name: hyserve\n    static_configs:\n"
                    f"      - targets: [{json.dumps(target)}]\n")
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w+")
        for _attempt in range(3):
            self.url = f"http://127.0.0.1:{free_port()}"
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
                 f"--web.listen-address={self.url[len('http://'):]}", "--log.level=info"],
                stdout=self.log, stderr=subprocess.STDOUT)
            deadline = time.time() + 60
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            self.stop_process()
            if "address already in use" not in self.read_log():
                break
        raise RuntimeError(f"prometheus did not start:\n{self.read_log()}")

    def read_log(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def query(self, expr):
        """`/api/v1/query`: (HTTP status, decoded body)."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        return r.status_code, r.json()

    def vector(self, expr):
        code, body = self.query(expr)
        assert code == 200 and body["status"] == "success", (expr, code, body)
        return body["data"]["result"]

    def stop_process(self):
        terminate(self.proc)

    def stop(self):
        self.stop_process()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def requests_by_label(vector):
    return {(s["metric"].get("endpoint"), s["metric"].get("outcome")): float(s["value"][1])
            for s in vector}


@pytest.fixture(scope="module")
def prometheus(metered, request):
    """Prometheus scraping the metered server, once it has our requests and a few samples of
    every series (so that rates over them have something to work on)."""
    server, _, sent, _ = metered
    prom = Prometheus(server.http)
    request.addfinalizer(prom.stop)
    want = {("completions", "ok"): sent.ok["completions"],
            ("chat_completions", "ok"): sent.ok["chat_completions"]}
    deadline = time.time() + 90
    got = {}
    while time.time() < deadline:
        got = requests_by_label(prom.vector("hyserve_requests_total"))
        samples = prom.vector('count_over_time(up{job="hyserve"}[1m])')
        if all(got.get(k) == v for k, v in want.items()) and samples and float(samples[0]["value"][1]) >= 4:
            return prom
        time.sleep(0.5)
    targets = httpx.get(prom.url + "/api/v1/targets", timeout=10).json()
    pytest.fail(f"Prometheus never saw the requests sent ({want}); it has {got}.\n"
                f"targets: {json.dumps(targets)}\nlog:\n{prom.read_log()[-4000:]}")


# The rule files, with promtool (no server needed).

def promtool(*args):
    out = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"promtool {' '.join(args)} exited {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


def test_alert_rules_are_valid():
    assert "SUCCESS" in promtool("check", "rules", ALERTS)


def test_alert_rules_unit_tests_pass():
    promtool("test", "rules", os.path.join(PROMETHEUS_DIR, "alerts_test.yml"))


def test_example_prometheus_config_is_valid():
    promtool("check", "config", os.path.join(PROMETHEUS_DIR, "prometheus.yml"))


def test_promql_name_extraction():
    """The metric-name check below reads PromQL with a regex; this is what it must see."""
    expr = ('histogram_quantile(0.95, sum by (le, endpoint) (rate(hyserve_time_to_first_token_seconds_bucket'
            '{endpoint=~"chat.*", job="x"}[5m]))) > 2 and on (instance) hyserve_requests_running offset 5m > 0 '
            'or sum without (layer) (hyserve_expert_load_imbalance_ratio) * 1e3 / ignoring (worker) '
            'group_left (version) hyserve_build_info unless up{job=~"$job"} == bool 0 '
            'or label_replace(hyserve_steps_total, "dst", "$1", "src", "(.*)") '
            'or max_over_time(hyserve_kv_blocks_used[10m:1m]) or -Inf < nan')
    assert metric_names(expr) == {"hyserve_time_to_first_token_seconds_bucket", "hyserve_requests_running",
                                  "hyserve_expert_load_imbalance_ratio", "hyserve_build_info", "up",
                                  "hyserve_steps_total", "hyserve_kv_blocks_used"}
    assert grafana_substitute('rate(x{worker=~"$worker", job=~"${job}"}[$__rate_interval])') == \
        'rate(x{worker=~".*", job=~".*"}[1m])'
    cat = {"a_seconds": {"type": "histogram"}, "b_total": {"type": "counter"}}
    assert catalogue_metric("a_seconds_bucket", cat) == "a_seconds"
    assert catalogue_metric("b_total_count", cat) is None
    assert unknown_names("rate(a_seconds_count[1m]) / rate(b_total[1m]) + c", cat) == ["c"]


# The page itself.

def test_every_catalogued_metric_is_exported_from_startup(metered, catalogue):
    _, before, _, _ = metered
    missing = [n for n in catalogue if n not in before.types]
    assert not missing, f"not on /metrics at startup: {missing}"
    wrong = {n: (before.types[n], m["type"]) for n, m in catalogue.items() if before.types[n] != m["type"]}
    assert not wrong, f"TYPE on /metrics differs from the catalogue (got, declared): {wrong}"
    empty = [n for n, m in catalogue.items() if not before.family_samples(n, m["type"])]
    assert not empty, f"declared but without a single series at startup: {empty}"
    ok = before.series("hyserve_requests_total", outcome="ok")
    assert {labels["endpoint"] for labels, _ in ok} >= {"completions", "chat_completions"}
    assert all(v == 0 for _, v in ok)


def test_metrics_page_passes_promtool_and_matches_the_catalogue(metered, catalogue):
    _, _, _, after = metered
    lint = subprocess.run([tool("promtool"), "check", "metrics"], input=after.text, capture_output=True, text=True)
    assert lint.returncode == 0, \
        f"promtool check metrics exited {lint.returncode}:\n{lint.stdout}{lint.stderr}"
    uncatalogued = sorted(n for n in after.types if n.startswith("hyserve_") and n not in catalogue)
    assert not uncatalogued, f"exported but not in `hyserve metrics-catalogue`: {uncatalogued}"
    for name, m in catalogue.items():
        assert after.types.get(name) == m["type"], (name, after.types.get(name), m["type"])
        for series, labels in after.family_samples(name, m["type"]):
            assert set(labels) - {"le"} == set(m["labels"]), \
                f"{series}{labels}: labels differ from the catalogue's {m['labels']}"


def test_metrics_move_with_traffic(metered):
    _, before, sent, m = metered
    assert m.total("hyserve_requests_total", endpoint="completions", outcome="ok") == sent.ok["completions"]
    assert m.total("hyserve_requests_total", endpoint="chat_completions", outcome="ok") == \
        sent.ok["chat_completions"]
    failed = {labels["outcome"]: v for labels, v in m.series("hyserve_requests_total")
              if labels["outcome"] != "ok" and v > 0}
    assert list(failed.values()) == [sent.invalid] and next(iter(failed)).startswith("invalid"), failed
    n = sent.ok_total
    assert m.total("hyserve_request_duration_seconds_count") == n + sent.invalid
    assert m.total("hyserve_time_to_first_token_seconds_count") == n
    assert m.total("hyserve_inter_token_latency_seconds_count") > 0
    assert m.total("hyserve_queue_time_seconds_count") >= n
    assert m.total("hyserve_prompt_length_tokens_count") == n
    assert m.total("hyserve_generation_length_tokens_count") == n
    assert m.total("hyserve_generation_length_tokens_sum") == sent.completion_tokens
    assert m.total("hyserve_generated_tokens_total") == sent.completion_tokens
    assert m.total("hyserve_prompt_tokens_total") == sent.prompt_tokens
    assert m.total("hyserve_auth_failures_total") == 0
    assert m.total("hyserve_steps_total") > before.total("hyserve_steps_total")
    assert m.total("hyserve_prefix_cache_queries_tokens_total") > 0
    assert m.total("hyserve_kv_blocks_capacity") > 0
    assert m.total("hyserve_kv_cache_bytes_per_token") > 0
    assert m.total("hyserve_requests_running") == 0 and m.total("hyserve_requests_waiting") == 0
    assert m.total("hyserve_workers_alive") == m.total("hyserve_workers_expected") >= 1
    # One process, no expert parallelism: no placement epochs.
    assert m.total("hyserve_placement_epoch") == 0
    info = m.series("hyserve_build_info")
    assert len(info) == 1 and info[0][1] == 1 and info[0][0]["version"], info
    routed = m.series("hyserve_expert_routed_tokens_total")
    assert len(routed) >= 2 and sum(v for _, v in routed) > 0, routed
    assert max(v for _, v in m.series("hyserve_expert_load_imbalance_ratio")) >= 1
    assert m.total("hyserve_worker_step_duration_seconds_count") > 0
    assert m.total("hyserve_worker_step_tokens_sum") > 0


# A real Prometheus.

def test_prometheus_scrapes_the_requests_sent(metered, prometheus):
    _, _, sent, _ = metered
    got = requests_by_label(prometheus.vector("hyserve_requests_total"))
    assert got[("completions", "ok")] == sent.ok["completions"]
    assert got[("chat_completions", "ok")] == sent.ok["chat_completions"]
    assert sum(got.values()) == sent.ok_total + sent.invalid
    up = prometheus.vector('up{job="hyserve"}')
    assert [float(s["value"][1]) for s in up] == [1.0]


def test_dashboards_are_generated_from_the_catalogue():
    """deploy/grafana/*.json are what `hyserve dashboards` writes today."""
    committed = sorted(glob.glob(os.path.join(GRAFANA_DIR, "*.json")))
    assert committed, f"no dashboards in {GRAFANA_DIR}"
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([hyserve_bin(), "dashboards", "--out", out], capture_output=True, text=True)
        assert r.returncode == 0, f"hyserve dashboards failed:\n{r.stderr}"
        generated = sorted(os.listdir(out))
        assert generated == [os.path.basename(p) for p in committed], \
            f"`hyserve dashboards` writes {generated}; deploy/grafana has {committed}"
        for path in committed:
            with open(path) as a, open(os.path.join(out, os.path.basename(path))) as b:
                assert json.load(a) == json.load(b), \
                    f"{path} is stale: run `hyserve dashboards --out deploy/grafana`"


def test_every_dashboard_query_runs_on_prometheus_and_names_catalogued_metrics(prometheus, catalogue):
    files = sorted(glob.glob(os.path.join(GRAFANA_DIR, "*.json")))
    assert files, f"no dashboards in {GRAFANA_DIR}"
    problems, queries = [], 0
    for path in files:
        with open(path) as f:
            dash, panels = dashboard_panels(json.load(f))
        where_d = f"{os.path.basename(path)} ({dash.get('title')!r})"
        with_targets = [p for p in panels if p.get("targets")]
        assert with_targets, f"{where_d} has no panels with queries"
        for panel in with_targets:
            where = f"{where_d} panel {panel.get('title')!r}"
            exprs = [t["expr"] for t in panel["targets"] if t.get("expr")]
            if not exprs:
                problems.append(f"{where}: no PromQL expr in its targets")
            has_data = False
            for expr in exprs:
                queries += 1
                unknown = unknown_names(expr, catalogue)
                if unknown:
                    problems.append(f"{where}: {expr!r} reads metrics not in the catalogue: {unknown}")
                q = grafana_substitute(expr)
                code, body = prometheus.query(q)
                if code != 200 or body.get("status") != "success":
                    problems.append(f"{where}: Prometheus refused {q!r}: HTTP {code} "
                                    f"{body.get('errorType')}: {body.get('error')}")
                elif body["data"]["result"]:
                    has_data = True
            if exprs and not has_data:
                problems.append(f"{where}: no query returns any series from a server that served traffic")
    assert queries > 0
    assert not problems, "\n".join(problems)


def test_alert_rules_run_on_prometheus_and_name_catalogued_metrics(metered, prometheus, catalogue):
    """Prometheus loaded alerts.yml; every rule must evaluate cleanly against the real page,
    read only catalogued metrics (and `up`), and select only outcomes the server reports."""
    _, _, _, page = metered
    outcomes = {labels["outcome"] for labels, _ in page.series("hyserve_requests_total")}
    deadline = time.time() + 30
    while True:
        groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        evaluated = all(not r.get("lastEvaluation", "").startswith("0001-") for r in rules)
        if (rules and evaluated) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in rules} == ALERT_NAMES
    problems = []
    for r in rules:
        if r.get("health") != "ok":
            problems.append(f"{r['name']}: health {r.get('health')}: {r.get('lastError')}")
        unknown = unknown_names(r["query"], catalogue)
        if unknown:
            problems.append(f"{r['name']}: reads metrics not in the catalogue: {unknown}")
        for selected in re.findall(r'outcome=~?"([^"]*)"', r["query"]):
            for value in selected.split("|"):
                if value not in outcomes:
                    problems.append(f"{r['name']}: outcome {value!r} is not a value the server reports "
                                    f"({sorted(outcomes)})")
        if r["state"] == "firing":
            problems.append(f"{r['name']} fires on a healthy server")
    assert not problems, "\n".join(problems)
