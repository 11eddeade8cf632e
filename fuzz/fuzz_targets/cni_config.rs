//! The network configuration (and prevResult) the container runtime hands the CNI plugin
//! on stdin. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_cni::plugin::fuzz_entry(data);
});
