//! The plugin ↔ node agent protocol: one JSON request line and one JSON reply line over
//! the agent's unix stream socket. A leaf module: the plugin and the agent both use it,
//! it uses neither.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The longest plugin request or agent reply line.
pub const MAX_LINE: usize = 64 * 1024;

/// Talks to the node agent.
pub trait Agent {
    fn call(&self, socket: &str, req: &AgentRequest) -> Result<AgentReply, String>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "camelCase")]
pub enum AgentRequest {
    #[serde(rename_all = "camelCase")]
    Add {
        namespace: String,
        name: String,
        uid: String,
        container_id: String,
        netns: String,
        ips: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Del {
        namespace: String,
        name: String,
        uid: String,
        container_id: String,
        /// CNI_NETNS, empty when the runtime gave none (the namespace may be gone).
        #[serde(default)]
        netns: String,
    },
    #[serde(rename_all = "camelCase")]
    Check {
        namespace: String,
        name: String,
        netns: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum AgentReply {
    Ok { enrolled: bool },
    Error { message: String },
}

/// The plugin's side: a blocking call with a deadline (connect, write and the whole
/// reply each bounded), and a reply of at most `MAX_LINE` bytes.
pub struct SocketAgent {
    pub timeout: Duration,
}

impl Agent for SocketAgent {
    fn call(&self, socket: &str, req: &AgentRequest) -> Result<AgentReply, String> {
        let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        BufReader::new((&s).take(MAX_LINE as u64 + 1))
            .read_until(b'\n', &mut reply)
            .map_err(|e| format!("no reply: {e}"))?;
        if reply.len() > MAX_LINE {
            return Err(format!("reply longer than {MAX_LINE} bytes"));
        }
        if reply.is_empty() {
            return Err("no reply: the agent closed the connection".into());
        }
        serde_json::from_slice(&reply).map_err(|e| {
            format!(
                "malformed reply {:?}: {e}",
                String::from_utf8_lossy(&reply[..reply.len().min(200)])
            )
        })
    }
}

/// When the agent cannot be reached, ADD may still proceed for a pod that a fresh cache
/// of the agent's view names, by UID, as not enrolled (see `cache`); anything else
/// fails closed with the agent's error and why the cache did not help.
pub struct FallbackAgent<A> {
    pub agent: A,
    /// Where the cache is read from: `None` puts it next to the agent socket.
    pub cache: Option<std::path::PathBuf>,
}

impl<A: Agent> Agent for FallbackAgent<A> {
    fn call(&self, socket: &str, req: &AgentRequest) -> Result<AgentReply, String> {
        let e = match self.agent.call(socket, req) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let AgentRequest::Add {
            namespace,
            name,
            uid,
            ..
        } = req
        else {
            return Err(e);
        };
        let path = self
            .cache
            .clone()
            .unwrap_or_else(|| crate::cache::path_for(std::path::Path::new(socket)));
        let bytes = std::fs::read(&path).ok();
        match crate::cache::allows_unenrolled_start(
            bytes.as_deref(),
            crate::cache::now_ms(),
            namespace,
            name,
            uid,
        ) {
            Ok(()) => Ok(AgentReply::Ok { enrolled: false }),
            Err(why) => Err(format!("{e}; {why}")),
        }
    }
}
