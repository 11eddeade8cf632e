//! Which pod a running process belongs to, the way the kubelet knows it: the pod UID in
//! the process's cgroup path. A pod's network namespace is the one its processes run in,
//! never "whichever namespace carries its IP": a pod with NET_ADMIN can put any address
//! on its own interfaces.
//!
//! Kubelet cgroup layouts (both drivers, every QoS class):
//! - systemd: `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (guaranteed pods: `/kubepods.slice/kubepods-pod<uid>.slice/...`);
//! - cgroupfs: `/kubepods/besteffort/pod<uid>/<container id>`
//!   (guaranteed pods: `/kubepods/pod<uid>/<container id>`).
//!
//! Paths may sit below other cgroups (a `--cgroup-root`, a node container, `/..` segments
//! when read from inside a cgroup namespace); the outermost pod cgroup wins, since a pod
//! may create cgroups below its own and name them as it likes (a node that is itself a
//! pod of another cluster sets `--cgroup-root` to its own cgroup).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const QOS: [&str; 2] = ["besteffort", "burstable"];

fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The pod UID a cgroup path belongs to, if it is inside a kubelet pod cgroup. The
/// outermost pod cgroup decides: what lies below it the pod itself may create (a
/// privileged or delegated pod can name a sub-cgroup after another pod's UID).
pub fn pod_uid_of_path(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segs.iter().enumerate() {
        // cgroupfs: kubepods[/qos]/pod<uid>
        if *seg == "kubepods" {
            let mut j = i + 1;
            if segs.get(j).is_some_and(|s| QOS.contains(s)) {
                j += 1;
            }
            if let Some(uid) = segs.get(j).and_then(|s| s.strip_prefix("pod"))
                && valid_uid(uid)
            {
                return Some(uid.to_string());
            }
        }
        // systemd: kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid>.slice
        if let Some(rest) = seg
            .strip_prefix("kubepods-")
            .and_then(|r| r.strip_suffix(".slice"))
        {
            let (qos, uid) = match rest.split_once("-pod") {
                Some((q, u)) if QOS.contains(&q) => (Some(q), u),
                _ => match rest.strip_prefix("pod") {
                    Some(u) => (None, u),
                    None => continue,
                },
            };
            let parents_ok = match qos {
                None => i >= 1 && segs[i - 1] == "kubepods.slice",
                Some(q) => {
                    i >= 2
                        && segs[i - 1] == format!("kubepods-{q}.slice")
                        && segs[i - 2] == "kubepods.slice"
                }
            };
            if parents_ok && valid_uid(uid) {
                // systemd unit names cannot hold '-' inside a component: the kubelet
                // writes the UID's dashes as underscores.
                return Some(uid.replace('_', "-"));
            }
        }
    }
    None
}

/// Whether `path` is `root` or below it (whole segments); an empty root or `/` is all.
fn under(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    root.is_empty() || path == root || path.strip_prefix(root).is_some_and(|r| r.starts_with('/'))
}

/// The pods a process belongs to, from the text of its `/proc/PID/cgroup` (one line per
/// hierarchy: `id:controllers:path`). Normally zero or one; more than one means its
/// hierarchies disagree, and the caller treats that as a conflict.
pub fn pods_of_process(cgroup_file: &str, root: &str) -> BTreeSet<String> {
    cgroup_file
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .filter(|p| under(p, root))
        .filter_map(pod_uid_of_path)
        .collect()
}

/// The node's pods' processes, by network namespace (inode).
#[derive(Debug, Default)]
pub struct PodNetnsIndex {
    /// pod UID → netns inode → `<proc>/<pid>/ns/net` of one of its processes there.
    pub by_pod: HashMap<String, BTreeMap<u64, PathBuf>>,
    /// netns inode → the pods that have processes in it.
    pub by_netns: HashMap<u64, BTreeSet<String>>,
}

impl PodNetnsIndex {
    pub fn add(&mut self, uids: &BTreeSet<String>, inode: u64, ns_path: PathBuf) {
        for uid in uids {
            self.by_pod
                .entry(uid.clone())
                .or_default()
                .entry(inode)
                .or_insert_with(|| ns_path.clone());
            self.by_netns.entry(inode).or_default().insert(uid.clone());
        }
    }
}

/// Scans `proc_dir` for processes in pod cgroups under `root`, skipping the namespace
/// `skip_inode` (the agent's own: the node's, where no pod of ours lives).
pub fn scan(proc_dir: &Path, root: &str, skip_inode: u64) -> PodNetnsIndex {
    let mut index = PodNetnsIndex::default();
    let Ok(rd) = std::fs::read_dir(proc_dir) else {
        return index;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = e.path();
        let Ok(cg) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let uids = pods_of_process(&cg, root);
        if uids.is_empty() {
            continue;
        }
        let ns_path = dir.join("ns/net");
        let Ok(meta) = std::fs::metadata(&ns_path) else {
            continue;
        };
        if meta.ino() == skip_inode {
            continue;
        }
        index.add(&uids, meta.ino(), ns_path);
    }
    index
}

/// Why a namespace was not bound to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Processes of more than one pod run in it.
    SharedNetns,
    /// The pod's processes run in more than one namespace carrying its IP.
    SeveralNetns,
    /// It carries an address that belongs to another pod of the node.
    ForeignIp,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::SharedNetns,
        Refusal::SeveralNetns,
        Refusal::ForeignIp,
    ];

    /// The metric label (fixed: never peer data).
    pub fn label(self) -> &'static str {
        match self {
            Refusal::SharedNetns => "shared_netns",
            Refusal::SeveralNetns => "several_netns",
            Refusal::ForeignIp => "foreign_ip",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The pod's own namespace: `(inode, path to open)`.
    Found(u64, PathBuf),
    /// Not found (yet): why.
    NotFound(String),
    /// Found but refused; said loudly by the caller.
    Refused(Refusal, String),
}

/// Lists the addresses of the namespace `(inode, path)`.
pub type Addresses<'a> = dyn FnMut(u64, &Path) -> Result<Vec<String>, String> + 'a;

/// Decides which namespace is pod `uid`'s: the namespaces its processes run in (from the
/// cgroup index), minus any shared with another pod, then the one carrying one of
/// `own_ips`; refused when that is ambiguous or when it also carries another pod's
/// address (`owner_of(ip)` names the other pod, if any). `addresses(inode, path)` lists
/// a namespace's addresses.
pub fn decide(
    uid: &str,
    own_ips: &[String],
    index: &PodNetnsIndex,
    owner_of: &dyn Fn(&str) -> Option<String>,
    addresses: &mut Addresses<'_>,
) -> Lookup {
    let Some(nets) = index.by_pod.get(uid).filter(|n| !n.is_empty()) else {
        return Lookup::NotFound(format!("no running process in the cgroup of pod UID {uid}"));
    };
    let mut shared = Vec::new();
    let mut carrying = Vec::new();
    for (inode, path) in nets {
        let claimants = &index.by_netns[inode];
        if claimants.len() > 1 {
            shared.push(format!(
                "netns {inode} holds processes of pods {}",
                claimants.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
            continue;
        }
        if own_ips.is_empty() {
            continue;
        }
        match addresses(*inode, path) {
            Ok(addrs) if addrs.iter().any(|a| own_ips.contains(a)) => {
                carrying.push((*inode, path.clone(), addrs))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(netns = %path.display(), error = %e, "cannot list addresses"),
        }
    }
    match carrying.len() {
        0 if !shared.is_empty() => Lookup::Refused(Refusal::SharedNetns, shared.join("; ")),
        0 if own_ips.is_empty() => Lookup::NotFound(
            "the pod's IP is not known yet, so its namespace cannot be confirmed".into(),
        ),
        0 => Lookup::NotFound(format!(
            "none of the pod's {} namespace(s) carries its IP {}",
            nets.len(),
            own_ips.join(", ")
        )),
        1 => {
            let (inode, path, addrs) = carrying.pop().expect("one");
            let foreign: Vec<String> = addrs
                .iter()
                .filter(|a| !own_ips.contains(a))
                .filter_map(|a| owner_of(a).map(|o| format!("{a} (pod {o})")))
                .collect();
            if !foreign.is_empty() {
                return Lookup::Refused(
                    Refusal::ForeignIp,
                    format!(
                        "netns {inode} also carries another pod's address: {}",
                        foreign.join(", ")
                    ),
                );
            }
            if !shared.is_empty() {
                tracing::warn!(pod_uid = uid, "{}", shared.join("; "));
            }
            Lookup::Found(inode, path)
        }
        n => Lookup::Refused(
            Refusal::SeveralNetns,
            format!(
                "{n} namespaces of the pod carry its IP: {}",
                carrying
                    .iter()
                    .map(|(i, p, _)| format!("{i} ({})", p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_cgroup_paths_of_both_drivers() {
        let cases = [
            // systemd driver, each QoS class.
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f4b1c2e_4a5d_4e6f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-abc.scope",
                Some("0f4b1c2e-4a5d-4e6f-8a9b-0c1d2e3f4a5b"),
            ),
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod11111111_2222_3333_4444_555555555555.slice/crio-x.scope",
                Some("11111111-2222-3333-4444-555555555555"),
            ),
            (
                "/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice/docker-y.scope",
                Some("11111111-2222-3333-4444-555555555555"),
            ),
            // The pod slice itself (the pause process may sit there on some runtimes).
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice",
                Some("abc"),
            ),
            // cgroupfs driver.
            (
                "/kubepods/besteffort/pod0f4b1c2e-4a5d-4e6f-8a9b-0c1d2e3f4a5b/0123abcd",
                Some("0f4b1c2e-4a5d-4e6f-8a9b-0c1d2e3f4a5b"),
            ),
            ("/kubepods/burstable/podu1/c", Some("u1")),
            ("/kubepods/podu2/c", Some("u2")),
            // Below a root (the lab, a kind node) or seen from a cgroup namespace.
            (
                "/mesh-lab-x-1234/kubepods/besteffort/pod9f8e/app",
                Some("9f8e"),
            ),
            (
                "/../../kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podq_r.slice/cri-containerd-1.scope",
                Some("q-r"),
            ),
            // Nested: the outermost pod wins; a pod cannot pass for another by naming
            // a cgroup of its own after it.
            (
                "/kubepods/besteffort/podouter/c/kubepods/besteffort/podinner/c",
                Some("outer"),
            ),
            (
                "/kubepods.slice/kubepods-podouter.slice/x/kubepods.slice/kubepods-podvictim.slice/c",
                Some("outer"),
            ),
            // Not a pod.
            ("/", None),
            ("/system.slice/containerd.service", None),
            ("/kubepods.slice/kubepods-besteffort.slice", None),
            ("/kubepods/besteffort", None),
            ("/kubepods/besteffort/notapod/c", None),
            ("/somewhere/podfake/c", None),
            // A pod slice out of place is not trusted.
            ("/user.slice/kubepods-besteffort-podevil.slice/x", None),
            ("/kubepods.slice/kubepods-pod.slice/x", None),
            ("/kubepods/besteffort/pod/c", None),
            ("/kubepods/besteffort/pod..%/c", None),
        ];
        for (path, want) in cases {
            assert_eq!(pod_uid_of_path(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files_v1_v2_and_hybrid() {
        let hybrid =
            "9:name=systemd:/\n4:memory:/process_api/x\n0::/lab-a/kubepods/besteffort/podu1/app\n";
        assert_eq!(
            pods_of_process(hybrid, ""),
            BTreeSet::from(["u1".to_string()])
        );
        assert_eq!(
            pods_of_process(hybrid, "/lab-a"),
            BTreeSet::from(["u1".to_string()])
        );
        assert!(
            pods_of_process(hybrid, "/lab-b").is_empty(),
            "another lab's root"
        );
        assert!(
            pods_of_process(hybrid, "/lab").is_empty(),
            "whole segments only"
        );
        let v1 = "12:pids:/kubepods/besteffort/podu2/c\n11:memory:/kubepods/besteffort/podu2/c\n";
        assert_eq!(pods_of_process(v1, "/"), BTreeSet::from(["u2".to_string()]));
        let disagree = "12:pids:/kubepods/besteffort/podu2/c\n0::/kubepods/besteffort/podu3/c\n";
        assert_eq!(pods_of_process(disagree, "").len(), 2);
        assert!(pods_of_process("garbage\n::\n", "").is_empty());
    }

    fn index(entries: &[(&str, u64)]) -> PodNetnsIndex {
        let mut ix = PodNetnsIndex::default();
        for (uid, inode) in entries {
            ix.add(
                &BTreeSet::from([uid.to_string()]),
                *inode,
                PathBuf::from(format!("/proc/{inode}/ns/net")),
            );
        }
        ix
    }

    fn run(
        uid: &str,
        own: &[&str],
        ix: &PodNetnsIndex,
        addrs: &[(u64, &[&str])],
        owners: &[(&str, &str)],
    ) -> Lookup {
        let own: Vec<String> = own.iter().map(|s| s.to_string()).collect();
        let owners: HashMap<String, String> = owners
            .iter()
            .map(|(ip, pod)| (ip.to_string(), pod.to_string()))
            .collect();
        let addrs: HashMap<u64, Vec<String>> = addrs
            .iter()
            .map(|(i, a)| (*i, a.iter().map(|s| s.to_string()).collect()))
            .collect();
        decide(
            uid,
            &own,
            ix,
            &|ip| owners.get(ip).cloned(),
            &mut |inode, _| addrs.get(&inode).cloned().ok_or_else(|| "gone".into()),
        )
    }

    #[test]
    fn the_pods_own_namespace_by_cgroup_then_ip() {
        let ix = index(&[("a", 10), ("b", 20)]);
        let addrs: &[(u64, &[&str])] = &[(10, &["127.0.0.1", "10.0.0.2"]), (20, &["10.0.0.3"])];
        assert!(matches!(
            run("a", &["10.0.0.2"], &ix, addrs, &[]),
            Lookup::Found(10, _)
        ));
        assert!(matches!(
            run("b", &["10.0.0.3"], &ix, addrs, &[]),
            Lookup::Found(20, _)
        ));
        // Never by IP alone: a pod with no process is not found, whoever carries its IP.
        assert!(matches!(
            run("c", &["10.0.0.2"], &ix, addrs, &[]),
            Lookup::NotFound(_)
        ));
        // Its namespace without its IP: not confirmed.
        assert!(matches!(
            run("a", &["10.0.0.9"], &ix, addrs, &[]),
            Lookup::NotFound(_)
        ));
        assert!(matches!(
            run("a", &[], &ix, addrs, &[]),
            Lookup::NotFound(_)
        ));
    }

    #[test]
    fn the_attacker_carrying_its_neighbours_ip() {
        // a (10.0.0.2) put b's 10.0.0.3 on its loopback.
        let ix = index(&[("a", 10), ("b", 20)]);
        let addrs: &[(u64, &[&str])] = &[(10, &["10.0.0.3", "10.0.0.2"]), (20, &["10.0.0.3"])];
        let owners = [("10.0.0.2", "ns/a"), ("10.0.0.3", "ns/b")];
        // b gets its own namespace, never a's.
        assert!(matches!(
            run("b", &["10.0.0.3"], &ix, addrs, &owners),
            Lookup::Found(20, _)
        ));
        // a's namespace matches two pods: refused.
        match run("a", &["10.0.0.2"], &ix, addrs, &owners) {
            Lookup::Refused(Refusal::ForeignIp, why) => assert!(why.contains("ns/b"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shared_and_several_namespaces_are_refused() {
        // A process of a runs in b's namespace.
        let mut ix = index(&[("a", 10), ("b", 20)]);
        ix.add(
            &BTreeSet::from(["a".to_string()]),
            20,
            "/proc/99/ns/net".into(),
        );
        let addrs: &[(u64, &[&str])] = &[(10, &["10.0.0.2"]), (20, &["10.0.0.3"])];
        assert!(matches!(
            run("b", &["10.0.0.3"], &ix, addrs, &[]),
            Lookup::Refused(Refusal::SharedNetns, _)
        ));
        // a still has its own, unshared namespace with its IP.
        assert!(matches!(
            run("a", &["10.0.0.2"], &ix, addrs, &[]),
            Lookup::Found(10, _)
        ));
        // A process whose hierarchies name two pods shares its namespace between them.
        let mut ix = index(&[]);
        ix.add(
            &BTreeSet::from(["a".to_string(), "b".to_string()]),
            30,
            "/proc/1/ns/net".into(),
        );
        assert!(matches!(
            run("a", &["10.0.0.2"], &ix, &[(30, &["10.0.0.2"])], &[]),
            Lookup::Refused(Refusal::SharedNetns, _)
        ));
        // Two namespaces of one pod both carry its IP.
        let ix = index(&[("a", 10), ("a", 11)]);
        assert!(matches!(
            run(
                "a",
                &["10.0.0.2"],
                &ix,
                &[(10, &["10.0.0.2"]), (11, &["10.0.0.2"])],
                &[]
            ),
            Lookup::Refused(Refusal::SeveralNetns, _)
        ));
        // ... but only one of them does: that one.
        assert!(matches!(
            run(
                "a",
                &["10.0.0.2"],
                &ix,
                &[(10, &["10.0.0.2"]), (11, &["127.0.0.1"])],
                &[]
            ),
            Lookup::Found(10, _)
        ));
    }

    #[test]
    fn scan_finds_this_process_by_its_cgroup() {
        // This process is in no pod cgroup: the scan finds nothing for it, and every
        // entry it does find names a pod.
        let ix = scan(Path::new("/proc"), "", 0);
        for (uid, nets) in &ix.by_pod {
            assert!(valid_uid(uid) && !nets.is_empty());
        }
        let me = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(pods_of_process(&me, "/no-such-root").is_empty());
    }
}
