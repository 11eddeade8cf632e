//! Enrolment you can check: what the agent planned for a pod's network namespace (the
//! nftables scripts it applies), what it reads back from that namespace (`nft -j list
//! ruleset`), whether the two match, and the pod's enrolment state (pending, confirmed,
//! failed, with the reason) from those facts and ztunnel's ack. All pure; the agent does
//! the I/O.
//!
//! The comparison is structural: for each of our chains, its type, hook and policy, and
//! the ordered list of its rules' verdicts (accept, drop, reject, redirect to a port,
//! other). A missing or extra table, chain or rule, a rule moved, or a redirect to
//! another port is a mismatch; the match expressions of a rule are not compared (nft
//! rewrites them when listing).

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
    Redirect(u16),
    /// A rule that sets something (a mark) without deciding.
    Other,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Reject => f.write_str("reject"),
            Verdict::Redirect(p) => write!(f, "redirect to :{p}"),
            Verdict::Other => f.write_str("set"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub table: String,
    pub name: String,
    /// `type hook priority policy`, e.g. `nat output -100 accept` (priority as a number).
    pub base: String,
    pub rules: Vec<Verdict>,
    /// Each rule's `expr` as nft lists it (JSON; empty in a plan): the baseline taken
    /// after programming, which later read-backs must equal exactly.
    pub exprs: Vec<String>,
}

/// The chains an `inet` nftables script creates (the scripts of `rules` and `guard`:
/// `table inet T {`, `chain C {`, `type X hook H priority P; policy Y;`, one rule a
/// line, `}`).
pub fn planned(script: &str) -> Vec<Chain> {
    let mut out: Vec<Chain> = Vec::new();
    let mut table: Option<String> = None;
    let mut in_chain = false;
    for line in script.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table inet ") {
            table = rest.strip_suffix(" {").map(|t| t.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("chain ") {
            if let (Some(t), Some(name)) = (&table, rest.strip_suffix(" {")) {
                in_chain = true;
                out.push(Chain {
                    table: t.clone(),
                    name: name.trim().to_string(),
                    base: String::new(),
                    rules: vec![],
                    exprs: vec![],
                });
            }
        } else if line == "}" {
            if in_chain {
                in_chain = false;
            } else {
                table = None;
            }
        } else if in_chain && let Some(c) = out.last_mut() {
            if let Some(rest) = line.strip_prefix("type ") {
                let words: Vec<&str> = rest.split([' ', ';']).filter(|w| !w.is_empty()).collect();
                let after = |k: &str| {
                    words
                        .iter()
                        .position(|w| *w == k)
                        .and_then(|i| words.get(i + 1))
                        .copied()
                        .unwrap_or("")
                };
                c.base = format!(
                    "{} {} {} {}",
                    words.first().copied().unwrap_or(""),
                    after("hook"),
                    priority(after("priority")),
                    after("policy")
                );
            } else if !line.is_empty() {
                c.rules.push(verdict_of_line(line));
            }
        }
    }
    out
}

/// A chain priority as nft lists it: the standard names of the `inet` family as numbers.
fn priority(p: &str) -> String {
    let n = match p {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" => 100,
        other => return other.to_string(),
    };
    n.to_string()
}

fn verdict_of_line(rule: &str) -> Verdict {
    if let Some(i) = rule.find("redirect to :") {
        let port: String = rule[i + 13..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        return port
            .parse()
            .map(Verdict::Redirect)
            .unwrap_or(Verdict::Other);
    }
    let last = rule.split_whitespace().last().unwrap_or("");
    if rule.contains(" reject") || rule.starts_with("reject") {
        Verdict::Reject
    } else if last == "accept" {
        Verdict::Accept
    } else if last == "drop" {
        Verdict::Drop
    } else {
        Verdict::Other
    }
}

/// The chains of the `inet` tables named in `tables`, read from `nft -j list ruleset`
/// (JSON schema of nftables 0.9.3 and later). Other tables (the pod's own) are ignored.
pub fn read_back(json: &str, tables: &[&str]) -> Result<Vec<Chain>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("unexpected `nft -j` output: {e}"))?;
    let items = v["nftables"]
        .as_array()
        .ok_or("`nft -j` output has no nftables array")?;
    let ours = |o: &serde_json::Value| {
        o["family"] == "inet" && o["table"].as_str().is_some_and(|t| tables.contains(&t))
    };
    let ours_table = |t: &serde_json::Value| {
        t["family"] == "inet" && t["name"].as_str().is_some_and(|n| tables.contains(&n))
    };
    let mut out: Vec<Chain> = Vec::new();
    for item in items {
        if let Some(t) = item.get("table").filter(|t| ours_table(t)) {
            // Our tables have no flags. `dormant` disables every chain of the table; any
            // flag is a difference (nft 1.0.6 misprints the flags in JSON, so their
            // presence is what counts).
            if let Some(flags) = t.get("flags").filter(|f| !f.is_null()) {
                let name = t["name"].as_str().unwrap_or("");
                return Err(format!(
                    "table inet {name} has flags {flags} (planned none; `dormant` disables all its chains)"
                ));
            }
        } else if let Some(c) = item.get("chain").filter(|c| ours(c)) {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            let base = if c.get("hook").is_some() {
                let prio = c["prio"]
                    .as_i64()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| s("prio"));
                format!("{} {} {} {}", s("type"), s("hook"), prio, s("policy"))
            } else {
                String::new()
            };
            out.push(Chain {
                table: s("table"),
                name: s("name"),
                base,
                rules: vec![],
                exprs: vec![],
            });
        } else if let Some(r) = item.get("rule").filter(|r| ours(r)) {
            let (t, ch) = (r["table"].as_str(), r["chain"].as_str());
            let chain = out
                .iter_mut()
                .find(|c| Some(c.table.as_str()) == t && Some(c.name.as_str()) == ch)
                .ok_or("`nft -j` lists a rule before its chain")?;
            chain.rules.push(verdict_of_json(&r["expr"]));
            chain.exprs.push(r["expr"].to_string());
        }
    }
    Ok(out)
}

fn verdict_of_json(expr: &serde_json::Value) -> Verdict {
    let Some(last) = expr.as_array().and_then(|a| a.last()) else {
        return Verdict::Other;
    };
    if last.get("accept").is_some() {
        Verdict::Accept
    } else if last.get("drop").is_some() {
        Verdict::Drop
    } else if last.get("reject").is_some() {
        Verdict::Reject
    } else if let Some(r) = last.get("redirect") {
        r["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .map(Verdict::Redirect)
            .unwrap_or(Verdict::Other)
    } else {
        Verdict::Other
    }
}

/// The policy route for ztunnel's spoofed connections, from `ip rule show`: a rule at
/// our preference (an earlier rule would take those packets first) that sends conn-marked
/// replies to our table.
pub fn policy_route_present(ip_rules: &str) -> bool {
    use crate::rules::{CONN_MARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};
    let fwmark = format!("{CONN_MARK:#x}/{MARK_MASK:#x}");
    let table = ROUTE_TABLE.to_string();
    ip_rules.lines().any(|l| {
        let Some((pref, rest)) = l.trim().split_once(':') else {
            return false;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        pref.trim().parse::<u32>() == Ok(RULE_PRIORITY)
            && w == [
                "from",
                "all",
                "fwmark",
                fwmark.as_str(),
                "lookup",
                table.as_str(),
            ]
    })
}

/// Table 100's route that delivers everything locally (to ztunnel's transparent
/// socket), from `ip route show table 100`.
pub fn local_route_present(routes: &str) -> bool {
    routes.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.starts_with(&["local", "default", "dev", "lo"])
    })
}

/// `Ok` when every planned chain is there, as planned, and nothing else is in our
/// tables; otherwise the first difference, worded for the operator.
pub fn compare(planned: &[Chain], found: &[Chain]) -> Result<(), String> {
    for p in planned {
        let Some(f) = found
            .iter()
            .find(|f| f.table == p.table && f.name == p.name)
        else {
            return Err(if found.iter().any(|f| f.table == p.table) {
                format!("chain {} of table inet {} is missing", p.name, p.table)
            } else {
                format!("table inet {} is missing", p.table)
            });
        };
        if f.base != p.base {
            return Err(format!(
                "chain {} of table inet {} is `{}`, planned `{}`",
                p.name, p.table, f.base, p.base
            ));
        }
        if let Some(i) =
            (0..p.rules.len().max(f.rules.len())).find(|&i| p.rules.get(i) != f.rules.get(i))
        {
            let show = |v: Option<&Verdict>| v.map(|v| v.to_string()).unwrap_or("none".into());
            return Err(format!(
                "rule {} of chain {} in table inet {}: found {}, planned {} ({} rules found, {} planned)",
                i + 1,
                p.name,
                p.table,
                show(f.rules.get(i)),
                show(p.rules.get(i)),
                f.rules.len(),
                p.rules.len()
            ));
        }
    }
    if let Some(extra) = found.iter().find(|f| {
        !planned
            .iter()
            .any(|p| p.table == f.table && p.name == f.name)
    }) {
        return Err(format!(
            "unplanned chain {} in table inet {}",
            extra.name, extra.table
        ));
    }
    Ok(())
}

/// `Ok` when every rule of `found` is exactly (match expressions included) what the
/// baseline read back after programming listed. The plan only fixes verdicts; this
/// catches a rule rewritten behind the agent's back with the same verdict (a redirect
/// narrowed to one port). Same nft both times, so no false differences.
pub fn compare_baseline(baseline: &[Chain], found: &[Chain]) -> Result<(), String> {
    for f in found {
        let Some(b) = baseline
            .iter()
            .find(|b| b.table == f.table && b.name == f.name)
        else {
            return Err(format!(
                "chain {} of table inet {} was not there when the pod was programmed",
                f.name, f.table
            ));
        };
        if let Some(i) =
            (0..b.exprs.len().max(f.exprs.len())).find(|&i| b.exprs.get(i) != f.exprs.get(i))
        {
            return Err(format!(
                "rule {} of chain {} in table inet {} changed since the pod was programmed: now {}",
                i + 1,
                f.name,
                f.table,
                f.exprs.get(i).map(String::as_str).unwrap_or("none")
            ));
        }
    }
    if let Some(gone) = baseline
        .iter()
        .find(|b| !found.iter().any(|f| f.table == b.table && f.name == b.name))
    {
        return Err(format!(
            "chain {} of table inet {} is missing",
            gone.name, gone.table
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Confirmed,
    Failed,
}

impl State {
    pub const ALL: [State; 3] = [State::Pending, State::Confirmed, State::Failed];

    pub fn label(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Confirmed => "confirmed",
            State::Failed => "failed",
        }
    }
}

/// What the agent knows about an enrolled pod.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub netns_known: bool,
    /// Why the namespace found for the pod was refused.
    pub refused: Option<String>,
    /// The last attempt to program the rules failed.
    pub apply_error: Option<String>,
    /// Rules applied for the pod's current namespace.
    pub programmed: bool,
    /// The last read-back: `None` not read yet, `Some(Err)` the difference.
    pub read_back: Option<Result<(), String>>,
    /// ztunnel acknowledged the pod.
    pub acked: bool,
}

/// An enrolled pod's state and, unless confirmed, why.
pub fn state(f: &Facts) -> (State, Option<String>) {
    let failed = |r: String| (State::Failed, Some(r));
    let pending = |r: &str| (State::Pending, Some(r.to_string()));
    if let Some(r) = &f.refused {
        return failed(format!("network namespace refused: {r}"));
    }
    if let Some(e) = &f.apply_error {
        return failed(format!("cannot program the redirection: {e}"));
    }
    if !f.netns_known {
        return pending("its network namespace is not known yet");
    }
    if !f.programmed {
        return pending("redirection not programmed yet");
    }
    match &f.read_back {
        None => pending("redirection not read back yet"),
        Some(Err(e)) => failed(format!(
            "the redirection read back from the pod differs from the plan: {e}"
        )),
        Some(Ok(())) if !f.acked => pending("ztunnel has not acknowledged the pod"),
        Some(Ok(())) => (State::Confirmed, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{PodRuleOptions, TABLES};

    /// What nftables 1.0.6 lists after applying `pod_ruleset(default)` and the guard
    /// (abridged: match expressions shortened, handles kept).
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "app-own", "handle": 1}},
 {"chain": {"family": "inet", "table": "app-own", "name": "x", "handle": 1}},
 {"rule": {"family": "inet", "table": "app-own", "chain": "x", "handle": 2, "expr": [{"drop": null}]}},
 {"table": {"family": "inet", "name": "ambient-mangle", "handle": 3}},
 {"chain": {"family": "inet", "table": "ambient-mangle", "name": "prerouting", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "ambient-mangle", "name": "output", "handle": 2, "type": "route", "hook": "output", "prio": -150, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "ambient-mangle", "chain": "prerouting", "handle": 3, "expr": [{"match": {}}, {"mangle": {}}]}},
 {"rule": {"family": "inet", "table": "ambient-mangle", "chain": "output", "handle": 4, "expr": [{"match": {}}, {"mangle": {}}]}},
 {"table": {"family": "inet", "name": "ambient-nat", "handle": 4}},
 {"chain": {"family": "inet", "table": "ambient-nat", "name": "prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "ambient-nat", "name": "output", "handle": 2, "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "prerouting", "handle": 3, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "prerouting", "handle": 4, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "prerouting", "handle": 5, "expr": [{"match": {}}, {"redirect": {"port": 15006}}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "prerouting", "handle": 6, "expr": [{"match": {}}, {"redirect": {"port": 15006}}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 7, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 8, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 9, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 10, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 11, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 12, "expr": [{"redirect": {"port": 15001}}]}},
 {"rule": {"family": "inet", "table": "ambient-nat", "chain": "output", "handle": 13, "expr": [{"redirect": {"port": 15001}}]}},
 {"table": {"family": "inet", "name": "ambient-guard", "handle": 5}},
 {"chain": {"family": "inet", "table": "ambient-guard", "name": "output", "handle": 1, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "ambient-guard", "name": "input", "handle": 2, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "output", "handle": 3, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "output", "handle": 4, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "output", "handle": 5, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "output", "handle": 6, "expr": [{"match": {}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "output", "handle": 7, "expr": [{"match": {}}, {"reject": {"type": "tcp reset"}}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 8, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 9, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 10, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 11, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 12, "expr": [{"match": {}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 13, "expr": [{"match": {}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "ambient-guard", "chain": "input", "handle": 14, "expr": [{"match": {}}, {"reject": {"type": "tcp reset"}}]}}
]}"#;

    fn ours() -> Vec<&'static str> {
        let mut t = TABLES.to_vec();
        t.push(crate::agent::guard::TABLE);
        t
    }

    fn plan(opts: &PodRuleOptions) -> Vec<Chain> {
        planned(&crate::agent::nft_script(opts))
    }

    #[test]
    fn the_plan_is_read_from_the_scripts() {
        let p = plan(&PodRuleOptions::default());
        let names: Vec<String> = p
            .iter()
            .map(|c| format!("{} {}", c.table, c.name))
            .collect();
        assert_eq!(
            names,
            [
                "ambient-guard output",
                "ambient-guard input",
                "ambient-mangle prerouting",
                "ambient-mangle output",
                "ambient-nat prerouting",
                "ambient-nat output"
            ]
        );
        let nat_out = &p[5];
        assert_eq!(nat_out.base, "nat output -100 accept");
        assert_eq!(nat_out.rules.last(), Some(&Verdict::Redirect(15001)));
        assert_eq!(p[0].rules.last(), Some(&Verdict::Reject));
        assert_eq!(p[1].base, "filter input 0 accept");
        assert_eq!(p[2].rules, vec![Verdict::Other]);
        assert_eq!(p[2].base, "filter prerouting -150 accept");
    }

    #[test]
    fn what_nft_lists_matches_the_plan() {
        let found = read_back(LISTED, &ours()).unwrap();
        assert_eq!(compare(&plan(&PodRuleOptions::default()), &found), Ok(()));
        // The pod's own table is not ours and not compared.
        assert!(found.iter().all(|c| c.table != "app-own"));
    }

    #[test]
    fn differences_are_found_and_named() {
        let p = plan(&PodRuleOptions::default());
        let found = read_back(LISTED, &ours()).unwrap();
        // A table deleted behind the agent's back.
        let gone: Vec<Chain> = found
            .iter()
            .filter(|c| c.table != "ambient-nat")
            .cloned()
            .collect();
        assert_eq!(
            compare(&p, &gone).unwrap_err(),
            "table inet ambient-nat is missing"
        );
        // A chain flushed.
        let mut flushed = found.clone();
        flushed[3].rules.clear();
        let e = compare(&p, &flushed).unwrap_err();
        assert!(
            e.contains("rule 1 of chain output in table inet ambient-nat"),
            "{e}"
        );
        assert!(e.contains("found none"), "{e}");
        // An accept-everything rule inserted before the redirects.
        let mut bypass = found.clone();
        bypass[3].rules.insert(0, Verdict::Accept);
        assert!(compare(&p, &bypass).is_err());
        // A redirect to another port.
        let mut elsewhere = found.clone();
        *elsewhere[3].rules.last_mut().unwrap() = Verdict::Redirect(15002);
        assert!(
            compare(&p, &elsewhere)
                .unwrap_err()
                .contains("redirect to :15002")
        );
        // A chain's policy changed.
        let mut policy = found.clone();
        policy[4].base = "filter output drop".into();
        assert!(
            compare(&p, &policy)
                .unwrap_err()
                .contains("planned `filter output 0 accept`")
        );
        // An extra chain in one of our tables.
        let mut extra = found.clone();
        extra.push(Chain {
            table: "ambient-nat".into(),
            name: "sneaky".into(),
            base: String::new(),
            rules: vec![],
            exprs: vec![],
        });
        assert!(
            compare(&p, &extra)
                .unwrap_err()
                .contains("unplanned chain sneaky")
        );
        // Other options make another plan: DNS capture adds redirects to 15053.
        let dns = plan(&PodRuleOptions {
            dns_capture: true,
            ..Default::default()
        });
        assert!(compare(&dns, &found).is_err());
        assert!(read_back("{}", &ours()).is_err());
    }

    #[test]
    fn a_dormant_table_or_another_priority_is_a_difference() {
        let p = plan(&PodRuleOptions::default());
        // `nft add table inet ambient-nat '{ flags dormant; }'` (nft 1.0.6 misprints the
        // flags' value in JSON; newer versions print the name).
        for flags in [r#""Lester Gooch #5""#, r#""dormant""#, r#"["dormant"]"#] {
            let dormant = LISTED.replace(
                r#""name": "ambient-nat", "handle": 4}"#,
                &format!(r#""name": "ambient-nat", "handle": 4, "flags": {flags}}}"#),
            );
            assert_ne!(dormant, LISTED);
            let e = read_back(&dormant, &ours()).unwrap_err();
            assert!(e.contains("table inet ambient-nat has flags"), "{e}");
        }
        // A capture chain moved after the guard's filter (another priority).
        let late = LISTED.replace(
            r#""name": "output", "handle": 2, "type": "nat", "hook": "output", "prio": -100"#,
            r#""name": "output", "handle": 2, "type": "nat", "hook": "output", "prio": 10"#,
        );
        assert_ne!(late, LISTED);
        let e = compare(&p, &read_back(&late, &ours()).unwrap()).unwrap_err();
        assert!(
            e.contains("`nat output 10 accept`, planned `nat output -100 accept`"),
            "{e}"
        );
    }

    #[test]
    fn later_read_backs_must_equal_the_baseline_exactly() {
        let baseline = read_back(LISTED, &ours()).unwrap();
        assert_eq!(compare_baseline(&baseline, &baseline), Ok(()));
        // Handles are not compared: the same rules re-listed with other handles match.
        let renumbered = LISTED.replace(r#""handle": 12,"#, r#""handle": 99,"#);
        assert_ne!(renumbered, LISTED);
        let again = read_back(&renumbered, &ours()).unwrap();
        assert_eq!(compare_baseline(&baseline, &again), Ok(()));
        // The same verdict with another match passes the plan, not the baseline.
        let narrowed = LISTED.replace(
            r#""handle": 12, "expr": [{"redirect": {"port": 15001}}]"#,
            r#""handle": 12, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1}}, {"redirect": {"port": 15001}}]"#,
        );
        assert_ne!(narrowed, LISTED);
        let found = read_back(&narrowed, &ours()).unwrap();
        assert_eq!(compare(&plan(&PodRuleOptions::default()), &found), Ok(()));
        let e = compare_baseline(&baseline, &found).unwrap_err();
        assert!(
            e.starts_with("rule 6 of chain output in table inet ambient-nat changed"),
            "{e}"
        );
        let fewer: Vec<Chain> = baseline[1..].to_vec();
        assert!(
            compare_baseline(&baseline, &fewer)
                .unwrap_err()
                .contains("is missing")
        );
    }

    #[test]
    fn policy_rule_and_local_route_are_parsed() {
        let rules = "0:\tfrom all lookup local\n32764:\tfrom all fwmark 0x111/0xfff lookup 100\n32766:\tfrom all lookup main\n";
        assert!(policy_route_present(rules));
        // Another preference, mark or table is not our rule.
        assert!(!policy_route_present(&rules.replace("32764:", "32767:")));
        assert!(!policy_route_present(
            &rules.replace("0x111/0xfff", "0x111/0xff")
        ));
        assert!(!policy_route_present(
            &rules.replace("lookup 100", "lookup 1000")
        ));
        assert!(!policy_route_present(
            &rules.replace("from all fwmark", "from 10.0.0.1 fwmark")
        ));
        assert!(!policy_route_present(
            "0:\tfrom all lookup local\n32766:\tfrom all lookup main\n# 32764: from all fwmark 0x111/0xfff lookup 100"
        ));
        assert!(local_route_present("local default dev lo scope host \n"));
        assert!(local_route_present(
            "local default dev lo metric 1024 pref medium\n"
        ));
        assert!(!local_route_present(""));
        assert!(!local_route_present("local 10.0.0.0/8 dev lo scope host\n"));
    }

    #[test]
    fn state_from_facts() {
        let ok = Facts {
            netns_known: true,
            programmed: true,
            read_back: Some(Ok(())),
            acked: true,
            ..Default::default()
        };
        assert_eq!(state(&ok), (State::Confirmed, None));
        let (s, r) = state(&Facts {
            acked: false,
            ..ok.clone()
        });
        assert_eq!(s, State::Pending);
        assert!(r.unwrap().contains("ztunnel has not acknowledged"));
        let (s, r) = state(&Facts {
            read_back: Some(Err("table inet ambient-nat is missing".into())),
            ..ok.clone()
        });
        assert_eq!(s, State::Failed);
        assert!(r.unwrap().ends_with("table inet ambient-nat is missing"));
        // A failed read-back fails the pod even when ztunnel acked it.
        assert_eq!(
            state(&Facts {
                read_back: None,
                ..ok.clone()
            })
            .0,
            State::Pending
        );
        assert_eq!(
            state(&Facts {
                netns_known: false,
                programmed: false,
                read_back: None,
                acked: false,
                ..Default::default()
            })
            .0,
            State::Pending
        );
        let (s, r) = state(&Facts {
            apply_error: Some("nft: exit 1".into()),
            ..ok.clone()
        });
        assert_eq!(s, State::Failed);
        assert!(r.unwrap().contains("cannot program"));
        assert_eq!(
            state(&Facts {
                refused: Some("shared_netns".into()),
                ..Default::default()
            })
            .0,
            State::Failed
        );
    }
}
