//! What one waypoint needs: the HTTPRoutes attached to the Services bound to it (GAMMA:
//! parentRefs of kind Service), and the AuthorizationPolicies that target its Gateway or
//! those Services.

use super::IndexConfig;
use super::waypoint::{TrafficKind, resolve};
use crate::manifest::Objects;
use mesh_proto::waypoint::{HttpRoute, L7Policy};
use mesh_proto::workload as pb;

/// Services (namespace, name) whose traffic goes through waypoint `ns/name`.
pub fn served_services(
    objs: &Objects,
    cfg: &IndexConfig,
    ns: &str,
    name: &str,
) -> Vec<(String, String)> {
    let want = cfg.service_hostname(ns, name);
    objs.services
        .values()
        .filter(|s| {
            match resolve(
                objs,
                cfg,
                s.metadata.ns(),
                &s.metadata.labels,
                TrafficKind::Service,
            )
            .and_then(|g| g.destination)
            {
                Some(pb::gateway_address::Destination::Hostname(h)) => {
                    h.hostname == want && h.namespace == ns
                }
                _ => false,
            }
        })
        .map(|s| (s.metadata.ns().to_string(), s.metadata.name.clone()))
        .collect()
}

/// HTTPRoutes and (translated) GRPCRoutes attached to the served Services.
pub fn routes(objs: &Objects, served: &[(String, String)]) -> Vec<(String, HttpRoute)> {
    let http = objs.http_routes.values().map(|r| ("", r));
    let grpc = objs.grpc_routes.values().map(|r| ("GRPCRoute/", r));
    http.chain(grpc)
        .filter(|(_, r)| {
            let rns = r.metadata.ns();
            r.spec["parentRefs"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| {
                    let kind = p["kind"].as_str().unwrap_or("Gateway");
                    let group = p["group"].as_str().unwrap_or("");
                    let pns = p["namespace"].as_str().unwrap_or(rns);
                    let pname = p["name"].as_str().unwrap_or_default();
                    kind == "Service"
                        && (group.is_empty() || group == "core")
                        && served
                            .iter()
                            .any(|(sns, sname)| sns == pns && sname == pname)
                })
        })
        .map(|(kind, r)| {
            let ns = r.metadata.ns().to_string();
            (
                format!("{kind}{ns}/{}", r.metadata.name),
                HttpRoute {
                    name: r.metadata.name.clone(),
                    spec_json: resolve_extension_refs(objs, &ns, &r.spec).to_string(),
                    namespace: ns,
                },
            )
        })
        .collect()
}

/// Inlines the spec of each `ExtensionRef` filter to an HTTPFault (same namespace) as the
/// filter's `fault`. A reference that cannot be resolved must not be skipped (Gateway
/// API): the filter becomes an abort with 500, so affected requests fail visibly.
fn resolve_extension_refs(objs: &Objects, ns: &str, spec: &serde_json::Value) -> serde_json::Value {
    let mut spec = spec.clone();
    // `get_mut`, not indexing: `value["key"]` on a mutable object inserts a null, which
    // the waypoint would then reject.
    let filters = spec
        .get_mut("rules")
        .and_then(|r| r.as_array_mut())
        .into_iter()
        .flatten()
        .flat_map(|rule| {
            rule.get_mut("filters")
                .and_then(|f| f.as_array_mut())
                .into_iter()
                .flatten()
        });
    for f in filters {
        if f["type"] != "ExtensionRef" {
            continue;
        }
        let r = &f["extensionRef"];
        let found = (r["group"] == crate::k8s::MESH_GROUP && r["kind"] == "HTTPFault")
            .then(|| r["name"].as_str())
            .flatten()
            .and_then(|name| objs.http_faults.get(&(ns.to_string(), name.to_string())));
        f["fault"] = match found {
            Some(fault) => serde_json::to_value(&fault.spec).unwrap_or_default(),
            None => serde_json::json!({"abort": {"httpStatus": 500}}),
        };
    }
    spec
}

/// AuthorizationPolicies whose targetRefs name waypoint `wp_ns/wp_name`'s Gateway or a
/// Service it serves, typed as mesh-control read them (problems included: the waypoint
/// enforces them fail closed).
pub fn policies(
    objs: &Objects,
    wp_ns: &str,
    wp_name: &str,
    served: &[(String, String)],
) -> Vec<(String, L7Policy)> {
    use mesh_proto::waypoint::TargetKind;
    objs.authorization_policies
        .values()
        .filter(|p| {
            let pns = p.metadata.ns();
            p.policy
                .targets
                .iter()
                .any(|t| match TargetKind::try_from(t.kind) {
                    Ok(TargetKind::Gateway) => pns == wp_ns && t.name == wp_name,
                    Ok(TargetKind::Service) => served
                        .iter()
                        .any(|(sns, sname)| sns == pns && *sname == t.name),
                    _ => false,
                })
        })
        .map(|p| {
            let ns = p.metadata.ns().to_string();
            (
                format!("{ns}/{}", p.metadata.name),
                L7Policy {
                    namespace: ns,
                    name: p.metadata.name.clone(),
                    policy: Some(p.policy.clone()),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const OBJS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.99, ports: [{port: 15008}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.21, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules: [{backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: unrelated, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: other}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules: [{matches: [{method: {service: shop.v1.Cart, method: Add}}], backendRefs: [{name: cart, port: 9090}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: chaos, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    filters: [{type: ExtensionRef, extensionRef: {group: ambient-mesh.dev, kind: HTTPFault, name: slow}}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    filters: [{type: ExtensionRef, extensionRef: {group: ambient-mesh.dev, kind: HTTPFault, name: nope}}]
---
apiVersion: ambient-mesh.dev/v1alpha1
kind: HTTPFault
metadata: {name: slow, namespace: shop}
spec: {delay: {fixedDelay: 2s, percentage: {value: 50}}, abort: {httpStatus: 503, percentage: {value: 10}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

    #[test]
    fn a_bad_fault_is_reported_with_its_field() {
        for (spec, field) in [
            ("{}", "spec"),
            ("{delay: {fixedDelay: soon}}", "spec.delay.fixedDelay"),
            ("{abort: {httpStatus: 42}}", "spec.abort.httpStatus"),
            (
                "{abort: {httpStatus: 503, percentage: {value: 101}}}",
                "spec.abort.percentage.value",
            ),
            (
                "{abort: {httpStatus: 503, precentage: {value: 1}}}",
                "precentage",
            ),
        ] {
            let doc = format!(
                "apiVersion: ambient-mesh.dev/v1alpha1\nkind: HTTPFault\nmetadata: {{name: f, namespace: shop}}\nspec: {spec}\n"
            );
            let e = Objects::default()
                .add_file(Path::new("faults.yaml"), &doc)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("faults.yaml") && e.contains(field),
                "{spec}: {e}"
            );
        }
    }

    #[test]
    fn a_malformed_grpc_route_is_reported_where_it_is() {
        let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  rules: [{matches: [{method: {type: Prefix, service: a}}]}]\n";
        let e = Objects::default()
            .add_file(Path::new("routes.yaml"), bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes.yaml") && e.contains("Prefix"), "{e}");
    }

    #[test]
    fn a_waypoint_gets_its_services_routes_and_policies() {
        let mut o = Objects::default();
        o.add_file(Path::new("t"), OBJS).unwrap();
        let cfg = IndexConfig::default();
        let served = served_services(&o, &cfg, "shop", "waypoint");
        assert!(served.contains(&("shop".into(), "api".into())));
        assert!(
            !served.contains(&("shop".into(), "other".into())),
            "opted out"
        );
        let r = routes(&o, &served);
        assert_eq!(
            r.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            vec!["shop/chaos", "shop/split", "GRPCRoute/shop/cart"]
        );
        // ExtensionRef filters reach the waypoint with the fault inlined; a dangling one
        // fails its requests with 500 instead of being skipped.
        let chaos: serde_json::Value = serde_json::from_str(&r[0].1.spec_json).unwrap();
        assert_eq!(
            chaos["rules"][0]["filters"][0]["fault"],
            serde_json::json!({"delay": {"fixedDelay": "2s", "percentage": {"value": 50.0}},
                               "abort": {"httpStatus": 503, "percentage": {"value": 10.0}}})
        );
        assert_eq!(
            chaos["rules"][1]["filters"][0]["fault"],
            serde_json::json!({"abort": {"httpStatus": 500}})
        );
        // Nothing else is touched: no null `filters` or `rules` appear.
        assert!(chaos["rules"][0].get("backendRefs").is_none());
        let split: serde_json::Value = serde_json::from_str(&r[1].1.spec_json).unwrap();
        assert!(split["rules"][0].get("filters").is_none(), "{split}");
        let r = &r[1..];
        assert!(r[0].1.spec_json.contains("api-v2"));
        // The GRPCRoute reaches the waypoint as the equivalent HTTPRoute spec.
        let grpc: serde_json::Value = serde_json::from_str(&r[1].1.spec_json).unwrap();
        assert_eq!(
            grpc["rules"][0]["matches"][0]["path"],
            serde_json::json!({"type": "Exact", "value": "/shop.v1.Cart/Add"})
        );
        let p = policies(&o, "shop", "waypoint", &served);
        assert_eq!(p.len(), 1);
        let typed = p[0].1.policy.as_ref().unwrap();
        assert_eq!(
            typed.rules[0].to[0].paths[0].kind,
            Some(mesh_proto::waypoint::authz_string_match::Kind::Prefix(
                "/admin".into()
            ))
        );
        assert!(policies(&o, "shop", "another", &[]).is_empty());
    }
}
