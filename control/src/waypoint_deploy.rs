//! Kubernetes mode: every Gateway of class `istio-waypoint` becomes a running waypoint: a
//! ServiceAccount named like the Gateway (the identity TokenReview maps back to it), a
//! ConfigMap with the mesh root (the waypoint must trust the control plane), a Deployment
//! of the `waypoint` binary and a Service on 15008; the Service's address is written to
//! the Gateway's `status.addresses`, which is how ztunnels find the waypoint. Everything
//! is owned by the Gateway, so deleting it deletes them (Kubernetes garbage collection).
//!
//! Objects are built by pure functions and written with server-side apply (field manager
//! `mesh-control`), so re-applying is idempotent and other managers' fields survive.

use crate::index::waypoint::WAYPOINT_CLASS;
use crate::k8s::Gateway;
use crate::kube_source::resource;
use crate::manifest::Objects;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use std::collections::HashMap;
use tokio::sync::watch;

pub const FIELD_MANAGER: &str = "mesh-control";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const ROOT_CONFIGMAP: &str = "mesh-ca-root";

/// (group, version, kind, plural) of what a waypoint is made of, in apply order; each is
/// written by server-side apply (`create` when missing, else `patch`), owned by its
/// Gateway with `blockOwnerDeletion` (see `crate::rbac`).
pub const OWNED: [(&str, &str, &str, &str); 4] = [
    ("", "v1", "ServiceAccount", "serviceaccounts"),
    ("", "v1", "ConfigMap", "configmaps"),
    ("apps", "v1", "Deployment", "deployments"),
    ("", "v1", "Service", "services"),
];
/// The Gateway whose status is written (`patch` on `gateways/status`).
pub const GATEWAY: (&str, &str, &str, &str) =
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways");

/// The owned kinds watched so that one deleted (or changed by hand) is put back: a
/// Deployment or Service gone means a waypoint down.
pub const WATCHED: [(&str, &str, &str, &str); 2] = [OWNED[2], OWNED[3]];
/// The label every owned object carries (`meta`), selecting them in watches.
pub const MANAGED_LABEL: (&str, &str) = ("gateway.istio.io/managed", "istio.io-mesh-controller");

/// On SIGTERM, how long a waypoint keeps accepting new connections (its readiness
/// failing) before it drains: Kubernetes removes a terminating pod's endpoints while it
/// signals it, not before, so ztunnels may still send new connections for a moment.
pub const DRAIN_DELAY_SECS: u64 = 5;
/// How long requests in flight may take to finish once the drain starts.
pub const DRAIN_DEADLINE_SECS: u64 = 20;
/// Beyond the delay and the deadline, before the kubelet's SIGKILL.
const GRACE_MARGIN_SECS: u64 = 5;

/// The waypoint's drain flags, as every waypoint Deployment (and the lab's waypoint
/// pods) runs it.
pub fn drain_args() -> [String; 2] {
    [
        format!("--drain-delay={DRAIN_DELAY_SECS}s"),
        format!("--drain-deadline={DRAIN_DEADLINE_SECS}s"),
    ]
}

/// What every waypoint Deployment is given.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WaypointDeployConfig {
    pub image: String,
    /// `https://mesh-control.<ns>.svc:15012`
    pub xds_address: String,
    pub trust_domain: String,
    pub cluster_id: String,
    pub log_level: String,
    /// Leader election among replicas: only the Lease's holder deploys. None: this is
    /// the only replica.
    pub lease: Option<crate::leader::LeaseConfig>,
}

fn owner(gw: &Gateway) -> Value {
    json!([{
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": gw.metadata.name,
        "uid": gw.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

fn meta(gw: &Gateway, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": gw.metadata.ns(),
        "labels": {
            GATEWAY_NAME_LABEL: gw.metadata.name,
            MANAGED_LABEL.0: MANAGED_LABEL.1,
            "istio.io/dataplane-mode": "none",
        },
        "ownerReferences": owner(gw),
    })
}

/// The objects a waypoint Gateway needs, in apply order, with their API resources.
pub fn desired_objects(
    gw: &Gateway,
    cfg: &WaypointDeployConfig,
    root_pem: &str,
) -> Vec<(ApiResource, Value)> {
    let name = gw.metadata.name.as_str();
    let selector = json!({ GATEWAY_NAME_LABEL: name });
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(gw, name)});
    let root = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta(gw, &format!("{name}-{ROOT_CONFIGMAP}")),
        "data": {"root-cert.pem": root_pem}});
    let args: Vec<String> = [
        format!("--name={name}"),
        format!("--namespace={}", gw.metadata.ns()),
        format!("--xds-address={}", cfg.xds_address),
        "--root-cert=/var/run/secrets/mesh/root-cert.pem".into(),
        "--token-file=/var/run/secrets/tokens/mesh-token".into(),
        format!("--trust-domain={}", cfg.trust_domain),
        format!("--cluster-id={}", cfg.cluster_id),
    ]
    .into_iter()
    .chain(drain_args())
    .collect();
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(gw, name),
        "spec": {
            "selector": {"matchLabels": selector},
            // A rollout never lowers capacity: the new pod is ready before an old one
            // leaves.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": {GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none"},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "15020"},
                },
                "spec": {
                    "serviceAccountName": name,
                    // The drain delay and deadline fit before the kubelet's SIGKILL.
                    "terminationGracePeriodSeconds":
                        DRAIN_DELAY_SECS + DRAIN_DEADLINE_SECS + GRACE_MARGIN_SECS,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "waypoint",
                        "image": cfg.image,
                        "command": ["/usr/local/bin/waypoint"],
                        "args": args,
                        "env": [{"name": "RUST_LOG", "value": cfg.log_level}],
                        "ports": [{"name": "hbone", "containerPort": 15008},
                                  {"name": "metrics", "containerPort": 15020},
                                  {"name": "status", "containerPort": 15021}],
                        // Ready once addresses, routes and policies have synced and it
                        // holds a certificate; not ready while draining.
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021},
                                           "periodSeconds": 5},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "mesh-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                            {"name": "mesh-root", "mountPath": "/var/run/secrets/mesh", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "mesh-token", "projected": {"sources": [{"serviceAccountToken":
                            {"path": "mesh-token", "audience": "istio-ca", "expirationSeconds": 43200}}]}},
                        {"name": "mesh-root", "configMap": {"name": format!("{name}-{ROOT_CONFIGMAP}")}},
                    ],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(gw, name),
        "spec": {
            "selector": selector,
            "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "appProtocol": "all"}],
        },
    });
    let [sa_kind, cm_kind, deploy_kind, svc_kind] = OWNED.map(|(g, v, k, p)| resource(g, v, k, p));
    vec![
        (sa_kind, sa),
        (cm_kind, root),
        (deploy_kind, deployment),
        (svc_kind, service),
    ]
}

/// A `metav1.Condition` for the Gateway's current generation. Its transition time is
/// kept while its status stays the same (the API's rule), else it is `now`.
fn condition(gw: &Gateway, type_: &str, ok: bool, reason: &str, message: &str, now: &str) -> Value {
    let status = if ok { "True" } else { "False" };
    let since = gw
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": gw.metadata.generation.unwrap_or(0),
    })
}

/// The Gateway status: `Accepted` (the class is ours and the Gateway is deployed) and
/// `Programmed` (its Service has an address, published in `status.addresses`, which is
/// how ztunnels find the waypoint), each for the Gateway's current generation.
/// `now` is an RFC 3339 time in seconds.
pub fn status_patch(gw: &Gateway, cluster_ip: Option<&str>, now: &str) -> Value {
    let accepted = condition(gw, "Accepted", true, "Accepted", "Resource accepted", now);
    let (programmed, addresses) = match cluster_ip {
        Some(ip) => (
            condition(
                gw,
                "Programmed",
                true,
                "Programmed",
                &format!(
                    "Resource programmed, assigned to service {}:15008",
                    gw.metadata.name
                ),
                now,
            ),
            json!([{"type": "IPAddress", "value": ip}]),
        ),
        None => (
            condition(
                gw,
                "Programmed",
                false,
                "AddressNotAssigned",
                &format!(
                    "Service {}/{} has no cluster IP yet",
                    gw.metadata.ns(),
                    gw.metadata.name
                ),
                now,
            ),
            json!([]),
        ),
    };
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": gw.metadata.name, "namespace": gw.metadata.ns()},
        "status": {"addresses": addresses, "conditions": [accepted, programmed]},
    })
}

/// Whether the Gateway's status already says what `status_patch` would (address and
/// both conditions True for its current generation).
pub fn status_is_current(gw: &Gateway, cluster_ip: &str) -> bool {
    let Some(st) = &gw.status else { return false };
    let current = |t: &str| {
        st.conditions.iter().any(|c| {
            c.type_ == t && c.status == "True" && c.observed_generation == gw.metadata.generation
        })
    };
    st.addresses.iter().any(|a| a.value == cluster_ip)
        && current("Accepted")
        && current("Programmed")
}

/// Now, as a Kubernetes timestamp (RFC 3339, whole seconds, UTC).
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn is_waypoint(gw: &Gateway) -> bool {
    gw.spec.gateway_class_name == WAYPOINT_CLASS && gw.metadata.deletion_timestamp.is_none()
}

/// Applies one Gateway's objects and publishes its address.
async fn reconcile_one(
    client: &kube::Client,
    gw: &Gateway,
    cfg: &WaypointDeployConfig,
    root_pem: &str,
) -> Result<(), String> {
    let ns = gw.metadata.ns();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut cluster_ip = None;
    for (ar, obj) in desired_objects(gw, cfg, root_pem) {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let applied = api
            .patch(&name, &params, &Patch::Apply(&obj))
            .await
            .map_err(|e| format!("{} {ns}/{name}: {e}", ar.kind))?;
        if ar.kind == "Service" {
            cluster_ip = applied.data["spec"]["clusterIP"]
                .as_str()
                .filter(|ip| !ip.is_empty() && *ip != "None")
                .map(str::to_string);
        }
    }
    if cluster_ip
        .as_deref()
        .is_some_and(|ip| status_is_current(gw, ip))
    {
        return Ok(());
    }
    let gws: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &resource(GATEWAY.0, GATEWAY.1, GATEWAY.2, GATEWAY.3),
    );
    gws.patch_status(
        &gw.metadata.name,
        &params,
        &Patch::Apply(status_patch(gw, cluster_ip.as_deref(), &now_rfc3339())),
    )
    .await
    .map_err(|e| format!("Gateway {ns}/{} status: {e}", gw.metadata.name))?;
    match cluster_ip {
        Some(ip) => {
            tracing::info!(gateway = %format!("{ns}/{}", gw.metadata.name), address = %ip, "waypoint programmed");
            Ok(())
        }
        None => Err(format!(
            "Service {ns}/{} has no cluster IP yet",
            gw.metadata.name
        )),
    }
}

/// The Gateway an owned object belongs to, from its labels.
pub fn owner_gateway(meta: &kube::api::ObjectMeta) -> Option<(String, String)> {
    let labels = meta.labels.as_ref()?;
    (labels.get(MANAGED_LABEL.0).map(String::as_str) == Some(MANAGED_LABEL.1)).then_some(())?;
    Some((
        meta.namespace.clone()?,
        labels.get(GATEWAY_NAME_LABEL)?.clone(),
    ))
}

/// Watches one owned kind; a deleted object sends its Gateway for repair.
async fn watch_owned(
    client: kube::Client,
    ar: ApiResource,
    repair: tokio::sync::mpsc::UnboundedSender<(String, String)>,
) {
    use futures_util::StreamExt;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::{self, Event};
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let config =
        watcher::Config::default().labels(&format!("{}={}", MANAGED_LABEL.0, MANAGED_LABEL.1));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Delete(o)) => {
                if let Some(gw) = owner_gateway(&o.metadata) {
                    tracing::warn!(kind = %ar.kind, gateway = %format!("{}/{}", gw.0, gw.1), "a waypoint's object was deleted; putting it back");
                    if repair.send(gw).is_err() {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(kind = %ar.kind, error = %e, "watching waypoint objects; retrying")
            }
        }
    }
}

/// Follows the object snapshots and keeps every waypoint Gateway deployed, while this
/// replica holds the Lease. A Gateway is re-applied when its spec, status or the root
/// changes, when one of its Deployment or Service is deleted, after a failure, and on
/// becoming leader.
pub async fn run(
    client: kube::Client,
    cfg: WaypointDeployConfig,
    mut objects: watch::Receiver<Option<std::sync::Arc<Objects>>>,
    root_pem: impl Fn() -> String + Send + 'static,
) {
    let (leader_tx, mut leader) = watch::channel(cfg.lease.is_none());
    let _sole = match cfg.lease.clone() {
        Some(lease) => {
            tokio::spawn(crate::leader::run(client.clone(), lease, leader_tx));
            None
        }
        None => Some(leader_tx), // kept: the only replica leads for good
    };
    let (repair_tx, mut repair) = tokio::sync::mpsc::unbounded_channel();
    for (g, v, k, p) in WATCHED {
        tokio::spawn(watch_owned(
            client.clone(),
            resource(g, v, k, p),
            repair_tx.clone(),
        ));
    }
    // Gateway → the fingerprint of what was last applied successfully.
    let mut applied: HashMap<(String, String), String> = HashMap::new();
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            changed = objects.changed() => if changed.is_err() { return },
            changed = leader.changed() => {
                if changed.is_err() { return }
                applied.clear(); // a new leader checks everything
            }
            Some(gw) = repair.recv() => { applied.remove(&gw); }
            _ = retry.tick() => {}
        }
        if !*leader.borrow() {
            continue;
        }
        let Some(snapshot) = objects.borrow().clone() else {
            continue;
        };
        let root = root_pem();
        for gw in snapshot.gateways.values().filter(|g| is_waypoint(g)) {
            let key = (gw.metadata.ns().to_string(), gw.metadata.name.clone());
            let fingerprint = format!(
                "{}|{}|{:?}|{root}",
                gw.metadata.uid.clone().unwrap_or_default(),
                serde_json::to_string(&gw.spec).unwrap_or_default(),
                gw.status
            );
            if applied.get(&key) == Some(&fingerprint) {
                continue;
            }
            // Leadership can be lost during a pass (a renewal stalled): stop writing then.
            if !*leader.borrow() {
                break;
            }
            match reconcile_one(&client, gw, &cfg, &root).await {
                Ok(()) => {
                    applied.insert(key, fingerprint);
                }
                Err(e) => tracing::warn!(error = %e, "waypoint not deployed yet; retrying"),
            }
        }
        applied.retain(|k, _| snapshot.gateways.contains_key(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Gateway {
        serde_json::from_value(json!({
            "metadata": {"name": "waypoint", "namespace": "shop", "uid": "gw-uid"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        }))
        .unwrap()
    }

    fn cfg() -> WaypointDeployConfig {
        WaypointDeployConfig {
            image: "registry.example.com/mesh:1".into(),
            xds_address: "https://mesh-control.mesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            log_level: "info".into(),
            lease: None,
        }
    }

    #[test]
    fn a_waypoint_gateway_becomes_four_owned_objects() {
        let objs = desired_objects(&gateway(), &cfg(), "ROOT");
        let kinds: Vec<_> = objs.iter().map(|(ar, _)| ar.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["ServiceAccount", "ConfigMap", "Deployment", "Service"]
        );
        for (_, o) in &objs {
            assert_eq!(o["metadata"]["namespace"], "shop");
            assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "gw-uid");
            assert_eq!(o["metadata"]["labels"][GATEWAY_NAME_LABEL], "waypoint");
        }
        let d = &objs[2].1["spec"]["template"]["spec"];
        // The identity TokenReview maps back to this waypoint.
        assert_eq!(d["serviceAccountName"], "waypoint");
        let args: Vec<_> = d["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"--name=waypoint") && args.contains(&"--namespace=shop"));
        let probe = &d["containers"][0]["readinessProbe"]["httpGet"];
        assert_eq!(
            (probe["path"].as_str(), probe["port"].as_u64()),
            (Some("/healthz/ready"), Some(15021))
        );
        assert_eq!(objs[1].1["data"]["root-cert.pem"], "ROOT");
        assert_eq!(objs[3].1["spec"]["ports"][0]["port"], 15008);
    }

    #[test]
    fn a_rollout_surges_and_the_old_pod_drains_before_it_is_killed() {
        let objs = desired_objects(&gateway(), &cfg(), "ROOT");
        let spec = &objs[2].1["spec"];
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        );
        let pod = &spec["template"]["spec"];
        let secs = |flag: &str| -> u64 {
            pod["containers"][0]["args"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|a| a.as_str()?.strip_prefix(flag)?.strip_suffix('s'))
                .unwrap_or_else(|| panic!("{flag} in the waypoint's args"))
                .parse()
                .unwrap()
        };
        let (delay, deadline) = (secs("--drain-delay="), secs("--drain-deadline="));
        assert!(
            delay > 0,
            "endpoints removal races SIGTERM: a drain delay covers it"
        );
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > delay + deadline,
            "SIGKILL ({grace}s) only after the drain delay ({delay}s) and deadline ({deadline}s)"
        );
        // Traffic only once ready (the waypoint is not ready while it drains).
        assert_eq!(
            pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/healthz/ready"
        );
    }

    #[test]
    fn status_has_the_gateway_api_conditions_for_the_current_generation() {
        let mut gw = gateway();
        gw.metadata.generation = Some(4);
        let now = "2026-11-29T10:00:00Z";
        let st = &status_patch(&gw, Some("10.96.0.50"), now)["status"];
        assert_eq!(
            st["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.50"}])
        );
        let conds = st["conditions"].as_array().unwrap();
        let types: Vec<_> = conds.iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["Accepted", "Programmed"]);
        for c in conds {
            assert_eq!(c["status"], "True");
            assert_eq!(c["reason"], c["type"]);
            assert_eq!(c["observedGeneration"], 4);
            assert_eq!(c["lastTransitionTime"], now);
        }
        // Not yet addressed: Programmed is False, with a reason Gateway API defines.
        let st = &status_patch(&gw, None, now)["status"];
        assert_eq!(st["conditions"][1]["status"], "False");
        assert_eq!(st["conditions"][1]["reason"], "AddressNotAssigned");
        assert_eq!(st["conditions"][0]["status"], "True");

        // Written: current. A new generation is not, and keeps the transition time of a
        // condition whose status did not change.
        let mut written: Gateway = gw.clone();
        written.status =
            serde_json::from_value(status_patch(&gw, Some("10.96.0.50"), now)["status"].clone())
                .unwrap();
        assert!(status_is_current(&written, "10.96.0.50"));
        assert!(!status_is_current(&written, "10.96.0.51"));
        written.metadata.generation = Some(5);
        assert!(!status_is_current(&written, "10.96.0.50"));
        let later = status_patch(&written, Some("10.96.0.50"), "2026-11-29T11:00:00Z");
        assert_eq!(later["status"]["conditions"][0]["lastTransitionTime"], now);
        assert_eq!(later["status"]["conditions"][0]["observedGeneration"], 5);
        let failed = status_patch(&written, None, "2026-11-29T11:00:00Z");
        assert_eq!(
            failed["status"]["conditions"][1]["lastTransitionTime"],
            "2026-11-29T11:00:00Z"
        );
        assert!(
            !status_is_current(&gateway(), "10.96.0.50"),
            "no status at all"
        );
    }

    #[test]
    fn only_live_waypoint_gateways_are_deployed() {
        let mut gw = gateway();
        assert!(is_waypoint(&gw));
        gw.metadata.deletion_timestamp = Some("2026-01-01T00:00:00Z".into());
        assert!(!is_waypoint(&gw));
        let mut ingress = gateway();
        ingress.spec.gateway_class_name = "istio".into();
        assert!(!is_waypoint(&ingress));
    }
}
