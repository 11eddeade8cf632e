//! The waypoint's request normalisation (`mesh_authz::normalize`), which decides what
//! routes and policies see: never panics, and in every mode but NONE a normalised path is
//! a fixed point (normalising it again changes nothing: a second proxy or the backend
//! cannot read it as another resource), starts with `/`, and has no dot segments or
//! backslashes left (the asterisk-form `*` excepted). Hosts: an accepted authority yields a lower-case name without port
//! or trailing dot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_authz::normalize::{PathNormalization, normalize_host, normalize_path};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (path, host) = text.split_once('\n').unwrap_or((&text, ""));
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        let Ok(once) = normalize_path(path, mode) else {
            continue;
        };
        // NONE passes the path on as it is; `*` is the asterisk-form (OPTIONS *).
        if mode == PathNormalization::None || path == "*" {
            continue;
        }
        assert!(once.starts_with('/'), "{mode}: {path:?} -> {once:?}");
        assert!(!once.contains('\\'), "{mode}: {path:?} -> {once:?}");
        assert!(
            !once.split('/').any(|s| s == "." || s == ".."),
            "{mode}: {path:?} -> {once:?}"
        );
        let twice = normalize_path(&once, mode).expect("a normalised path normalises");
        assert_eq!(once, twice, "{mode}: {path:?}");
    }
    if let Ok(h) = normalize_host(host) {
        assert_eq!(h.name, h.name.to_ascii_lowercase());
        assert!(!h.name.ends_with('.'), "{host:?} -> {h:?}");
    }
});
