//! Per-request cost of the waypoint's decisions (policy, then routing to a backend) with
//! a configuration of some size: 200 Services, a route on each of 50 of them, 20
//! policies. `before` reproduces how a request read the configuration before it was
//! compiled once per version (a read lock per step, every policy and every route
//! scanned, backends found by a scan of the Services); `after` is the pipeline's stages
//! on the current snapshot. Compare the two in one run.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_discovery::{Service, State};
use mesh_identity::SpiffeId;
use mesh_proto::workload as pb;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use waypoint::authz::{self, Policy};
use waypoint::binding::Dest;
use waypoint::pipeline::policy::{Peer, Seen};
use waypoint::pipeline::{policy, routing};
use waypoint::proxy::{Config, ConfigStore, Target};
use waypoint::route::{self, RequestInfo};

const SERVICES: usize = 200;
const ROUTES: usize = 50;
const POLICIES: usize = 20;

fn service(i: usize) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Service(pb::Service {
            name: format!("svc-{i}"),
            namespace: "shop".into(),
            hostname: format!("svc-{i}.shop.svc.cluster.local"),
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
}

fn route(i: usize) -> route::Route {
    let spec = serde_json::json!({
    "parentRefs": [{"kind": "Service", "name": format!("svc-{i}")}],
    "rules": [
        {"matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
         "backendRefs": [{"name": format!("svc-{i}")}]},
        {"matches": [{"path": {"type": "RegularExpression", "value": "/items/[0-9]+"},
                      "headers": [{"type": "RegularExpression", "name": "x-version", "value": "v[12]"}]}],
         "backendRefs": [{"name": format!("svc-{}", i + 100), "weight": 90},
                         {"name": format!("svc-{}", i + 101), "weight": 10}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v1"}}],
         "filters": [{"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "x-routed", "value": "1"}]}}],
         "backendRefs": [{"name": format!("svc-{}", i + 100)}]},
    ]});
    let none = |_: &str| None;
    let (typed, _) = mesh_route::k8s::read_route(
        mesh_route::k8s::Kind::Http,
        "shop",
        &format!("r{i}"),
        Some(&spec),
        &none,
    );
    route::compile(&typed).0
}

fn policy(i: usize) -> (Policy, Vec<Target>) {
    let spec = if i.is_multiple_of(2) {
        serde_json::json!({"action": "DENY",
            "rules": [{"to": [{"operation": {"paths": [format!("/admin{i}*")]}}]}]})
    } else {
        serde_json::json!({"rules": [{"from": [{"source": {"namespaces": ["front"]}}],
            "to": [{"operation": {"methods": ["GET", "POST"]}}]}]})
    };
    let name = format!("p{i:02}");
    let (typed, _) = mesh_authz::k8s::read("shop", &name, &Default::default(), Some(&spec));
    let (p, _) = Policy::from_proto(&mesh_proto::waypoint::L7Policy {
        namespace: "shop".into(),
        name,
        policy: Some(typed),
    });
    let target = if i.is_multiple_of(4) {
        Target::Gateway
    } else {
        Target::Service {
            namespace: "shop".into(),
            name: format!("svc-{}", i % ROUTES),
        }
    };
    (p, vec![target])
}

fn config() -> Config {
    let mut cfg = Config::default();
    let mut st = State::default();
    for i in 0..SERVICES {
        st.apply_address(&service(i)).unwrap();
    }
    cfg.discovery = st;
    for i in 0..ROUTES {
        cfg.routes.insert(format!("shop/r{i}"), route(i));
    }
    for i in 0..POLICIES {
        cfg.policies.insert(format!("shop/p{i:02}"), policy(i));
    }
    cfg
}

/// The backend a request goes to (None: denied or not routed).
type Outcome = Option<(Arc<Service>, u16)>;

/// As a request read the configuration before snapshots.
fn before(
    lock: &RwLock<Config>,
    dest: &Dest,
    svc: &Service,
    peer: Peer<'_>,
    req: &Seen<'_>,
) -> Outcome {
    let allowed = {
        let cfg = lock.read().unwrap();
        let merged = waypoint::normalize::merged_for_policy(req.headers);
        authz::evaluate(
            cfg.policies_for(dest),
            &authz::Request {
                source: Some(peer.source),
                source_ip: peer.source_ip,
                method: req.method.as_str(),
                path: req.path,
                host: req.host,
                port: peer.port,
                headers: merged.as_ref().unwrap_or(req.headers),
            },
        ) == authz::Decision::Allow
    };
    if !allowed {
        return None;
    }
    let cfg = lock.read().unwrap();
    let info = RequestInfo {
        method: req.method,
        path: req.path,
        query: None,
        headers: req.headers,
    };
    let attached = cfg
        .routes
        .values()
        .filter(|r| r.attaches_to(&svc.namespace, &svc.name, peer.port));
    match route::route_request(attached, &info) {
        route::Routing::Rule(r, rule) => match route::decide(r, rule, |_| 0) {
            route::Decision::Backend(b) => cfg
                .discovery
                .services()
                .find(|s| s.namespace == b.namespace && s.name == b.name)
                .map(|s| (s.clone(), b.port.unwrap_or(peer.port))),
            _ => None,
        },
        _ => None,
    }
}

/// The pipeline's stages on the current snapshot.
fn after(
    store: &ConfigStore,
    dest: &Dest,
    svc: &Arc<Service>,
    peer: Peer<'_>,
    req: &Seen<'_>,
) -> Outcome {
    let snap = store.snapshot();
    policy::check(snap.policies_for(dest), peer, req).ok()?;
    let info = RequestInfo {
        method: req.method,
        path: req.path,
        query: None,
        headers: req.headers,
    };
    routing::plan(&snap, svc, peer.port, &info, |_| 0)
        .ok()
        .map(|p| (p.service, p.port))
}

fn bench(c: &mut Criterion) {
    let store = ConfigStore::new(config());
    let lock = RwLock::new(config());
    let svc = store.snapshot().service("shop", "svc-25").unwrap().clone();
    let dest = Dest::Service(svc.clone());
    let source: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
    let peer = Peer {
        source: &source,
        source_ip: "10.244.1.2".parse().unwrap(),
        port: 80,
    };
    let mut headers = http::HeaderMap::new();
    for (k, v) in [
        ("user-agent", "curl/8"),
        ("accept", "*/*"),
        ("x-version", "v2"),
    ] {
        headers.insert(k, v.parse().unwrap());
    }
    let method = http::Method::GET;
    let req = Seen {
        method: &method,
        path: "/items/42",
        host: "svc-25.shop.svc.cluster.local",
        headers: &headers,
    };
    // Both make the same decision, and it is the routed one (not a denial).
    let a = before(&lock, &dest, &svc, peer, &req).expect("routed");
    let b = after(&store, &dest, &svc, peer, &req).expect("routed");
    assert_eq!((a.0.name.as_str(), a.1), (b.0.name.as_str(), b.1));
    assert_eq!(b.0.name, "svc-125");
    let mut g = c.benchmark_group("policy_and_routing");
    g.bench_function("before", |x| {
        x.iter(|| black_box(before(&lock, &dest, &svc, peer, &req)))
    });
    g.bench_function("after", |x| {
        x.iter(|| black_box(after(&store, &dest, &svc, peer, &req)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
