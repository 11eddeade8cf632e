//! Wire-compatibility tests: hand-built byte vectors (so a wrong field number or type
//! fails) and round trips of every message.

use mesh_proto::prost::Message;
use mesh_proto::{ca, discovery, envoy_core, rpc, security, workload, zds};
use prost_types::{Any, Struct, Value, value::Kind};
use std::collections::HashMap;

fn bytes(hex_str: &str) -> Vec<u8> {
    hex::decode(hex_str.replace(' ', "")).expect("valid hex in test vector")
}

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(m: M) {
    let encoded = m.encode_to_vec();
    let decoded = M::decode(encoded.as_slice()).expect("decode what we encoded");
    assert_eq!(m, decoded);
}

#[test]
fn workload_address_from_hand_built_bytes() {
    let port = "08 50 10 903f 18 01"; // service_port 80, target_port 8080, HTTP11
    let port_list = format!("0a 07 {port}");
    let services_entry = format!("0a 04 6e732f68 12 09 {port_list}"); // "ns/h" -> PortList
    let waypoint = "12 06 12 04 0a000009 18 a075"; // address{10.0.0.9}, hbone_mtls_port 15008
    let wl = format!(
        "a201 01 75 \
         1a 04 0a000001 \
         28 01 \
         3a 02 7361 \
         4a 02 6e31 \
         42 0b {waypoint} \
         b201 11 {services_entry} \
         da01 02 08 02 \
         8801 01"
    );
    let wl_bytes = bytes(&wl);
    let mut addr_bytes = vec![0x0a, wl_bytes.len() as u8];
    addr_bytes.extend_from_slice(&wl_bytes);

    let addr = workload::Address::decode(addr_bytes.as_slice()).unwrap();
    let Some(workload::address::Type::Workload(w)) = addr.r#type else {
        panic!("expected a workload, got {addr:?}")
    };
    assert_eq!(w.uid, "u");
    assert_eq!(w.addresses, vec![vec![10, 0, 0, 1]]);
    assert_eq!(w.tunnel_protocol(), workload::TunnelProtocol::Hbone);
    assert_eq!(w.service_account, "sa");
    assert_eq!(w.node, "n1");
    assert_eq!(w.capacity, Some(2));
    assert_eq!(w.status(), workload::WorkloadStatus::Unhealthy);
    let gw = w.waypoint.expect("waypoint");
    assert_eq!(gw.hbone_mtls_port, 15008);
    match gw.destination {
        Some(workload::gateway_address::Destination::Address(a)) => {
            assert_eq!(a.address, vec![10, 0, 0, 9])
        }
        other => panic!("unexpected waypoint destination {other:?}"),
    }
    let ports = &w.services["ns/h"].ports;
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
    assert_eq!(ports[0].app_protocol(), workload::AppProtocol::Http11);
}

#[test]
fn workload_service_from_hand_built_bytes() {
    // name "s", namespace "ns", hostname "s.ns.svc", addresses [{address 10.96.0.1, length 32}],
    // ports [{80, 8080}], load_balancing {routing_preference [NODE], mode STRICT}
    let svc = bytes(
        "0a 01 73 12 02 6e73 1a 08 732e6e732e737663 \
         22 08 12 04 0a600001 18 20 \
         2a 05 08 50 10 903f \
         42 05 0a 01 04 10 01",
    );
    let mut addr = vec![0x12, svc.len() as u8];
    addr.extend_from_slice(&svc);
    let addr = workload::Address::decode(addr.as_slice()).unwrap();
    let Some(workload::address::Type::Service(s)) = addr.r#type else {
        panic!("expected a service")
    };
    assert_eq!((s.name.as_str(), s.namespace.as_str()), ("s", "ns"));
    assert_eq!(s.hostname, "s.ns.svc");
    assert_eq!(s.addresses[0].address, vec![10, 96, 0, 1]);
    assert_eq!(s.addresses[0].length, Some(32));
    assert_eq!(
        (s.ports[0].service_port, s.ports[0].target_port),
        (80, 8080)
    );
    let lb = s.load_balancing.unwrap();
    assert_eq!(
        lb.routing_preference().collect::<Vec<_>>(),
        vec![workload::load_balancing::Scope::Node]
    );
    assert_eq!(lb.mode(), workload::load_balancing::Mode::Strict);
}

#[test]
fn authorization_from_hand_built_bytes() {
    let string_prefix = "12 03 74642f"; // StringMatch{prefix "td/"}
    let presence = "22 00"; // StringMatch{presence {}}
    let sa = "0a 02 6e73 12 02 7361"; // {namespace ns, serviceAccount sa}
    let ip = "0a 04 0a000000 10 18"; // {10.0.0.0, length 24}
    let m = format!("1a 05 {string_prefix} 22 02 {presence} 4a 02 903f 5a 08 {sa} 2a 08 {ip}");
    let m_len = bytes(&m).len();
    let clause = format!("12 {m_len:02x} {m}");
    let clause_len = bytes(&clause).len();
    let rule = format!("0a {clause_len:02x} {clause}");
    let rule_len = bytes(&rule).len();
    let authz = bytes(&format!(
        "0a 01 70 12 02 6e73 18 02 20 01 2a {rule_len:02x} {rule} 30 01"
    ));
    let a = security::Authorization::decode(authz.as_slice()).unwrap();
    assert_eq!((a.name.as_str(), a.namespace.as_str()), ("p", "ns"));
    assert_eq!(a.scope(), security::Scope::WorkloadSelector);
    assert_eq!(a.action(), security::Action::Deny);
    assert!(a.dry_run);
    let m = &a.rules[0].clauses[0].matches[0];
    assert_eq!(
        m.principals[0].match_type,
        Some(security::string_match::MatchType::Prefix("td/".into()))
    );
    assert_eq!(
        m.not_principals[0].match_type,
        Some(security::string_match::MatchType::Presence(()))
    );
    assert_eq!(m.destination_ports, vec![8080]);
    assert_eq!(m.service_accounts[0].namespace, "ns");
    assert_eq!(m.service_accounts[0].service_account, "sa");
    assert_eq!(m.source_ips[0].address, vec![10, 0, 0, 0]);
    assert_eq!(m.source_ips[0].length, 24);
}

#[test]
fn ca_messages_from_hand_built_bytes() {
    // metadata Struct {fields {"ImpersonatedIdentity": string "spiffe://x"}}
    let key = hex::encode("ImpersonatedIdentity");
    let value = format!("1a 0a {}", hex::encode("spiffe://x"));
    let entry = format!("0a 14 {key} 12 0c {value}");
    let entry_len = bytes(&entry).len();
    let meta = format!("0a {entry_len:02x} {entry}");
    let meta_len = bytes(&meta).len();
    let req = bytes(&format!("0a 03 50454d 18 901c 22 {meta_len:02x} {meta}"));
    let r = ca::IstioCertificateRequest::decode(req.as_slice()).unwrap();
    assert_eq!(r.csr, "PEM");
    assert_eq!(r.validity_duration, 3600);
    let v = &r.metadata.unwrap().fields["ImpersonatedIdentity"];
    assert_eq!(v.kind, Some(Kind::StringValue("spiffe://x".into())));

    let resp = ca::IstioCertificateResponse {
        cert_chain: vec!["a".into(), "b".into()],
    };
    assert_eq!(resp.encode_to_vec(), bytes("0a 01 61 0a 01 62"));
}

#[test]
fn zds_messages_match_hand_built_bytes() {
    use zds::workload_request::Payload;
    let add = zds::WorkloadRequest {
        payload: Some(Payload::Add(zds::AddWorkload {
            uid: "u1".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        })),
    };
    assert_eq!(
        add.encode_to_vec(),
        bytes("0a 11 0a 02 7531 12 0b 0a 01 70 12 02 6e73 1a 02 7361")
    );
    let del = zds::WorkloadRequest {
        payload: Some(Payload::Del(zds::DelWorkload { uid: "u1".into() })),
    };
    assert_eq!(del.encode_to_vec(), bytes("12 04 12 02 7531"));
    let snap = zds::WorkloadRequest {
        payload: Some(Payload::SnapshotSent(zds::SnapshotSent {})),
    };
    assert_eq!(snap.encode_to_vec(), bytes("1a 00"));
    let keep = zds::WorkloadRequest {
        payload: Some(Payload::Keep(zds::KeepWorkload { uid: "u1".into() })),
    };
    assert_eq!(keep.encode_to_vec(), bytes("2a 04 0a 02 7531"));
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
        capabilities: vec![],
    };
    assert_eq!(hello.encode_to_vec(), bytes("08 01"));
    // Our extension: field 100 (tag a2 06), which Istio's agent skips as unknown.
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
        capabilities: vec!["handover.v1".into()],
    };
    assert_eq!(
        hello.encode_to_vec(),
        bytes("08 01 a2 06 0b 68616e646f7665722e7631")
    );
    let handover = zds::WorkloadRequest {
        payload: Some(Payload::Handover(zds::Handover {})),
    };
    assert_eq!(handover.encode_to_vec(), bytes("a2 06 00"));
    let nack = zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
            error: "x".into(),
        })),
    };
    assert_eq!(nack.encode_to_vec(), bytes("0a 03 0a 01 78"));
}

#[test]
fn delta_discovery_from_hand_built_bytes() {
    // node{id "n"}, type_url "t", subscribe ["*"], initial_resource_versions {"a":"1"},
    // response_nonce "x", error_detail {code 3, message "bad"}
    let req = bytes(
        "0a 03 0a 01 6e 12 01 74 1a 01 2a 2a 06 0a 01 61 12 01 31 32 01 78 \
         3a 07 08 03 12 03 626164",
    );
    let r = discovery::DeltaDiscoveryRequest::decode(req.as_slice()).unwrap();
    assert_eq!(r.node.unwrap().id, "n");
    assert_eq!(r.type_url, "t");
    assert_eq!(r.resource_names_subscribe, vec!["*"]);
    assert_eq!(r.initial_resource_versions["a"], "1");
    assert_eq!(r.response_nonce, "x");
    let e = r.error_detail.unwrap();
    assert_eq!((e.code, e.message.as_str()), (3, "bad"));

    // system_version_info "v", resources [{version "1", resource Any{type_url "t"}, name "r",
    // aliases ["a"]}], type_url "t", nonce "n", removed_resources ["g"]
    let resp = bytes(
        "0a 01 76 12 0e 0a 01 31 12 03 0a 01 74 1a 01 72 22 01 61 \
         22 01 74 2a 01 6e 32 01 67",
    );
    let r = discovery::DeltaDiscoveryResponse::decode(resp.as_slice()).unwrap();
    assert_eq!(r.system_version_info, "v");
    assert_eq!(r.type_url, "t");
    assert_eq!(r.nonce, "n");
    assert_eq!(r.removed_resources, vec!["g"]);
    let res = &r.resources[0];
    assert_eq!((res.name.as_str(), res.version.as_str()), ("r", "1"));
    assert_eq!(res.aliases, vec!["a"]);
    assert_eq!(res.resource.as_ref().unwrap().type_url, "t");
}

#[test]
fn every_message_round_trips() {
    let port = workload::Port {
        service_port: 80,
        target_port: 8080,
        app_protocol: workload::AppProtocol::Grpc as i32,
    };
    let net_addr = workload::NetworkAddress {
        network: "net".into(),
        address: vec![10, 0, 0, 1],
        length: Some(32),
    };
    let gw = workload::GatewayAddress {
        destination: Some(workload::gateway_address::Destination::Hostname(
            workload::NamespacedHostname {
                namespace: "ns".into(),
                hostname: "wp.ns.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    };
    let ext = workload::Extension {
        name: "e".into(),
        config: Some(Any {
            type_url: "t".into(),
            value: vec![1, 2, 3],
        }),
    };
    let lb = workload::LoadBalancing {
        routing_preference: vec![workload::load_balancing::Scope::Network as i32],
        mode: workload::load_balancing::Mode::Failover as i32,
        health_policy: workload::load_balancing::HealthPolicy::AllowAll as i32,
    };
    let wl = workload::Workload {
        uid: "c//Pod/ns/p".into(),
        name: "p".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1], vec![0; 16]],
        hostname: "h".into(),
        network: "net".into(),
        tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
        trust_domain: "td".into(),
        service_account: "sa".into(),
        waypoint: Some(gw.clone()),
        network_gateway: Some(gw.clone()),
        node: "node".into(),
        canonical_name: "cn".into(),
        canonical_revision: "v1".into(),
        workload_type: workload::WorkloadType::Pod as i32,
        workload_name: "wn".into(),
        native_tunnel: true,
        application_tunnel: Some(workload::ApplicationTunnel {
            protocol: workload::application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        services: HashMap::from([("ns/s".to_string(), workload::PortList { ports: vec![port] })]),
        authorization_policies: vec!["ns/p".into()],
        status: workload::WorkloadStatus::Unhealthy as i32,
        cluster_id: "c".into(),
        locality: Some(workload::Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into(),
        }),
        network_mode: workload::NetworkMode::HostNetwork as i32,
        extensions: vec![ext.clone()],
        capacity: Some(3),
    };
    let svc = workload::Service {
        name: "s".into(),
        namespace: "ns".into(),
        hostname: "s.ns.svc.cluster.local".into(),
        addresses: vec![net_addr.clone()],
        ports: vec![port],
        subject_alt_names: vec!["spiffe://td/ns/ns/sa/x".into()],
        waypoint: Some(gw.clone()),
        load_balancing: Some(lb.clone()),
        ip_families: workload::IpFamilies::Dual as i32,
        extensions: vec![ext.clone()],
        canonical: true,
        ingress_use_waypoint: true,
        weighted_waypoints: vec![workload::WeightedWaypoint {
            destination: Some(gw.clone()),
            weight: 10,
        }],
        visibility: workload::Visibility::Namespace as i32,
    };
    roundtrip(workload::Address {
        r#type: Some(workload::address::Type::Workload(wl.clone())),
    });
    roundtrip(workload::Address {
        r#type: Some(workload::address::Type::Service(svc)),
    });
    roundtrip(wl);
    roundtrip(port);
    roundtrip(workload::PortList { ports: vec![port] });
    roundtrip(net_addr);
    roundtrip(gw);
    roundtrip(ext);
    roundtrip(lb);

    let sm = |m| security::StringMatch {
        match_type: Some(m),
    };
    use security::string_match::MatchType;
    let addr = security::Address {
        address: vec![10, 0, 0, 0],
        length: 8,
    };
    let sa = security::ServiceAccountMatch {
        namespace: "ns".into(),
        service_account: "sa".into(),
    };
    let m = security::Match {
        namespaces: vec![sm(MatchType::Exact("a".into()))],
        not_namespaces: vec![sm(MatchType::Prefix("b".into()))],
        principals: vec![sm(MatchType::Suffix("c".into()))],
        not_principals: vec![sm(MatchType::Presence(()))],
        source_ips: vec![addr.clone()],
        not_source_ips: vec![addr.clone()],
        destination_ips: vec![addr.clone()],
        not_destination_ips: vec![addr.clone()],
        destination_ports: vec![1, 2],
        not_destination_ports: vec![3],
        service_accounts: vec![sa.clone()],
        not_service_accounts: vec![sa.clone()],
        extensions: vec![],
    };
    let authz = security::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![m.clone()],
            }],
        }],
        dry_run: true,
        extensions: vec![],
    };
    roundtrip(authz);
    roundtrip(m);
    roundtrip(addr);
    roundtrip(sa);

    roundtrip(ca::IstioCertificateRequest {
        csr: "csr".into(),
        validity_duration: 86400,
        metadata: Some(Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue("spiffe://td/ns/a/sa/b".into())),
                },
            )]
            .into(),
        }),
    });
    roundtrip(ca::IstioCertificateResponse {
        cert_chain: vec!["leaf".into(), "root".into()],
    });

    let status = rpc::Status {
        code: 3,
        message: "invalid".into(),
        details: vec![],
    };
    roundtrip(status.clone());
    let node = envoy_core::Node {
        id: "ztunnel~10.0.0.1~zt.mesh-system~mesh-system.svc.cluster.local".into(),
        cluster: "c".into(),
        metadata: None,
        locality: Some(envoy_core::Locality {
            region: "r".into(),
            zone: "z".into(),
            sub_zone: "s".into(),
        }),
        user_agent_name: "ztunnel".into(),
    };
    roundtrip(node.clone());
    roundtrip(discovery::DeltaDiscoveryRequest {
        node: Some(node),
        type_url: mesh_proto::type_url::ADDRESS.into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["x".into()],
        initial_resource_versions: [("a".to_string(), "1".to_string())].into(),
        response_nonce: "n".into(),
        error_detail: Some(status),
    });
    roundtrip(discovery::DeltaDiscoveryResponse {
        system_version_info: "v".into(),
        resources: vec![discovery::Resource {
            name: "r".into(),
            aliases: vec!["/10.0.0.1".into()],
            version: "1".into(),
            resource: Some(Any {
                type_url: mesh_proto::type_url::ADDRESS.into(),
                value: vec![],
            }),
            ttl: None,
            metadata: None,
        }],
        type_url: mesh_proto::type_url::ADDRESS.into(),
        removed_resources: vec!["gone".into()],
        nonce: "n".into(),
    });

    roundtrip(zds::ZdsHello {
        version: zds::Version::V1 as i32,
        capabilities: vec![],
    });
    roundtrip(zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
            uid: "u".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "n".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        })),
    });
    roundtrip(zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
            error: String::new(),
        })),
    });
}

/// Istio's `ZdsHello` and `WorkloadRequest` as its own schema has them (no extension
/// fields): what Istio's node agent and ztunnel decode.
mod istio_schema {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ZdsHello {
        #[prost(int32, tag = "1")]
        pub version: i32,
    }
}

#[test]
fn the_handover_extension_is_invisible_to_istios_schema() {
    // Our ztunnel's hello, read by Istio's agent: the capability is skipped.
    let ours = zds::ZdsHello {
        version: zds::Version::V1 as i32,
        capabilities: vec!["handover.v1".into()],
    };
    let seen = istio_schema::ZdsHello::decode(ours.encode_to_vec().as_slice()).unwrap();
    assert_eq!(seen.version, zds::Version::V1 as i32);
    // Istio's ztunnel's hello, read by our agent: no capability, so never a Handover.
    let istio = istio_schema::ZdsHello {
        version: zds::Version::V1 as i32,
    };
    let seen = zds::ZdsHello::decode(istio.encode_to_vec().as_slice()).unwrap();
    assert!(seen.capabilities.is_empty());
    assert_eq!(seen.version, zds::Version::V1 as i32);
}
