//! A lab cluster for a test: up in a private state directory under a unique name, torn
//! down (processes, namespaces, cgroups) when dropped, also when the test panics.

use crate::cluster::wait_until;
use crate::net::unique;
use crate::{binary, require_tool};
use mesh_lab::lab::Lab;

pub struct TestLab {
    pub lab: Lab,
    _root: tempfile::TempDir,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.lab.down();
    }
}

impl TestLab {
    /// A lab of `nodes` nodes, with the workspace's binaries.
    pub fn up(nodes: usize) -> TestLab {
        require_tool("curl");
        require_tool("tcpdump");
        let root = tempfile::tempdir().unwrap();
        let bins = binary("ztunnel").parent().unwrap().to_path_buf();
        let mut lab = Lab::open_with_binaries(&unique("l"), root.path(), &bins).unwrap();
        lab.up(nodes).unwrap();
        TestLab { lab, _root: root }
    }

    pub fn apply(&mut self, yaml: &str) {
        self.lab.apply(yaml, "test.yaml").unwrap();
    }

    /// A component's whole log (every run of it).
    pub fn log(&self, role: &str) -> String {
        std::fs::read_to_string(self.lab.log_path(role).unwrap()).unwrap_or_default()
    }

    pub fn wait_log(&self, role: &str, needle: &str) {
        wait_until(&format!("{needle:?} in {role}'s log"), || {
            self.log(role).contains(needle)
        });
    }

    /// curl from inside a pod; `Err` when the request fails.
    pub fn curl(&self, pod: &str, url: &str) -> Result<String, String> {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.lab.state.pods[pod].netns,
                "curl",
                "-s",
                "--max-time",
                "5",
                url,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("curl exit {:?}", out.status.code()))
        }
    }
}
