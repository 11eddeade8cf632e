//! Service VIPs in the lab, as the API server and kube-proxy make them: a Service that
//! names no cluster IP gets one per IP family it asks for (`ipFamilyPolicy`,
//! `ipFamilies`), and pods outside the mesh reach a VIP of either family through NAT on
//! every node. Pure functions; `lab.rs` writes the manifests and loads the rules.

use crate::ip_family::IpFamily;
use mesh_control::index::service::cluster_ips;
use mesh_control::index::workload::pod_ips;
use mesh_control::k8s::IntOrString;
use mesh_control::manifest::Objects;
use serde_json::{Value, json};
use std::net::IpAddr;

/// VIP `n` of each family: `10.96.0.<n>` and `fd00:96::<n in hex>`.
pub fn vip(n: u8, ipv6: bool) -> String {
    if ipv6 {
        format!("fd00:96::{n:x}")
    } else {
        format!("10.96.0.{n}")
    }
}

fn single_stack(lab: IpFamily) -> &'static str {
    if lab == IpFamily::Ipv6 {
        "IPv6 only"
    } else {
        "IPv4 only"
    }
}

/// Fills in `spec.clusterIP`, `clusterIPs`, `ipFamilies` and `ipFamilyPolicy` of a
/// Service manifest as the API server would in this lab, allocating the missing VIPs as
/// number `n` of their family. `Ok(true)` when `n` was used. Headless Services
/// (`clusterIP: None`) are left alone. A Service that names no family gets the lab's
/// primary one (IPv6 in an IPv6-only lab). Errors are the API server's refusals: a family
/// the lab does not have, or dual stack required of a single-stack lab.
pub fn assign(spec: &mut Value, n: u8, lab: IpFamily) -> Result<bool, String> {
    let dual_stack_lab = lab == IpFamily::DualStack;
    if spec["clusterIP"] == "None" || spec["clusterIPs"][0] == "None" {
        return Ok(false);
    }
    let mut given: Vec<String> = match spec["clusterIPs"].as_array() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => spec["clusterIP"]
            .as_str()
            .map(str::to_string)
            .into_iter()
            .collect(),
    };
    given.retain(|ip| !ip.is_empty()); // `""`: allocate one, as the API server does
    let family_of = |ip: &str| -> Result<&'static str, String> {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => Ok("IPv4"),
            Ok(IpAddr::V6(_)) => Ok("IPv6"),
            Err(_) => Err(format!("clusterIP {ip:?} is not an IP address")),
        }
    };
    let mut families: Vec<String> = match spec["ipFamilies"].as_array() {
        Some(f) if !f.is_empty() => f
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ if given.is_empty() => vec![lab.primary_service_family().to_string()],
        _ => given
            .iter()
            .map(|ip| family_of(ip).map(str::to_string))
            .collect::<Result<_, _>>()?,
    };
    // The API server's default: dual stack required when two VIPs or families are given.
    let policy = match spec["ipFamilyPolicy"].as_str() {
        Some(p) => p.to_string(),
        None if given.len() > 1 || families.len() > 1 => "RequireDualStack".to_string(),
        None => "SingleStack".to_string(),
    };
    if let Some(f) = families
        .iter()
        .find(|f| !matches!(f.as_str(), "IPv4" | "IPv6"))
    {
        return Err(format!("ipFamilies: {f:?} is neither IPv4 nor IPv6"));
    }
    match policy.as_str() {
        "SingleStack" => families.truncate(1),
        "PreferDualStack" | "RequireDualStack" if dual_stack_lab => {
            let other = if families[0] == "IPv4" {
                "IPv6"
            } else {
                "IPv4"
            };
            families.truncate(1);
            families.push(other.to_string());
        }
        "PreferDualStack" => families.truncate(1),
        "RequireDualStack" => {
            return Err(format!(
                "ipFamilyPolicy RequireDualStack: this lab is {} (run `mesh-lab up --dual-stack`)",
                single_stack(lab)
            ));
        }
        p => {
            return Err(format!(
                "ipFamilyPolicy {p:?} is none of SingleStack, PreferDualStack, RequireDualStack"
            ));
        }
    }
    if let Some(f) = families.iter().find(|f| !lab.allows_service_family(f)) {
        return Err(format!(
            "ipFamilies {f}: this lab is {} (run `mesh-lab up --dual-stack`)",
            single_stack(lab)
        ));
    }
    let mut used = false;
    for family in &families {
        let mut have = false;
        for ip in &given {
            have |= family_of(ip)? == family;
        }
        if !have {
            given.push(vip(n, family == "IPv6"));
            used = true;
        }
    }
    // In the order of `ipFamilies`: the first is the primary, `clusterIP`.
    given.sort_by_key(|ip| {
        let f = family_of(ip).unwrap_or("IPv4");
        families.iter().position(|x| x == f).unwrap_or(usize::MAX)
    });
    spec["clusterIP"] = json!(given[0]);
    spec["clusterIPs"] = json!(given);
    spec["ipFamilies"] = json!(families);
    spec["ipFamilyPolicy"] = json!(policy);
    Ok(used)
}

/// kube-proxy's job for pods outside the mesh, as one nftables script: every Service VIP
/// (of both families) → its ready pods' addresses of the VIP's family, on each port.
/// Mesh pods never get here: ztunnel resolves VIPs inside the pod.
pub fn nat_rules(objs: &Objects) -> String {
    let mut v4 = String::new();
    let mut v6 = String::new();
    for svc in objs.services.values() {
        let Some(selector) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let ns = svc.metadata.ns();
        let members: Vec<&mesh_control::k8s::Pod> = objs
            .pods
            .values()
            .filter(|p| {
                p.metadata.ns() == ns
                    && selector
                        .iter()
                        .all(|(k, v)| p.metadata.labels.get(k) == Some(v))
            })
            .map(|p| p.as_ref())
            .collect();
        for vip in cluster_ips(svc) {
            for port in &svc.spec.ports {
                let endpoints: Vec<String> = members
                    .iter()
                    .filter_map(|p| {
                        let target = match &port.target_port {
                            None => port.port,
                            Some(IntOrString::Int(t)) => *t,
                            Some(IntOrString::String(n)) => {
                                p.spec
                                    .containers
                                    .iter()
                                    .flat_map(|c| &c.ports)
                                    .find(|cp| cp.name.as_deref() == Some(n.as_str()))?
                                    .container_port
                            }
                        };
                        let ip = pod_ips(p)
                            .into_iter()
                            .find(|ip| ip.is_ipv4() == vip.is_ipv4())?;
                        Some(format!("{ip} . {target}"))
                    })
                    .collect();
                if endpoints.is_empty() {
                    continue;
                }
                let map: Vec<String> = endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, e)| format!("{i} : {e}"))
                    .collect();
                let (out, daddr) = if vip.is_ipv4() {
                    (&mut v4, "ip")
                } else {
                    (&mut v6, "ip6")
                };
                out.push_str(&format!(
                    "    {daddr} daddr {vip} tcp dport {} dnat to numgen random mod {} map {{ {} }}\n",
                    port.port,
                    endpoints.len(),
                    map.join(", ")
                ));
            }
        }
    }
    let table = |family: &str, body: &str| {
        format!(
            "add table {family} lab-services\ndelete table {family} lab-services\n\
             table {family} lab-services {{\n\
             \x20 chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{body}  }}\n\
             \x20 chain output {{\n    type nat hook output priority -100; policy accept;\n{body}  }}\n}}\n"
        )
    };
    table("ip", &v4) + &table("ip6", &v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Value {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn single_stack_by_default_even_in_a_dual_stack_lab() {
        let mut s = spec("{ports: [{port: 80}]}");
        assert_eq!(assign(&mut s, 12, IpFamily::DualStack), Ok(true));
        assert_eq!(s["clusterIP"], "10.96.0.12");
        assert_eq!(s["clusterIPs"], json!(["10.96.0.12"]));
        assert_eq!(s["ipFamilies"], json!(["IPv4"]));
        assert_eq!(s["ipFamilyPolicy"], "SingleStack");
    }

    #[test]
    fn dual_stack_services_get_a_vip_of_each_family_primary_first() {
        let mut s = spec("{ipFamilyPolicy: PreferDualStack}");
        assert_eq!(assign(&mut s, 26, IpFamily::DualStack), Ok(true));
        assert_eq!(s["clusterIPs"], json!(["10.96.0.26", "fd00:96::1a"]));
        assert_eq!(s["ipFamilies"], json!(["IPv4", "IPv6"]));

        let mut s = spec("{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6]}");
        assert_eq!(assign(&mut s, 10, IpFamily::DualStack), Ok(true));
        assert_eq!(s["clusterIP"], "fd00:96::a");
        assert_eq!(s["clusterIPs"], json!(["fd00:96::a", "10.96.0.10"]));
        assert_eq!(s["ipFamilies"], json!(["IPv6", "IPv4"]));

        let mut s = spec("{ipFamilies: [IPv6]}");
        assert_eq!(assign(&mut s, 11, IpFamily::DualStack), Ok(true));
        assert_eq!(s["clusterIPs"], json!(["fd00:96::b"]));
    }

    #[test]
    fn given_vips_are_kept_and_only_the_missing_family_allocated() {
        let mut s = spec(r#"{clusterIP: 10.96.0.20, clusterIPs: [10.96.0.20, "fd00:96::20"]}"#);
        assert_eq!(assign(&mut s, 30, IpFamily::DualStack), Ok(false));
        assert_eq!(s["clusterIPs"], json!(["10.96.0.20", "fd00:96::20"]));
        assert_eq!(s["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(s["ipFamilyPolicy"], "RequireDualStack");

        let mut s = spec("{clusterIP: 10.96.0.20, ipFamilyPolicy: PreferDualStack}");
        assert_eq!(assign(&mut s, 30, IpFamily::DualStack), Ok(true));
        assert_eq!(s["clusterIPs"], json!(["10.96.0.20", "fd00:96::1e"]));

        let mut s = spec(r#"{clusterIP: ""}"#);
        assert_eq!(assign(&mut s, 30, IpFamily::DualStack), Ok(true));
        assert_eq!(s["clusterIPs"], json!(["10.96.0.30"]));

        let mut s = spec("{clusterIP: None}");
        assert_eq!(assign(&mut s, 30, IpFamily::DualStack), Ok(false));
        assert!(s["clusterIPs"].is_null());
        assert_eq!(
            assign(&mut spec("{clusterIPs: [None]}"), 30, IpFamily::DualStack),
            Ok(false)
        );
    }

    #[test]
    fn a_single_stack_lab_refuses_ipv6_as_the_api_server_would() {
        let mut s = spec("{ipFamilyPolicy: PreferDualStack}");
        assert_eq!(assign(&mut s, 10, IpFamily::Ipv4), Ok(true));
        assert_eq!(s["clusterIPs"], json!(["10.96.0.10"]));
        for bad in [
            "{ipFamilyPolicy: RequireDualStack}",
            "{ipFamilies: [IPv6]}",
            "{ipFamilyPolicy: Sometimes}",
            "{ipFamilies: [IPX]}",
        ] {
            assert!(assign(&mut spec(bad), 10, IpFamily::Ipv4).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_ipv6_only_lab_gives_ipv6_vips_by_default_and_refuses_ipv4() {
        for ok in [
            "{}",
            "{ipFamilyPolicy: PreferDualStack}",
            "{ipFamilies: [IPv6]}",
        ] {
            let mut s = spec(ok);
            assert_eq!(assign(&mut s, 10, IpFamily::Ipv6), Ok(true), "{ok}");
            assert_eq!(s["clusterIP"], "fd00:96::a", "{ok}");
            assert_eq!(s["clusterIPs"], json!(["fd00:96::a"]), "{ok}");
            assert_eq!(s["ipFamilies"], json!(["IPv6"]), "{ok}");
        }
        for bad in [
            "{ipFamilyPolicy: RequireDualStack}",
            "{ipFamilies: [IPv4]}",
            "{clusterIP: 10.96.0.7}",
        ] {
            let err = assign(&mut spec(bad), 10, IpFamily::Ipv6).unwrap_err();
            assert!(err.contains("IPv6 only"), "{bad}: {err}");
        }
    }

    #[test]
    fn each_vip_is_nated_to_endpoints_of_its_own_family() {
        let mut objs = Objects::default();
        objs.add_file(
            std::path::Path::new("t"),
            r#"
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api}}
spec: {containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: "fd00:10:244:1::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: back, labels: {app: api}}
spec: {containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.2.7}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ports: [{port: 80, targetPort: http}]
"#,
        )
        .unwrap();
        let rules = nat_rules(&objs);
        assert!(rules.contains(
            "ip daddr 10.96.0.20 tcp dport 80 dnat to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.2.7 . 8080 }"
        ), "{rules}");
        assert!(rules.contains(
            "ip6 daddr fd00:96::20 tcp dport 80 dnat to numgen random mod 1 map { 0 : fd00:10:244:1::5 . 8080 }"
        ), "{rules}");
        let v6_table = &rules[rules.find("table ip6 lab-services {").unwrap()..];
        assert!(!v6_table.contains("10.244."), "{rules}");
    }
}
