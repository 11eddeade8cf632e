//! The dashboard page in headless Chromium (no network: the page from a file): label
//! values from scraped targets that look like markup are drawn as text, never run.

use mesh_control::observe::dashboard::page;
use mesh_control::observe::graph::{Graph, Node};

const EVIL: &str = r#"<img src=x onerror="document.title='pwned'">"#;

#[test]
fn label_values_that_look_like_markup_render_as_text() {
    let graph = Graph {
        namespaces: vec![EVIL.into()],
        nodes: vec![Node {
            id: format!("workload:{EVIL}/{EVIL}"),
            kind: "workload",
            namespace: EVIL.into(),
            name: EVIL.into(),
        }],
        edges: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.html");
    std::fs::write(&file, page(&graph)).unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=2000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg("--dump-dom")
        .arg(format!("file://{}", file.display()))
        .output()
        .expect("chromium runs (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("id=\"legend\""), "the page was drawn: {dom}");
    // The legend and the node's labels hold the value as text.
    let escaped = "&lt;img src=x onerror=\"document.title='pwned'\"&gt;";
    assert!(
        dom.contains(&format!("namespace {escaped}")),
        "legend as text: {dom}"
    );
    assert!(
        dom.contains(&format!(">{escaped}</text>")),
        "node name as text: {dom}"
    );
    // Outside the inline JSON (raw text inside its <script>), no element was made of it.
    let (before, rest) = dom.split_once("<script id=\"initial\"").unwrap();
    let after = rest.split_once("</script>").unwrap().1;
    assert!(
        !before.contains("<img") && !after.contains("<img"),
        "an element was made of a label: {dom}"
    );
    assert!(
        dom.contains("<title>mesh dashboard</title>"),
        "a label's script ran: {dom}"
    );
}
