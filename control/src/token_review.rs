//! Kubernetes mode authentication: callers present a service-account token (ztunnel sends
//! its projected token, audience `istio-ca`), which the API server vouches for through a
//! TokenReview. The reviewed identity then maps to a principal:
//! - a node proxy service account (ztunnel, node agent) → the node its pod runs on, taken
//!   from the token's bound node (`authentication.kubernetes.io/node-name`) or else the
//!   bound pod's `spec.nodeName`;
//! - the service account of a waypoint Gateway (same namespace and name) → that waypoint.
//!
//! Positive reviews are cached briefly so a reconnect storm does not become a
//! TokenReview storm.

use crate::auth::Principal;
use crate::index::waypoint::WAYPOINT_CLASS;
use crate::manifest::Objects;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

pub struct TokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    /// `namespace/name` of the node proxies' service accounts.
    node_proxy_accounts: Vec<String>,
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        node_proxy_accounts: Vec<String>,
    ) -> Self {
        TokenReviewer {
            client,
            audiences,
            node_proxy_accounts,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn authenticate(&self, token: &str, objects: &Objects) -> Result<Principal, String> {
        if let Some((p, at)) = self.cache.lock().expect("cache lock").get(token)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(p.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed (is the API server reachable, and may mesh-control create tokenreviews?): {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        let p = principal_from_review(&status, objects, &self.node_proxy_accounts)?;
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (p.clone(), Instant::now()));
        Ok(p)
    }
}

/// Maps a TokenReview's verdict to who the caller is (pure: no I/O).
pub fn principal_from_review(
    status: &TokenReviewStatus,
    objects: &Objects,
    node_proxy_accounts: &[String],
) -> Result<Principal, String> {
    if status.authenticated != Some(true) {
        return Err(format!(
            "the API server rejected the token: {}",
            status.error.as_deref().unwrap_or("not authenticated")
        ));
    }
    let user = status
        .user
        .as_ref()
        .ok_or("the TokenReview names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| format!("{username} is not a service account"))?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    let account = format!("{ns}/{sa}");
    if node_proxy_accounts.contains(&account) {
        if let Some(node) = extra(NODE_NAME) {
            return Ok(Principal::Node(node));
        }
        let pod = extra(POD_NAME).ok_or_else(|| {
            format!("the token of {account} is not bound to a pod; use a projected service-account token")
        })?;
        let pod = objects
            .pods
            .get(&(ns.to_string(), pod.clone()))
            .ok_or_else(|| {
                format!("pod {ns}/{pod} (bound to the token of {account}) is not known")
            })?;
        return pod
            .spec
            .node_name
            .clone()
            .map(Principal::Node)
            .ok_or_else(|| format!("pod {ns}/{} is not scheduled on a node", pod.metadata.name));
    }
    let waypoint = objects
        .gateways
        .get(&(ns.to_string(), sa.to_string()))
        .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS);
    if waypoint {
        return Ok(Principal::Waypoint {
            namespace: ns.into(),
            name: sa.into(),
        });
    }
    Err(format!(
        "service account {account} is neither a node proxy ({}) nor a waypoint's",
        node_proxy_accounts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn objects() -> Objects {
        let mut o = Objects::default();
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-abc, namespace: mesh-system}\nspec: {nodeName: node-2}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n\
                    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: shop}\n\
                    spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n";
        for (i, doc) in yaml.split("---\n").enumerate() {
            let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            o.add_document(std::path::Path::new("t.yaml"), i, v)
                .unwrap();
        }
        o
    }

    fn status(user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn maps_reviews_to_principals() {
        let o = objects();
        let proxies = vec!["mesh-system/ztunnel".to_string()];
        let sa = "system:serviceaccount:mesh-system:ztunnel";
        assert_eq!(
            principal_from_review(&status(sa, &[(NODE_NAME, "node-1")]), &o, &proxies),
            Ok(Principal::Node("node-1".into()))
        );
        // Older API servers bind only the pod: its node comes from the pod.
        assert_eq!(
            principal_from_review(&status(sa, &[(POD_NAME, "ztunnel-abc")]), &o, &proxies),
            Ok(Principal::Node("node-2".into()))
        );
        let e = principal_from_review(&status(sa, &[]), &o, &proxies).unwrap_err();
        assert!(e.contains("not bound to a pod"), "{e}");
        let e =
            principal_from_review(&status(sa, &[(POD_NAME, "gone")]), &o, &proxies).unwrap_err();
        assert!(e.contains("not known"), "{e}");

        assert_eq!(
            principal_from_review(
                &status("system:serviceaccount:shop:waypoint", &[]),
                &o,
                &proxies
            ),
            Ok(Principal::Waypoint {
                namespace: "shop".into(),
                name: "waypoint".into()
            })
        );
        // A Gateway of another class, an ordinary workload, a user: refused.
        for who in [
            "system:serviceaccount:shop:ingress",
            "system:serviceaccount:shop:web",
            "alice",
        ] {
            assert!(
                principal_from_review(&status(who, &[]), &o, &proxies).is_err(),
                "{who}"
            );
        }
        let mut rejected = status(sa, &[(NODE_NAME, "node-1")]);
        rejected.authenticated = Some(false);
        rejected.error = Some("token has expired".into());
        let e = principal_from_review(&rejected, &o, &proxies).unwrap_err();
        assert!(e.contains("token has expired"), "{e}");
    }
}
