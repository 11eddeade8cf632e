//! A manifest file (multi-document YAML) as mesh-control reads it, then indexed. Never
//! panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_control::index::fuzz_entry(data);
});
