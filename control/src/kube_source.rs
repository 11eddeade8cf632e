//! The Kubernetes source: one watcher per kind (list, then watch; kube's watcher re-lists
//! after a 410 Gone or a broken watch), every object fed through the same parser as the
//! directory source. A malformed object is reported and skipped; it never wipes the rest.
//! Optional kinds whose CRD is not installed (Gateway API, HTTPFault) count as empty; the
//! security kinds never do: they are read at `security.istio.io/v1`, else at `v1beta1`
//! (older Istio CRDs, same schema), and when the API server serves neither (CRD
//! missing), nothing is published and mesh-control stays not ready, because "cannot
//! read policies" is not "no policies".

use crate::manifest::Objects;
use crate::readiness::{Readiness, SourceState};
use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// (group, version, kind, plural) of everything the control plane reads.
pub const KINDS: [(&str, &str, &str, &str); 12] = [
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "Node", "nodes"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Service", "services"),
    ("", "v1", "ServiceAccount", "serviceaccounts"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
    (
        crate::k8s::MESH_GROUP,
        "v1alpha1",
        "HTTPFault",
        "httpfaults",
    ),
];

/// Kinds that must be read before anything is served: without them every workload would
/// be served without its policies (fail open).
pub fn required(group: &str) -> bool {
    group == "security.istio.io"
}

/// The versions tried for a kind, in order: the security kinds fall back to v1beta1,
/// which older Istio CRDs serve with the same schema.
pub fn versions(group: &str, version: &'static str) -> Vec<&'static str> {
    if required(group) && version == "v1" {
        vec!["v1", "v1beta1"]
    } else {
        vec![version]
    }
}

/// The dynamic API resource for a kind (also used to write waypoint objects).
pub(crate) fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// What has been read, each object parsed once, when it arrived: a change re-parses that
/// object only, and a publish copies typed objects (only the fields the index reads),
/// never JSON.
#[derive(Default)]
struct Store {
    objects: Objects,
    synced: BTreeMap<&'static str, bool>,
}

/// `o` parsed into `into` (as the directory source parses a document), with its
/// `managedFields` dropped before anything is copied: they are never read and weigh
/// most on a real cluster. Reported and false when it cannot be read.
fn parse_into(into: &mut Objects, mut o: DynamicObject, ar: &ApiResource) -> bool {
    o.metadata.managed_fields = None;
    let v = into_value(o, ar);
    match into.add_document(Path::new(&format!("kubernetes/{}", ar.kind)), 0, v) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "object skipped");
            false
        }
    }
}

/// (namespace, name) of an object.
fn key(o: &DynamicObject) -> (String, String) {
    (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

/// What is parsed of an object: its JSON without what is never read and weighs most on
/// a real cluster (`managedFields`, kubectl's last-applied copy of the whole object).
/// The object's body is moved, not copied.
fn into_value(o: DynamicObject, ar: &ApiResource) -> serde_json::Value {
    let metadata = serde_json::to_value(&o.metadata).unwrap_or_default();
    let mut v = match o.data {
        serde_json::Value::Object(_) => o.data,
        _ => serde_json::json!({}),
    };
    v["metadata"] = metadata;
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    // Items of a list carry no apiVersion/kind; the parser needs them.
    v["apiVersion"] = serde_json::Value::String(ar.api_version.clone());
    v["kind"] = serde_json::Value::String(ar.kind.clone());
    v
}

/// The resource to watch `kind` at: the first version the API server serves, or (for
/// a kind that is not required) its only version whatever the answer. None, with the
/// kind not ready, when a required kind is served at no version.
async fn served(
    client: &kube::Client,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    readiness: &Readiness,
) -> Option<ApiResource> {
    let tried = versions(group, version);
    if tried.len() == 1 && !required(group) {
        return Some(resource(group, version, kind, plural));
    }
    for v in &tried {
        let ar = resource(group, v, kind, plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list(&ListParams::default().limit(1)).await {
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            // Served (or failing otherwise: the watcher reports and retries).
            _ => {
                if *v != version {
                    tracing::warn!(
                        kind,
                        "reading {kind} at {} (the API server does not serve {group}/{version}); upgrade the Istio CRDs",
                        ar.api_version
                    );
                }
                return Some(ar);
            }
        }
    }
    let why = format!(
        "the API server does not serve {kind} at {} (404): install the Istio CRDs",
        tried
            .iter()
            .map(|v| format!("{group}/{v}"))
            .collect::<Vec<_>>()
            .join(" or ")
    );
    tracing::error!(kind, "{why}; not ready");
    readiness.set(kind, SourceState::Unavailable(why));
    None
}

/// Lists and watches one kind into the store until its version is no longer served.
async fn watch_kind(
    api: Api<DynamicObject>,
    ar: &ApiResource,
    group: &'static str,
    kind: &'static str,
    store: &Mutex<Store>,
    changed: &Notify,
    readiness: &Readiness,
) {
    // A (re-)list is parsed aside and replaces the kind's objects when complete.
    let mut buffer = Objects::default();
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => buffer = Objects::default(),
            Ok(Event::InitApply(o)) => {
                parse_into(&mut buffer, o, ar);
            }
            Ok(Event::InitDone) => {
                let mut st = store.lock().expect("store lock");
                st.objects.replace_kind(kind, std::mem::take(&mut buffer));
                st.synced.insert(kind, true);
                readiness.set(kind, SourceState::Synced);
                changed.notify_one();
            }
            Ok(Event::Apply(o)) => {
                let (ns, name) = key(&o);
                // Parsed before the lock is taken; one that cannot be read replaces
                // (removes) its previous version, as a re-list would.
                let mut one = Objects::default();
                let parsed = parse_into(&mut one, o, ar);
                let mut st = store.lock().expect("store lock");
                st.objects.remove(kind, &ns, &name);
                if parsed {
                    st.objects.absorb(one);
                }
                changed.notify_one();
            }
            Ok(Event::Delete(o)) => {
                let (ns, name) = key(&o);
                store
                    .lock()
                    .expect("store lock")
                    .objects
                    .remove(kind, &ns, &name);
                changed.notify_one();
            }
            Err(e) => {
                let mut st = store.lock().expect("store lock");
                let list_failed = matches!(&e, watcher::Error::InitialListFailed(_));
                let missing = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                let synced = st.synced.get(kind).copied().unwrap_or(false);
                if missing && required(group) {
                    // Kept: what was listed before (never wiped); the served
                    // version is looked for again.
                    tracing::error!(kind, api_version = %ar.api_version, "the API server no longer serves {kind} at this version");
                    return;
                } else if missing {
                    // The watcher keeps retrying: report the first time only.
                    if !synced {
                        tracing::warn!(
                            kind,
                            "the API server does not serve {kind} (CRD not installed?); treating it as empty"
                        );
                        st.synced.insert(kind, true);
                        changed.notify_one();
                    }
                    readiness.set(kind, SourceState::Synced);
                } else if list_failed {
                    tracing::warn!(kind, error = %e, "list failed; retrying");
                    readiness.set(
                        kind,
                        SourceState::Unavailable(format!("cannot list {kind}: {e}")),
                    );
                } else {
                    tracing::warn!(kind, error = %e, "watch failed; retrying");
                }
            }
        }
    }
}

/// Watches every kind and calls `publish` with the full set of objects after changes
/// (debounced), once every kind has been listed. Each kind's state goes to `readiness`.
pub async fn run(
    client: kube::Client,
    readiness: Readiness,
    publish: impl Fn(Arc<Objects>) + Send + Sync + 'static,
) {
    let store = Arc::new(Mutex::new(Store::default()));
    let changed = Arc::new(Notify::new());
    for (group, version, kind, plural) in KINDS {
        let (store, changed, readiness) = (store.clone(), changed.clone(), readiness.clone());
        readiness.set(kind, SourceState::Pending);
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                let Some(ar) = served(&client, group, version, kind, plural, &readiness).await
                else {
                    // Required and served at no version: not ready; look again.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                };
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                watch_kind(api, &ar, group, kind, &store, &changed, &readiness).await;
                // The version went away (a 404 on re-list): find the one served now.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    loop {
        changed.notified().await;
        // Debounce bursts (a re-list delivers many events at once).
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A copy of the typed objects (no parsing) is all that is done under the lock.
        let objects = {
            let st = store.lock().expect("store lock");
            if st.synced.len() < KINDS.len() {
                continue;
            }
            Arc::new(st.objects.clone())
        };
        publish(objects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_fields_and_last_applied_copies_are_not_kept() {
        let o: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "me"},
                         "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {}}]},
            "spec": {"nodeName": "node-1"},
        }))
        .unwrap();
        let v = into_value(o, &resource("", "v1", "Pod", "pods"));
        assert!(v["metadata"].get("managedFields").is_none(), "{v}");
        assert_eq!(
            v["metadata"]["annotations"],
            serde_json::json!({"keep": "me"})
        );
        assert_eq!(
            (v["apiVersion"].as_str(), v["kind"].as_str()),
            (Some("v1"), Some("Pod"))
        );
        assert_eq!(v["spec"]["nodeName"], "node-1");
    }

    /// Objects as a 1.28-1.33 API server lists them: managedFields, kubectl's
    /// last-applied copy, ownerReferences, dual-stack podIPs, a slice endpoint outside
    /// any pod, policies whose specs are read field by field.
    fn realistic() -> Vec<serde_json::Value> {
        let managed = serde_json::json!([{"manager": "kubectl-client-side-apply", "operation": "Update",
            "apiVersion": "v1", "time": "2026-11-01T10:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}, "f:spec": {"f:ports": {}}}}]);
        let last_applied = serde_json::json!({"kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}"});
        serde_json::json!([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "managedFields": managed,
             "labels": {"istio.io/dataplane-mode": "ambient"}}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "managedFields": managed,
             "labels": {"topology.kubernetes.io/zone": "eu-1a"}}, "status": {"images": [{"names": ["a"], "sizeBytes": 1}]}},
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "shop", "managedFields": managed}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-7d4b9-abcde", "namespace": "shop", "uid": "u-1",
              "labels": {"app": "web", "version": "v1"}, "annotations": last_applied, "managedFields": managed,
              "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9", "uid": "r", "controller": true}]},
             "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                      "containers": [{"name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                                      "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]},
             "status": {"phase": "Running", "podIP": "10.10.1.5", "podIPs": [{"ip": "10.10.1.5"}, {"ip": "fd00::5"}],
                        "hostIP": "172.18.0.2", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-01T10:00:00Z"}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop", "annotations": last_applied,
              "managedFields": managed},
             "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                      "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop", "managedFields": managed},
             "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "db-x1", "namespace": "shop",
              "labels": {"kubernetes.io/service-name": "db"}, "managedFields": managed},
             "addressType": "IPv4", "endpoints": [{"addresses": ["192.168.5.9"], "conditions": {"ready": true, "serving": true}}],
             "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]},
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "web", "namespace": "shop",
              "annotations": last_applied, "managedFields": managed},
             "spec": {"action": "ALLOW", "selector": {"matchLabels": {"app": "web"}},
                      "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
                                 "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}},
            {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "strict", "namespace": "shop",
              "managedFields": managed}, "spec": {"mtls": {"mode": "STRICT"}}},
        ])
        .as_array()
        .unwrap()
        .clone()
    }

    /// What the index computes never depends on what is dropped before parsing: the
    /// Kubernetes source's objects give the same resources as the full manifests do.
    #[test]
    fn the_index_of_trimmed_objects_is_the_index_of_the_full_objects() {
        let mut full = Objects::default();
        let mut trimmed = Objects::default();
        for (i, doc) in realistic().into_iter().enumerate() {
            full.add_document(Path::new("full.yaml"), i, doc.clone())
                .unwrap();
            let api_version = doc["apiVersion"].as_str().unwrap().to_string();
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
            let kind = doc["kind"].as_str().unwrap().to_string();
            let (.., plural) = KINDS.iter().find(|k| k.2 == kind).unwrap();
            let ar = resource(group, version, &kind, plural);
            let o: DynamicObject = serde_json::from_value(doc).unwrap();
            assert!(parse_into(&mut trimmed, o, &ar));
        }
        let cfg = crate::index::IndexConfig::default();
        let (a, b) = (
            crate::index::compute(&full, &cfg),
            crate::index::compute(&trimmed, &cfg),
        );
        assert!(
            a.addresses.len() >= 4 && !a.authorizations.is_empty(),
            "{a:?}"
        );
        assert_eq!(a, b);
    }

    /// Every kind read can be replaced (a re-list) and removed (a DELETED event).
    #[test]
    fn every_kind_read_can_be_replaced_and_removed() {
        for (group, version, kind, plural) in KINDS {
            let api_version = resource(group, version, kind, plural).api_version;
            let doc = serde_json::json!({"apiVersion": api_version, "kind": kind,
                                         "metadata": {"name": "x", "namespace": "shop"}});
            let mut one = Objects::default();
            one.add_document(Path::new("k"), 0, doc).unwrap();
            assert_ne!(one, Objects::default(), "{kind}");
            let mut store = Objects::default();
            store.replace_kind(kind, one.clone());
            assert_eq!(store, one, "{kind} replaced");
            store.remove(kind, "shop", "x");
            assert_eq!(store, Objects::default(), "{kind} removed");
            store.absorb(one.clone());
            assert_eq!(store, one, "{kind} absorbed");
            store.replace_kind(kind, Objects::default());
            assert_eq!(store, Objects::default(), "{kind} re-listed empty");
        }
    }

    #[test]
    fn only_the_security_kinds_fall_back_to_v1beta1() {
        assert_eq!(versions("security.istio.io", "v1"), ["v1", "v1beta1"]);
        assert_eq!(versions("gateway.networking.k8s.io", "v1"), ["v1"]);
        assert_eq!(versions("", "v1"), ["v1"]);
    }
}
