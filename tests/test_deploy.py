"""deploy/: the compose file and the Kubernetes manifests parse, and agree with each other
and with deploy/nginx.conf on the replicas' names (nginx routes sessions by the name a
replica writes into their ids). tests/test_replicas.py runs nginx.conf itself."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
NGINX_CONF = (DEPLOY / "nginx.conf").read_text()


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s() -> dict[tuple[str, str], dict]:
    docs = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load(path)]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if "metadata" in d}


def routed_replicas() -> list[str]:
    """Replica names in nginx.conf's map, each checked to route to its own upstream."""
    routes = re.findall(r"~\^/v1/sessions/sess_([a-z0-9-]+)\\\.\s+(\w+);", NGINX_CONF)
    assert routes and all(upstream == name.replace("-", "_") for name, upstream in routes)
    return [name for name, _ in routes]


def upstream(name: str) -> str:
    match = re.search(rf"upstream {name} {{(.*?)}}", NGINX_CONF, re.S)
    assert match, name
    return match.group(1)


def test_nginx_routes_each_replica_first_and_the_others_as_backup():
    replicas = routed_replicas()
    assert len(replicas) >= 2
    spread = upstream("workmem_any")
    assert "least_conn;" in spread and all(f"server {r}:8000 " in spread for r in replicas)
    for r in replicas:
        own = upstream(r.replace("-", "_"))
        assert re.search(rf"server {r}:8000 max_fails=\d+ fail_timeout=\w+;", own)
        assert all(f"server {other}:8000 backup;" in own for other in replicas if other != r)
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_next_upstream error timeout",
                      "keepalive "):
        assert directive in NGINX_CONF
    assert "non_idempotent" not in NGINX_CONF.split("proxy_next_upstream ", 1)[1].split(";")[0]


def test_compose_runs_the_routed_replicas_on_one_shared_session_volume():
    (compose,) = load(DEPLOY / "compose.replicas.yaml")
    services = compose["services"]
    replicas = {name: s for name, s in services.items() if name.startswith("workmem-")}
    assert sorted(replicas) == routed_replicas()
    for name, service in replicas.items():
        env = service["environment"]
        assert env["WORKMEM_REPLICA_ID"] == name and service["image"] == "workmem:latest"
        assert f"sessions:{env['WORKMEM_SESSION_DIR']}" in service["volumes"]
    assert "sessions" in compose["volumes"]
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == set(replicas)
    mount = next(v for v in nginx["volumes"] if v.endswith(":/etc/nginx/nginx.conf:ro"))
    assert (DEPLOY / mount.split(":")[0]).resolve() == DEPLOY / "nginx.conf"


def test_kubernetes_manifests_agree_with_nginx_conf():
    objects = k8s()
    config = objects[("ConfigMap", "workmem-nginx")]["data"]["nginx.conf"]
    assert config == NGINX_CONF  # the ConfigMap carries deploy/nginx.conf verbatim
    replicas = routed_replicas()
    sts = objects[("StatefulSet", "workmem")]
    assert sts["spec"]["replicas"] == len(replicas)
    assert [f"workmem-{i}" for i in range(len(replicas))] == replicas  # the pods' names
    for name in replicas:  # a stable Service per pod, named as nginx.conf names it
        service = objects[("Service", name)]["spec"]
        assert service["selector"] == {"statefulset.kubernetes.io/pod-name": name}
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["WORKMEM_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["WORKMEM_SESSION_DIR"]["value"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = objects[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    nginx = objects[("Deployment", "workmem-nginx")]["spec"]["template"]["spec"]
    assert nginx["volumes"][0]["configMap"]["name"] == "workmem-nginx"
    kustomize = load(DEPLOY / "k8s" / "kustomization.yaml")[0]
    assert sorted(kustomize["resources"]) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                                    if p.name != "kustomization.yaml")
