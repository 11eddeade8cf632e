//! Who is calling. Directory mode: each node (and each waypoint) has a bootstrap bearer
//! token, listed in a tokens file and sent as `authorization: Bearer <token>` in gRPC
//! metadata, exactly as an upstream ztunnel sends its service-account token.

use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A node's ztunnel or node agent.
    Node(String),
    /// A waypoint's instances.
    Waypoint { namespace: String, name: String },
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node(n) => write!(f, "node/{n}"),
            Principal::Waypoint { namespace, name } => write!(f, "waypoint/{namespace}/{name}"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    token: String,
    #[serde(default)]
    node: Option<String>,
    /// `namespace/name` of a waypoint Gateway.
    #[serde(default)]
    waypoint: Option<String>,
}

#[derive(Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Principal>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token in the `authorization` metadata")]
    Missing,
    #[error("the bearer token is not known to this control plane")]
    Unknown,
    #[error("{0}")]
    Rejected(String),
}

/// The bearer token of a gRPC request.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    let header = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing)?;
    Ok(header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::Missing)?
        .trim())
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let f: TokenFile = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        let mut by_token = HashMap::new();
        for (i, t) in f.tokens.into_iter().enumerate() {
            if t.token.len() < 16 {
                return Err(format!("tokens[{i}]: token is shorter than 16 characters"));
            }
            let p = match (t.node, t.waypoint) {
                (Some(n), None) => Principal::Node(n),
                (None, Some(w)) => {
                    let (ns, name) = w
                        .split_once('/')
                        .ok_or_else(|| format!("tokens[{i}]: waypoint must be namespace/name"))?;
                    Principal::Waypoint {
                        namespace: ns.into(),
                        name: name.into(),
                    }
                }
                _ => return Err(format!("tokens[{i}]: give exactly one of node or waypoint")),
            };
            if by_token.insert(t.token, p).is_some() {
                return Err(format!("tokens[{i}]: duplicate token"));
            }
        }
        Ok(Tokens { by_token })
    }

    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Principal, AuthError> {
        self.lookup(bearer(metadata)?).ok_or(AuthError::Unknown)
    }

    pub fn lookup(&self, token: &str) -> Option<Principal> {
        self.by_token.get(token).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_principals() {
        let t = Tokens::parse(
            "tokens:\n- {token: aaaaaaaaaaaaaaaa1, node: node-1}\n- {token: bbbbbbbbbbbbbbbb2, waypoint: shop/wp}\n",
        )
        .unwrap();
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(t.authenticate(&md), Err(AuthError::Missing));
        md.insert("authorization", "Bearer aaaaaaaaaaaaaaaa1".parse().unwrap());
        assert_eq!(t.authenticate(&md), Ok(Principal::Node("node-1".into())));
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(t.authenticate(&md), Err(AuthError::Unknown));
        assert!(Tokens::parse("tokens:\n- {token: short, node: n}\n").is_err());
        assert!(Tokens::parse("tokens:\n- {token: aaaaaaaaaaaaaaaa1}\n").is_err());
    }
}
