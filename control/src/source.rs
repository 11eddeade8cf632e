//! The directory source: every `*.yaml`/`*.yml` file under a directory, re-read when it
//! changes. A file that fails to parse keeps its last good contents (and the error is
//! reported with its location), so a typo never wipes the mesh's state.

use crate::manifest::{ManifestError, Objects};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Default)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

struct FileState {
    stamp: (SystemTime, u64),
    objects: Objects,
    error: Option<ManifestError>,
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            ) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl DirSource {
    pub fn new(dir: &Path) -> Self {
        DirSource {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads changed files. Returns true when the merged objects may have changed.
    pub fn scan(&mut self) -> Result<bool, String> {
        let present = yaml_files(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= self.files.len() != before;
        for path in present {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read manifest");
                    continue;
                }
            };
            let mut objects = Objects::default();
            match objects.add_file(&path, &text) {
                Ok(_) => {
                    if self.files.get(&path).is_some_and(|f| f.error.is_some()) {
                        tracing::info!(file = %path.display(), "manifest fixed");
                    }
                    self.files.insert(
                        path,
                        FileState {
                            stamp,
                            objects,
                            error: None,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "manifest rejected; keeping its last good contents");
                    let previous = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(
                        path,
                        FileState {
                            stamp,
                            objects: previous,
                            error: Some(e),
                        },
                    );
                }
            }
            changed = true;
        }
        Ok(changed)
    }

    pub fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for f in self.files.values() {
            all.merge(&f.objects);
        }
        all
    }

    pub fn errors(&self) -> Vec<ManifestError> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }
}

/// Polls the directory and calls `publish` with the merged objects after each change.
pub async fn watch(mut src: DirSource, period: Duration, publish: impl Fn(Objects)) {
    loop {
        match src.scan() {
            Ok(true) => publish(src.objects()),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the config directory"),
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_edit_keeps_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns.yaml");
        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .unwrap();
        let mut src = DirSource::new(dir.path());
        assert!(src.scan().unwrap());
        assert!(src.objects().namespaces.contains_key("shop"));
        assert!(!src.scan().unwrap(), "unchanged");
        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: [broken\n",
        )
        .unwrap();
        src.scan().unwrap();
        assert!(
            src.objects().namespaces.contains_key("shop"),
            "last good state kept"
        );
        assert_eq!(src.errors().len(), 1);
        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
        )
        .unwrap();
        src.scan().unwrap();
        assert!(src.objects().namespaces.contains_key("other"));
        assert!(src.errors().is_empty());
        std::fs::remove_file(&f).unwrap();
        assert!(src.scan().unwrap());
        assert!(src.objects().namespaces.is_empty());
    }
}
