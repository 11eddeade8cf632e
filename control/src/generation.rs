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
    pub fn build(version: u64, objects: Objects, cfg: &IndexConfig) -> Self {
        let resources = index::compute(&objects, cfg);
        let addresses = resources
            .addresses
            .iter()
            .map(|(name, a)| {
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
            objects: Arc::new(objects),
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
