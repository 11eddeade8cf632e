//! Which builds of the ztunnel and the waypoint `mesh-lab bench` compares, and in what
//! order each run measures them: every claim of a speed-up is a comparison made in one
//! run, on the same lab, with the builds alternating so that a drift of the machine
//! (another load starting, the CPU warming) does not favour one of them.

use std::path::{Path, PathBuf};

/// One build to measure: the ztunnel and waypoint binaries (`None`: the lab's own).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Build {
    pub ztunnel: Option<PathBuf>,
    pub waypoint: Option<PathBuf>,
}

impl Build {
    /// What the build runs, for the legend.
    pub fn describe(&self) -> String {
        let part = |what: &str, p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| format!("{what} {}", p.display()))
                .unwrap_or_else(|| format!("the lab's {what}"))
        };
        format!(
            "{}, {}",
            part("ztunnel", &self.ztunnel),
            part("waypoint", &self.waypoint)
        )
    }

    /// The ztunnel binary this build runs.
    pub fn ztunnel_exe(&self, bin_dir: &Path) -> PathBuf {
        self.ztunnel
            .clone()
            .unwrap_or_else(|| bin_dir.join("ztunnel"))
    }

    /// The waypoint binary this build runs.
    pub fn waypoint_exe(&self, bin_dir: &Path) -> PathBuf {
        self.waypoint
            .clone()
            .unwrap_or_else(|| bin_dir.join("waypoint"))
    }
}

/// The builds to measure: the lab's own first, then one per `--ztunnel`/`--waypoint`
/// given, the n-th of each paired (a build given only one of them runs the lab's other).
pub fn builds(ztunnels: &[PathBuf], waypoints: &[PathBuf]) -> Vec<Build> {
    let others = ztunnels.len().max(waypoints.len());
    std::iter::once(Build::default())
        .chain((0..others).map(|i| Build {
            ztunnel: ztunnels.get(i).cloned(),
            waypoint: waypoints.get(i).cloned(),
        }))
        .collect()
}

/// A build's column heading.
pub fn label(index: usize) -> String {
    if index == 0 {
        "this build".into()
    } else {
        format!("build {}", index + 1)
    }
}

/// The order in which run `run` (from 0) measures `n` builds: rotated by one each run,
/// so each build goes first as often as the others.
pub fn order(run: usize, n: usize) -> Vec<usize> {
    (0..n).map(|i| (i + run) % n.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_build_comes_first_then_the_given_ones_paired() {
        assert_eq!(builds(&[], &[]), vec![Build::default()]);
        let z = |s: &str| PathBuf::from(s);
        let b = builds(&[z("/a/ztunnel"), z("/b/ztunnel")], &[z("/a/waypoint")]);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], Build::default());
        assert_eq!(
            b[1],
            Build {
                ztunnel: Some(z("/a/ztunnel")),
                waypoint: Some(z("/a/waypoint"))
            }
        );
        assert_eq!(b[2].waypoint, None);
        assert_eq!(b[2].waypoint_exe(Path::new("/lab")), z("/lab/waypoint"));
        assert_eq!(b[2].ztunnel_exe(Path::new("/lab")), z("/b/ztunnel"));
        assert_eq!(b[2].describe(), "ztunnel /b/ztunnel, the lab's waypoint");
        assert_eq!(
            (label(0).as_str(), label(2).as_str()),
            ("this build", "build 3")
        );
    }

    #[test]
    fn builds_alternate_between_runs() {
        assert_eq!(order(0, 1), vec![0]);
        assert_eq!(order(5, 1), vec![0]);
        assert_eq!(order(0, 2), vec![0, 1]);
        assert_eq!(order(1, 2), vec![1, 0]);
        assert_eq!(order(2, 2), vec![0, 1]);
        assert_eq!(order(1, 3), vec![1, 2, 0]);
        // Over n runs each build is first once.
        let firsts: Vec<usize> = (0..3).map(|r| order(r, 3)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }
}
