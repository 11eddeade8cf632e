//! The plugin ↔ node agent protocol: one JSON request line and one JSON reply line over
//! the agent's unix stream socket.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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

/// The plugin's side: a blocking call with a deadline.
pub struct SocketAgent {
    pub timeout: Duration,
}

impl crate::plugin::Agent for SocketAgent {
    fn call(&self, socket: &str, req: &AgentRequest) -> Result<AgentReply, String> {
        let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        let mut reply = String::new();
        BufReader::new(&s)
            .read_line(&mut reply)
            .map_err(|e| format!("no reply: {e}"))?;
        serde_json::from_str(&reply).map_err(|e| format!("malformed reply {reply:?}: {e}"))
    }
}
