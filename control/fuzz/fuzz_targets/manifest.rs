//! `cargo fuzz run manifest` (nightly): the manifest parser and the index must never
//! panic on any file content.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_control::manifest::fuzz_entry(data);
});
