"""Offline checks of the Kubernetes deployment (deploy/k8s): every overlay is rendered with
`kubectl kustomize` (the binary in $KUBECTL, else `kubectl` on PATH), each document is
validated against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate,
unknown fields fail), and the facts the deployment depends on are asserted: security
contexts, GPU requests, probes, the drain hook, disruption budgets, selectors, the image.
Custom resources (LeaderWorkerSet, ServiceMonitor, PodMonitor) have no schema there: their
pod templates are validated as core v1 PodTemplates and their own fields checked here.
No cluster and no server is needed."""

import collections
import copy
import json
import os
import re
import shutil
import subprocess
import tomllib

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "deploy", "k8s")
# The Kubernetes version whose schemas the manifests are held to.
K8S_VERSION = "1.30"
IMAGE = "ghcr.io/hyserve/hyserve:0.1.0"
GPUS_PER_NODE = 8

# What each overlay renders, by kind: a missing or extra object fails.
EXPECTED = {
    "single-node": {
        "ConfigMap": 2, "Service": 1, "Deployment": 1, "PodDisruptionBudget": 1,
        "ServiceMonitor": 1,
    },
    "multi-node-lws": {
        "ConfigMap": 2, "Service": 2, "Deployment": 1, "StatefulSet": 1,
        "PodDisruptionBudget": 2, "ServiceMonitor": 1, "PodMonitor": 1, "LeaderWorkerSet": 1,
    },
    "multi-node-statefulset": {
        "ConfigMap": 2, "Service": 3, "Deployment": 1, "StatefulSet": 2,
        "PodDisruptionBudget": 2, "ServiceMonitor": 1, "PodMonitor": 1,
    },
}
OVERLAYS = sorted(EXPECTED)
CRDS = {"LeaderWorkerSet", "ServiceMonitor", "PodMonitor"}
COMMON_LABELS = {"app.kubernetes.io/name": "hyserve", "app.kubernetes.io/part-of": "hyserve"}


def kubectl():
    k = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not k or not os.path.exists(k):
        pytest.fail("kubectl not found: install it (scripts/test.sh installs Debian's "
                    "kubernetes-client) or point $KUBECTL at a kubectl binary")
    return k


_RENDERED = {}


def render(overlay):
    if overlay not in _RENDERED:
        path = os.path.join(K8S, "overlays", overlay)
        p = subprocess.run([kubectl(), "kustomize", path], capture_output=True, text=True)
        assert p.returncode == 0, f"kubectl kustomize {path} failed:\n{p.stderr}"
        docs = [d for d in yaml.safe_load_all(p.stdout) if d is not None]
        assert docs, f"kubectl kustomize {path} rendered nothing"
        _RENDERED[overlay] = docs
    return copy.deepcopy(_RENDERED[overlay])


def schema_check(obj):
    """Strict validation against the pinned Kubernetes schemas; fails with the path."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: {path}: {e.message}")


def as_pod_template(name, template):
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
            "template": template}


def pod_templates(docs):
    """(owner kind, owner name, pod template) of every workload in the documents."""
    out = []
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet"):
            out.append((kind, name, d["spec"]["template"]))
        elif kind == "LeaderWorkerSet":
            lwt = d["spec"]["leaderWorkerTemplate"]
            out.append((kind, name, lwt["workerTemplate"]))
            if "leaderTemplate" in lwt:
                out.append((kind, name + "-leader", lwt["leaderTemplate"]))
        elif kind == "Pod":
            out.append((kind, name, {"metadata": d["metadata"], "spec": d["spec"]}))
    return out


def containers(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def component(template):
    return template["metadata"]["labels"].get("app.kubernetes.io/component")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def arg(args, flag):
    """The value of `--flag=value` or `--flag value` in a container's args."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def hyserve_container(template):
    [c] = [c for c in template["spec"]["containers"] if c["image"] == IMAGE]
    return c


def serve_config_keys():
    """Field names of ServeConfig in src/config.rs: the keys the TOML may have."""
    src = open(os.path.join(ROOT, "src", "config.rs")).read()
    body = re.search(r"pub struct ServeConfig \{(.*?)\n\}", src, re.S).group(1)
    return set(re.findall(r"^\s*pub (\w+):", body, re.M))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_expected_objects(overlay):
    docs = render(overlay)
    kinds = collections.Counter(d["kind"] for d in docs)
    assert dict(kinds) == EXPECTED[overlay], f"{overlay} rendered {dict(kinds)}"
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects in {overlay}: {names}"
    for d in docs:
        assert "namespace" not in d["metadata"], "the manifests are namespace-less"
        labels = d["metadata"].get("labels", {})
        for k, v in COMMON_LABELS.items():
            assert labels.get(k) == v, f"{d['kind']}/{d['metadata']['name']} lacks {k}={v}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_schemas_strict(overlay):
    n = 0
    for d in render(overlay):
        if d["kind"] in CRDS:
            continue
        schema_check(d)
        n += 1
    for kind, name, t in pod_templates(render(overlay)):
        schema_check(as_pod_template(name, t))
        n += 1
    assert n >= sum(EXPECTED[overlay].values()) - sum(
        v for k, v in EXPECTED[overlay].items() if k in CRDS)


def test_strict_validation_rejects_unknown_fields():
    # The validator is not vacuous: an unknown field and a wrong type both fail.
    [dep] = [d for d in render("single-node") if d["kind"] == "Deployment"]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_contexts(overlay):
    templates = pod_templates(render(overlay))
    assert templates
    for kind, name, t in templates:
        pod_sc = t["spec"].get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert t["spec"].get("automountServiceAccountToken") is False, name
        for c in containers(t):
            sc = c.get("securityContext", {})
            where = f"{kind}/{name} container {c['name']}"
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser") == 10001, f"{where}: runAsUser"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: drop ALL"
            assert "resources" in c and c["resources"].get("requests"), f"{where}: requests"
            assert c["resources"].get("limits", {}).get("memory"), f"{where}: memory limit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images(overlay):
    seen = 0
    for kind, name, t in pod_templates(render(overlay)):
        for c in containers(t):
            if c["name"] == "etcd":
                assert c["image"].startswith("quay.io/coreos/etcd:v3.5."), c["image"]
            else:
                assert c["image"] == IMAGE, f"{name}/{c['name']}: {c['image']} (images: not applied?)"
                seen += 1
    assert seen >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hyserve_pods(overlay):
    """Volumes and environment every hyserve process relies on."""
    docs = render(overlay)
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    hyserve = [(n, t) for k, n, t in pod_templates(docs) if component(t) != "etcd"]
    assert hyserve
    for name, t in hyserve:
        volumes = {v["name"]: v for v in t["spec"]["volumes"]}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{name}: no ConfigMap {v['configMap']['name']}"
        c = hyserve_container(t)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        models = volumes[mounts["/models"]["name"]]
        assert models["persistentVolumeClaim"]["claimName"] == "hyserve-models", name
        assert mounts["/models"].get("readOnly") is True, name
        for path in ("/tmp", "/var/cache/hyserve"):
            assert "emptyDir" in volumes[mounts[path]["name"]], f"{name}: {path} not writable"
            assert not mounts[path].get("readOnly"), name
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HYSERVE_HOME"] == "/var/cache/hyserve", name
        assert env["HYSERVE_KERNEL_CACHE"].startswith("/var/cache/hyserve/"), name
        assert env["HYSERVE_LOG_FORMAT"] == "json", name
        assert arg(c["args"], "--model") == "/models/hunyuan-large", name
        assert arg(c["args"], "--device") == "cuda", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway(overlay):
    """The HTTP front (coordinator, or `serve` on one node): probes, drain, Service, PDB."""
    docs = render(overlay)
    gateways = [(k, n, t) for k, n, t in pod_templates(docs) if component(t) == "gateway"]
    assert len(gateways) == 1, gateways
    kind, name, t = gateways[0]
    c = hyserve_container(t)
    role = c["args"][0]
    assert role == ("serve" if overlay == "single-node" else "coordinator"), c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    assert arg(c["args"], "--http-addr") == "0.0.0.0:8000"
    assert arg(c["args"], "--grpc-addr") == "0.0.0.0:50051"
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"]["port"] == "http"

    # `hyserve drain` on the pod's loopback (/drain refuses other callers), at the
    # HTTP port, for less time than the grace period.
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[:2] == ["hyserve", "drain"], pre
    assert arg(pre, "--http-addr") == "127.0.0.1:%d" % ports["http"], pre
    assert t["spec"]["terminationGracePeriodSeconds"] > int(arg(pre, "--timeout-secs")), \
        "the grace period must outlast the drain"

    # The serve config: a TOML of known keys, mounted where --config points.
    config = arg(c["args"], "--config")
    mount = [mt for mt in c["volumeMounts"] if mt["mountPath"] == config]
    assert mount, f"--config {config} is not mounted"
    [vol] = [v for v in t["spec"]["volumes"] if v["name"] == mount[0]["name"]]
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"
            and d["metadata"]["name"] == vol["configMap"]["name"]]
    toml = tomllib.loads(cm["data"][mount[0]["subPath"]])
    unknown = set(toml) - serve_config_keys()
    assert not unknown, f"serve.toml keys ServeConfig does not have: {unknown}"
    assert toml["http_addr"] == "0.0.0.0:8000" and toml["log_prompts"] is False

    # The model config ConfigMap is the real Hunyuan-Large config.
    fixture = json.load(open(os.path.join(ROOT, "tests", "fixtures", "hunyuan-large-config",
                                          "config.json")))
    [model_cm] = [d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("hyserve-model-config")]
    assert json.loads(model_cm["data"]["config.json"]) == fixture

    labels = t["metadata"]["labels"]
    [svc] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "hyserve"]
    assert selects(svc["spec"]["selector"], labels)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (50051, "grpc")}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
            and selects(d["spec"]["selector"]["matchLabels"], labels)]
    assert len(pdbs) == 1, "one PodDisruptionBudget must cover the gateway"
    [sm] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("http", "/metrics")]

    if overlay == "single-node":
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert int(arg(c["args"], "--workers")) == int(gpus) == GPUS_PER_NODE
        assert not any(d["kind"] in ("StatefulSet", "LeaderWorkerSet", "PodMonitor") for d in docs)


@pytest.mark.parametrize("overlay", ["multi-node-lws", "multi-node-statefulset"])
def test_cluster(overlay):
    docs = render(overlay)
    by_kind = collections.defaultdict(list)
    for d in docs:
        by_kind[d["kind"]].append(d)

    # etcd: one member, reachable as the coordinator and workers are told.
    [etcd] = [d for d in by_kind["StatefulSet"] if d["metadata"]["name"] == "etcd"]
    assert etcd["spec"]["replicas"] == 1 and etcd["spec"]["serviceName"] == "etcd"
    [etcd_svc] = [d for d in by_kind["Service"] if d["metadata"]["name"] == "etcd"]
    assert etcd_svc["spec"]["clusterIP"] == "None"
    assert selects(etcd_svc["spec"]["selector"], etcd["spec"]["template"]["metadata"]["labels"])
    assert 2379 in [p["port"] for p in etcd_svc["spec"]["ports"]]
    etcd_args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    assert arg(etcd_args, "--advertise-client-urls") == "http://etcd-0.etcd:2379"
    assert arg(etcd_args, "--listen-client-urls") == "http://0.0.0.0:2379"
    etcd_mounts = etcd["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in etcd_mounts] == ["/var/lib/etcd"]
    assert isinstance(etcd["spec"].get("volumeClaimTemplates", []), list)

    [coord] = by_kind["Deployment"]
    assert coord["spec"]["replicas"] == 1
    cargs = hyserve_container(coord["spec"]["template"])["args"]
    assert arg(cargs, "--etcd") == "http://etcd:2379"

    # The workers: one process and one GPU per pod.
    if overlay == "multi-node-lws":
        [lws] = by_kind["LeaderWorkerSet"]
        assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        spec = lws["spec"]
        lwt = spec["leaderWorkerTemplate"]
        assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
        assert lwt["size"] == GPUS_PER_NODE, "one LWS group per node, one pod per GPU"
        assert lws["metadata"]["annotations"][
            "leaderworkerset.sigs.k8s.io/exclusive-topology"] == "kubernetes.io/hostname"
        assert lwt["restartPolicy"] in ("RecreateGroupOnPodRestart", "None")
        templates = [t for k, n, t in pod_templates([lws])]
        total = spec["replicas"] * lwt["size"]
    else:
        [sts] = [d for d in by_kind["StatefulSet"] if d["metadata"]["name"] == "hyserve-worker"]
        [svc] = [d for d in by_kind["Service"] if d["metadata"]["name"] == "hyserve-worker"]
        assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "hyserve-worker"
        assert selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
        assert selects(sts["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"])
        assert isinstance(sts["spec"].get("volumeClaimTemplates", []), list)
        templates = [sts["spec"]["template"]]
        total = sts["spec"]["replicas"]
    assert int(arg(cargs, "--expect-workers")) == total, \
        "--expect-workers must equal the number of worker pods"
    assert arg(cargs, "--cluster")

    for t in templates:
        labels = t["metadata"]["labels"]
        assert component(t) == "worker"
        for k, v in COMMON_LABELS.items():
            assert labels.get(k) == v, f"worker pods lack {k}={v}"
        c = hyserve_container(t)
        a = c["args"]
        assert a[0] == "worker"
        assert arg(a, "--etcd") == arg(cargs, "--etcd")
        assert arg(a, "--cluster") == arg(cargs, "--cluster")
        assert arg(a, "--gpu") == "0"
        assert arg(a, "--advertise") == "$(POD_IP):50061"
        assert arg(a, "--name") == "$(POD_NAME)"
        assert arg(a, "--listen") == "0.0.0.0:50061"
        assert arg(a, "--metrics-addr") == "0.0.0.0:9400"
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        res = c["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"cluster": 50061, "metrics": 9400}
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
        pdbs = [d for d in by_kind["PodDisruptionBudget"]
                if selects(d["spec"]["selector"]["matchLabels"], labels)]
        assert len(pdbs) == 1, "one PodDisruptionBudget must cover the workers"
        [pm] = by_kind["PodMonitor"]
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert selects(pm["spec"]["selector"]["matchLabels"], labels)
        assert [(e["port"], e["path"]) for e in pm["spec"]["podMetricsEndpoints"]] == [
            ("metrics", "/metrics")]


def test_examples():
    """The model PVC and the copy pod of docs/deploy.md."""
    docs = []
    for f in ("models-pvc.yaml", "model-copy-pod.yaml"):
        docs += [d for d in yaml.safe_load_all(open(os.path.join(K8S, "examples", f))) if d]
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Pod"]
    for d in docs:
        schema_check(d)
    assert docs[0]["metadata"]["name"] == "hyserve-models"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in docs[1]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == ["hyserve-models"]
