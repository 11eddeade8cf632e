//! The chained CNI plugin (spec 1.0.0; 0.3.x and 0.4.0 configs accepted). It never
//! touches the network itself: it passes `prevResult` through unchanged and tells the node
//! agent about the pod; the agent decides whether the pod is enrolled and, if so,
//! programs its redirection before ADD returns. Protocol logic here is pure; I/O (env,
//! stdin, the agent socket) is passed in.

use crate::events::{AgentReply, AgentRequest};
use serde_json::{Value, json};
use std::collections::HashMap;

pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/mesh-cni/agent.sock";

/// A CNI error object (`code`, `msg`, `details`), printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}

// Well-known codes from the CNI spec.
pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
/// Ours: the pod must be in the mesh and its redirection could not be set up.
pub const MESH_SETUP_FAILED: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The runtime's environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: HashMap<String, String>,
}

impl Env {
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Env, CniError> {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let command = match get("CNI_COMMAND").as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "" => {
                return Err(CniError::new(
                    INVALID_ENV,
                    "CNI_COMMAND is not set",
                    "expected ADD, DEL, CHECK or VERSION",
                ));
            }
            other => {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("unknown CNI_COMMAND {other}"),
                    "expected ADD, DEL, CHECK or VERSION",
                ));
            }
        };
        let env = Env {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS")
                .split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        if env.command != Command::Version {
            if env.container_id.is_empty() {
                return Err(CniError::new(INVALID_ENV, "CNI_CONTAINERID is not set", ""));
            }
            if env.ifname.is_empty() {
                return Err(CniError::new(INVALID_ENV, "CNI_IFNAME is not set", ""));
            }
            if env.command != Command::Del && env.netns.is_empty() {
                return Err(CniError::new(
                    INVALID_ENV,
                    "CNI_NETNS is not set",
                    "ADD and CHECK need the pod's network namespace",
                ));
            }
        }
        Ok(env)
    }

    fn pod(&self) -> Option<(String, String, String)> {
        let ns = self.args.get("K8S_POD_NAMESPACE")?;
        let name = self.args.get("K8S_POD_NAME")?;
        let uid = self.args.get("K8S_POD_UID").cloned().unwrap_or_default();
        Some((ns.clone(), name.clone(), uid))
    }
}

/// Our entry in the conflist (runtime adds `name` and `cniVersion`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub agent_socket: String,
    pub prev_result: Option<Value>,
}

pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            DECODE_FAILURE,
            "network configuration is not valid JSON",
            e.to_string(),
        )
    })?;
    let obj = v.as_object().ok_or_else(|| {
        CniError::new(
            DECODE_FAILURE,
            "network configuration must be a JSON object",
            "",
        )
    })?;
    let cni_version = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| CniError::new(INVALID_CONFIG, "cniVersion is missing", ""))?
        .to_string();
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!("CNI version {cni_version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let str_field = |k: &str| -> Result<Option<String>, CniError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(CniError::new(
                INVALID_CONFIG,
                format!("{k} must be a string"),
                "",
            )),
        }
    };
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "prevResult must be an object",
                "",
            ));
        }
    };
    Ok(NetConf {
        name: str_field("name")?.unwrap_or_default(),
        agent_socket: str_field("agent_socket")?
            .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.to_string()),
        prev_result,
        cni_version,
    })
}

/// The pod's IPs from the previous plugin's result (`ips[].address`, CIDR notation).
pub fn prev_ips(prev: &Value) -> Result<Vec<String>, CniError> {
    let Some(ips) = prev.get("ips") else {
        return Ok(vec![]);
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| CniError::new(INVALID_CONFIG, "prevResult.ips must be an array", ""))?;
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let a = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
                CniError::new(
                    INVALID_CONFIG,
                    format!("prevResult.ips[{i}].address is missing"),
                    "",
                )
            })?;
            let addr = a.split('/').next().unwrap_or(a);
            addr.parse::<std::net::IpAddr>().map_err(|_| {
                CniError::new(
                    INVALID_CONFIG,
                    format!("prevResult.ips[{i}].address {a:?} is not an IP/prefix"),
                    "",
                )
            })?;
            Ok(addr.to_string())
        })
        .collect()
}

/// The fuzz targets' entry: parse a configuration and its prevResult; never panic.
pub fn fuzz_entry(data: &[u8]) {
    if let Ok(conf) = parse_config(data)
        && let Some(prev) = &conf.prev_result
    {
        let _ = prev_ips(prev);
    }
}

/// Talks to the node agent (defined with the protocol, so `events` needs nothing from here).
pub use crate::events::Agent;

/// Runs one invocation: `Ok(stdout)` or the error object to print.
pub fn run(env: &Env, stdin: &[u8], agent: &dyn Agent) -> Result<String, CniError> {
    if env.command == Command::Version {
        return Ok(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let conf = parse_config(stdin)?;
    let pod = env.pod();
    match env.command {
        Command::Add => {
            let prev = conf.prev_result.as_ref().ok_or_else(|| {
                CniError::new(
                    INVALID_CONFIG,
                    "mesh-cni must be chained after a primary plugin: prevResult is missing",
                    "",
                )
            })?;
            let ips = prev_ips(prev)?;
            // Without the pod's identity nobody can tell whether it must be in the mesh:
            // it is not started (fail closed), whatever the agent would say.
            let Some((namespace, name, uid)) = pod else {
                return Err(CniError::new(
                    INVALID_ENV,
                    "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME: cannot tell whether this sandbox must be in the mesh, so it is not started",
                    "mesh-cni serves Kubernetes pods; the runtime passes their identity in CNI_ARGS",
                ));
            };
            let req = AgentRequest::Add {
                namespace: namespace.clone(),
                name: name.clone(),
                uid,
                container_id: env.container_id.clone(),
                netns: env.netns.clone(),
                ips,
            };
            match agent.call(&conf.agent_socket, &req) {
                Ok(AgentReply::Ok { .. }) => {}
                Ok(AgentReply::Error { message }) => {
                    return Err(CniError::new(
                        MESH_SETUP_FAILED,
                        format!(
                            "pod {namespace}/{name} must be in the mesh but its redirection could not be set up"
                        ),
                        message,
                    ));
                }
                Err(e) => {
                    return Err(CniError::new(
                        TRY_AGAIN_LATER,
                        format!(
                            "node agent unreachable: cannot tell whether pod {namespace}/{name} must be in the mesh, so it is not started unprotected"
                        ),
                        format!("{}: {e}", conf.agent_socket),
                    ));
                }
            }
            // Chained plugins pass the previous result on unchanged.
            Ok(prev.to_string())
        }
        Command::Del => {
            if let Some((namespace, name, uid)) = pod {
                // DEL must succeed even when the agent is gone; it reconciles later.
                let _ = agent.call(
                    &conf.agent_socket,
                    &AgentRequest::Del {
                        namespace,
                        name,
                        uid,
                        container_id: env.container_id.clone(),
                        netns: env.netns.clone(),
                    },
                );
            }
            Ok(String::new())
        }
        Command::Check => {
            conf.prev_result
                .as_ref()
                .ok_or_else(|| CniError::new(INVALID_CONFIG, "CHECK needs prevResult", ""))?;
            if let Some((namespace, name, _)) = pod {
                match agent.call(
                    &conf.agent_socket,
                    &AgentRequest::Check {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        netns: env.netns.clone(),
                    },
                ) {
                    Ok(AgentReply::Ok { .. }) => {}
                    Ok(AgentReply::Error { message }) => {
                        return Err(CniError::new(
                            MESH_SETUP_FAILED,
                            format!("pod {namespace}/{name}: mesh redirection is not in place"),
                            message,
                        ));
                    }
                    Err(e) => {
                        return Err(CniError::new(TRY_AGAIN_LATER, "node agent unreachable", e));
                    }
                }
            }
            Ok(String::new())
        }
        Command::Version => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct FakeAgent {
        reply: Result<AgentReply, String>,
        seen: RefCell<Vec<AgentRequest>>,
    }

    impl Agent for FakeAgent {
        fn call(&self, _socket: &str, req: &AgentRequest) -> Result<AgentReply, String> {
            self.seen.borrow_mut().push(req.clone());
            self.reply.clone()
        }
    }

    fn agent(reply: Result<AgentReply, String>) -> FakeAgent {
        FakeAgent {
            reply,
            seen: RefCell::new(vec![]),
        }
    }

    fn env(cmd: &str) -> Env {
        let vars: HashMap<String, String> = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=u1",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Env::from_vars(&vars).unwrap()
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"lab","type":"mesh-cni","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.1.2/24","gateway":"10.1.1.1","interface":0}]}}"#;

    #[test]
    fn add_passes_prev_result_through_and_tells_the_agent() {
        let a = agent(Ok(AgentReply::Ok { enrolled: true }));
        let out = run(&env("ADD"), CONF.as_bytes(), &a).unwrap();
        let prev: Value = serde_json::from_str(CONF).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            prev["prevResult"]
        );
        match &a.seen.borrow()[0] {
            AgentRequest::Add {
                namespace,
                name,
                uid,
                ips,
                netns,
                ..
            } => {
                assert_eq!(
                    (namespace.as_str(), name.as_str(), uid.as_str()),
                    ("shop", "web", "u1")
                );
                assert_eq!(ips, &vec!["10.1.1.2".to_string()]);
                assert_eq!(netns, "/var/run/netns/p1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn add_fails_closed() {
        let a = agent(Err("connection refused".into()));
        let e = run(&env("ADD"), CONF.as_bytes(), &a).unwrap_err();
        assert_eq!(e.code, TRY_AGAIN_LATER);
        let a = agent(Ok(AgentReply::Error {
            message: "nft failed".into(),
        }));
        let e = run(&env("ADD"), CONF.as_bytes(), &a).unwrap_err();
        assert_eq!(e.code, MESH_SETUP_FAILED);
        assert_eq!(e.details, "nft failed");
    }

    #[test]
    fn add_without_the_pods_identity_fails_closed() {
        let mut e = env("ADD");
        e.args.remove("K8S_POD_NAME");
        let a = agent(Ok(AgentReply::Ok { enrolled: false }));
        let err = run(&e, CONF.as_bytes(), &a).unwrap_err();
        assert_eq!(err.code, INVALID_ENV);
        assert!(err.msg.contains("not started"), "{}", err.msg);
        assert!(a.seen.borrow().is_empty());
        // DEL and CHECK of such a sandbox have nothing to protect: they succeed.
        let mut d = env("DEL");
        d.args.clear();
        assert!(run(&d, CONF.as_bytes(), &a).is_ok());
    }

    #[test]
    fn del_succeeds_without_the_agent() {
        let a = agent(Err("gone".into()));
        assert_eq!(run(&env("DEL"), CONF.as_bytes(), &a).unwrap(), "");
    }

    #[test]
    fn version_lists_supported_versions() {
        let out = run(&env("VERSION"), b"", &agent(Err(String::new()))).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn bad_input_gets_spec_error_codes() {
        let a = agent(Ok(AgentReply::Ok { enrolled: false }));
        let code = |stdin: &str| run(&env("ADD"), stdin.as_bytes(), &a).unwrap_err().code;
        assert_eq!(code("{not json"), DECODE_FAILURE);
        assert_eq!(code("[]"), DECODE_FAILURE);
        assert_eq!(code(r#"{"name":"x"}"#), INVALID_CONFIG);
        assert_eq!(
            code(r#"{"cniVersion":"0.2.0","name":"x"}"#),
            INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"x"}"#),
            INVALID_CONFIG,
            "no prevResult"
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"nope"}]}}"#),
            INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","prevResult":5}"#),
            INVALID_CONFIG
        );
        let vars: HashMap<String, String> = [("CNI_COMMAND".to_string(), "ADD".to_string())].into();
        assert_eq!(Env::from_vars(&vars).unwrap_err().code, INVALID_ENV);
        let vars: HashMap<String, String> =
            [("CNI_COMMAND".to_string(), "FROB".to_string())].into();
        assert_eq!(Env::from_vars(&vars).unwrap_err().code, INVALID_ENV);
        let e = CniError::new(7, "m", "d");
        let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            (v["code"].as_u64(), v["msg"].as_str(), v["details"].as_str()),
            (Some(7), Some("m"), Some("d"))
        );
    }

    /// The fuzz entry on mutations of valid inputs (deterministic, so it runs in CI).
    #[test]
    fn mutated_configs_never_panic() {
        let seeds = [
            CONF.as_bytes().to_vec(),
            br#"{"cniVersion":"0.3.1","prevResult":{"ips":[]}}"#.to_vec(),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for seed in seeds {
            for _ in 0..5000 {
                let mut d = seed.clone();
                for _ in 0..(x % 8 + 1) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x as usize) % d.len().max(1);
                    match x % 3 {
                        0 if !d.is_empty() => d[i] = (x >> 24) as u8,
                        1 if !d.is_empty() => {
                            d.remove(i);
                        }
                        _ => d.insert(i.min(d.len()), (x >> 32) as u8),
                    }
                }
                fuzz_entry(&d);
            }
        }
    }

    #[test]
    fn older_config_versions_are_accepted() {
        for v in ["0.3.1", "0.4.0"] {
            let conf = CONF.replace(
                "\"cniVersion\":\"1.0.0\",\"name\"",
                &format!("\"cniVersion\":\"{v}\",\"name\""),
            );
            assert!(
                run(
                    &env("ADD"),
                    conf.as_bytes(),
                    &agent(Ok(AgentReply::Ok { enrolled: false }))
                )
                .is_ok()
            );
        }
    }
}
