//! `meshctl enrolment`: each pod's capture, as the node agents see it. meshctl reads
//! each node agent's local endpoint (`GET /enrolment` on its --readiness-addr), as
//! `istioctl ztunnel-config` reads each ztunnel: only the agent can read a pod's rules
//! back from its network namespace, and the control plane stays a one-way publisher.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// One agent's `/enrolment` answer (JSON).
pub fn fetch(agent: &str) -> Result<serde_json::Value, String> {
    let unreachable = |e: String| {
        format!(
            "cannot reach the node agent at {agent}: {e}\n(is mesh-cni agent running on that node? give its --readiness-addr with --agent)"
        )
    };
    let addr: SocketAddr = agent
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| unreachable(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // One write: the agent answers on the first segment and closes, so a request
    // written in pieces could meet a reset.
    s.write_all(format!("GET /enrolment HTTP/1.0\r\nHost: {agent}\r\n\r\n").as_bytes())
        .map_err(|e| unreachable(e.to_string()))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| unreachable(e.to_string()))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or("malformed response from the node agent")?;
    let status = status_code(head);
    if status == Some(403) {
        return Err(format!(
            "the node agent at {agent} serves /enrolment to its own node only: run meshctl on that node (its network namespace) with --agent 127.0.0.1:<port>"
        ));
    }
    if status != Some(200) {
        return Err(format!(
            "the node agent at {agent} answered `{}`: is it an older agent without /enrolment?",
            head.lines().next().unwrap_or_default()
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("malformed JSON from the node agent: {e}"))
}

/// The status code of an HTTP/1.x response head, whichever minor version the agent
/// answers with (it answers a 1.0 request in 1.0).
fn status_code(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    rest.get(..3)?.parse().ok()
}

/// The report for one agent's answer, and whether every pod is confirmed.
pub fn render(v: &serde_json::Value) -> (String, bool) {
    let mut out = format!("NODE {}\n", v["node"].as_str().unwrap_or("(unnamed node)"));
    // Until the control plane's view arrives an agent knows of no pod: say so, not
    // "no enrolled pods". (Agents that do not report it are ready once they answer.)
    if v["ready"] == false {
        out.push_str("  NOT READY: the agent is waiting for the control plane's view\n");
        return (out, false);
    }
    let pods = v["pods"].as_array().cloned().unwrap_or_default();
    if pods.is_empty() {
        out.push_str("  (no enrolled pods)\n");
    }
    let mut all_confirmed = true;
    for p in &pods {
        let state = p["state"].as_str().unwrap_or("unknown");
        let pod = p["pod"].as_str().unwrap_or_default();
        if state == "confirmed" {
            out.push_str(&format!("  {pod:<40} confirmed\n"));
        } else {
            all_confirmed = false;
            out.push_str(&format!(
                "  {pod:<40} {}: {}\n",
                state.to_uppercase(),
                p["reason"].as_str().unwrap_or("(no reason given)")
            ));
        }
    }
    (out, all_confirmed)
}

/// The few lines `meshctl status` prints for one agent's answer: how many pods are
/// confirmed, and each pod that is not, with the reason (the full list is
/// `meshctl enrolment`).
pub fn summary(v: &serde_json::Value) -> String {
    let node = v["node"].as_str().unwrap_or("(unnamed node)");
    if v["ready"] == false {
        return format!(
            "  {node:<20} NOT READY: the agent is waiting for the control plane's view\n"
        );
    }
    let pods = v["pods"].as_array().cloned().unwrap_or_default();
    let confirmed = pods.iter().filter(|p| p["state"] == "confirmed").count();
    let mut out = format!(
        "  {node:<20} {confirmed} of {} enrolled pods confirmed\n",
        pods.len()
    );
    for p in pods.iter().filter(|p| p["state"] != "confirmed") {
        out.push_str(&format!(
            "    {:<38} {}: {}\n",
            p["pod"].as_str().unwrap_or_default(),
            p["state"].as_str().unwrap_or("unknown").to_uppercase(),
            p["reason"].as_str().unwrap_or("(no reason given)")
        ));
    }
    out
}

/// meshctl's exit code for the agents' answers (`Ok(all confirmed)` or the reason it
/// could not be read): 2 when an agent could not be read, 1 when pods are not
/// confirmed, 0 otherwise.
pub fn exit_code(answers: &[Result<bool, String>]) -> i32 {
    if answers.iter().any(|a| a.is_err()) {
        2
    } else if answers.iter().any(|a| a == &Ok(false)) {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_read_whichever_http_1_version_answers() {
        assert_eq!(
            status_code("HTTP/1.0 200 OK\r\ncontent-length: 2"),
            Some(200)
        );
        assert_eq!(status_code("HTTP/1.1 403 Forbidden"), Some(403));
        assert_eq!(status_code("HTTP/2 200"), None);
        assert_eq!(status_code("garbage"), None);
    }

    #[test]
    fn flags_every_pod_not_confirmed_with_its_reason() {
        let v = serde_json::json!({"node": "node-1", "pods": [
            {"pod": "front/client", "uid": "u1", "state": "confirmed"},
            {"pod": "back/api", "uid": "u2", "state": "failed",
             "reason": "the redirection read back from the pod differs from the plan: table inet ambient-nat is missing"},
            {"pod": "back/db", "uid": "u3", "state": "pending", "reason": "ztunnel has not acknowledged the pod"},
        ]});
        let (text, ok) = render(&v);
        assert!(!ok);
        assert!(text.starts_with("NODE node-1\n"), "{text}");
        let line = |pod: &str| text.lines().find(|l| l.contains(pod)).unwrap().to_string();
        assert!(line("front/client").ends_with("confirmed"));
        assert!(line("back/api").contains("FAILED: the redirection read back"));
        assert!(line("back/db").contains("PENDING: ztunnel has not acknowledged"));
        let (text, ok) = render(&serde_json::json!({"node": "n", "pods": [
            {"pod": "a/b", "state": "confirmed"}]}));
        assert!(ok, "{text}");
        assert!(
            render(&serde_json::json!({"node": "n", "pods": []}))
                .0
                .contains("no enrolled pods")
        );
    }

    #[test]
    fn status_summary_counts_and_flags_with_reasons() {
        let v = serde_json::json!({"node": "node-1", "ready": true, "pods": [
            {"pod": "front/client", "state": "confirmed"},
            {"pod": "front/other", "state": "confirmed"},
            {"pod": "back/api", "state": "failed", "reason": "table inet ambient-nat is missing"},
            {"pod": "back/db", "state": "pending"},
        ]});
        let s = summary(&v);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3, "{s}");
        assert!(
            lines[0].contains("node-1") && lines[0].ends_with("2 of 4 enrolled pods confirmed")
        );
        assert!(
            lines[1].contains("back/api")
                && lines[1].ends_with("FAILED: table inet ambient-nat is missing")
        );
        assert!(lines[2].contains("back/db") && lines[2].ends_with("PENDING: (no reason given)"));
        assert!(
            !s.contains("front/client"),
            "confirmed pods are only counted: {s}"
        );
        let s = summary(&serde_json::json!({"node": "n", "ready": false, "pods": []}));
        assert!(s.contains("NOT READY"), "{s}");
    }

    #[test]
    fn an_agent_not_ready_is_not_an_empty_node() {
        let (text, ok) = render(&serde_json::json!({"node": "n", "ready": false, "pods": []}));
        assert!(!ok);
        assert!(text.contains("NOT READY"), "{text}");
        assert!(!text.contains("no enrolled pods"), "{text}");
        let (text, ok) = render(&serde_json::json!({"node": "n", "ready": true, "pods": []}));
        assert!(ok && text.contains("no enrolled pods"), "{text}");
    }

    #[test]
    fn unreachable_agents_exit_2_unconfirmed_pods_1() {
        assert_eq!(exit_code(&[Ok(true), Ok(true)]), 0);
        assert_eq!(exit_code(&[Ok(true), Ok(false)]), 1);
        assert_eq!(exit_code(&[Ok(false), Err("down".into())]), 2);
        assert_eq!(exit_code(&[]), 0);
    }

    #[test]
    fn an_unreachable_agent_is_explained() {
        let e = fetch("127.0.0.1:1").unwrap_err();
        assert!(e.contains("cannot reach the node agent"), "{e}");
    }
}
