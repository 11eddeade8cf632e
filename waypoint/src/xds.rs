//! Applies the control plane's updates: addresses (services and endpoints), routes and
//! L7 policies. An invalid route or policy is NACKed and the previous version kept. The
//! first response of each type marks it synced (the waypoint serves nothing before all
//! three have synced).

use crate::authz::Policy;
use crate::proxy::{Config, Target};
use crate::route::Route;
use crate::server::Lifecycle;
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use mesh_proto::{type_url, waypoint, workload};
use std::sync::{Arc, RwLock};

pub struct Apply {
    pub config: Arc<RwLock<Config>>,
    pub lifecycle: Arc<Lifecycle>,
}

fn targets(spec_json: &str) -> Vec<Target> {
    let v: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
    let mut refs: Vec<&serde_json::Value> =
        v["targetRefs"].as_array().into_iter().flatten().collect();
    if v["targetRef"].is_object() {
        refs.push(&v["targetRef"]);
    }
    refs.into_iter()
        .filter_map(|t| match t["kind"].as_str()? {
            "Gateway" => Some(Target::Gateway),
            "Service" => Some(Target::Service {
                namespace: String::new(),
                name: t["name"].as_str()?.to_string(),
            }),
            _ => None,
        })
        .collect()
}

impl mesh_xds::Handler for Apply {
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let mut cfg = self.config.write().expect("config lock");
        let mut errors = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                errors.push((r.name.clone(), "resource body missing".to_string()));
                continue;
            };
            let result: Result<(), String> = match resp.type_url.as_str() {
                type_url::ADDRESS => workload::Address::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|a| cfg.discovery.apply_address(&a).map_err(|e| e.to_string())),
                type_url::HTTP_ROUTE => waypoint::HttpRoute::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|h| Route::parse(&h.namespace, &h.name, &h.spec_json))
                    .map(|route| {
                        cfg.routes.insert(r.name.clone(), route);
                    }),
                type_url::L7_POLICY => waypoint::L7Policy::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|p| {
                        let policy = Policy::parse(&p.namespace, &p.name, &p.spec_json)?;
                        let t = targets(&p.spec_json)
                            .into_iter()
                            .map(|t| match t {
                                Target::Service { name, .. } => Target::Service {
                                    namespace: p.namespace.clone(),
                                    name,
                                },
                                g => g,
                            })
                            .collect();
                        cfg.policies.insert(r.name.clone(), (policy, t));
                        Ok(())
                    }),
                other => Err(format!("unexpected type {other}")),
            };
            if let Err(e) = result {
                errors.push((r.name.clone(), e));
            }
        }
        for name in &resp.removed_resources {
            match resp.type_url.as_str() {
                type_url::ADDRESS => {
                    cfg.discovery.remove_address(name);
                }
                type_url::HTTP_ROUTE => {
                    cfg.routes.remove(name);
                }
                type_url::L7_POLICY => {
                    cfg.policies.remove(name);
                }
                _ => {}
            }
        }
        drop(cfg);
        self.lifecycle.mark_synced(&resp.type_url);
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_xds::Handler;

    fn response(
        type_url: &str,
        resources: Vec<mesh_proto::discovery::Resource>,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            ..Default::default()
        }
    }

    #[test]
    fn synced_once_addresses_routes_and_policies_have_each_been_received() {
        let lifecycle = Lifecycle::new();
        let mut a = Apply {
            config: Default::default(),
            lifecycle: lifecycle.clone(),
        };
        a.apply(&response(type_url::ADDRESS, vec![]));
        a.apply(&response(type_url::HTTP_ROUTE, vec![]));
        assert!(!lifecycle.synced(), "policies missing");
        assert!(lifecycle.not_ready().contains(&"policies not synced"));
        // A response with a rejected policy is still the control plane's answer.
        let bad = waypoint::L7Policy {
            namespace: "back".into(),
            name: "bad".into(),
            spec_json: r#"{"action":"CUSTOM"}"#.into(),
        };
        let errors = a.apply(&response(
            type_url::L7_POLICY,
            vec![mesh_proto::discovery::Resource {
                name: "back/bad".into(),
                resource: Some(mesh_proto::prost_types::Any {
                    type_url: type_url::L7_POLICY.into(),
                    value: bad.encode_to_vec(),
                }),
                ..Default::default()
            }],
        ));
        assert_eq!(errors.len(), 1);
        assert!(lifecycle.synced());
        assert_eq!(lifecycle.not_ready(), ["no certificate"]);
    }

    #[test]
    fn policy_targets() {
        let t = super::targets(
            r#"{"targetRefs":[{"kind":"Gateway","name":"wp"},{"kind":"Service","name":"api"}]}"#,
        );
        assert_eq!(t.len(), 2);
        assert!(super::targets("{}").is_empty());
    }
}
