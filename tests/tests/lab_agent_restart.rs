//! Restarting the node agent never touches traffic, on a real lab cluster: a long-lived
//! TCP stream and an HTTP/2 keep-alive connection run across a restart of the agent on
//! both nodes, with no reset and no byte lost; the restarted agents confirm every pod
//! again, and new connections are still captured (only HBONE on the fabric).

use mesh_e2e::cluster::{contains, wait_until};
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_API_POD_WITH_TCP_ECHO, FRONT_AMBIENT, FRONT_CLIENT, join,
};
use mesh_e2e::testlab::{TestLab, echo_chunk};
use std::io::Read;
use std::time::Duration;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-legacy, port: 9000, targetPort: 9000}]
";

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

async fn h2_get(sender: &mut H2, path: &str) -> Result<u16, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let req = http::Request::get(format!("http://10.96.0.20{path}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_restart_leaves_streams_and_h2_connections_untouched() {
    let mut t = tokio::task::block_in_place(|| {
        let mut t = TestLab::up_named("rst", 2, &["curl", "tcpdump", "nft"]);
        t.apply(&join(&[
            FRONT_AMBIENT,
            BACK_AMBIENT,
            BACK_API_POD_WITH_TCP_ECHO,
            SERVICE,
            FRONT_CLIENT,
        ]));
        t.eventually("front/client confirmed", || t.confirmed(1, "front/client"));
        t.eventually("back/api confirmed", || t.confirmed(2, "back/api"));
        wait_until("mTLS", || {
            t.curl("front/client", "http://10.96.0.20/").is_ok()
                && t.log("ztunnel-2")
                    .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
        });
        t
    });

    // The long-lived TCP stream (through both ztunnels, to the echo server) and the
    // HTTP/2 keep-alive connection, both made before the restart.
    let mut stream = t.connect_from("front/client", "10.96.0.20:9000");
    let mut sent = 0;
    for _ in 0..4 {
        echo_chunk(&mut stream, sent, 64 * 1024);
        sent += 64 * 1024;
    }
    let h2_tcp = t.connect_from("front/client", "10.96.0.20:80");
    h2_tcp.set_nonblocking(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(h2_tcp).unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(h2_get(&mut sender, "/before").await, Ok(200));

    // Restart the agent on both nodes; traffic keeps flowing while they are down.
    let old: Vec<u32> = (1..=2)
        .map(|i| t.lab.process(&format!("agent-{i}")).unwrap().pid)
        .collect();
    tokio::task::block_in_place(|| {
        for i in 1..=2 {
            t.lab.stop(&format!("agent-{i}"), false).unwrap();
        }
    });
    echo_chunk(&mut stream, sent, 64 * 1024);
    sent += 64 * 1024;
    assert_eq!(h2_get(&mut sender, "/agents-down").await, Ok(200));
    tokio::task::block_in_place(|| {
        for i in 1..=2 {
            t.lab.start_agent(i).unwrap();
        }
        for i in 1..=2 {
            let new = t.lab.process(&format!("agent-{i}")).unwrap().pid;
            assert_ne!(new, old[i - 1], "agent-{i} restarted");
        }
        // The new agents have re-programmed every pod and read the rules back.
        t.eventually("front/client confirmed again", || {
            t.confirmed(1, "front/client")
        });
        t.eventually("back/api confirmed again", || t.confirmed(2, "back/api"));
    });
    // Each new agent's own run (its log from its start on) re-programmed its pod.
    for i in 1..=2 {
        if let Err(e) = t.lab.wait_log(
            &format!("agent-{i}"),
            "redirection programmed",
            Duration::from_secs(30),
        ) {
            panic!(
                "the new agent-{i} re-programmed its pod: {e}{}",
                t.all_logs()
            );
        }
    }

    // The same stream and the same HTTP/2 connection, after the restart.
    for _ in 0..4 {
        echo_chunk(&mut stream, sent, 64 * 1024);
        sent += 64 * 1024;
    }
    assert_eq!(h2_get(&mut sender, "/after").await, Ok(200));
    assert!(
        !conn.is_finished(),
        "the HTTP/2 connection is still the same one"
    );

    // New connections are still captured: only HBONE on the fabric.
    tokio::task::block_in_place(|| {
        let cap = t.capture("after-restart");
        let answer = t.curl("front/client", "http://10.96.0.20/new-after-restart");
        let (bytes, summary) = cap.finish();
        assert!(answer.is_ok(), "{answer:?}");
        assert!(!contains(&bytes, "new-after-restart"));
        assert!(
            !summary.is_empty() && summary.lines().all(|l| l.contains(".15008")),
            "only HBONE on the fabric: {summary}"
        );
    });

    // The stream ends cleanly: everything sent came back, nothing more.
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
    assert_eq!(sent, 9 * 64 * 1024);
    drop(sender);
}
