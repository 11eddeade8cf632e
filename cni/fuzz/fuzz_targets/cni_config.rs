//! `cargo fuzz run cni_config` (nightly): network configuration and prevResult parsing
//! must never panic, whatever the runtime hands us on stdin.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_cni::plugin::fuzz_entry(data);
});
