//! Installing the chained plugin on a node: copy the binary into the host's CNI bin
//! directory and append our entry to the primary CNI's conflist, repairing it whenever
//! the primary CNI rewrites its file. Uninstall removes the entry and the binary; an
//! upgrade (the installer merely restarting) leaves both in place, so pods created
//! meanwhile are still enrolled.
//!
//! The edit is a pure function on the file's text: it only ever appends or removes
//! entries of type `mesh-cni` in `plugins`, keeps everything else (key order included),
//! and refuses a file it does not understand rather than guessing.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const PLUGIN_TYPE: &str = "mesh-cni";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Unchanged,
    Changed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}; left untouched")]
pub struct ConflistError {
    pub file: String,
    pub reason: String,
}

fn refuse(file: &Path, reason: impl Into<String>) -> ConflistError {
    ConflistError {
        file: file.display().to_string(),
        reason: reason.into(),
    }
}

/// Parses a conflist, insisting on the shape the CNI spec gives it.
fn parse(file: &Path, text: &str) -> Result<Map<String, Value>, ConflistError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| refuse(file, format!("not valid JSON ({e})")))?;
    let Value::Object(obj) = v else {
        return Err(refuse(file, "not a JSON object"));
    };
    match obj.get("plugins") {
        Some(Value::Array(plugins)) if !plugins.is_empty() => {
            for (i, p) in plugins.iter().enumerate() {
                if !p.get("type").is_some_and(Value::is_string) {
                    return Err(refuse(file, format!("plugins[{i}] has no string \"type\"")));
                }
            }
        }
        Some(_) => return Err(refuse(file, "\"plugins\" is not a non-empty array")),
        None if obj.contains_key("type") => {
            return Err(refuse(
                file,
                "a single-plugin .conf cannot be chained; configure the primary CNI to write a .conflist",
            ));
        }
        None => return Err(refuse(file, "no \"plugins\" array: not a CNI conflist")),
    }
    Ok(obj)
}

fn render(obj: Map<String, Value>) -> String {
    let mut s = serde_json::to_string_pretty(&Value::Object(obj)).expect("JSON value");
    s.push('\n');
    s
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Our entry, as the plugin reads it (`plugin::parse_config`).
pub fn entry(agent_socket: &str) -> Value {
    serde_json::json!({"type": PLUGIN_TYPE, "agent_socket": agent_socket})
}

/// Appends our entry as the last plugin (after the primary CNI has set up the
/// interface and IPs); an older or misplaced entry of ours is replaced.
pub fn chain(file: &Path, text: &str, agent_socket: &str) -> Result<Edit, ConflistError> {
    let mut obj = parse(file, text)?;
    let ours = entry(agent_socket);
    let plugins = obj
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .expect("checked by parse");
    let already =
        plugins.iter().filter(|p| is_ours(p)).count() == 1 && plugins.last() == Some(&ours);
    if already {
        return Ok(Edit::Unchanged);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(ours);
    Ok(Edit::Changed(render(obj)))
}

/// Removes every entry of ours.
pub fn unchain(file: &Path, text: &str) -> Result<Edit, ConflistError> {
    let mut obj = parse(file, text)?;
    let plugins = obj
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .expect("checked by parse");
    if !plugins.iter().any(is_ours) {
        return Ok(Edit::Unchanged);
    }
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(refuse(
            file,
            "holds only our plugin; not a primary CNI's config",
        ));
    }
    Ok(Edit::Changed(render(obj)))
}

/// The config file the runtime uses: the first by name among `.conflist`, `.conf` and
/// `.json` files (libcni's order).
pub fn primary_config(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Replaces `path` atomically, keeping its permissions: the runtime never reads half a file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A dot name without a CNI extension: never picked up as a config meanwhile.
    let tmp = dir.join(format!(".{name}.mesh-cni-tmp"));
    std::fs::write(&tmp, contents)?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions())?;
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Copies the plugin binary into the CNI bin directory if it differs.
pub fn install_binary(source: &Path, bin_dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let target = bin_dir.join(PLUGIN_TYPE);
    let new = std::fs::read(source)?;
    if std::fs::read(&target).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    write_atomically(&target, &new)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    Ok(true)
}

/// One pass of the installer: chain into the primary config if needed. Returns the file
/// it changed, if any.
pub fn reconcile(net_dir: &Path, agent_socket: &str) -> Result<Option<PathBuf>, String> {
    let Some(primary) =
        primary_config(net_dir).map_err(|e| format!("cannot list {}: {e}", net_dir.display()))?
    else {
        return Err(format!(
            "no CNI config in {} yet; waiting for the primary CNI to write one",
            net_dir.display()
        ));
    };
    let text = std::fs::read_to_string(&primary)
        .map_err(|e| format!("cannot read {}: {e}", primary.display()))?;
    match chain(&primary, &text, agent_socket).map_err(|e| e.to_string())? {
        Edit::Unchanged => Ok(None),
        Edit::Changed(new) => {
            write_atomically(&primary, new.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", primary.display()))?;
            Ok(Some(primary))
        }
    }
}

/// Removes our entry from every config in `net_dir` and the binary from `bin_dir`.
/// Files that are not conflists are skipped; every problem is reported.
pub fn uninstall(net_dir: &Path, bin_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let files = match std::fs::read_dir(net_dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(e) => {
            problems.push(format!("cannot list {}: {e}", net_dir.display()));
            Vec::new()
        }
    };
    for f in files {
        if !matches!(f.extension().and_then(|e| e.to_str()), Some("conflist")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match unchain(&f, &text) {
            Ok(Edit::Unchanged) => {}
            Ok(Edit::Changed(new)) => {
                if let Err(e) = write_atomically(&f, new.as_bytes()) {
                    problems.push(format!("cannot write {}: {e}", f.display()));
                }
            }
            Err(e) if text.contains(PLUGIN_TYPE) => problems.push(e.to_string()),
            Err(_) => {}
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    if let Err(e) = std::fs::remove_file(&bin)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("cannot remove {}: {e}", bin.display()));
    }
    problems
}

/// What a stopping installer does with the entry and binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnStop {
    /// An upgrade or a restart: pods created meanwhile must still be enrolled.
    Keep(String),
    /// The mesh is being removed: leaving the entry would make every new pod on the node
    /// fail to start once the agent is gone.
    Uninstall(String),
}

/// The state of the installer's own DaemonSet as the API server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonSetState {
    Present,
    BeingDeleted,
    Gone,
    /// The API server no longer lets the installer read its own DaemonSet (401: its
    /// ServiceAccount is gone, so is its token; 403: its Role or RoleBinding is gone).
    /// `helm uninstall` deletes those with the DaemonSet, often before the installer's
    /// SIGTERM check runs, so this is the mesh going away, not a doubt, once it persists
    /// over a few re-checks (`settled_state`).
    AccessLost(u16),
}

/// Decides from the DaemonSet's state (or why it could not be read). When in doubt (the
/// API server unreachable, throttling, failing) the entry stays: a leftover entry is
/// visible and fixable, a missing one silently lets pods start outside the mesh. Losing
/// access to its own objects is no doubt: that is how an uninstall looks from inside.
pub fn on_stop(daemonset: &str, state: Result<DaemonSetState, String>) -> OnStop {
    match state {
        Ok(DaemonSetState::Present) => OnStop::Keep(format!(
            "DaemonSet {daemonset} still exists (upgrade or restart)"
        )),
        Ok(DaemonSetState::BeingDeleted) => {
            OnStop::Uninstall(format!("DaemonSet {daemonset} is being deleted"))
        }
        Ok(DaemonSetState::Gone) => OnStop::Uninstall(format!("DaemonSet {daemonset} is gone")),
        Ok(DaemonSetState::AccessLost(code)) => OnStop::Uninstall(format!(
            "the API server no longer lets this installer read DaemonSet {daemonset} ({code}): \
             its ServiceAccount or Role was removed with the mesh"
        )),
        Err(e) => OnStop::Keep(format!(
            "cannot tell whether DaemonSet {daemonset} still exists ({e}); if the mesh is being \
             removed, run `mesh-cni install --uninstall` on this node"
        )),
    }
}

/// How often a lost access is asked again before it is believed, and how far apart: a
/// transient 401/403 (an authenticator outage, a key rotation) during a rollout must not
/// remove the entry while pods are still being scheduled. Bounded well within the
/// termination grace period (with each ask's own timeout, see `STOP_ASK_TIMEOUT`).
pub const ACCESS_RECHECKS: u32 = 2;
pub const ACCESS_RECHECK_GAP: std::time::Duration = std::time::Duration::from_secs(1);
/// Each ask of the API server while stopping: (1 + ACCESS_RECHECKS) asks and the gaps
/// stay under 20 s, within the DaemonSet's 30 s grace period.
pub const STOP_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether an answer is to be asked again before acting on it (only lost access).
pub fn needs_recheck(state: &Result<DaemonSetState, String>) -> bool {
    matches!(state, Ok(DaemonSetState::AccessLost(_)))
}

/// Asks with `ask` until the answer is not lost access, or lost access has been seen
/// `1 + rechecks` times, `gap` apart; returns the last answer. Any other answer in
/// between (the DaemonSet read, an error) is what `on_stop` decides from.
pub async fn settled_state<F, Fut>(
    mut ask: F,
    rechecks: u32,
    gap: std::time::Duration,
) -> Result<DaemonSetState, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<DaemonSetState, String>>,
{
    let mut state = ask().await;
    for _ in 0..rechecks {
        if !needs_recheck(&state) {
            break;
        }
        tokio::time::sleep(gap).await;
        state = ask().await;
    }
    state
}

/// Asks the API server about `namespace/name` (the installer's own DaemonSet).
pub async fn daemonset_state(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<DaemonSetState, String> {
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(None) => Ok(DaemonSetState::Gone),
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => {
            Ok(DaemonSetState::BeingDeleted)
        }
        Ok(Some(_)) => Ok(DaemonSetState::Present),
        Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
            Ok(DaemonSetState::AccessLost(s.code))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A client from `kubeconfig`, else the in-cluster service account / `$KUBECONFIG`.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    mesh_kube::connect(kubeconfig)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/var/run/mesh-cni/agent.sock";

    /// containernetworking's bridge + portmap + firewall, as kind / kubeadm guides write it.
    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "kubenet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall"}
  ]
}
"#;

    /// Calico's 10-calico.conflist.
    const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
"#;

    /// Cilium's 05-cilium.conflist (a single plugin).
    const CILIUM: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {
       "type": "cilium-cni",
       "enable-debug": false,
       "log-file": "/var/run/cilium/cilium-cni.log"
    }
  ]
}
"#;

    fn types(text: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(text).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect()
    }

    fn changed(e: Edit) -> String {
        match e {
            Edit::Changed(s) => s,
            Edit::Unchanged => panic!("expected a change"),
        }
    }

    #[test]
    fn chains_last_idempotently_and_reversibly() {
        let f = Path::new("/etc/cni/net.d/10-x.conflist");
        for sample in [BRIDGE, CALICO, CILIUM] {
            let before: Value = serde_json::from_str(sample).unwrap();
            let chained = changed(chain(f, sample, SOCKET).unwrap());
            let mut expected = types(sample);
            expected.push(PLUGIN_TYPE.into());
            assert_eq!(types(&chained), expected);
            let after: Value = serde_json::from_str(&chained).unwrap();
            // Everything else is untouched, key order included.
            let before_plugins = before["plugins"].as_array().unwrap();
            assert_eq!(
                &after["plugins"].as_array().unwrap()[..before_plugins.len()],
                &before_plugins[..]
            );
            let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(&after), keys(&before));
            assert_eq!(
                after["plugins"].as_array().unwrap().last(),
                Some(&entry(SOCKET))
            );

            assert_eq!(chain(f, &chained, SOCKET).unwrap(), Edit::Unchanged);

            let restored = changed(unchain(f, &chained).unwrap());
            assert_eq!(serde_json::from_str::<Value>(&restored).unwrap(), before);
            assert_eq!(unchain(f, &restored).unwrap(), Edit::Unchanged);
        }
    }

    #[test]
    fn an_old_or_misplaced_entry_is_replaced_by_one_at_the_end() {
        let f = Path::new("10-x.conflist");
        let old = changed(chain(f, CALICO, "/old/agent.sock").unwrap());
        let new = changed(chain(f, &old, SOCKET).unwrap());
        assert_eq!(types(&new), ["calico", "portmap", "bandwidth", PLUGIN_TYPE]);
        assert!(!new.contains("/old/agent.sock"));
        // Ours ahead of the primary plugin (someone edited the file by hand): moved last.
        let misplaced = BRIDGE.replacen(
            "\"plugins\": [",
            &format!("\"plugins\": [{},", entry(SOCKET)),
            1,
        );
        let fixed = changed(chain(f, &misplaced, SOCKET).unwrap());
        assert_eq!(
            types(&fixed),
            ["bridge", "portmap", "firewall", PLUGIN_TYPE]
        );
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let f = Path::new("/etc/cni/net.d/10-x.conflist");
        let cases = [
            (&BRIDGE[..BRIDGE.len() / 2], "not valid JSON"),
            ("[1, 2]", "not a JSON object"),
            (
                r#"{"cniVersion": "1.0.0", "name": "n", "plugins": []}"#,
                "non-empty array",
            ),
            (
                r#"{"cniVersion": "1.0.0", "name": "n", "plugins": {"type": "x"}}"#,
                "non-empty array",
            ),
            (
                r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"name": "x"}]}"#,
                "plugins[0]",
            ),
            (
                r#"{"cniVersion": "0.3.1", "name": "n", "type": "bridge"}"#,
                "single-plugin",
            ),
            (
                r#"{"cniVersion": "1.0.0", "name": "n"}"#,
                "not a CNI conflist",
            ),
        ];
        for (text, why) in cases {
            let e = chain(f, text, SOCKET).unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
            assert!(e.to_string().contains("10-x.conflist"), "{e}");
            assert!(unchain(f, text).is_err());
        }
    }

    #[test]
    fn stopping_keeps_the_entry_unless_the_daemonset_is_going_away() {
        let ds = "mesh-system/mesh-cni";
        assert!(matches!(
            on_stop(ds, Ok(DaemonSetState::Present)),
            OnStop::Keep(_)
        ));
        assert!(matches!(
            on_stop(ds, Ok(DaemonSetState::BeingDeleted)),
            OnStop::Uninstall(_)
        ));
        assert!(matches!(
            on_stop(ds, Ok(DaemonSetState::Gone)),
            OnStop::Uninstall(_)
        ));
        for code in [401, 403] {
            match on_stop(ds, Ok(DaemonSetState::AccessLost(code))) {
                OnStop::Uninstall(why) => assert!(why.contains(&code.to_string()), "{why}"),
                other => panic!("{code}: {other:?}"),
            }
        }
        match on_stop(ds, Err("connection refused".into())) {
            OnStop::Keep(why) => assert!(why.contains("--uninstall"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lost_access_is_believed_only_when_it_persists() {
        use std::collections::VecDeque;
        use std::time::Duration;
        let run = |answers: Vec<Result<DaemonSetState, String>>| async move {
            let answers = std::sync::Mutex::new(VecDeque::from(answers));
            let asked = std::sync::atomic::AtomicU32::new(0);
            let state = settled_state(
                || {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let next = answers
                        .lock()
                        .unwrap()
                        .pop_front()
                        .expect("asked too often");
                    async move { next }
                },
                ACCESS_RECHECKS,
                ACCESS_RECHECK_GAP,
            )
            .await;
            (state, asked.into_inner())
        };
        let lost = || Ok(DaemonSetState::AccessLost(401));
        let start = tokio::time::Instant::now();
        // Persisting: asked three times, a second apart, then believed.
        assert_eq!(
            run(vec![lost(), lost(), Ok(DaemonSetState::AccessLost(403))]).await,
            (Ok(DaemonSetState::AccessLost(403)), 3)
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Transient: the next answer decides.
        assert_eq!(
            run(vec![lost(), Ok(DaemonSetState::Present)]).await,
            (Ok(DaemonSetState::Present), 2)
        );
        assert_eq!(
            run(vec![lost(), lost(), Err("timeout".into())]).await,
            (Err("timeout".into()), 3)
        );
        // Anything else is not asked again.
        assert_eq!(
            run(vec![Ok(DaemonSetState::Gone)]).await,
            (Ok(DaemonSetState::Gone), 1)
        );
        // Within the 30 s termination grace period even when every ask times out.
        assert!(
            STOP_ASK_TIMEOUT * (1 + ACCESS_RECHECKS) + ACCESS_RECHECK_GAP * ACCESS_RECHECKS
                < Duration::from_secs(20)
        );
    }

    #[test]
    fn primary_config_is_the_first_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(primary_config(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("README"), "x").unwrap();
        std::fs::write(dir.path().join("20-b.conflist"), CALICO).unwrap();
        std::fs::write(dir.path().join("10-a.conflist"), BRIDGE).unwrap();
        std::fs::write(dir.path().join(".10-a.conflist.mesh-cni-tmp"), "").unwrap();
        assert_eq!(
            primary_config(dir.path()).unwrap(),
            Some(dir.path().join("10-a.conflist"))
        );
    }
}
