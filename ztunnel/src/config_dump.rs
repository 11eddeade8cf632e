//! `/config_dump` in the shape `istioctl ztunnel-config` reads (Istio's `ZtunnelDump`:
//! `workloads`, `services`, `policies`, `certificates`, `workloadState`), so an operator's
//! tools work on either ztunnel. Built by a pure function from our state; a few fields of
//! our own (`config`, `version`, certificate renewal details) sit beside Istio's names,
//! which the Go reader ignores. A key holding the wrong JSON type would make istioctl
//! refuse the whole dump, so each value has the type Istio's struct declares.

use crate::identity::CertStatus;
use crate::inpod::manager::PodState;
use crate::state::{GatewayAddress, LbMode, Locality, Scope, Service, State, Workload};
use base64::Engine;
use mesh_authz::{Action, IpNet, Match, Policy, PolicyScope, StringMatch};
use serde_json::{Map, Value, json};
use std::time::SystemTime;

/// The whole dump. `config` is our running configuration, shown as is.
pub fn config_dump(st: &State, certs: &[CertStatus], pods: &[PodState], config: &Value) -> Value {
    let mut workloads: Vec<&Workload> = st.workloads().map(|w| w.as_ref()).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = st.services().map(|s| s.as_ref()).collect();
    services.sort_by_key(|s| s.key());
    let mut policies: Vec<&Policy> = st.policies().map(|p| p.as_ref()).collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let workload_state: Map<String, Value> = pods
        .iter()
        .map(|p| {
            let td = workloads
                .iter()
                .find(|w| w.uid == p.uid)
                .map(|w| w.identity.trust_domain().to_string());
            (p.uid.clone(), pod_json(p, td))
        })
        .collect();
    json!({
        "workloads": workloads.iter().map(|w| workload_json(w)).collect::<Vec<_>>(),
        "services": services.iter().map(|s| service_json(s, &workloads)).collect::<Vec<_>>(),
        "policies": policies.iter().map(|p| policy_json(p)).collect::<Vec<_>>(),
        "certificates": certs.iter().map(cert_json).collect::<Vec<_>>(),
        "workloadState": workload_state,
        "config": config,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// Istio writes a gateway as `{"destination": "ns/hostname"}` (or the address).
fn gateway_json(g: &GatewayAddress) -> Value {
    match g {
        GatewayAddress::Hostname {
            namespace,
            hostname,
            port,
        } => json!({"destination": format!("{namespace}/{hostname}"), "hboneMtlsPort": port}),
        GatewayAddress::Ip { ip, port } => {
            json!({"destination": ip.to_string(), "hboneMtlsPort": port})
        }
    }
}

fn locality_json(l: &Locality) -> Value {
    let mut m = Map::new();
    for (k, v) in [
        ("region", &l.region),
        ("zone", &l.zone),
        ("subzone", &l.subzone),
    ] {
        if !v.is_empty() {
            m.insert(k.into(), Value::from(v.as_str()));
        }
    }
    Value::Object(m)
}

fn workload_json(w: &Workload) -> Value {
    let mut v = json!({
        "uid": w.uid,
        "workloadIps": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "protocol": if w.hbone { "HBONE" } else { "TCP" },
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.identity.service_account(),
        "workloadName": w.workload_name,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "trustDomain": w.identity.trust_domain(),
        "locality": locality_json(&w.locality),
        "node": w.node,
        "network": w.network,
        "status": if w.healthy { "Healthy" } else { "Unhealthy" },
        "capacity": w.capacity,
        "authorizationPolicies": w.authorization_policies,
    });
    if let Some(g) = &w.waypoint {
        v["waypoint"] = gateway_json(g);
    }
    v
}

fn service_json(s: &Service, workloads: &[&Workload]) -> Value {
    let key = s.key();
    // Istio keys `ports` by service port (a JSON object key is a string).
    let ports: Map<String, Value> = s
        .ports
        .iter()
        .map(|p| (p.service_port.to_string(), Value::from(p.target_port)))
        .collect();
    let endpoints: Map<String, Value> = workloads
        .iter()
        .filter_map(|w| w.services.get(&key).map(|ports| (w, ports)))
        .map(|(w, ports)| {
            let port: Map<String, Value> = ports
                .iter()
                .map(|p| (p.service_port.to_string(), Value::from(p.target_port)))
                .collect();
            (
                w.uid.clone(),
                json!({"workloadUid": w.uid, "service": key, "port": port}),
            )
        })
        .collect();
    let mut v = json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
        "ports": ports,
        "endpoints": endpoints,
        "subjectAltNames": s.subject_alt_names.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    if let Some(g) = &s.waypoint {
        v["waypoint"] = gateway_json(g);
    }
    let lb = &s.load_balancing;
    if lb.mode != LbMode::Unspecified || !lb.preferences.is_empty() {
        v["loadBalancer"] = json!({
            "mode": match lb.mode {
                LbMode::Unspecified | LbMode::Strict => "Strict",
                LbMode::Failover => "Failover",
                LbMode::Passthrough => "Passthrough",
            },
            "routingPreferences": lb.preferences.iter().map(|p| match p {
                Scope::Region => "Region",
                Scope::Zone => "Zone",
                Scope::Subzone => "Subzone",
                Scope::Node => "Node",
                Scope::Cluster => "Cluster",
                Scope::Network => "Network",
            }).collect::<Vec<_>>(),
            "healthPolicy": if lb.allow_unhealthy { "AllowAll" } else { "OnlyHealthy" },
        });
    }
    v
}

fn string_match_json(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(s) => json!({"Exact": s}),
        StringMatch::Prefix(s) => json!({"Prefix": s}),
        StringMatch::Suffix(s) => json!({"Suffix": s}),
        StringMatch::Presence => json!({"Presence": {}}),
    }
}

/// One match with Istio's keys; empty lists are left out, as Istio's `omitempty` does.
fn match_json(m: &Match) -> Value {
    let mut o = Map::new();
    let mut put = |k: &str, v: Vec<Value>| {
        if !v.is_empty() {
            o.insert(k.into(), Value::Array(v));
        }
    };
    let strs = |v: &[StringMatch]| v.iter().map(string_match_json).collect::<Vec<_>>();
    let nets = |v: &[IpNet]| {
        v.iter()
            .map(|n| Value::from(format!("{}/{}", n.addr, n.prefix)))
            .collect::<Vec<_>>()
    };
    let ports = |v: &[u16]| v.iter().map(|p| Value::from(*p)).collect::<Vec<_>>();
    let sas = |v: &[(String, String)]| {
        v.iter()
            .map(|(ns, sa)| json!({"namespace": ns, "serviceAccount": sa}))
            .collect::<Vec<_>>()
    };
    put("namespaces", strs(&m.namespaces));
    put("notNamespaces", strs(&m.not_namespaces));
    put("principals", strs(&m.principals));
    put("notPrincipals", strs(&m.not_principals));
    put("sourceIps", nets(&m.source_ips));
    put("notSourceIps", nets(&m.not_source_ips));
    put("destinationIps", nets(&m.destination_ips));
    put("notDestinationIps", nets(&m.not_destination_ips));
    put("destinationPorts", ports(&m.destination_ports));
    put("notDestinationPorts", ports(&m.not_destination_ports));
    put("serviceAccounts", sas(&m.service_accounts));
    put("notServiceAccounts", sas(&m.not_service_accounts));
    Value::Object(o)
}

fn policy_json(p: &Policy) -> Value {
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": match p.scope {
            PolicyScope::Global => "Global",
            PolicyScope::Namespace => "Namespace",
            PolicyScope::WorkloadSelector => "WorkloadSelector",
        },
        "action": match p.action {
            Action::Allow => "Allow",
            Action::Deny => "Deny",
            Action::Audit => "Audit",
        },
        "rules": p.rules.iter().map(|rule| {
            rule.iter().map(|clause| clause.iter().map(match_json).collect::<Vec<_>>()).collect::<Vec<_>>()
        }).collect::<Vec<_>>(),
        "dryRun": p.dry_run,
    })
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A serial number as Istio prints it: decimal. Hex digits are folded into base-10^9
/// limbs, so serials of any length (X.509 allows 20 bytes) convert exactly. Byte
/// separators (`53:1c:…`) are skipped.
pub fn serial_decimal(hex: &str) -> String {
    let mut limbs: Vec<u64> = vec![0]; // little endian, base 1e9
    for c in hex.chars().filter(|c| *c != ':') {
        let Some(d) = c.to_digit(16) else {
            return hex.to_string();
        };
        let mut carry = u64::from(d);
        for l in limbs.iter_mut() {
            let v = *l * 16 + carry;
            *l = v % 1_000_000_000;
            carry = v / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    let mut out = limbs.last().copied().unwrap_or(0).to_string();
    for l in limbs.iter().rev().skip(1) {
        out.push_str(&format!("{l:09}"));
    }
    out
}

/// One certificate as Istio dumps it; `pem` is the PEM text, base64-encoded.
fn cert_entry(der: &[u8]) -> Value {
    let pem = mesh_identity::cert::cert_to_pem(der);
    let pem = base64::engine::general_purpose::STANDARD.encode(pem);
    match mesh_identity::cert::inspect(der) {
        Ok(info) => json!({
            "pem": pem,
            "serialNumber": serial_decimal(&info.serial_hex),
            "validFrom": rfc3339(info.not_before),
            "expirationTime": rfc3339(info.not_after),
        }),
        Err(_) => json!({"pem": pem, "serialNumber": "", "validFrom": "", "expirationTime": ""}),
    }
}

/// Istio's states: `Available`, `Initializing` (first request in flight) or
/// `Unavailable: <error>`.
fn cert_state(c: &CertStatus) -> String {
    match (&c.current, &c.last_error) {
        (Some(_), _) => "Available".into(),
        (None, Some(e)) => format!("Unavailable: {e}"),
        (None, None) => "Initializing".into(),
    }
}

fn cert_json(c: &CertStatus) -> Value {
    let (chain, roots) = match &c.current {
        Some(cred) => (
            cred.cert
                .chain()
                .iter()
                .map(|d| cert_entry(d))
                .collect::<Vec<_>>(),
            cred.cert
                .roots()
                .iter()
                .map(|d| cert_entry(d))
                .collect::<Vec<_>>(),
        ),
        None => (vec![], vec![]),
    };
    json!({
        "identity": c.identity,
        "state": cert_state(c),
        "certChain": chain,
        "rootCerts": roots,
        "refreshAt": c.refresh_at,
        "lastError": c.last_error,
        "consecutiveFailures": c.consecutive_failures,
    })
}

fn pod_json(p: &PodState, trust_domain: Option<String>) -> Value {
    json!({
        "state": p.state,
        "info": {
            "name": p.name,
            "namespace": p.namespace,
            "serviceAccount": p.service_account,
            "trustDomain": trust_domain.unwrap_or_default(),
        },
        "netnsInode": p.netns_inode,
        "openConnections": p.open_connections,
    })
}

#[cfg(test)]
mod tests;
