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
                    namespace: ns,
                    name: r.metadata.name.clone(),
                    spec_json: r.spec.to_string(),
                },
            )
        })
        .collect()
}

pub fn policies(
    objs: &Objects,
    wp_ns: &str,
    wp_name: &str,
    served: &[(String, String)],
) -> Vec<(String, L7Policy)> {
    objs.authorization_policies
        .values()
        .filter(|p| {
            let pns = p.metadata.ns();
            p.spec
                .target_ref
                .iter()
                .chain(&p.spec.target_refs)
                .any(|t| match t.kind.as_str() {
                    "Gateway" => pns == wp_ns && t.name == wp_name,
                    "Service" => served
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
                    spec_json: serde_json::to_string(&p.spec).unwrap_or_default(),
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
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

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
            vec!["shop/split", "GRPCRoute/shop/cart"]
        );
        assert!(r[0].1.spec_json.contains("api-v2"));
        // The GRPCRoute reaches the waypoint as the equivalent HTTPRoute spec.
        let grpc: serde_json::Value = serde_json::from_str(&r[1].1.spec_json).unwrap();
        assert_eq!(
            grpc["rules"][0]["matches"][0]["path"],
            serde_json::json!({"type": "Exact", "value": "/shop.v1.Cart/Add"})
        );
        let p = policies(&o, "shop", "waypoint", &served);
        assert_eq!(p.len(), 1);
        assert!(p[0].1.spec_json.contains("/admin*"));
        assert!(policies(&o, "shop", "another", &[]).is_empty());
    }
}
