//! Pod cgroups named like the kubelet's (cgroupfs driver): each lab pod's processes run in
//! `<mount>/<lab root>/kubepods/besteffort/pod<uid>/<container>`, so the node agent finds a
//! running pod's network namespace the way it does on a real node: by the pod UID in its
//! processes' cgroup. The lab root is unique per lab (its name and state directory), so
//! labs running side by side never see each other's pods, and `down` removes it all.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a cgroup hierarchy to put pods in is mounted: the unified (v2) hierarchy
/// (`/sys/fs/cgroup` on a v2 host, `/sys/fs/cgroup/unified` on a hybrid one), else the
/// v1 `name=systemd` hierarchy.
pub fn mount_point() -> Result<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    // mountinfo: id parent major:minor root mount-point options [optional...] - fstype source super-options
    let mounts: Vec<(PathBuf, String, String)> = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let opts = r.nth(1).unwrap_or_default().to_string();
            Some((PathBuf::from(mount), fstype, opts))
        })
        .collect();
    mounts
        .iter()
        .find(|(_, t, _)| t == "cgroup2")
        .or_else(|| {
            mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == "name=systemd"))
        })
        .map(|(m, _, _)| m.clone())
        .ok_or_else(|| "no cgroup hierarchy is mounted (cgroup2, or v1 name=systemd)".into())
}

fn fnv1a(s: &[u8]) -> u32 {
    s.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// One lab's pod cgroups.
#[derive(Debug, Clone)]
pub struct PodCgroups {
    mount: PathBuf,
    /// The lab's subtree as a cgroup path (as /proc/PID/cgroup shows it): `/mesh-lab-...`.
    root: String,
}

impl PodCgroups {
    /// The cgroups of the lab `name` whose state lives in `dir`.
    pub fn for_lab(name: &str, dir: &Path) -> Result<PodCgroups, String> {
        Ok(Self::at(
            mount_point()?,
            &format!(
                "mesh-lab-{name}-{:08x}",
                fnv1a(dir.as_os_str().as_encoded_bytes())
            ),
        ))
    }

    /// A subtree `top` (one path segment) of the hierarchy mounted at `mount`.
    pub fn at(mount: PathBuf, top: &str) -> PodCgroups {
        PodCgroups {
            mount,
            root: format!("/{top}"),
        }
    }

    /// What the node agent's `--cgroup-root` is.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn root_dir(&self) -> PathBuf {
        self.mount.join(self.root.trim_start_matches('/'))
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root_dir()
            .join(format!("kubepods/besteffort/pod{uid}"))
    }

    /// Creates the cgroup of container `container` of pod `uid`; its directory.
    pub fn create(&self, uid: &str, container: &str) -> Result<PathBuf, String> {
        let safe = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                && s != "."
                && s != ".."
        };
        if !safe(uid) || !safe(container) {
            return Err(format!(
                "pod uid {uid:?} / container {container:?}: not a cgroup name"
            ));
        }
        let dir = self.pod_dir(uid).join(container);
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "cannot create the pod's cgroup {}: {e} (the lab needs a writable cgroup hierarchy)",
                dir.display()
            )
        })?;
        Ok(dir)
    }

    /// `args` started inside cgroup `dir`: a shell moves itself there, then execs them
    /// (same PID), so the process and all it starts are the pod's from their first
    /// instruction.
    pub fn wrap(dir: &Path, args: &[String]) -> Vec<String> {
        let mut v = vec![
            "sh".to_string(),
            "-c".to_string(),
            r#"echo $$ > "$0/cgroup.procs" && exec "$@""#.to_string(),
            dir.to_string_lossy().into_owned(),
        ];
        v.extend(args.iter().cloned());
        v
    }

    /// Removes pod `uid`'s cgroups (its processes are ended first).
    pub fn remove_pod(&self, uid: &str) {
        remove_tree(&self.pod_dir(uid));
    }

    /// Removes the lab's whole subtree (its processes are ended first).
    pub fn remove_all(&self) {
        remove_tree(&self.root_dir());
    }

    /// Whether the lab's subtree exists.
    pub fn exists(&self) -> bool {
        self.root_dir().exists()
    }
}

/// Depth-first: kills what is left in each cgroup (only ever our pods' processes), then
/// removes the directories, waiting briefly for dying processes to leave.
fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .output();
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_root_per_lab_and_kubelet_names_below_it() {
        let a = PodCgroups::at("/sys/fs/cgroup".into(), "mesh-lab-a-1");
        assert_eq!(a.root(), "/mesh-lab-a-1");
        assert_eq!(
            a.pod_dir("u1").join("app"),
            Path::new("/sys/fs/cgroup/mesh-lab-a-1/kubepods/besteffort/podu1/app")
        );
        assert_ne!(fnv1a(b"/var/run/mesh-lab/x"), fnv1a(b"/tmp/y/x"));
        let w = PodCgroups::wrap(Path::new("/cg/x"), &["app".into(), "--flag".into()]);
        assert_eq!(w[3], "/cg/x");
        assert_eq!(&w[4..], ["app", "--flag"]);
        assert!(a.create("../evil", "c").is_err());
        assert!(a.create("u1", "a/b").is_err());
    }

    #[test]
    fn a_hierarchy_is_mounted_here() {
        let m = mount_point().unwrap();
        assert!(m.join("cgroup.procs").exists(), "{}", m.display());
    }
}
