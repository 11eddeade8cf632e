//! `meshctl authz check`: which policies apply to a connection or request, which matched,
//! and the decision the enforcing component would make, evaluated with the same code and
//! on the same resources it enforces:
//!
//! - `to=<ns>/<pod>`: ztunnel's decision at L4, on the Authorizations ztunnel receives;
//! - `service=<ns>/<name>`, bound to a waypoint: its decision at L7, on the L7Policies
//!   it receives (method, path and host from the query; defaults GET, `/`, the Service's
//!   hostname).

use crate::generation::Generation;
use crate::index::waypoint::{TrafficKind, resolve};
use crate::index::waypoint_config as wc;
use mesh_authz::normalize::{self, PathNormalization};
use mesh_authz::{
    ConnectionInfo, Decision, HttpRequest, Policy, PolicyScope, evaluate_request,
    policy_matches_request,
};
use mesh_identity::SpiffeId;
use mesh_proto::{security as pb_sec, workload as pb};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub fn check(
    g: &Generation,
    trust_domain: &str,
    q: &BTreeMap<String, String>,
) -> Result<Value, String> {
    let from = q
        .get("from")
        .ok_or("give from=<spiffe id> (or from=plaintext)")?;
    let (to, service) = match (q.get("to"), q.get("service")) {
        (Some(to), None) => (to, false),
        (None, Some(svc)) => (svc, true),
        _ => {
            return Err(
                "give to=<namespace>/<pod> (ztunnel's decision) or service=<namespace>/<service> (its waypoint's decision)"
                    .into(),
            );
        }
    };
    let port: u16 = q
        .get("port")
        .ok_or("give port=<port>")?
        .parse()
        .map_err(|_| "port must be a number")?;
    let src_identity: Option<SpiffeId> = if from == "plaintext" {
        None
    } else {
        Some(from.parse().map_err(|e| format!("from: {e}"))?)
    };
    let src_ip: IpAddr = q
        .get("fromIp")
        .map(|s| s.parse().map_err(|_| format!("fromIp {s:?} is not an IP")))
        .transpose()?
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let (ns, name) = to.split_once('/').ok_or("give <namespace>/<name>")?;
    let conn = ConnectionInfo {
        src_identity,
        src_ip,
        dst_ip: IpAddr::from([0, 0, 0, 0]),
        dst_port: port,
    };
    let td_note = conn
        .src_identity
        .as_ref()
        .filter(|id| id.trust_domain() != trust_domain)
        .map(|id| {
            format!(
                "{id} is outside trust domain {trust_domain}: its TLS handshake would be refused"
            )
        });
    let (mut out, policies, decision) = if service {
        at_waypoint(g, ns, name, conn, q)?
    } else {
        let w = g
            .resources
            .addresses
            .values()
            .find_map(|a| match &a.r#type {
                Some(pb::address::Type::Workload(w)) if w.namespace == ns && w.name == name => {
                    Some(w)
                }
                _ => None,
            })
            .ok_or_else(|| format!("no workload {ns}/{name}"))?;
        at_ztunnel(g, w, conn)
    };
    let Value::Object(o) = &mut out else {
        unreachable!("built as an object")
    };
    o.insert("policies".into(), Value::Array(policies));
    o.insert("note".into(), json!(td_note));
    match decision {
        Decision::Allow => {
            o.insert("decision".into(), json!("ALLOW"));
        }
        Decision::Deny { policy, reason } => {
            o.insert("decision".into(), json!("DENY"));
            o.insert("policy".into(), json!(policy));
            o.insert("reason".into(), json!(reason));
        }
    }
    Ok(out)
}

fn per_policy(
    policies: &[Policy],
    conn: &ConnectionInfo,
    http: Option<&HttpRequest<'_>>,
) -> Vec<Value> {
    policies
        .iter()
        .map(|p| {
            json!({"policy": p.key(), "action": format!("{:?}", p.action), "dryRun": p.dry_run,
                   "matched": policy_matches_request(p, conn, http), "problems": p.problems})
        })
        .collect()
}

/// ztunnel's view: the Authorizations it receives that apply to `w`.
fn at_ztunnel(
    g: &Generation,
    w: &pb::Workload,
    mut conn: ConnectionInfo,
) -> (Value, Vec<Value>, Decision) {
    conn.dst_ip = w
        .addresses
        .first()
        .and_then(|b| mesh_authz::ip_from_bytes(b).ok())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let policies: Vec<Policy> = g
        .resources
        .authorizations
        .iter()
        .filter(|(key, a)| match pb_sec::Scope::try_from(a.scope) {
            Ok(pb_sec::Scope::Global) => true,
            Ok(pb_sec::Scope::Namespace) => a.namespace == w.namespace,
            _ => w.authorization_policies.contains(key),
        })
        .map(|(_, a)| Policy::from_proto(a).0)
        .collect();
    let decision = evaluate_request(policies.iter(), &conn, None);
    (
        json!({"enforcedBy": format!("ztunnel on {}", w.node)}),
        per_policy(&policies, &conn, None),
        decision,
    )
}

/// The waypoint's view: the L7Policies it receives that apply to Service `ns/name`.
fn at_waypoint(
    g: &Generation,
    ns: &str,
    name: &str,
    conn: ConnectionInfo,
    q: &BTreeMap<String, String>,
) -> Result<(Value, Vec<Value>, Decision), String> {
    let cfg = &g.index_config;
    let svc = g
        .objects
        .services
        .get(&(ns.to_string(), name.to_string()))
        .ok_or_else(|| format!("no Service {ns}/{name}"))?;
    let hostname = cfg.service_hostname(ns, name);
    let gw = resolve(&g.objects, cfg, ns, &svc.metadata.labels, TrafficKind::Service)
        .and_then(|gw| match gw.destination {
            Some(pb::gateway_address::Destination::Hostname(h)) => {
                let suffix = format!(".{}.svc.{}", h.namespace, cfg.domain_suffix);
                let name = h.hostname.strip_suffix(&suffix)?.to_string();
                Some((h.namespace, name))
            }
            _ => None,
        })
        .ok_or_else(|| {
            format!(
                "Service {ns}/{name} uses no waypoint: its traffic is authorized by the ztunnel of each endpoint; check a pod instead (to=<namespace>/<pod>)"
            )
        })?;
    let served = wc::served_services(&g.objects, cfg, &gw.0, &gw.1);
    let policies: Vec<Policy> = wc::policies(&g.objects, &gw.0, &gw.1, &served)
        .into_iter()
        .filter_map(|(_, p)| p.policy)
        .filter(|p| {
            use mesh_proto::waypoint::TargetKind;
            p.targets
                .iter()
                .any(|t| match TargetKind::try_from(t.kind) {
                    Ok(TargetKind::Gateway) => true,
                    Ok(TargetKind::Service) => p.namespace == ns && t.name == name,
                    _ => false,
                })
        })
        .map(|p| mesh_authz::typed::policy(&p, PolicyScope::Namespace).0)
        .collect();
    // The request as the waypoint sees it: normalised first (its default
    // pathNormalization unless `normalization` says otherwise), refused with 400 when it
    // cannot be, exactly as the waypoint does before routing and policy.
    let method = q.get("method").map_or("GET", String::as_str);
    let (raw_path, raw_host) = (
        q.get("path").map_or("/", String::as_str),
        q.get("host").map_or(hostname.as_str(), String::as_str),
    );
    let mode: PathNormalization = q
        .get("normalization")
        .map_or(Ok(PathNormalization::default()), |m| m.parse())?;
    let normalised = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("{method:?} is not an HTTP method"))
        .and_then(|m| normalize::check_method(&m))
        .and_then(|()| normalize::normalize_path(raw_path, mode))
        .and_then(|p| Ok((p.into_owned(), normalize::normalize_host(raw_host)?.name)));
    let (path, host) = match normalised {
        Ok(ph) => ph,
        Err(e) => {
            let request = json!({"method": method, "path": raw_path, "host": raw_host});
            return Ok((
                json!({"enforcedBy": format!("waypoint {}/{}", gw.0, gw.1), "request": request}),
                vec![],
                Decision::Deny {
                    policy: None,
                    reason: format!("refused with 400 before routing and policy: {e}"),
                },
            ));
        }
    };
    let headers = http::HeaderMap::new();
    let http = HttpRequest {
        method,
        path: &path,
        host: &host,
        headers: &headers,
    };
    let decision = evaluate_request(policies.iter(), &conn, Some(&http));
    Ok((
        json!({"enforcedBy": format!("waypoint {}/{}", gw.0, gw.1),
               "request": {"method": http.method, "path": http.path, "host": http.host}}),
        per_policy(&policies, &conn, Some(&http)),
        decision,
    ))
}
