//! One computed state of the mesh, and the view each client gets of it.

use crate::ads::{Served, View};
use crate::auth::Principal;
use crate::index::{self, IndexConfig, Resources};
use crate::manifest::Objects;
use mesh_proto::prost::Message;
use mesh_proto::{cni, type_url, workload as pb};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Generation {
    pub version: u64,
    pub index_config: IndexConfig,
    pub objects: Arc<Objects>,
    pub resources: Arc<Resources>,
    pub addresses: View,
    pub authorizations: View,
    pub node_pods: HashMap<String, View>,
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

impl Generation {
    /// The generation of `objects`. Resources equal to `previous`'s keep its encoding
    /// (no re-encoding of 10,000 unchanged workloads when one pod changes).
    pub fn build(
        version: u64,
        objects: Arc<Objects>,
        previous: Option<&Generation>,
        cfg: &IndexConfig,
    ) -> Self {
        let resources = index::compute(&objects, cfg);
        let unchanged = |name: &str, a: &pb::Address| {
            let p = previous?;
            (p.resources.addresses.get(name)? == a)
                .then(|| p.addresses.get(name).cloned())
                .flatten()
        };
        let addresses = resources
            .addresses
            .iter()
            .map(|(name, a)| {
                if let Some(served) = unchanged(name, a) {
                    return (name.clone(), served);
                }
                let aliases = match &a.r#type {
                    Some(pb::address::Type::Workload(w)) => w
                        .addresses
                        .iter()
                        .filter_map(|b| ip_of(b))
                        .map(|ip| format!("{}/{ip}", w.network))
                        .collect(),
                    Some(pb::address::Type::Service(s)) => s
                        .addresses
                        .iter()
                        .filter_map(|n| Some(format!("{}/{}", n.network, ip_of(&n.address)?)))
                        .collect(),
                    None => vec![],
                };
                (
                    name.clone(),
                    Served::new(name.clone(), type_url::ADDRESS, a.encode_to_vec(), aliases),
                )
            })
            .collect();
        let authorizations = resources
            .authorizations
            .iter()
            .map(|(name, a)| {
                if let Some(served) = previous.and_then(|p| {
                    (p.resources.authorizations.get(name)? == a)
                        .then(|| p.authorizations.get(name).cloned())
                        .flatten()
                }) {
                    return (name.clone(), served);
                }
                (
                    name.clone(),
                    Served::new(
                        name.clone(),
                        type_url::AUTHORIZATION,
                        a.encode_to_vec(),
                        vec![],
                    ),
                )
            })
            .collect();
        let node_pods = resources
            .node_pods
            .iter()
            .map(|(node, pods)| {
                if let Some(view) = previous.and_then(|p| {
                    (p.resources.node_pods.get(node)? == pods)
                        .then(|| p.node_pods.get(node).cloned())
                        .flatten()
                }) {
                    return (node.clone(), view);
                }
                let view = pods
                    .iter()
                    .map(|p| {
                        let name = format!("{}/{}", p.namespace, p.name);
                        let msg = cni::NodePod {
                            enrolled: p.enrolled,
                            uid: p.uid.clone(),
                            name: p.name.clone(),
                            namespace: p.namespace.clone(),
                            service_account: p.service_account.clone(),
                            ips: p.ips.clone(),
                            bypass_inbound_capture: p.bypass_inbound,
                            dns_capture: p.dns_capture,
                        };
                        (
                            name.clone(),
                            Served::new(name, type_url::NODE_POD, msg.encode_to_vec(), vec![]),
                        )
                    })
                    .collect();
                (node.clone(), view)
            })
            .collect();
        Generation {
            version,
            index_config: cfg.clone(),
            objects,
            resources: Arc::new(resources),
            addresses,
            authorizations,
            node_pods,
        }
    }

    /// What `who` may see of `type_url`; `None` for types it may not subscribe to.
    pub fn view(&self, type_url: &str, who: &Principal) -> Option<View> {
        match type_url {
            type_url::ADDRESS => Some(self.addresses.clone()),
            type_url::AUTHORIZATION => Some(self.authorizations.clone()),
            type_url::HTTP_ROUTE | type_url::L7_POLICY => match who {
                Principal::Waypoint { namespace, name } => {
                    use crate::index::waypoint_config as wc;
                    let served =
                        wc::served_services(&self.objects, &self.index_config, namespace, name);
                    let view = if type_url == type_url::HTTP_ROUTE {
                        wc::routes(&self.resources, &served)
                            .into_iter()
                            .map(|(k, r)| {
                                (
                                    k.clone(),
                                    Served::new(k, type_url, r.encode_to_vec(), vec![]),
                                )
                            })
                            .collect()
                    } else {
                        wc::policies(&self.objects, namespace, name, &served)
                            .into_iter()
                            .map(|(k, p)| {
                                (
                                    k.clone(),
                                    Served::new(k, type_url, p.encode_to_vec(), vec![]),
                                )
                            })
                            .collect()
                    };
                    Some(view)
                }
                Principal::Node(_) => None,
            },
            type_url::NODE_POD => match who {
                Principal::Node(n) => Some(self.node_pods.get(n).cloned().unwrap_or_default()),
                Principal::Waypoint { .. } => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-1, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web}
status: {podIP: 10.10.1.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, uid: u-2, labels: {app: web}}
spec: {nodeName: node-2, serviceAccountName: web}
status: {podIP: 10.10.1.6, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
"#;

    fn served(v: &View) -> Vec<(String, String, Vec<u8>, Vec<String>)> {
        v.values()
            .map(|s| {
                let s = s.as_ref();
                (
                    s.name.clone(),
                    s.version.clone(),
                    s.body.value.clone(),
                    s.aliases.clone(),
                )
            })
            .collect()
    }

    /// A rebuild after one pod moved serves exactly what a build from scratch serves,
    /// re-encoding only what changed.
    #[test]
    fn a_rebuild_reuses_what_did_not_change_and_serves_what_did() {
        let cfg = IndexConfig::default();
        let mut objects = Objects::default();
        objects.add_file(Path::new("mesh.yaml"), MESH).unwrap();
        let before = Generation::build(1, Arc::new(objects.clone()), None, &cfg);
        let key = ("shop".to_string(), "web-2".to_string());
        Arc::make_mut(objects.pods.get_mut(&key).unwrap())
            .status
            .pod_ip = Some("10.10.1.9".into());
        let objects = Arc::new(objects);
        let after = Generation::build(2, objects.clone(), Some(&before), &cfg);
        let scratch = Generation::build(2, objects, None, &cfg);

        assert_eq!(served(&after.addresses), served(&scratch.addresses));
        assert_eq!(
            served(&after.authorizations),
            served(&scratch.authorizations)
        );
        for (node, view) in &scratch.node_pods {
            assert_eq!(served(&after.node_pods[node]), served(view), "{node}");
        }
        let same = |name: &str| Arc::ptr_eq(&before.addresses[name], &after.addresses[name]);
        assert!(same("Kubernetes//Pod/shop/web-1"), "unchanged: reused");
        assert!(same("shop/web.shop.svc.cluster.local"), "unchanged: reused");
        assert!(!same("Kubernetes//Pod/shop/web-2"), "moved: re-encoded");
        assert!(Arc::ptr_eq(
            &before.node_pods["node-1"]["shop/web-1"],
            &after.node_pods["node-1"]["shop/web-1"]
        ));
        assert!(!Arc::ptr_eq(
            &before.node_pods["node-2"]["shop/web-2"],
            &after.node_pods["node-2"]["shop/web-2"]
        ));
    }
}
