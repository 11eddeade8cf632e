//! Runs a CNI network configuration list exactly as a container runtime does: each
//! plugin in order with the environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
//! CNI_IFNAME, CNI_ARGS, CNI_PATH) and its configuration on stdin, the list's `name` and
//! `cniVersion` injected and the previous plugin's result as `prevResult`; DEL in reverse
//! order with the cached result.

use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Debug)]
pub struct Runtime {
    /// CNI_PATH: where plugin binaries are found.
    pub bin_dirs: Vec<PathBuf>,
    /// The conflist: `{cniVersion, name, plugins: [...]}`.
    pub conflist: Value,
    /// Where results are cached for CHECK and DEL.
    pub cache_dir: PathBuf,
    /// Run plugins inside this network namespace (the node's), when set.
    pub run_in_netns: Option<String>,
}

/// The runtime's view of one pod sandbox.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// e.g. `K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=...`
    pub args: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub plugin: String,
    pub code: Option<u64>,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI plugin {} failed", self.plugin)?;
        if let Some(c) = self.code {
            write!(f, " (code {c})")?;
        }
        write!(f, ": {}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl Runtime {
    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn find(&self, plugin_type: &str) -> Option<PathBuf> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.exists())
    }

    fn cache_file(&self, sb: &Sandbox) -> PathBuf {
        self.cache_dir
            .join(format!("{}-{}.json", sb.container_id, sb.ifname))
    }

    /// Invokes one plugin; returns its parsed stdout (Null when empty).
    pub fn invoke(&self, command: &str, sb: &Sandbox, conf: &Value) -> Result<Value, PluginError> {
        let plugin_type = conf["type"].as_str().unwrap_or_default().to_string();
        let err = |code, msg: String, details: String| PluginError {
            plugin: plugin_type.clone(),
            code,
            msg,
            details,
        };
        let bin = self.find(&plugin_type).ok_or_else(|| {
            err(
                None,
                format!("plugin binary not found in {}", self.cni_path()),
                String::new(),
            )
        })?;
        let mut cmd = match &self.run_in_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.container_id)
            .env("CNI_NETNS", &sb.netns)
            .env("CNI_IFNAME", &sb.ifname)
            .env("CNI_ARGS", &sb.args)
            .env("CNI_PATH", self.cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                err(
                    None,
                    format!("cannot run {}: {e}", bin.display()),
                    String::new(),
                )
            })?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| err(None, e.to_string(), String::new()))?;
        let out = child
            .wait_with_output()
            .map_err(|e| err(None, e.to_string(), String::new()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed: Value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).map_err(|e| {
                err(
                    None,
                    format!("unparseable output {stdout:?}: {e}"),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })?
        };
        if !out.status.success() {
            return Err(err(
                parsed["code"].as_u64(),
                parsed["msg"].as_str().unwrap_or("failed").to_string(),
                parsed["details"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned()),
            ));
        }
        Ok(parsed)
    }

    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        conf
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// ADD: every plugin in order; the final result is cached and returned.
    pub fn add(&self, sb: &Sandbox) -> Result<Value, PluginError> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, prev.as_ref());
            let result = self.invoke("ADD", sb, &conf)?;
            prev = Some(result);
        }
        let result = prev.unwrap_or(Value::Null);
        let _ = std::fs::create_dir_all(&self.cache_dir);
        let _ = std::fs::write(self.cache_file(sb), result.to_string());
        Ok(result)
    }

    /// CHECK: every plugin in order with the cached result.
    pub fn check(&self, sb: &Sandbox) -> Result<(), PluginError> {
        let cached = self.cached(sb);
        for plugin in self.plugins() {
            self.invoke("CHECK", sb, &self.plugin_conf(&plugin, cached.as_ref()))?;
        }
        Ok(())
    }

    /// DEL: plugins in reverse order with the cached result; the cache is removed.
    pub fn del(&self, sb: &Sandbox) -> Result<(), PluginError> {
        let cached = self.cached(sb);
        let mut first_err = None;
        for plugin in self.plugins().iter().rev() {
            if let Err(e) = self.invoke("DEL", sb, &self.plugin_conf(plugin, cached.as_ref())) {
                first_err.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_file(self.cache_file(sb));
        first_err.map_or(Ok(()), Err)
    }

    fn cached(&self, sb: &Sandbox) -> Option<Value> {
        std::fs::read_to_string(self.cache_file(sb))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
    }
}

/// The pod's IPv4 address from an ADD result (`ips[].address`).
pub fn result_ipv4(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let addr = a.split('/').next()?;
        (!addr.contains(':')).then(|| addr.to_string())
    })
}

/// The pod's IPv6 address from an ADD result, if it has one (dual stack).
pub fn result_ipv6(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let addr = a.split('/').next()?;
        addr.contains(':').then(|| addr.to_string())
    })
}

/// `conflist` (from [`node_conflist`]) with a second, IPv6 range and default route: the
/// pod gets an address of each family.
pub fn with_ipv6_range(mut conflist: Value, subnet: &str, gateway: &str) -> Value {
    let ipam = &mut conflist["plugins"][0]["ipam"];
    if let Some(ranges) = ipam["ranges"].as_array_mut() {
        ranges.push(json!([{"subnet": subnet, "gateway": gateway}]));
    }
    if let Some(routes) = ipam["routes"].as_array_mut() {
        routes.push(json!({"dst": "::/0"}));
    }
    conflist
}

/// A conflist for a node: the reference bridge + host-local plugins, then mesh-cni.
pub fn node_conflist(
    name: &str,
    bridge: &str,
    subnet: &str,
    gateway: &str,
    ipam_dir: &Path,
    agent_socket: &Path,
) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {
                "type": "mesh-cni",
                "agent_socket": agent_socket
            }
        ]
    })
}

/// The loopback plugin's configuration (brings `lo` up in the pod).
pub fn loopback_conf() -> Value {
    json!({"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]})
}
