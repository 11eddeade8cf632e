//! Resource dispatch by type URL: a client lists, per type it subscribes to, how one
//! resource of it is applied to its state and how one is removed; the registry walks a
//! response and gathers what was rejected (those are NACKed). Pure: no I/O, no locks.

use mesh_proto::discovery::DeltaDiscoveryResponse;

/// Applies one resource (its name and encoded body) to the state `S`; `Err` rejects it
/// with a reason worded for the control plane's operator.
pub type ApplyFn<S> = fn(&mut S, &str, &[u8]) -> Result<(), String>;
/// Removes one resource, by name, from the state `S`.
pub type RemoveFn<S> = fn(&mut S, &str);
/// Applies a resource that came without a body, by name, the way an undecodable one is
/// (e.g. a policy enforced fail closed); returns why it is rejected.
pub type BodylessFn<S> = fn(&mut S, &str) -> String;

struct Kind<S> {
    type_url: &'static str,
    apply: ApplyFn<S>,
    remove: RemoveFn<S>,
    bodyless: Option<BodylessFn<S>>,
}

/// The resource types one client subscribes to, each with its handlers.
pub struct Registry<S> {
    kinds: Vec<Kind<S>>,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry { kinds: Vec::new() }
    }
}

impl<S> Registry<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a type; the order of addition is the order of subscription.
    ///
    /// # Panics
    /// If the type was already added (a programming error).
    pub fn with(self, type_url: &'static str, apply: ApplyFn<S>, remove: RemoveFn<S>) -> Self {
        self.add(type_url, apply, remove, None)
    }

    /// Adds a type whose resources must not simply be skipped when they come without a
    /// body (a policy left out could widen access): `bodyless` applies them by name.
    ///
    /// # Panics
    /// If the type was already added (a programming error).
    pub fn with_fail_closed(
        self,
        type_url: &'static str,
        apply: ApplyFn<S>,
        remove: RemoveFn<S>,
        bodyless: BodylessFn<S>,
    ) -> Self {
        self.add(type_url, apply, remove, Some(bodyless))
    }

    fn add(
        mut self,
        type_url: &'static str,
        apply: ApplyFn<S>,
        remove: RemoveFn<S>,
        bodyless: Option<BodylessFn<S>>,
    ) -> Self {
        assert!(
            !self.knows(type_url),
            "{type_url} registered twice in one xDS registry"
        );
        self.kinds.push(Kind {
            type_url,
            apply,
            remove,
            bodyless,
        });
        self
    }

    /// The types to subscribe to, in order.
    pub fn types(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.type_url).collect()
    }

    pub fn knows(&self, type_url: &str) -> bool {
        self.kinds.iter().any(|k| k.type_url == type_url)
    }

    /// Applies `resp` to `state`: each resource through its type's handler, then each
    /// removal. Returns `(resource name, reason)` for each rejected resource: one whose
    /// body is missing (applied by name first where its type says so), one its handler
    /// refused, every one of a type not registered.
    pub fn apply(&self, state: &mut S, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let kind = self.kinds.iter().find(|k| k.type_url == resp.type_url);
        let mut rejected = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                let why = match kind.and_then(|k| k.bodyless) {
                    Some(bodyless) => bodyless(state, &r.name),
                    None => "resource body missing".to_string(),
                };
                rejected.push((r.name.clone(), why));
                continue;
            };
            let applied = match kind {
                Some(k) => (k.apply)(state, &r.name, &any.value),
                None => Err(format!("unexpected type {}", resp.type_url)),
            };
            if let Err(e) = applied {
                rejected.push((r.name.clone(), e));
            }
        }
        if let Some(k) = kind {
            for name in &resp.removed_resources {
                (k.remove)(state, name);
            }
        }
        rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::discovery::Resource;
    use std::collections::BTreeMap;

    /// Two kinds of resources as strings, kept apart.
    #[derive(Default, Debug, PartialEq)]
    struct Store {
        a: BTreeMap<String, String>,
        b: BTreeMap<String, String>,
    }

    fn text(body: &[u8]) -> Result<String, String> {
        let s = String::from_utf8(body.to_vec()).map_err(|_| "not UTF-8".to_string())?;
        if s.is_empty() {
            return Err("empty".into());
        }
        Ok(s)
    }

    fn registry() -> Registry<Store> {
        Registry::new()
            .with(
                "type/a",
                |s: &mut Store, name, body| {
                    s.a.insert(name.into(), text(body)?);
                    Ok(())
                },
                |s: &mut Store, name| {
                    s.a.remove(name);
                },
            )
            .with(
                "type/b",
                |s: &mut Store, name, body| {
                    s.b.insert(name.into(), text(body)?);
                    Ok(())
                },
                |s: &mut Store, name| {
                    s.b.remove(name);
                },
            )
    }

    fn res(name: &str, body: Option<&[u8]>) -> Resource {
        Resource {
            name: name.into(),
            version: "1".into(),
            resource: body.map(|b| prost_types::Any {
                type_url: String::new(),
                value: b.to_vec(),
            }),
            ..Default::default()
        }
    }

    fn resp(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_type_goes_to_its_own_handlers() {
        let r = registry();
        assert_eq!(r.types(), vec!["type/a", "type/b"]);
        let mut s = Store::default();
        let rejected = r.apply(&mut s, &resp("type/a", vec![res("x", Some(b"1"))], &[]));
        assert!(rejected.is_empty());
        let rejected = r.apply(&mut s, &resp("type/b", vec![res("x", Some(b"2"))], &[]));
        assert!(rejected.is_empty());
        assert_eq!(s.a["x"], "1");
        assert_eq!(s.b["x"], "2");
        // A removal of b's "x" leaves a's "x".
        assert!(r.apply(&mut s, &resp("type/b", vec![], &["x"])).is_empty());
        assert_eq!(s.a.get("x").map(String::as_str), Some("1"));
        assert!(s.b.is_empty());
    }

    #[test]
    fn rejected_resources_are_named_with_their_reason_and_the_rest_applied() {
        let r = registry();
        let mut s = Store::default();
        let rejected = r.apply(
            &mut s,
            &resp(
                "type/a",
                vec![
                    res("good", Some(b"v")),
                    res("empty", Some(b"")),
                    res("bodiless", None),
                    res("good2", Some(b"w")),
                ],
                &[],
            ),
        );
        assert_eq!(
            rejected,
            vec![
                ("empty".to_string(), "empty".to_string()),
                ("bodiless".to_string(), "resource body missing".to_string()),
            ]
        );
        assert_eq!(s.a.keys().collect::<Vec<_>>(), ["good", "good2"]);
    }

    #[test]
    fn a_bodyless_resource_of_a_fail_closed_type_is_applied_by_name_and_rejected() {
        let r = registry().with_fail_closed(
            "type/policy",
            |s: &mut Store, name, body| {
                s.a.insert(name.into(), text(body)?);
                Ok(())
            },
            |s: &mut Store, name| {
                s.a.remove(name);
            },
            |s: &mut Store, name| {
                s.a.insert(name.into(), "deny all".into());
                "no body: denying all".into()
            },
        );
        let mut s = Store::default();
        let rejected = r.apply(
            &mut s,
            &resp(
                "type/policy",
                vec![res("p", None), res("q", Some(b"v"))],
                &[],
            ),
        );
        assert_eq!(
            rejected,
            vec![("p".to_string(), "no body: denying all".to_string())]
        );
        assert_eq!(s.a["p"], "deny all");
        assert_eq!(s.a["q"], "v");
        // Other types still skip a bodyless resource.
        let rejected = r.apply(&mut s, &resp("type/b", vec![res("p", None)], &[]));
        assert_eq!(rejected[0].1, "resource body missing");
        assert!(s.b.is_empty());
    }

    #[test]
    fn a_type_not_registered_is_rejected_whole_and_changes_nothing() {
        let r = registry();
        let mut s = Store::default();
        r.apply(&mut s, &resp("type/a", vec![res("x", Some(b"1"))], &[]));
        let rejected = r.apply(&mut s, &resp("type/c", vec![res("y", Some(b"1"))], &["x"]));
        assert_eq!(
            rejected,
            vec![("y".to_string(), "unexpected type type/c".to_string())]
        );
        assert_eq!(s.a["x"], "1", "a removal of another type removes nothing");
        assert!(!r.knows("type/c"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_type_registered_twice_is_a_bug() {
        let _ = registry().with("type/a", |_, _, _| Ok(()), |_, _| {});
    }
}
