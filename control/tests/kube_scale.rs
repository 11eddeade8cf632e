//! mesh-control at scale: the real binary in Kubernetes mode against the test API server
//! holding a cluster the size of the issue's target (10,000 pods on 100 nodes, 2,000
//! Services with their EndpointSlices, 500 AuthorizationPolicies, ServiceAccounts),
//! every object shaped as a 1.28-1.33 API server lists it (managedFields, ownerReferences,
//! `podIPs`, probes, node images). A delta xDS client (the data plane's own, `mesh-xds`,
//! applying into ztunnel's state) subscribes as a node's ztunnel.
//!
//! Asserted (machine-independent): every workload and Service is served, one pod's
//! changed IP and label reach the client, and mesh-control's peak RSS (VmHWM) stays
//! within 256 MiB. Printed with met/missed against the targets, never asserted (machines
//! differ 2x): time to first serve (start until the client holds the full set; target
//! 10 s) and time to push one pod change (API server watch event until the client has
//! it; target 1 s).
//!
//! The figures for the README are a release build's, on an idle machine:
//!
//! ```text
//! cargo test --release -p mesh-control --test kube_scale -- --nocapture
//! ```
//!
//! `SCALE_LOG=info` (a `RUST_LOG` filter) prints mesh-control's log at the end.

mod fake_api;

use fake_api::{Fake, write_kubeconfig};
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use mesh_proto::{type_url, workload as pb};
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const PODS: usize = 10_000;
const NODES: usize = 100;
const NAMESPACES: usize = 100;
/// Namespaces enrolled in the mesh (`istio.io/dataplane-mode=ambient`); the rest are not.
const ENROLLED: usize = 80;
const SERVICES: usize = 2_000;
const POLICIES: usize = 500;
const PODS_PER_SERVICE: usize = PODS / SERVICES;
const SERVICES_PER_NAMESPACE: usize = SERVICES / NAMESPACES;

const MEMORY_TARGET_MIB: u64 = 256;
const FIRST_SERVE_TARGET: Duration = Duration::from_secs(10);
const PUSH_TARGET: Duration = Duration::from_secs(1);

const NODE_TOKEN: &str = "scale-node-000-token-0123456789";

fn namespace(i: usize) -> String {
    format!("team-{i:03}")
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

fn service_name(s: usize) -> String {
    format!("svc-{s:04}")
}

fn pod_name(s: usize, k: usize) -> String {
    format!("{}-7d9f8c6b5-{k:05x}", service_name(s))
}

fn pod_ip(p: usize) -> String {
    format!("10.{}.{}.{}", 64 + p / 65536, (p / 256) % 256, p % 256)
}

fn uid(kind: u32, i: usize) -> String {
    format!(
        "{kind:08x}-{:04x}-4{:03x}-a{:03x}-{i:012x}",
        i % 65536,
        i % 4096,
        i % 4096
    )
}

const TS: &str = "2026-11-02T08:15:30Z";

/// The managedFields a controller-created pod carries: the controller's and the kubelet's.
fn pod_managed_fields() -> Value {
    json!([
        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": TS,
         "fieldsType": "FieldsV1", "fieldsV1": {
            "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:version": {}},
                           "f:ownerReferences": {".": {}, "k:{\"uid\":\"x\"}": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {".": {}, "k:{\"name\":\"PORT\"}": {".": {}, "f:name": {}, "f:value": {}}},
                       "f:image": {}, "f:imagePullPolicy": {}, "f:livenessProbe": {".": {}, "f:httpGet": {".": {}, "f:path": {}, "f:port": {}, "f:scheme": {}}},
                       "f:name": {}, "f:ports": {".": {}, "k:{\"containerPort\":8080,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}}},
                       "f:readinessProbe": {".": {}, "f:httpGet": {".": {}, "f:path": {}, "f:port": {}, "f:scheme": {}}},
                       "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}}, "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}}},
                       "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {}}},
                       "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {},
                       "f:securityContext": {}, "f:serviceAccount": {}, "f:serviceAccountName": {}, "f:terminationGracePeriodSeconds": {}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": TS, "subresource": "status",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {
            "f:conditions": {"k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                             "k:{\"type\":\"Initialized\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                             "k:{\"type\":\"PodReadyToStartContainers\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                             "k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
            "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {},
            "f:podIPs": {".": {}, "k:{\"ip\":\"x\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}}}
    ])
}

/// Pod `k` of Service `s`, as a Deployment's pod is listed.
fn pod(s: usize, k: usize) -> Value {
    let p = s * PODS_PER_SERVICE + k;
    let ns = namespace(s / SERVICES_PER_NAMESPACE);
    let app = service_name(s);
    let node = node_name(p % NODES);
    let host_ip = format!("172.18.{}.{}", p % NODES / 250, p % NODES % 250 + 2);
    let conditions: Vec<Value> = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .iter()
    .map(|t| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": TS}))
    .collect();
    json!({
        "metadata": {
            "name": pod_name(s, k), "generateName": format!("{app}-7d9f8c6b5-"), "namespace": ns,
            "uid": uid(1, p), "resourceVersion": (1000 + p).to_string(), "creationTimestamp": TS,
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": TS},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9f8c6b5"),
                                 "uid": uid(2, s), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": pod_managed_fields(),
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x8k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "containers": [{
                "name": "app", "image": format!("registry.example.com/{ns}/{app}:1.4.2"),
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "PORT", "value": "8080"}],
                "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "kube-api-access-x8k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": app, "serviceAccount": app, "nodeName": node, "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running", "conditions": conditions, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip(p), "podIPs": [{"ip": pod_ip(p)}], "startTime": TS, "qosClass": "Burstable",
            "containerStatuses": [{"name": "app", "state": {"running": {"startedAt": TS}}, "lastState": {},
                "ready": true, "restartCount": 0, "image": format!("registry.example.com/{ns}/{app}:1.4.2"),
                "imageID": format!("registry.example.com/{ns}/{app}@sha256:{:064x}", s),
                "containerID": format!("containerd://{:064x}", p), "started": true}],
        },
    })
}

fn service(s: usize) -> Value {
    let ns = namespace(s / SERVICES_PER_NAMESPACE);
    let ip = format!("10.96.{}.{}", s / 250, s % 250 + 2);
    json!({
        "metadata": {"name": service_name(s), "namespace": ns, "uid": uid(3, s),
                     "resourceVersion": (100_000 + s).to_string(), "creationTimestamp": TS,
                     "labels": {"app": service_name(s)},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                        format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{}\",\"namespace\":\"{ns}\"}},\"spec\":{{\"ports\":[{{\"name\":\"http\",\"port\":80,\"targetPort\":8080}}],\"selector\":{{\"app\":\"{}\"}}}}}}\n", service_name(s), service_name(s))},
                     "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1", "time": TS,
                                        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                                        "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                                                   "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]},
        "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                 "selector": {"app": service_name(s)}, "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                 "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    })
}

fn endpoint_slice(s: usize) -> Value {
    let ns = namespace(s / SERVICES_PER_NAMESPACE);
    let endpoints: Vec<Value> = (0..PODS_PER_SERVICE)
        .map(|k| {
            let p = s * PODS_PER_SERVICE + k;
            json!({"addresses": [pod_ip(p)], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name(s, k), "uid": uid(1, p)},
                   "nodeName": node_name(p % NODES)})
        })
        .collect();
    json!({
        "metadata": {"name": format!("{}-x7k2p", service_name(s)), "generateName": format!("{}-", service_name(s)),
                     "namespace": ns, "uid": uid(4, s), "resourceVersion": (200_000 + s).to_string(), "generation": 6,
                     "creationTimestamp": TS,
                     "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                "kubernetes.io/service-name": service_name(s), "app": service_name(s)},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": TS},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service_name(s), "uid": uid(3, s),
                                          "controller": true, "blockOwnerDeletion": true}],
                     "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1",
                                        "time": TS, "fieldsType": "FieldsV1", "fieldsV1": {"f:addressType": {}, "f:endpoints": {},
                                        "f:metadata": {"f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                                        "f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}},
                                        "f:ownerReferences": {".": {}, "k:{\"uid\":\"x\"}": {}}}, "f:ports": {}}}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    })
}

fn service_account(ns: &str, name: &str, i: usize) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "uid": uid(5, i), "resourceVersion": (300_000 + i).to_string(),
                        "creationTimestamp": TS}})
}

/// A node as the kubelet reports it: labels, addresses, capacity, conditions, images.
fn node(i: usize) -> Value {
    let images: Vec<Value> = (0..40)
        .map(|k| json!({"names": [format!("registry.example.com/team-{k:03}/app@sha256:{:064x}", k * 7 + i),
                                   format!("registry.example.com/team-{k:03}/app:1.4.{k}")],
                        "sizeBytes": 48_000_000 + k * 1000}))
        .collect();
    let conditions: Vec<Value> = [
        ("MemoryPressure", "False"),
        ("DiskPressure", "False"),
        ("PIDPressure", "False"),
        ("Ready", "True"),
    ]
    .iter()
    .map(|(t, s)| json!({"type": t, "status": s, "lastHeartbeatTime": TS, "lastTransitionTime": TS,
                         "reason": format!("Kubelet{t}"), "message": "kubelet is posting ready status"}))
    .collect();
    json!({
        "metadata": {"name": node_name(i), "uid": uid(6, i), "resourceVersion": (400_000 + i).to_string(), "creationTimestamp": TS,
                     "labels": {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                                "kubernetes.io/hostname": node_name(i), "kubernetes.io/os": "linux",
                                "topology.kubernetes.io/region": "eu-west-1", "topology.kubernetes.io/zone": format!("eu-west-1{}", ["a", "b", "c"][i % 3]),
                                "node.kubernetes.io/instance-type": "m6i.2xlarge"},
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
                     "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": TS, "subresource": "status",
                                        "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:allocatable": {}, "f:capacity": {}, "f:conditions": {}, "f:images": {}, "f:nodeInfo": {}}}}]},
        "spec": {"podCIDR": format!("10.244.{i}.0/24"), "podCIDRs": [format!("10.244.{i}.0/24")], "providerID": format!("aws:///eu-west-1a/i-{i:017x}")},
        "status": {"capacity": {"cpu": "8", "ephemeral-storage": "104845292Ki", "memory": "32386524Ki", "pods": "110"},
                   "allocatable": {"cpu": "7910m", "ephemeral-storage": "95551679124", "memory": "31369692Ki", "pods": "110"},
                   "conditions": conditions,
                   "addresses": [{"type": "InternalIP", "address": format!("172.18.{}.{}", i / 250, i % 250 + 2)}, {"type": "Hostname", "address": node_name(i)}],
                   "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                   "nodeInfo": {"machineID": format!("{i:032x}"), "systemUUID": format!("{i:032x}"), "bootID": format!("{i:032x}"),
                                "kernelVersion": "6.1.0-27-amd64", "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.22",
                                "kubeletVersion": "v1.31.2", "kubeProxyVersion": "v1.31.2", "operatingSystem": "linux", "architecture": "amd64"},
                   "images": images},
    })
}

/// Policy `i`: per namespace, ALLOW and DENY rules on principals, namespaces and ports.
fn authorization_policy(i: usize) -> Value {
    let n = i % NAMESPACES;
    let ns = namespace(n);
    let s = n * SERVICES_PER_NAMESPACE + (i / NAMESPACES) % SERVICES_PER_NAMESPACE;
    let caller = format!(
        "cluster.local/ns/{}/sa/{}",
        namespace((n + 1) % NAMESPACES),
        service_name(s)
    );
    let spec = if i % 5 == 4 {
        json!({"action": "DENY", "selector": {"matchLabels": {"app": service_name(s)}},
               "rules": [{"from": [{"source": {"notNamespaces": [ns.clone(), namespace((n + 1) % NAMESPACES)]}}],
                          "to": [{"operation": {"ports": ["8080"]}}]}]})
    } else {
        json!({"action": "ALLOW", "selector": {"matchLabels": {"app": service_name(s)}},
               "rules": [{"from": [{"source": {"principals": [caller]}}, {"source": {"namespaces": [ns.clone()]}}],
                          "to": [{"operation": {"ports": ["8080", "9090"]}}]}]})
    };
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("allow-{i:03}"), "namespace": ns, "uid": uid(7, i), "generation": 1,
                     "resourceVersion": (500_000 + i).to_string(), "creationTimestamp": TS,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": spec.to_string()},
                     "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "security.istio.io/v1",
                                        "time": TS, "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {".": {}, "f:action": {}, "f:rules": {}, "f:selector": {}}}}]},
        "spec": spec,
    })
}

/// The cluster, by plural.
fn cluster() -> Vec<(&'static str, Vec<Value>)> {
    let mut namespaces = vec![
        json!({"metadata": {"name": "default", "uid": uid(8, 1000)}}),
        json!({"metadata": {"name": "kube-system", "uid": uid(8, 1001)}}),
    ];
    let mut accounts = vec![];
    for n in 0..NAMESPACES {
        let labels = if n < ENROLLED {
            json!({"kubernetes.io/metadata.name": namespace(n), "istio.io/dataplane-mode": "ambient"})
        } else {
            json!({"kubernetes.io/metadata.name": namespace(n)})
        };
        namespaces.push(json!({"metadata": {"name": namespace(n), "uid": uid(8, n), "labels": labels,
                                             "resourceVersion": (600_000 + n).to_string(), "creationTimestamp": TS},
                                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}));
        accounts.push(service_account(&namespace(n), "default", SERVICES + n));
    }
    for s in 0..SERVICES {
        accounts.push(service_account(
            &namespace(s / SERVICES_PER_NAMESPACE),
            &service_name(s),
            s,
        ));
    }
    let pods = (0..SERVICES)
        .flat_map(|s| (0..PODS_PER_SERVICE).map(move |k| pod(s, k)))
        .collect();
    vec![
        ("namespaces", namespaces),
        ("nodes", (0..NODES).map(node).collect()),
        ("pods", pods),
        ("services", (0..SERVICES).map(service).collect()),
        (
            "endpointslices",
            (0..SERVICES).map(endpoint_slice).collect(),
        ),
        ("serviceaccounts", accounts),
        (
            "authorizationpolicies",
            (0..POLICIES).map(authorization_policy).collect(),
        ),
    ]
}

/// What the subscribed client holds, in ztunnel's own state, and when it last changed.
#[derive(Default)]
struct Held {
    state: mesh_discovery::State,
    rejected: Vec<String>,
}

struct Client {
    held: Arc<Mutex<Held>>,
    changed: Arc<Notify>,
}

impl mesh_xds::Handler for Client {
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let mut held = self.held.lock().unwrap();
        let mut rejected = vec![];
        for r in &resp.resources {
            let applied = r
                .resource
                .as_ref()
                .ok_or("no body".to_string())
                .and_then(|a| pb::Address::decode(a.value.as_slice()).map_err(|e| e.to_string()))
                .and_then(|a| held.state.apply_address(&a).map_err(|e| e.to_string()));
            if let Err(e) = applied {
                rejected.push((r.name.clone(), e));
            }
        }
        for name in &resp.removed_resources {
            held.state.remove_address(name);
        }
        held.rejected
            .extend(rejected.iter().map(|(n, e)| format!("{n}: {e}")));
        self.changed.notify_waiters();
        rejected
    }
}

/// Waits until `f` holds of what the client holds; None after `limit`.
async fn until(
    held: &Mutex<Held>,
    changed: &Notify,
    limit: Duration,
    f: impl Fn(&Held) -> bool,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let notified = changed.notified();
        if f(&held.lock().unwrap()) {
            return Some(Instant::now());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

/// The mesh-control process, killed (by its pid) when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `VmHWM`/`VmRSS` line of /proc/PID/status, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) the process has used: a figure that does not depend on how
/// busy the machine is, unlike the wall-clock times.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux architecture we run on.
    Duration::from_millis(ticks * 10)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pods_are_served_within_memory_and_a_pod_change_is_pushed() {
    let fake = Fake::default();
    let objects = cluster();
    let json_bytes: usize = objects
        .iter()
        .flat_map(|(_, v)| v.iter())
        .map(|o| o.to_string().len())
        .sum();
    for (plural, items) in objects {
        fake.set(plural, items);
    }
    let url = fake.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), &url);
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "tokens:\n- {{token: {NODE_TOKEN}, node: {}}}\n",
            node_name(0)
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), NODE_TOKEN).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log = std::fs::File::create(dir.path().join("mesh-control.log")).unwrap();

    let started = Instant::now();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["--source", "kubernetes", "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--tokens")
        .arg(dir.path().join("tokens.yaml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--debug-listen",
            "127.0.0.1:0",
            "--dns-name",
            "mesh-control.test",
        ])
        .env(
            "RUST_LOG",
            std::env::var("SCALE_LOG").unwrap_or("error".into()),
        )
        // The memory figure should not depend on the machine's core count: tokio starts a
        // worker per core and glibc a malloc arena per thread by default. Two of each, as
        // on the 2-core machines the figures are stated for.
        .env("TOKIO_WORKER_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let process = Process(child);
    let pid = process.0.id();
    let log_tail = || {
        let text = std::fs::read_to_string(dir.path().join("mesh-control.log")).unwrap_or_default();
        text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    };

    // The state dir's root is written before anything is served.
    let root = dir.path().join("state/root-cert.pem");
    while !root.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no root certificate: {}",
            log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = Arc::new(Mutex::new(Held::default()));
    let changed = Arc::new(Notify::new());
    let client = tokio::spawn(mesh_xds::run(
        mesh_xds::ControlPlane {
            address: format!("https://127.0.0.1:{port}"),
            root_pem: std::fs::read_to_string(&root).unwrap(),
            hostname: Some("mesh-control.test".into()),
            token_file: Some(dir.path().join("token")),
            cluster_id: "Kubernetes".into(),
        },
        Default::default(),
        vec![type_url::ADDRESS],
        Client {
            held: held.clone(),
            changed: changed.clone(),
        },
    ));

    // Every pod is a workload (enrolled or not) and every Service is served.
    let complete =
        |h: &Held| h.state.workloads().count() >= PODS && h.state.services().count() >= SERVICES;
    let served = until(&held, &changed, Duration::from_secs(600), complete).await;
    let Some(served) = served else {
        let h = held.lock().unwrap();
        panic!(
            "not everything served: {} workloads, {} services; mesh-control says:\n{}",
            h.state.workloads().count(),
            h.state.services().count(),
            log_tail()
        );
    };
    let first_serve = served - started;
    let first_serve_cpu = cpu_time(pid);
    {
        let h = held.lock().unwrap();
        assert!(
            h.rejected.is_empty(),
            "NACKed: {:?}",
            &h.rejected[..h.rejected.len().min(5)]
        );
        let w = h
            .state
            .workload_by_pod(&namespace(0), &pod_name(0, 0))
            .expect("an enrolled pod");
        assert!(w.hbone, "pods of enrolled namespaces are enrolled");
        let other = h
            .state
            .workload_by_pod(&namespace(NAMESPACES - 1), &pod_name(SERVICES - 1, 0))
            .expect("a pod outside the mesh is still a workload");
        assert!(!other.hbone);
    }

    // One pod moves to a new IP and gains a label, as a watch event.
    let (s, k) = (SERVICES / 2, 3);
    let new_ip: IpAddr = "10.250.1.7".parse().unwrap();
    let mut moved = pod(s, k);
    moved["status"]["podIP"] = json!(new_ip.to_string());
    moved["status"]["podIPs"] = json!([{"ip": new_ip.to_string()}]);
    moved["metadata"]["labels"]["version"] = json!("v2");
    let ns = namespace(s / SERVICES_PER_NAMESPACE);
    let cpu_before_push = cpu_time(pid);
    let pushed_at = Instant::now();
    fake.push("pods", "MODIFIED", moved);
    let pushed = until(&held, &changed, Duration::from_secs(120), |h| {
        h.state
            .workload_by_pod(&ns, &pod_name(s, k))
            .is_some_and(|w| w.addresses == [new_ip] && w.canonical_revision == "v2")
    })
    .await
    .unwrap_or_else(|| panic!("the pod change never reached the client:\n{}", log_tail()));
    let push = pushed - pushed_at;
    let push_cpu = cpu_time(pid).saturating_sub(cpu_before_push);
    assert!(
        held.lock().unwrap().state.destination("", new_ip).is_some(),
        "the new IP is looked up as the pod"
    );

    if std::env::var("SCALE_LOG").is_ok() {
        println!(
            "{}",
            std::fs::read_to_string(dir.path().join("mesh-control.log")).unwrap_or_default()
        );
    }
    let peak_kib = proc_kib(pid, "VmHWM");
    let rss_kib = proc_kib(pid, "VmRSS");
    let (anon_kib, file_kib) = (proc_kib(pid, "RssAnon"), proc_kib(pid, "RssFile"));
    client.abort();
    drop(process);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "scale ({profile} build): {PODS} pods on {NODES} nodes in {NAMESPACES} namespaces ({ENROLLED} enrolled), \
         {SERVICES} services + EndpointSlices, {POLICIES} AuthorizationPolicies; {} MiB of JSON in the API server",
        json_bytes >> 20
    );
    println!(
        "  peak RSS (VmHWM): {} MiB (RSS now {} MiB: heap and stacks {} MiB, binary and libraries {} MiB), target <= {MEMORY_TARGET_MIB} MiB: {}",
        peak_kib / 1024,
        rss_kib / 1024,
        anon_kib / 1024,
        file_kib / 1024,
        verdict(peak_kib / 1024 <= MEMORY_TARGET_MIB)
    );
    println!(
        "  time to first serve: {:.2} s (mesh-control used {:.2} s of CPU), target <= {} s: {}",
        first_serve.as_secs_f64(),
        first_serve_cpu.as_secs_f64(),
        FIRST_SERVE_TARGET.as_secs(),
        verdict(first_serve <= FIRST_SERVE_TARGET)
    );
    println!(
        "  time to push one pod change: {} ms (mesh-control used {} ms of CPU), target <= {} ms: {}",
        push.as_millis(),
        push_cpu.as_millis(),
        PUSH_TARGET.as_millis(),
        verdict(push <= PUSH_TARGET)
    );
    assert!(
        peak_kib / 1024 <= MEMORY_TARGET_MIB,
        "mesh-control peaked at {} MiB with {PODS} pods (target {MEMORY_TARGET_MIB} MiB)",
        peak_kib / 1024
    );
}
