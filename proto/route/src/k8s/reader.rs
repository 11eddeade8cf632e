//! The reading shell every object reader shares: typed access to JSON with a problem
//! (and a finding) for whatever is not what the field needs.

use crate::{Finding, Severity, parse_duration};
use mesh_proto::waypoint as pb;
use serde_json::{Map, Value};

pub(crate) struct Reader {
    kind: &'static str,
    namespace: String,
    name: String,
    pub(crate) findings: Vec<Finding>,
}

impl Reader {
    pub(crate) fn new(kind: &'static str, namespace: &str, name: &str) -> Reader {
        Reader {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            findings: Vec::new(),
        }
    }

    pub(crate) fn finding(&mut self, severity: Severity, field: &str, message: String) {
        self.findings.push(Finding {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            severity,
            field: field.to_string(),
            message,
        });
    }

    /// A problem where it sits, and its finding.
    pub(crate) fn problem(
        &mut self,
        problems: &mut Vec<pb::Problem>,
        severity: Severity,
        field: &str,
        message: String,
    ) {
        problems.push(pb::Problem {
            field: field.to_string(),
            message: message.clone(),
        });
        self.finding(severity, field, message);
    }

    pub(crate) fn error(&mut self, problems: &mut Vec<pb::Problem>, field: &str, message: String) {
        self.problem(problems, Severity::Error, field, message);
    }

    /// An object whose keys are all in `known`; unknown keys are problems (what they
    /// would mean cannot be applied).
    pub(crate) fn object<'v>(
        &mut self,
        v: &'v Value,
        at: &str,
        known: &[&str],
        problems: &mut Vec<pb::Problem>,
    ) -> Option<&'v Map<String, Value>> {
        let Some(o) = v.as_object() else {
            self.error(problems, at, format!("must be an object, not {}", kind(v)));
            return None;
        };
        for k in o.keys().filter(|k| !known.contains(&k.as_str())) {
            self.error(
                problems,
                &format!("{at}.{k}"),
                format!(
                    "unknown field (this mesh reads: {}); what it would mean cannot be applied",
                    known.join(", ")
                ),
            );
        }
        Some(o)
    }

    /// A list (absent or null: empty).
    pub(crate) fn list<'v>(
        &mut self,
        o: &'v Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
    ) -> &'v [Value] {
        match o.get(key) {
            None | Some(Value::Null) => &[],
            Some(Value::Array(a)) => a,
            Some(v) => {
                self.error(
                    problems,
                    &format!("{at}.{key}"),
                    format!("must be a list, not {}", kind(v)),
                );
                &[]
            }
        }
    }

    /// An optional string (absent or null: None).
    pub(crate) fn string<'v>(
        &mut self,
        o: &'v Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
    ) -> Option<&'v str> {
        match o.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(v) => {
                self.error(
                    problems,
                    &format!("{at}.{key}"),
                    format!("must be a string, not {}", kind(v)),
                );
                None
            }
        }
    }

    /// An optional integer within `range`.
    pub(crate) fn int(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        at: &str,
        range: std::ops::RangeInclusive<u64>,
        problems: &mut Vec<pb::Problem>,
    ) -> Option<u64> {
        match o.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().filter(|n| range.contains(n)) {
                Some(n) => Some(n),
                None => {
                    self.error(
                        problems,
                        &format!("{at}.{key}"),
                        format!(
                            "{v} is not an integer from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    None
                }
            },
        }
    }

    pub(crate) fn duration_ms(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
    ) -> Option<u64> {
        let s = self.string(o, key, at, problems)?;
        match parse_duration(s) {
            Some(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => {
                self.error(
                    problems,
                    &format!("{at}.{key}"),
                    format!("{s:?} is not a duration like 2s, 150ms or 1m30s"),
                );
                None
            }
        }
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Anchored as the waypoint matches it.
pub(crate) fn check_regex(r: &str) -> Result<(), String> {
    regex_lite::Regex::new(&format!("^(?:{r})$"))
        .map(|_| ())
        .map_err(|e| format!("{r:?} is not a valid regular expression: {e}"))
}
