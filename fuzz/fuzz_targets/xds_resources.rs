//! What the control plane sends ztunnel (and what ztunnel trusts least after a peer's
//! bytes): a DeltaDiscoveryResponse of Address or Authorization resources, applied with
//! ztunnel's own `apply_response` (decode, validate, index; the policies converted by
//! mesh-authz), then looked up and evaluated as the data path does. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_authz::ConnectionInfo;
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use ztunnel::state::State;

fuzz_target!(|data: &[u8]| {
    let Ok(resp) = DeltaDiscoveryResponse::decode(data) else {
        return;
    };
    let mut state = State::default();
    let _ = ztunnel::xds::apply_response(&mut state, &resp);
    let workloads: Vec<_> = state.workloads().cloned().collect();
    for w in &workloads {
        for ip in &w.addresses {
            let _ = state.destination(&w.network, *ip);
            let conn = ConnectionInfo {
                src_identity: None,
                src_ip: *ip,
                dst_ip: *ip,
                dst_port: 80,
            };
            let _ = state.authorize(w, &conn);
        }
    }
    for s in state.services().cloned().collect::<Vec<_>>() {
        for w in &workloads {
            for p in &s.ports {
                let _ = State::target_port(&s, w, p.service_port);
            }
        }
    }
    // A second response on top (updates and removals of what is there).
    let _ = ztunnel::xds::apply_response(&mut state, &resp);
});
