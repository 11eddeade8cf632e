//! What one waypoint needs: the HTTPRoutes attached to the Services bound to it (GAMMA:
//! parentRefs of kind Service), and the AuthorizationPolicies that target its Gateway or
//! those Services.

use super::waypoint::{TrafficKind, resolve};
use super::{IndexConfig, Resources};
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

/// HTTPRoutes and GRPCRoutes (as read, problems included: the waypoint fails closed on
/// them) attached to the served Services of their own namespace (a route never takes over
/// another namespace's Service; the reader drops such parents, checked again here).
pub fn routes(resources: &Resources, served: &[(String, String)]) -> Vec<(String, HttpRoute)> {
    resources
        .routes
        .iter()
        .filter(|(_, r)| {
            r.parents.iter().any(|p| {
                served.iter().any(|(sns, sname)| {
                    *sns == p.namespace && *sns == r.namespace && *sname == p.name
                })
            })
        })
        .map(|(k, r)| (k.clone(), r.clone()))
        .collect()
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

    /// A fault that cannot be read no longer refuses its file (which would drop every
    /// object in it): it is reported with its object and field, and a rule naming it
    /// answers 500.
    #[test]
    fn a_bad_fault_is_reported_with_its_object_and_field() {
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
                "spec.abort.precentage",
            ),
        ] {
            let doc = format!(
                "apiVersion: ambient-mesh.dev/v1alpha1\nkind: HTTPFault\nmetadata: {{name: f, namespace: shop}}\nspec: {spec}\n"
            );
            let mut o = Objects::default();
            o.add_file(Path::new("faults.yaml"), &doc).unwrap();
            let r = super::super::compute(&o, &IndexConfig::default());
            let f = &r.route_findings[0];
            assert_eq!(
                (f.object.as_str(), f.field.as_str()),
                ("HTTPFault shop/f", field),
                "{spec}: {f:?}"
            );
            assert!(r.warnings.contains(&f.to_string()), "logged");
        }
    }

    #[test]
    fn a_waypoint_gets_its_services_routes_and_policies() {
        use mesh_proto::waypoint as pb;
        let mut o = Objects::default();
        o.add_file(Path::new("t"), OBJS).unwrap();
        let cfg = IndexConfig::default();
        let served = served_services(&o, &cfg, "shop", "waypoint");
        assert!(served.contains(&("shop".into(), "api".into())));
        assert!(
            !served.contains(&("shop".into(), "other".into())),
            "opted out"
        );
        let resources = super::super::compute(&o, &cfg);
        let r = routes(&resources, &served);
        assert_eq!(
            r.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            vec!["GRPCRoute/shop/cart", "shop/chaos", "shop/split"]
        );
        // ExtensionRef filters reach the waypoint with the fault resolved; a dangling one
        // makes its rule answer 500 instead of being skipped, and is reported.
        let chaos = &r[1].1;
        assert_eq!(
            chaos.rules[0].filters[0].kind,
            Some(pb::route_filter::Kind::Fault(pb::HttpFault {
                delay: Some(pb::FaultDelay {
                    fixed_delay_ms: 2000,
                    percentage: Some(50.0)
                }),
                abort: Some(pb::FaultAbort {
                    http_status: 503,
                    percentage: Some(10.0)
                }),
            }))
        );
        assert!(chaos.rules[1].filters.is_empty());
        assert_eq!(
            chaos.rules[1].problems[0].field,
            "spec.rules[1].filters[0].extensionRef.name"
        );
        assert!(
            resources
                .route_findings
                .iter()
                .any(|f| f.object == "HTTPRoute shop/chaos"
                    && f.field == "spec.rules[1].filters[0].extensionRef.name")
        );
        let split = &r[2].1;
        assert_eq!(
            split.rules[0]
                .backends
                .iter()
                .map(|b| (b.name.as_str(), b.weight))
                .collect::<Vec<_>>(),
            [("api-v1", 90), ("api-v2", 10)]
        );
        // The GRPCRoute reaches the waypoint typed, its method match as written.
        let grpc = &r[0].1;
        assert_eq!(grpc.kind, pb::RouteKind::Grpc as i32);
        assert_eq!(
            grpc.rules[0].matches[0].grpc_method,
            Some(pb::GrpcMethodMatch {
                r#type: pb::GrpcMatchType::Exact as i32,
                service: "shop.v1.Cart".into(),
                method: "Add".into()
            })
        );
        // A route of another namespace naming shop/api as its parent is not sent.
        let mut foreign = resources.clone();
        foreign.routes.insert(
            "evil/r".into(),
            pb::HttpRoute {
                namespace: "evil".into(),
                name: "r".into(),
                kind: pb::RouteKind::Http as i32,
                parents: vec![pb::RouteParent {
                    namespace: "shop".into(),
                    name: "api".into(),
                    port: 0,
                }],
                ..Default::default()
            },
        );
        assert_eq!(routes(&foreign, &served).len(), 3);
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
