//! The lab's pod network family: IPv4 (the default), dual stack, or IPv6 only. Pure
//! functions; `lab.rs` applies them to the CNI configuration and the pods it starts.

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpFamily {
    #[default]
    Ipv4,
    DualStack,
    Ipv6,
}

impl IpFamily {
    /// The family `mesh-lab up` asks for: `--ip-family` (ipv4, ipv6, dual) or the older
    /// `--dual-stack` flag; both given must agree.
    pub fn from_args(ip_family: Option<&str>, dual_stack: bool) -> Result<IpFamily, String> {
        let named = match ip_family {
            None => None,
            Some("ipv4") => Some(IpFamily::Ipv4),
            Some("ipv6") => Some(IpFamily::Ipv6),
            Some("dual") => Some(IpFamily::DualStack),
            Some(other) => {
                return Err(format!("--ip-family {other:?} is none of ipv4, ipv6, dual"));
            }
        };
        match (named, dual_stack) {
            (None, false) => Ok(IpFamily::Ipv4),
            (None, true) | (Some(IpFamily::DualStack), _) => Ok(IpFamily::DualStack),
            (Some(f), false) => Ok(f),
            (Some(_), true) => Err("--dual-stack contradicts --ip-family: give one".into()),
        }
    }

    /// Whether pods (and so nodes' routes) have IPv6 addresses.
    pub fn has_ipv6(self) -> bool {
        self != IpFamily::Ipv4
    }

    /// A Service's family when it names none, as a cluster's API server defaults it.
    pub fn primary_service_family(self) -> &'static str {
        if self == IpFamily::Ipv6 {
            "IPv6"
        } else {
            "IPv4"
        }
    }

    /// Whether Services may have VIPs of `family` ("IPv4" or "IPv6") in this lab.
    pub fn allows_service_family(self, family: &str) -> bool {
        match self {
            IpFamily::Ipv4 => family == "IPv4",
            IpFamily::Ipv6 => family == "IPv6",
            IpFamily::DualStack => true,
        }
    }
}

/// `conflist` (from `node_conflist`) with its IPv4 range and route replaced by one IPv6
/// range and a default IPv6 route: the pod gets an IPv6 address only.
pub fn ipv6_only_range(mut conflist: Value, subnet: &str, gateway: &str) -> Value {
    let ipam = &mut conflist["plugins"][0]["ipam"];
    ipam["ranges"] = json!([[{"subnet": subnet, "gateway": gateway}]]);
    ipam["routes"] = json!([{"dst": "::/0"}]);
    conflist
}

/// The pod's addresses as the lab records them, from what the CNI chain gave it: the
/// primary address (`status.podIP`: IPv6 in an IPv6-only lab) and its IPv6 address.
pub fn pod_addresses(
    family: IpFamily,
    ip4: Option<String>,
    ip6: Option<String>,
) -> Result<(String, Option<String>), String> {
    match family {
        IpFamily::Ipv6 => {
            let v6 = ip6.ok_or("no IPv6 address from the CNI chain")?;
            Ok((v6.clone(), Some(v6)))
        }
        _ => {
            let v4 = ip4.ok_or("no IPv4 address from the CNI chain")?;
            if family == IpFamily::DualStack && ip6.is_none() {
                return Err("no IPv6 address from the CNI chain".into());
            }
            Ok((v4, ip6))
        }
    }
}

/// `status.podIPs` of a pod with addresses `ip` (primary) and `ip6`, each once.
pub fn pod_ips(ip: &str, ip6: Option<&str>) -> Vec<String> {
    let mut ips = vec![ip.to_string()];
    ips.extend(ip6.filter(|v6| *v6 != ip).map(str::to_string));
    ips
}

/// Where the control plane listens (on node 1, whose fabric addresses are `node_v4` and
/// `node_v6`) and the IP SANs of its certificate. The nodes' components reach it over
/// IPv4; in an IPv6-only lab pods (waypoints) have no IPv4 and reach it over IPv6, so it
/// listens on both.
pub fn control_listen(family: IpFamily, node_v4: &str, node_v6: &str) -> (String, Vec<String>) {
    if family == IpFamily::Ipv6 {
        (
            "[::]:15012".into(),
            vec![node_v4.to_string(), node_v6.to_string()],
        )
    } else {
        (format!("{node_v4}:15012"), vec![node_v4.to_string()])
    }
}

/// The control plane's xDS address as a pod (a waypoint) dials it.
pub fn pod_control_address(family: IpFamily, node_v4: &str, node_v6: &str) -> String {
    if family == IpFamily::Ipv6 {
        format!("https://[{node_v6}]:15012")
    } else {
        format!("https://{node_v4}:15012")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni_runtime::node_conflist;
    use std::path::Path;

    #[test]
    fn flags_name_the_family_and_contradictions_are_refused() {
        assert_eq!(IpFamily::from_args(None, false), Ok(IpFamily::Ipv4));
        assert_eq!(IpFamily::from_args(None, true), Ok(IpFamily::DualStack));
        assert_eq!(IpFamily::from_args(Some("ipv6"), false), Ok(IpFamily::Ipv6));
        assert_eq!(
            IpFamily::from_args(Some("dual"), true),
            Ok(IpFamily::DualStack)
        );
        assert!(IpFamily::from_args(Some("ipv6"), true).is_err());
        assert!(IpFamily::from_args(Some("ipv5"), false).is_err());
    }

    #[test]
    fn services_default_to_the_labs_primary_family() {
        assert_eq!(IpFamily::Ipv4.primary_service_family(), "IPv4");
        assert_eq!(IpFamily::DualStack.primary_service_family(), "IPv4");
        assert_eq!(IpFamily::Ipv6.primary_service_family(), "IPv6");
        assert!(!IpFamily::Ipv6.allows_service_family("IPv4"));
        assert!(!IpFamily::Ipv4.allows_service_family("IPv6"));
        assert!(IpFamily::DualStack.allows_service_family("IPv6"));
    }

    #[test]
    fn ipv6_only_pods_reach_the_control_plane_over_ipv6() {
        let (v4, v6) = ("10.100.0.11", "fd00:100::11");
        assert_eq!(
            control_listen(IpFamily::Ipv4, v4, v6),
            ("10.100.0.11:15012".to_string(), vec![v4.to_string()])
        );
        assert_eq!(
            control_listen(IpFamily::DualStack, v4, v6),
            control_listen(IpFamily::Ipv4, v4, v6)
        );
        assert_eq!(
            control_listen(IpFamily::Ipv6, v4, v6),
            (
                "[::]:15012".to_string(),
                vec![v4.to_string(), v6.to_string()]
            )
        );
        assert_eq!(
            pod_control_address(IpFamily::DualStack, v4, v6),
            "https://10.100.0.11:15012"
        );
        assert_eq!(
            pod_control_address(IpFamily::Ipv6, v4, v6),
            "https://[fd00:100::11]:15012"
        );
    }

    #[test]
    fn an_ipv6_only_conflist_has_no_ipv4_range_or_route() {
        let c = node_conflist(
            "n",
            "cni0",
            "10.244.1.0/24",
            "10.244.1.1",
            Path::new("/ipam"),
            Path::new("/sock"),
        );
        let c = ipv6_only_range(c, "fd00:10:244:1::/64", "fd00:10:244:1::1");
        let ipam = &c["plugins"][0]["ipam"];
        assert_eq!(
            ipam["ranges"],
            json!([[{"subnet": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::1"}]])
        );
        assert_eq!(ipam["routes"], json!([{"dst": "::/0"}]));
        assert_eq!(c["plugins"][1]["type"], "mesh-cni");
    }

    #[test]
    fn an_ipv6_only_pods_primary_address_is_its_ipv6_one() {
        let v6 = Some("fd00:10:244:1::5".to_string());
        let v4 = Some("10.244.1.5".to_string());
        assert_eq!(
            pod_addresses(IpFamily::Ipv6, None, v6.clone()),
            Ok(("fd00:10:244:1::5".into(), v6.clone()))
        );
        assert!(pod_addresses(IpFamily::Ipv6, v4.clone(), None).is_err());
        assert_eq!(
            pod_addresses(IpFamily::Ipv4, v4.clone(), None),
            Ok(("10.244.1.5".into(), None))
        );
        assert!(pod_addresses(IpFamily::DualStack, v4.clone(), None).is_err());
        assert_eq!(
            pod_ips("fd00:10:244:1::5", Some("fd00:10:244:1::5")),
            vec!["fd00:10:244:1::5"]
        );
        assert_eq!(
            pod_ips("10.244.1.5", Some("fd00:10:244:1::5")),
            vec!["10.244.1.5", "fd00:10:244:1::5"]
        );
    }
}
