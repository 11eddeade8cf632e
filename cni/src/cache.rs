//! What the node agent last knew about its node's pods, for the plugin when the agent
//! cannot be reached. It is believed only to let a pod start *outside* the mesh, and
//! only when it is fresh (the agent rewrites it every few seconds while it is in sync
//! with the control plane, so an agent that is gone or cut off leaves a cache that goes
//! stale within seconds), and only for the very pod it names (same UID: a new pod with an
//! old pod's name is never covered). Anything else fails closed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const FILE_NAME: &str = "node-pods.json";
/// The cache's format; an older or newer one is not believed.
pub const VERSION: u32 = 2;
/// Older than this, the cache is stale and never believed.
pub const MAX_AGE: Duration = Duration::from_secs(10);
/// How often a synced agent rewrites it (well within MAX_AGE).
pub const REFRESH: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCache {
    pub version: u32,
    /// When the agent wrote it (ms since the epoch).
    pub written_at_ms: u64,
    /// `namespace/name` → the pod.
    pub pods: BTreeMap<String, CachedPod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CachedPod {
    pub uid: String,
    pub enrolled: bool,
}

/// The cache next to the agent socket.
pub fn path_for(agent_socket: &Path) -> PathBuf {
    agent_socket
        .parent()
        .map(|d| d.join(FILE_NAME))
        .unwrap_or_else(|| PathBuf::from(FILE_NAME))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether the cache (its bytes, if it could be read) lets pod `namespace/name` with
/// `uid` start outside the mesh at time `now_ms`: `Ok(())` only for a fresh cache of
/// the current format that names this very pod as not enrolled; otherwise why not.
pub fn allows_unenrolled_start(
    bytes: Option<&[u8]>,
    now_ms: u64,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<(), String> {
    let bytes = bytes.ok_or("no cache of the agent's view")?;
    let cache: NodeCache = serde_json::from_slice(bytes)
        .map_err(|e| format!("the cache of the agent's view is not of a known format: {e}"))?;
    if cache.version != VERSION {
        return Err(format!(
            "the cache of the agent's view has version {}, not {VERSION}",
            cache.version
        ));
    }
    // A little clock slack; a cache from the future is not believed either.
    if cache.written_at_ms > now_ms + 1000 {
        return Err("the cache of the agent's view is dated in the future".into());
    }
    let age = Duration::from_millis(now_ms.saturating_sub(cache.written_at_ms));
    if age > MAX_AGE {
        return Err(format!(
            "the cache of the agent's view is stale ({} s old, at most {} s is believed)",
            age.as_secs(),
            MAX_AGE.as_secs()
        ));
    }
    let key = format!("{namespace}/{name}");
    let pod = cache
        .pods
        .get(&key)
        .ok_or_else(|| format!("the cache of the agent's view does not list {key}"))?;
    if uid.is_empty() || pod.uid != uid {
        return Err(format!(
            "the cache of the agent's view lists another pod named {key} (UID {:?}, this one {uid:?})",
            pod.uid
        ));
    }
    if pod.enrolled {
        return Err(format!("{key} is enrolled in the mesh"));
    }
    Ok(())
}

/// Writes the cache atomically, 0600.
pub fn write(path: &Path, cache: &NodeCache) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(cache).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(written_at_ms: u64, uid: &str, enrolled: bool) -> Vec<u8> {
        serde_json::to_vec(&NodeCache {
            version: VERSION,
            written_at_ms,
            pods: [(
                "shop/web".to_string(),
                CachedPod {
                    uid: uid.into(),
                    enrolled,
                },
            )]
            .into(),
        })
        .unwrap()
    }

    #[test]
    fn only_a_fresh_cache_naming_this_very_pod_as_unenrolled_is_believed() {
        let now = 1_000_000_000;
        let ok = |b: &[u8], uid: &str| allows_unenrolled_start(Some(b), now, "shop", "web", uid);
        assert!(ok(&cache(now - 2000, "u1", false), "u1").is_ok());
        // Stale.
        let e = ok(&cache(now - 11_000, "u1", false), "u1").unwrap_err();
        assert!(e.contains("stale"), "{e}");
        // From the future.
        assert!(ok(&cache(now + 60_000, "u1", false), "u1").is_err());
        // Enrolled.
        assert!(
            ok(&cache(now, "u1", true), "u1")
                .unwrap_err()
                .contains("enrolled")
        );
        // Another pod with the same name, or no UID to compare.
        assert!(ok(&cache(now, "u1", false), "u2").is_err());
        assert!(ok(&cache(now, "", false), "").is_err());
        // Not listed, no cache, the old format (`{"ns/name": false}`), garbage.
        assert!(
            allows_unenrolled_start(Some(&cache(now, "u1", false)), now, "shop", "api", "u1")
                .is_err()
        );
        assert!(allows_unenrolled_start(None, now, "shop", "web", "u1").is_err());
        assert!(ok(br#"{"shop/web": false}"#, "u1").is_err());
        assert!(ok(b"\x00garbage", "u1").is_err());
        let mut v2: serde_json::Value = serde_json::from_slice(&cache(now, "u1", false)).unwrap();
        v2["version"] = 3.into();
        assert!(ok(&serde_json::to_vec(&v2).unwrap(), "u1").is_err());
    }

    #[test]
    fn written_private_and_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(FILE_NAME);
        let c = NodeCache {
            version: VERSION,
            written_at_ms: 5,
            pods: Default::default(),
        };
        write(&p, &c).unwrap();
        write(&p, &c).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back: NodeCache = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            path_for(Path::new("/run/x/agent.sock")),
            Path::new("/run/x/node-pods.json")
        );
    }
}
