//! Policies an attacker hopes the mesh cannot read, on a real lab: invalid and
//! unsupported fields in ALLOW and DENY policies, at ztunnel (L4) and at a waypoint (L7),
//! never widen access; a root-namespace selector policy reaches other namespaces; and
//! `meshctl authz check` answers as the data plane does, case by case.
//!
//! Policies are written straight into the control plane's manifest directory, as an API
//! server that accepted them would hold them (mesh-lab's `apply` validates first).

use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_USES_WAYPOINT, FRONT_AMBIENT, FRONT_CLIENT, WAYPOINT_GATEWAY, back_api, join,
};
use mesh_e2e::testlab::{TestLab, logged_from};

const CLIENT: &str = "spiffe://cluster.local/ns/front/sa/web";

/// A lab of two nodes for these tests.
fn up() -> TestLab {
    TestLab::up_named("ap", 2, &["curl"])
}

/// The HTTP status a request from front/client gets ("000": no answer at all).
fn status(t: &TestLab, url: &str) -> String {
    t.status("front/client", url)
}

/// meshctl's verdict, "ALLOW" or "DENY", for a pod (`--to`) or, with a path, for a
/// Service through its waypoint (`--service`).
fn check(t: &TestLab, to: &str, port: &str, path: Option<&str>) -> String {
    let flag = if path.is_some() { "--service" } else { "--to" };
    let mut args = vec!["authz", "check", "--from", CLIENT, flag, to, "--port", port];
    if let Some(p) = path {
        args.extend(["--path", p]);
    }
    let out = t.meshctl(&args);
    out.split_whitespace()
        .find(|w| *w == "ALLOW" || *w == "DENY")
        .unwrap_or_else(|| panic!("no verdict from meshctl: {out}"))
        .to_string()
}

/// Namespaces `front` and `back` in the mesh, back/api on 10.96.0.20, front/client.
fn app() -> String {
    join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n",
        &back_api(),
        FRONT_CLIENT,
    ])
}

fn policy(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: adversarial, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// An ALLOW that admits everyone to back/api, so each case starts from "allowed".
const ALLOW_ALL: &str = "  selector: {matchLabels: {app: api}}\n  rules: [{}]\n";

/// At ztunnel (no waypoint): each policy below must stop the client, who is allowed
/// before it; on the code before this change each of them let it through (the first
/// three were left out or dropped by mesh-control, the last applied to istio-system
/// only). meshctl must say DENY each time, and ALLOW in between.
#[test]
fn at_ztunnel_unreadable_or_l7_only_policies_never_widen_access() {
    let mut t = up();
    t.apply(&app());
    let url = "http://10.96.0.20/";
    t.eventually("mTLS to back/api", || status(&t, url) == "200");
    let client_ip = t.lab.state.pods["front/client"].ip.clone();
    // Each case with the reason ztunnel-2 must give for refusing the client.
    let cases = [
        (
            "an ALLOW with an unknown source field",
            "back",
            "  selector: {matchLabels: {app: api}}\n  rules:\n  - from: [{source: {namespaces: [front], principalz: [\"x\"]}}]\n",
            "allow policies exist, but none allowed (checked back/adversarial",
        ),
        (
            "a DENY on paths only, enforced at L4",
            "back",
            "  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n",
            "explicitly denied by: back/adversarial",
        ),
        (
            "an unknown action",
            "back",
            "  selector: {matchLabels: {app: api}}\n  action: ALOW\n  rules: [{}]\n",
            "explicitly denied by: back/adversarial",
        ),
        (
            "a root-namespace DENY selecting back/api",
            "istio-system",
            "  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [front]}}]}]\n",
            "explicitly denied by: istio-system/adversarial",
        ),
    ];
    for (what, ns, spec, reason) in cases {
        // Back to allowed (the same policy file, replaced).
        t.hold_manifest("adversarial-istio-system", "");
        t.hold_manifest("adversarial", &policy("back", ALLOW_ALL));
        t.eventually(&format!("allowed before {what}"), || {
            status(&t, url) == "200" && check(&t, "back/api", "8080", None) == "ALLOW"
        });
        let file = if ns == "back" {
            "adversarial"
        } else {
            "adversarial-istio-system"
        };
        let (from1, from2) = (t.log_len("ztunnel-1"), t.log_len("ztunnel-2"));
        t.hold_manifest(file, &policy(ns, spec));
        // Denied, as the destination's own record says: ztunnel-2 refused this client, for
        // this policy. Every try is a new request: one that failed for another reason (in
        // flight when the policy arrived, closed by the re-check of open connections)
        // proves nothing, and nothing else would make the request to be refused.
        t.eventually(
            &format!("{what} to deny the client, named by ztunnel-2"),
            || {
                status(&t, url) == "000"
                    && logged_from(&t.log_since("ztunnel-2", from2), &client_ip, reason)
            },
        );
        // Closed after the tunnel was set up (52/56), not refused (7) or timed out (28).
        let exit = t.curl_exit("front/client", url);
        assert!(
            exit == 52 || exit == 56,
            "{what}: closed by the destination, curl exit {exit}"
        );
        // And the source side did not refuse it itself.
        let zt1 = t.log_since("ztunnel-1", from1);
        assert!(
            !zt1.contains("IDENTITY_ERROR") && !zt1.contains("not (yet) known"),
            "{what}: refused at the source, not by policy:\n{zt1}"
        );
        assert_eq!(
            check(&t, "back/api", "8080", None),
            "DENY",
            "meshctl agrees with ztunnel on {what}"
        );
        assert_eq!(status(&t, url), "000", "{what}: still denied");
    }
    // The unknown field and the unknown action are reported with their object and field.
    t.hold_manifest(
        "adversarial",
        &policy(
            "back",
            "  selector: {matchLabels: {app: api}}\n  rules:\n  - from: [{source: {namespaces: [front], principalz: [\"x\"]}}]\n",
        ),
    );
    t.eventually("the finding in meshctl status", || {
        t.meshctl(&["status"]).contains(
            "AuthorizationPolicy back/adversarial: spec.rules[0].from[0].source.principalz",
        )
    });
    assert!(
        t.log("control").contains(
            "AuthorizationPolicy back/adversarial: spec.rules[0].from[0].source.principalz"
        ),
        "and in the control log"
    );
}

/// The waypoint for `back`.
fn waypoint() -> String {
    join(&[WAYPOINT_GATEWAY, BACK_USES_WAYPOINT])
}

fn waypoint_policy(spec: &str) -> String {
    policy(
        "back",
        &format!(
            "  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n{spec}"
        ),
    )
}

/// At the waypoint: an ALLOW it cannot evaluate (the invalid ipBlocks CIDR)
/// allows nothing, and a DENY with an unreadable source denies what its readable parts
/// match. Before this change the waypoint NACKed both and had neither: everything got
/// through. meshctl answers as the waypoint does.
#[test]
fn at_the_waypoint_unreadable_policies_never_widen_access() {
    let mut t = up();
    t.apply(&app());
    t.apply(&waypoint());
    let root = "http://10.96.0.20/";
    let admin = "http://10.96.0.20/admin/users";
    t.hold_manifest("adversarial", &waypoint_policy("  rules: [{}]\n"));
    t.eventually("the waypoint in the path", || {
        status(&t, root) == "200" && t.log("pod:back/waypoint").contains("backend=back/api")
    });

    // ALLOW with an invalid CIDR: nothing is allowed.
    t.hold_manifest(
        "adversarial",
        &waypoint_policy("  rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/40\"]}}]}]\n"),
    );
    t.eventually("the unreadable ALLOW to allow nothing", || {
        status(&t, root) == "403"
    });
    assert_eq!(check(&t, "back/api", "80", Some("/")), "DENY");

    // Back to allowed.
    t.hold_manifest("adversarial", &waypoint_policy("  rules: [{}]\n"));
    t.eventually("allowed again", || status(&t, admin) == "200");
    assert_eq!(check(&t, "back/api", "80", Some("/admin/users")), "ALLOW");

    // DENY /admin* from an unreadable source, and from an unknown source field: /admin
    // is denied to everyone, the rest still served.
    for (what, from) in [
        ("an invalid CIDR", "{ipBlocks: [\"10.0.0.0/40\"]}"),
        ("an unknown field", "{namespaces: [front], notAField: [x]}"),
    ] {
        t.hold_manifest(
            "adversarial",
            &waypoint_policy(&format!(
                "  action: DENY\n  rules: [{{from: [{{source: {from}}}], to: [{{operation: {{paths: [\"/admin*\"]}}}}]}}]\n"
            )),
        );
        t.eventually(&format!("the DENY with {what} to deny /admin"), || {
            status(&t, admin) == "403"
        });
        assert_eq!(status(&t, root), "200", "{what}: the rest is served");
        assert_eq!(
            check(&t, "back/api", "80", Some("/admin/users")),
            "DENY",
            "{what}"
        );
        assert_eq!(check(&t, "back/api", "80", Some("/")), "ALLOW", "{what}");
        // The same resource written otherwise: the waypoint normalises before policy,
        // and meshctl normalises as it does, so both still deny (or refuse with 400).
        for path in [
            "/%61dmin/users",
            "/x/../admin/users",
            "/./admin/users",
            "/%zz/admin",
        ] {
            let status = status(&t, &format!("http://10.96.0.20{path}"));
            assert!(
                status == "403" || status == "400",
                "{what}: {path} got {status}"
            );
            assert_eq!(
                check(&t, "back/api", "80", Some(path)),
                "DENY",
                "{what}: {path}"
            );
        }
        t.hold_manifest("adversarial", &waypoint_policy("  rules: [{}]\n"));
        t.eventually("allowed again", || status(&t, admin) == "200");
    }
}
