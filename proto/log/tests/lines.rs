//! What the layer writes, against a real writer: levels (and a change of level while
//! running), text and JSON.

use mesh_log::{Captured, Format, layer};
use tracing_subscriber::prelude::*;

#[test]
fn lines_at_the_level_are_written_when_logged_and_the_level_changes_while_running() {
    let out = Captured::default();
    let o = out.clone();
    let (layer, reload) = layer("info", Format::Text, false, o).unwrap();
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
        tracing::info!(target: "access", bytes = 5, "connection complete");
        // Written by the time the call returns.
        assert!(
            out.text().contains("connection complete bytes=5"),
            "{}",
            out.text()
        );
        tracing::debug!("not at info");
        reload("debug").unwrap();
        tracing::debug!("now at debug");
        assert!(reload("not a [level").is_err());
    });
    let text = out.text();
    assert!(!text.contains("not at info"), "{text}");
    assert!(text.contains("now at debug"), "{text}");
}

#[test]
fn json_lines_flatten_the_fields() {
    let out = Captured::default();
    let o = out.clone();
    let (layer, _) = layer("info", Format::Json, false, o).unwrap();
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
        tracing::info!(target: "access", direction = "inbound", "connection complete");
    });
    let v: serde_json::Value = serde_json::from_str(out.text().trim()).unwrap();
    assert_eq!(v["direction"], "inbound");
    assert_eq!(v["message"], "connection complete");
    assert_eq!(v["target"], "access");
}
