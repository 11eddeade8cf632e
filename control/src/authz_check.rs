//! `meshctl authz check`: which policies apply to a connection, which matched, and the
//! decision ztunnel would make, evaluated with the same code ztunnel enforces with.

use crate::generation::Generation;
use mesh_authz::{ConnectionInfo, Decision, Policy, evaluate, policy_matches};
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
    let to = q.get("to").ok_or("give to=<namespace>/<pod>")?;
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
    let (ns, name) = to.split_once('/').ok_or("to must be <namespace>/<pod>")?;
    let workload = g
        .resources
        .addresses
        .values()
        .find_map(|a| match &a.r#type {
            Some(pb::address::Type::Workload(w)) if w.namespace == ns && w.name == name => Some(w),
            _ => None,
        })
        .ok_or_else(|| format!("no workload {to}"))?;
    let dst_ip = workload
        .addresses
        .first()
        .and_then(|b| match b.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.as_slice()).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(b.as_slice()).ok()?)),
            _ => None,
        })
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let applicable: Vec<&pb_sec::Authorization> = g
        .resources
        .authorizations
        .iter()
        .filter(|(key, a)| match pb_sec::Scope::try_from(a.scope) {
            Ok(pb_sec::Scope::Global) => true,
            Ok(pb_sec::Scope::Namespace) => a.namespace == ns,
            _ => workload.authorization_policies.contains(key),
        })
        .map(|(_, a)| a)
        .collect();
    let policies: Vec<Policy> = applicable
        .iter()
        .map(|a| Policy::from_proto(a).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let conn = ConnectionInfo {
        src_identity,
        src_ip,
        dst_ip,
        dst_port: port,
    };
    let decision = evaluate(policies.iter(), &conn);
    let per_policy: Vec<Value> = policies
        .iter()
        .map(|p| {
            json!({"policy": p.key(), "action": format!("{:?}", p.action), "dryRun": p.dry_run,
                   "matched": policy_matches(p, &conn)})
        })
        .collect();
    let td_note = conn
        .src_identity
        .as_ref()
        .filter(|id| id.trust_domain() != trust_domain)
        .map(|id| {
            format!(
                "{id} is outside trust domain {trust_domain}: its TLS handshake would be refused"
            )
        });
    Ok(match decision {
        Decision::Allow => json!({"decision": "ALLOW", "policies": per_policy, "note": td_note}),
        Decision::Deny { policy, reason } => {
            json!({"decision": "DENY", "policy": policy, "reason": reason, "policies": per_policy, "note": td_note})
        }
    })
}
