//! Writes the binary seeds of the fuzz corpora from real samples: the xDS responses
//! mesh-control computes for `seeds/mesh.yaml`, and the ZDS messages the node agent
//! sends. `cargo run --example make_seeds` (from fuzz/).
use mesh_proto::discovery::{DeltaDiscoveryResponse, Resource};
use mesh_proto::prost::Message;
use mesh_proto::{type_url, zds};
use std::path::Path;

fn response<M: Message>(type_url: &str, items: &[(String, M)], removed: &[&str]) -> Vec<u8> {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        system_version_info: "1".into(),
        nonce: "n1".into(),
        resources: items
            .iter()
            .map(|(name, m)| Resource {
                name: name.clone(),
                version: "v1".into(),
                resource: Some(mesh_proto::prost_types::Any {
                    type_url: type_url.into(),
                    value: m.encode_to_vec(),
                }),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let yaml = std::fs::read_to_string("seeds/mesh.yaml").unwrap();
    let mut objects = mesh_control::manifest::Objects::default();
    objects.add_file(Path::new("mesh.yaml"), &yaml).unwrap();
    let r = mesh_control::index::compute(&objects, &Default::default());
    let addresses: Vec<_> = r.addresses.into_iter().collect();
    let policies: Vec<_> = r.authorizations.into_iter().collect();
    assert!(!addresses.is_empty() && !policies.is_empty());
    write(
        "xds_resources",
        "addresses",
        &response(type_url::ADDRESS, &addresses, &[]),
    );
    write(
        "xds_resources",
        "authorizations",
        &response(type_url::AUTHORIZATION, &policies, &[]),
    );
    write(
        "xds_resources",
        "removal",
        &response::<zds::Ack>(type_url::ADDRESS, &[], &["shop/web.shop.svc.cluster.local"]),
    );

    use zds::workload_request::Payload;
    let msg = |p: Payload| zds::WorkloadRequest { payload: Some(p) }.encode_to_vec();
    let add = msg(Payload::Add(zds::AddWorkload {
        uid: "1111-aaaa".into(),
        workload_info: Some(zds::WorkloadInfo {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }),
    }));
    // The first byte picks the fds sent along: 1 = one netns fd.
    write("zds_messages", "add", &[&[1u8][..], &add].concat());
    write(
        "zds_messages",
        "add-without-fd",
        &[&[0u8][..], &add].concat(),
    );
    let del = msg(Payload::Del(zds::DelWorkload {
        uid: "1111-aaaa".into(),
    }));
    write("zds_messages", "del", &[&[0u8][..], &del].concat());
    let keep = msg(Payload::Keep(zds::KeepWorkload {
        uid: "1111-aaaa".into(),
    }));
    write("zds_messages", "keep", &[&[0u8][..], &keep].concat());
    let sent = msg(Payload::SnapshotSent(zds::SnapshotSent {}));
    write(
        "zds_messages",
        "snapshot-sent",
        &[&[0u8][..], &sent].concat(),
    );
    write("manifest", "mesh.yaml", yaml.as_bytes());
}
