//! ZDS, the node agent ↔ ztunnel protocol over a unix socket: ztunnel decodes the
//! agent's WorkloadRequest (with or without a netns fd), the agent decodes ztunnel's
//! hello and acks. Never panics; an Add is accepted only with its one netns fd.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::prost::Message;
use mesh_proto::zds;
use std::os::fd::OwnedFd;
use ztunnel::inpod::zds::{ZdsEvent, decode_request};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    // 0, 1 or 2 fds: a real network namespace, or a file that is not one.
    let open = |p: &str| std::fs::File::open(p).ok().map(OwnedFd::from);
    let fds: Vec<OwnedFd> = match sel % 4 {
        0 => vec![],
        1 => open("/proc/self/ns/net").into_iter().collect(),
        2 => open("/dev/null").into_iter().collect(),
        _ => [open("/proc/self/ns/net"), open("/proc/self/ns/net")]
            .into_iter()
            .flatten()
            .collect(),
    };
    let n = fds.len();
    if let Ok(ZdsEvent::Add { uid, .. }) = decode_request(msg, fds) {
        assert!(n == 1 && sel % 4 == 1 && !uid.is_empty());
    }
    let _ = zds::ZdsHello::decode(msg);
    let _ = zds::WorkloadResponse::decode(msg);
});
