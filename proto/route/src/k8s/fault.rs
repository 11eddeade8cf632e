//! HTTPFault (ambient-mesh.dev/v1alpha1): Istio's HTTPFaultInjection shape.

use super::reader::Reader;
use crate::Finding;
use mesh_proto::waypoint as pb;
use serde_json::{Map, Value};

/// Reads one HTTPFault spec (Istio's HTTPFaultInjection shape). None: nothing of it can
/// be applied; findings name the fields.
pub fn read_fault(
    namespace: &str,
    name: &str,
    spec: Option<&Value>,
) -> (Option<pb::HttpFault>, Vec<Finding>) {
    let mut r = Reader::new("HTTPFault", namespace, name);
    let mut p = Vec::new();
    let null = Value::Null;
    let v = spec.unwrap_or(&null);
    let Some(o) = r.object(v, "spec", &["delay", "abort"], &mut p) else {
        return (None, r.findings);
    };
    let mut out = pb::HttpFault::default();
    let percentage =
        |r: &mut Reader, o: &Map<String, Value>, at: &str, p: &mut Vec<pb::Problem>| {
            let v = o.get("percentage").filter(|v| !v.is_null())?;
            let here = format!("{at}.percentage");
            let po = r.object(v, &here, &["value"], p)?;
            match po
                .get("value")
                .and_then(Value::as_f64)
                .filter(|v| (0.0..=100.0).contains(v))
            {
                Some(v) => Some(v),
                None => {
                    r.error(
                        p,
                        &format!("{here}.value"),
                        format!(
                            "{} is not a number within 0..100",
                            po.get("value").unwrap_or(&Value::Null)
                        ),
                    );
                    None
                }
            }
        };
    if let Some(d) = o.get("delay").filter(|v| !v.is_null())
        && let Some(d) = r.object(d, "spec.delay", &["fixedDelay", "percentage"], &mut p)
    {
        let fixed = r.duration_ms(d, "fixedDelay", "spec.delay", &mut p);
        if fixed.is_none() && !d.contains_key("fixedDelay") {
            r.error(&mut p, "spec.delay.fixedDelay", "missing".into());
        }
        let pct = percentage(&mut r, d, "spec.delay", &mut p);
        out.delay = fixed.map(|ms| pb::FaultDelay {
            fixed_delay_ms: ms,
            percentage: pct,
        });
    }
    if let Some(a) = o.get("abort").filter(|v| !v.is_null())
        && let Some(a) = r.object(a, "spec.abort", &["httpStatus", "percentage"], &mut p)
    {
        let status = r.int(a, "httpStatus", "spec.abort", 200..=599, &mut p);
        if status.is_none() && !a.contains_key("httpStatus") {
            r.error(&mut p, "spec.abort.httpStatus", "missing".into());
        }
        let pct = percentage(&mut r, a, "spec.abort", &mut p);
        out.abort = status.map(|s| pb::FaultAbort {
            http_status: s as u32,
            percentage: pct,
        });
    }
    if p.is_empty() && out.delay.is_none() && out.abort.is_none() {
        r.error(&mut p, "spec", "needs a delay or an abort".into());
    }
    ((p.is_empty()).then_some(out), r.findings)
}
