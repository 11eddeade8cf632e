//! No program or shared crate has a circle of modules: in each crate's `src/`, no
//! top-level module reaches itself again through the `crate::<module>` paths of the
//! modules it names (a circle makes none of them understandable or testable alone; the
//! waypoint's `proxy` → `counted` → `upstream_pool` → `proxy` once was one). Code after
//! a file's `#[cfg(test)]`, and comments, are left out: a test module may reach anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates checked, relative to the workspace root.
const CRATES: &[&str] = &[
    "control",
    "cni",
    "waypoint",
    "ztunnel",
    "proto",
    "proto/admin",
    "proto/authz",
    "proto/discovery",
    "proto/hbone",
    "proto/identity",
    "proto/kube",
    "proto/log",
    "proto/route",
    "proto/trace",
    "proto/xds",
];

/// The circles there are today, each to be broken (then removed here): the test fails on
/// any other circle, and on one of these once it is gone, so the list only shrinks.
const KNOWN: &[(&str, &[&str])] = &[
    ("ztunnel", &["dns", "proxy"]),
    ("ztunnel", &["metrics", "trace"]),
];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// `.rs` files under `dir`, leaving out `src/bin` (other crates, with their own `crate`).
fn rust_files(src: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p != src.join("bin") {
                rust_files(src, &p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules `code` names as `crate::<name>`, other than `own`, outside
/// comments.
fn crate_refs(code: &str, own: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    code.match_indices("crate::")
        // `$crate::` in macros and `other_crate::` are not this crate's paths.
        .filter(|(i, _)| {
            code[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '$'))
        })
        .map(|(i, _)| {
            code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty() && name != own)
        .collect()
}

/// Top-level module → the top-level modules its files name (crate root files left out).
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, src, &mut files);
    let mut g = Graph::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        g.entry(top.clone())
            .or_default()
            .extend(crate_refs(code, &top));
    }
    g
}

/// A cycle through `start`, if any, as the path of modules (`start` first and last).
fn cycle_from(g: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((m, path)) = stack.pop() {
        for d in g.get(&m).into_iter().flatten() {
            let mut p = path.clone();
            p.push(d.clone());
            if d == start {
                return Some(p);
            }
            if seen.insert(d.clone()) {
                stack.push((d.clone(), p));
            }
        }
    }
    None
}

/// Every circle once, by its set of modules, with its path (`a → b → a`).
fn circles(g: &Graph) -> BTreeMap<BTreeSet<String>, String> {
    let mut out = BTreeMap::new();
    for m in g.keys() {
        if let Some(c) = cycle_from(g, m) {
            let members: BTreeSet<String> = c.iter().cloned().collect();
            out.entry(members).or_insert_with(|| c.join(" → "));
        }
    }
    out
}

#[test]
fn no_module_circle_in_any_program_or_shared_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let known: BTreeSet<(String, BTreeSet<String>)> = KNOWN
        .iter()
        .map(|(k, m)| (k.to_string(), m.iter().map(|s| s.to_string()).collect()))
        .collect();
    let (mut new, mut seen) = (Vec::new(), BTreeSet::new());
    for krate in CRATES {
        let src = root.join(krate).join("src");
        // A crate is there to be read: a wrong path must not pass as "no circle". (A
        // crate all in its root file, as proto/kube, has no modules to form one.)
        assert!(
            src.join("lib.rs").exists() || src.join("main.rs").exists(),
            "{krate}: no crate at {}",
            src.display()
        );
        let g = graph(&src);
        for (members, path) in circles(&g) {
            let key = (krate.to_string(), members);
            if known.contains(&key) {
                seen.insert(key);
            } else {
                new.push(format!("{krate}: {path}"));
            }
        }
    }
    // The scan sees real references (so an empty graph of edges cannot pass).
    let waypoint = graph(&root.join("waypoint/src"));
    assert!(
        waypoint
            .get("proxy")
            .is_some_and(|d| d.contains("upstream_pool")),
        "{waypoint:?}"
    );
    assert!(new.is_empty(), "module circles:\n{}", new.join("\n"));
    let gone: Vec<_> = known.difference(&seen).collect();
    assert!(
        gone.is_empty(),
        "these circles are broken now: remove them from KNOWN: {gone:?}"
    );
}

#[test]
fn a_circle_through_a_third_module_is_named_once() {
    let g: Graph = [
        ("proxy", &["counted"][..]),
        ("counted", &["upstream_pool", "body"][..]),
        ("upstream_pool", &["proxy"][..]),
        ("body", &[][..]),
        ("admin", &["proxy"][..]),
    ]
    .into_iter()
    .map(|(m, d)| (m.to_string(), d.iter().map(|s| s.to_string()).collect()))
    .collect();
    assert_eq!(
        circles(&g).into_values().collect::<Vec<_>>(),
        ["counted → upstream_pool → proxy → counted"]
    );
    assert_eq!(cycle_from(&g, "body"), None);
    assert_eq!(cycle_from(&g, "admin"), None);
}

#[test]
fn only_this_crates_paths_count() {
    let code = "use crate::a::X; use $crate::b; use other_crate::c; fn f() { crate::d::g() }\n\
                /// see [`crate::e`]\n  // crate::f\nuse crate::own::Y;";
    assert_eq!(
        crate_refs(code, "own"),
        ["a", "d"].map(String::from).into_iter().collect()
    );
}
