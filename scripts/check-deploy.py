#!/usr/bin/env python3
"""Offline checks of the deployment files against the real binary.

- the Kubernetes overlays render (kubectl kustomize) and pass
  kubernetes-validate --strict against the Kubernetes schemas;
- docker-compose.yml passes `docker-compose config`;
- every command, flag and environment variable that the manifests and the
  compose file give the containers exists in the binary (its --help and
  `dualwrite ctl env-vars`), every secret the mounted configuration names is
  provided, and the metrics port agrees everywhere;
- the configuration files validate (`dualwrite ctl validate`);
- the PrometheusRule carries exactly deploy/prometheus/alerts.yml.

Usage: check-deploy.py BINARY   (prints one line per check and `N passed, N failed`)
"""
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = sys.argv[1]
passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def run(cmd, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def help_of(args):
    return run([BIN, *args, "--help"]).stdout


def env_vars(config, secrets):
    import os
    env = dict(os.environ, **{k: "x" for k in secrets})
    out = run([BIN, "--config", str(config), "ctl", "env-vars"], env=env)
    return {line.split("\t")[0] for line in out.stdout.splitlines() if line}


def secrets_named(path):
    """Environment variables a configuration file reads secrets from (comments left out)."""
    text = "\n".join(l for l in Path(path).read_text().splitlines() if not l.lstrip().startswith("#"))
    return sorted(set(re.findall(r'env = "([A-Z0-9_]+)"', text)))


def check_command(where, args, env_names, known_env, metrics_port):
    top = help_of([])
    sub = args[0]
    commands = re.findall(r"^  ([a-z-]+)\s", top, re.M)
    check(f"{where}: subcommand `{sub}` exists", sub in commands, f"not in {commands}")
    sub_help = help_of([sub])
    for flag in [a for a in args[1:] if a.startswith("--")]:
        check(f"{where}: flag {flag} of `{sub}` exists", flag in sub_help, sub_help)
    for name in env_names:
        known = name in known_env or (name.startswith("DUALWRITE_KAFKA_") and "DUALWRITE_KAFKA_<PROPERTY>" in known_env)
        check(f"{where}: environment variable {name} is read by the binary", known, sorted(known_env))
    if metrics_port is not None:
        check(f"{where}: metrics address port is {metrics_port}", True)


def kubernetes():
    venv_validate = Path.home() / ".cache/dualwrite/venv/bin/kubernetes-validate"
    for overlay in ["demo", "prometheus-operator"]:
        out = run(["kubectl", "kustomize", str(ROOT / "deploy/kubernetes/overlays" / overlay)])
        check(f"kustomize renders overlay {overlay}", out.returncode == 0, out.stderr)
        if out.returncode != 0:
            continue
        rendered = Path(f"/tmp/dualwrite-k8s-{overlay}.yaml")
        rendered.write_text(out.stdout)
        v = run([str(venv_validate), "--strict", "--quiet", str(rendered)])
        check(f"overlay {overlay} passes kubernetes-validate --strict", v.returncode == 0, v.stdout + v.stderr)
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        config_file = ROOT / "deploy/kubernetes/base/dualwrite.toml"
        secrets = secrets_named(config_file)
        known = env_vars(config_file, secrets)
        for d in docs:
            if d["kind"] == "PrometheusRule":
                alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
                check("PrometheusRule equals deploy/prometheus/alerts.yml", d["spec"] == alerts, "rules drifted")
            if d["kind"] not in ("Deployment", "StatefulSet"):
                continue
            name = d["metadata"]["name"]
            pod = d["spec"]["template"]["spec"]
            c = pod["containers"][0]
            env = {e["name"]: e for e in c.get("env", [])}
            if "DUALWRITE_INSTANCES" in env:
                n = int(env["DUALWRITE_INSTANCES"]["value"])
                check(f"{overlay}/{name}: DUALWRITE_INSTANCES equals replicas", n == d["spec"]["replicas"], (n, d["spec"]["replicas"]))
                check(f"{overlay}/{name}: sharded only as a StatefulSet", d["kind"] == "StatefulSet", d["kind"])
                idx = env.get("DUALWRITE_INSTANCE_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
                check(f"{overlay}/{name}: instance index from the pod index", "pod-index" in idx, idx)
                check(f"{overlay}/{name}: only the router and appliers are sharded", c["args"][0] in ("router", "apply"), c["args"])
            port = int(env["DUALWRITE_METRICS_ADDR"]["value"].rsplit(":", 1)[1])
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            check(f"{overlay}/{name}: containerPort metrics = DUALWRITE_METRICS_ADDR port", ports.get("metrics") == port, ports)
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            check(f"{overlay}/{name}: scrape annotation port", ann.get("prometheus.io/port") == str(port), ann)
            for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
                g = c[probe]["httpGet"]
                check(f"{overlay}/{name}: {probe} on {path}", g["path"] == path and g["port"] in ("metrics", port), g)
            for s in secrets:
                check(f"{overlay}/{name}: provides secret {s}", s in env, sorted(env))
            check_command(f"{overlay}/{name}", c["args"], env.keys(), known, port)
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            check(f"{overlay}/{name}: config mounted at DUALWRITE_CONFIG", str(Path(env["DUALWRITE_CONFIG"]["value"]).parent) in mounts, mounts)
            if c["args"][0] == "pause-buffer" and c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                check(f"{overlay}/{name}: a writable /tmp for the resolver's spill files", "/tmp" in mounts, mounts)


def compose():
    out = run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"])
    check("docker-compose config", out.returncode == 0, out.stderr)
    if out.returncode != 0:
        return
    doc = yaml.safe_load(out.stdout)
    config_file = ROOT / "deploy/compose/dualwrite.toml"
    secrets = secrets_named(config_file)
    known = env_vars(config_file, secrets)
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for sc in prom["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]}
    for name, svc in doc["services"].items():
        if svc.get("image") != "dualwrite:dev":
            continue
        env = svc.get("environment", {})
        for s in secrets:
            check(f"compose/{name}: provides secret {s}", s in env, sorted(env))
        port = None
        if "DUALWRITE_METRICS_ADDR" in env:
            port = int(env["DUALWRITE_METRICS_ADDR"].rsplit(":", 1)[1])
            check(f"compose/{name}: Prometheus scrapes {name}:{port}", f"{name}:{port}" in targets, sorted(targets))
        check_command(f"compose/{name}", svc["command"], env.keys(), known, port)
    for f in ["deploy/compose/dualwrite.toml", "deploy/kubernetes/base/dualwrite.toml"]:
        import os
        env = dict(os.environ, **{k: "x" for k in secrets_named(ROOT / f)})
        v = run([BIN, "--config", str(ROOT / f), "ctl", "validate"], env=env)
        check(f"{f} validates", v.returncode == 0, v.stderr)


kubernetes()
compose()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
