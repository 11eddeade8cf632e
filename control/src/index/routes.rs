//! Every HTTPRoute and GRPCRoute read and validated once per change (`mesh_route::k8s`),
//! with the HTTPFaults their ExtensionRef filters name resolved in, and every finding
//! (routes' and faults') with its object and field.

use super::PolicyFinding;
use crate::manifest::Objects;
use mesh_proto::waypoint::HttpRoute;
use mesh_route::k8s::{Kind, read_fault, read_route};
use std::collections::BTreeMap;

fn finding(f: mesh_route::Finding) -> PolicyFinding {
    PolicyFinding {
        object: f.object(),
        severity: f.severity.as_str(),
        field: f.field,
        message: f.message,
    }
}

/// The typed routes by xDS name (`ns/name`, `GRPCRoute/ns/name`), and the findings.
pub fn read_all(objs: &Objects) -> (BTreeMap<String, HttpRoute>, Vec<PolicyFinding>) {
    let mut routes = BTreeMap::new();
    let mut findings = Vec::new();
    for f in objs.http_faults.values() {
        let (_, found) = read_fault(f.metadata.ns(), &f.metadata.name, Some(&f.spec));
        findings.extend(found.into_iter().map(finding));
    }
    let http = objs.http_routes.values().map(|r| (Kind::Http, "", r));
    let grpc = objs
        .grpc_routes
        .values()
        .map(|r| (Kind::Grpc, "GRPCRoute/", r));
    for (kind, prefix, r) in http.chain(grpc) {
        let ns = r.metadata.ns();
        let faults = |name: &str| {
            objs.http_faults
                .get(&(ns.to_string(), name.to_string()))
                .map(|f| &f.spec)
        };
        let (typed, found) = read_route(kind, ns, &r.metadata.name, Some(&r.spec), &faults);
        findings.extend(found.into_iter().map(finding));
        routes.insert(format!("{prefix}{ns}/{}", r.metadata.name), typed);
    }
    (routes, findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const OBJS: &str = r#"
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
  - matches: [{path: {type: RegularExpression, value: "(" }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules: [{matches: [{method: {type: Prefix, service: a}}]}]
---
apiVersion: ambient-mesh.dev/v1alpha1
kind: HTTPFault
metadata: {name: slow, namespace: shop}
spec: {delay: {fixedDelay: 2s, percentage: {value: 50}}}
---
apiVersion: ambient-mesh.dev/v1alpha1
kind: HTTPFault
metadata: {name: slow, namespace: other}
spec: {delay: {fixedDelay: soon}}
"#;

    /// Routes, GRPCRoutes and faults that cannot be understood are kept (failing closed
    /// where they sit) and reported with their object and field; before, a malformed
    /// GRPCRoute or HTTPFault refused its whole file, and a bad regex was found only by
    /// the waypoint, which NACKed the route and kept routing without it.
    #[test]
    fn every_route_is_read_once_with_its_findings() {
        let mut o = Objects::default();
        o.add_file(Path::new("t.yaml"), OBJS).unwrap();
        let (routes, findings) = read_all(&o);
        assert_eq!(
            routes.keys().collect::<Vec<_>>(),
            ["GRPCRoute/shop/cart", "shop/chaos"]
        );
        let shown: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown
                .iter()
                .map(|f| f.split(": ").take(2).collect::<Vec<_>>().join(": "))
                .collect::<Vec<_>>(),
            [
                "error HTTPFault other/slow: spec.delay.fixedDelay",
                "error HTTPRoute shop/chaos: spec.rules[1].filters[0].extensionRef.name",
                "error HTTPRoute shop/chaos: spec.rules[2].matches[0].path.value",
                "unsupported GRPCRoute shop/cart: spec.rules[0].matches[0].method.type",
            ],
            "{shown:#?}"
        );
        let chaos = &routes["shop/chaos"];
        assert!(
            chaos.rules[0].problems.is_empty(),
            "the fault in its namespace"
        );
        assert!(matches!(
            chaos.rules[0].filters[0].kind,
            Some(mesh_proto::waypoint::route_filter::Kind::Fault(_))
        ));
        assert!(!chaos.rules[1].problems.is_empty());
        assert!(!chaos.rules[2].matches[0].problems.is_empty());
    }
}
