"""Checks what the schemas cannot: the properties the chart promises (see README)."""
import sys
import yaml

def objects(path):
    with open(path) as f:
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f) if d}

def spec_of(o, kind, name):
    return o[(kind, name)]["spec"]["template"]["spec"]

def check(path, full):
    o = objects(path)
    problems = []
    def expect(cond, what):
        if not cond:
            problems.append(what)

    zt = o[("DaemonSet", "ztunnel")]
    spec = zt["spec"]["template"]["spec"]
    c = spec["containers"][0]
    expect(not spec.get("hostNetwork"), "ztunnel must not be hostNetwork")
    caps = c["securityContext"]["capabilities"]
    expect(caps["drop"] == ["ALL"] and sorted(caps["add"]) == ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"],
           f"ztunnel capabilities: {caps}")
    expect(not c["securityContext"].get("privileged"), "ztunnel must not be privileged")
    expect(zt["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0},
           "ztunnel rollout must surge")
    expect(c["readinessProbe"]["httpGet"]["port"] == 15021, "ztunnel readiness on 15021")
    ann = zt["spec"]["template"]["metadata"]["annotations"]
    expect(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "15020",
           "ztunnel scrape annotations")
    expect(spec["priorityClassName"] == "system-node-critical", "ztunnel priority")
    vols = {v["name"]: v for v in spec["volumes"]}
    token = vols["mesh-token"]["projected"]["sources"][0]["serviceAccountToken"]
    expect(token["audience"] == "istio-ca", "projected token audience istio-ca")
    expect(vols["zds"]["hostPath"]["path"] == "/var/run/ztunnel", "ZDS socket hostPath")

    # The CA key reaches only the control plane.
    for name in ("ztunnel", "mesh-cni"):
        for v in o[("DaemonSet", name)]["spec"]["template"]["spec"]["volumes"]:
            if "secret" in v:
                items = [i["key"] for i in v["secret"].get("items", [])]
                expect(items == ["root-cert.pem"], f"{name} mounts only the root bundle, got {items}")

    cni = o[("DaemonSet", "mesh-cni")]["spec"]["template"]["spec"]
    install = next(c for c in cni["containers"] if c["name"] == "install")
    expect(install["command"][-1] == "install", "cni installer container")
    expect("--daemonset=mesh-system/mesh-cni" in install["args"], "installer knows its DaemonSet")
    role = o[("Role", "mesh-cni")]
    expect(role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": ["mesh-cni"], "verbs": ["get"]}],
           "the installer may only read its own DaemonSet")
    proc = next(v for v in cni["volumes"] if v["name"] == "host-proc")
    agent = next(c for c in cni["containers"] if c["name"] == "agent")
    proc_mount = next(m for m in agent["volumeMounts"] if m["name"] == "host-proc")
    expect(proc["hostPath"]["path"] == "/proc" and proc_mount.get("readOnly"), "host /proc read-only")

    role = o[("ClusterRole", "mesh-control-mesh-system")]
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    expect(verbs <= {"get", "list", "watch", "create", "patch", "update"}, f"control RBAC verbs: {verbs}")
    writes = sorted(res for r in role["rules"] if set(r["verbs"]) & {"create", "patch", "update", "delete"}
                    for res in r["resources"])
    expect(writes == ["configmaps", "deployments", "gateways/finalizers", "gateways/status",
                      "serviceaccounts", "services", "tokenreviews"],
           f"control writes only TokenReviews and waypoint objects, got {writes}")
    expect(not any(r["resources"] == ["secrets"] for r in role["rules"]), "control never reads Secrets")
    expect(("PodDisruptionBudget", "mesh-control") in o, "control PDB")

    control = o[("Deployment", "mesh-control")]["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(control["args"])
    # Readiness is mesh-control's own verdict (policies readable, serving), not an open port.
    expect("--readiness-listen=[::]:15021" in args, f"control readiness listener: {args}")
    expect(control["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021}, "control /ready probe")
    if full:
        expect(("Secret", "mesh-ca") not in o, "existingSecret: no generated CA")
        expect("--trust-domain=example.org" in args and "--exclude-namespace=legacy" in args, f"control args: {args}")
        expect("--dns-capture=false" in agent["args"], "DNS capture turned off")
        expect(spec["containers"][0]["image"] == "registry.example.com/platform/mesh:1.2.3", "image")
        ns = o.get(("Namespace", "mesh-system"))
        expect(ns is not None, "namespace.create renders the release Namespace")
        if ns:
            labels = ns["metadata"]["labels"]
            expect(all(labels.get(f"pod-security.kubernetes.io/{m}") == "privileged"
                       for m in ("enforce", "audit", "warn")), f"Pod Security labels: {labels}")
            expect(ns["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep",
                   "the Namespace (with the CA Secret) is kept on uninstall")
    else:
        # Rendered offline, the CA is never generated: the Secret is named (existingSecret).
        expect(("Secret", "mesh-ca") not in o, "no CA generated when rendered offline")
        vol = next(v for v in spec_of(o, "Deployment", "mesh-control")["volumes"] if v["name"] == "ca")
        expect(vol["secret"]["secretName"] == "mesh-ca", "control mounts the named CA Secret")
        expect(not any(k == "Namespace" for k, _ in o), "no Namespace unless namespace.create")
        expect("--dns-capture=true" in agent["args"], "DNS capture on by default")
    return problems

if __name__ == "__main__":
    failed = False
    for path, full in ((sys.argv[1], False), (sys.argv[2], True)):
        for p in check(path, full):
            print(f"chart-properties: {path}: {p}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)
