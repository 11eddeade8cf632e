//! The one duration parser: command-line flags and environment variables (Go-style,
//! as Istio's own settings are written) and Gateway API fields (GEP-2257, a stricter
//! subset) read through the same tokenizer, so the two cannot drift apart.

use std::time::Duration;

/// Why a duration could not be read; worded for whoever wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 5s, 200ms, 1m30s or 24h")]
    Malformed(String),
    #[error("{input:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    UnknownUnit { input: String, unit: String },
    #[error("{0:?} is too long a duration")]
    Overflow(String),
}

const UNITS: [(&str, f64); 4] = [("ms", 0.001), ("h", 3600.0), ("m", 60.0), ("s", 1.0)];

/// One `<number><unit>` part of a duration.
#[derive(Debug, PartialEq)]
struct Part<'a> {
    number: &'a str,
    unit: &'a str,
}

/// Splits `s` into its parts; a lone number has an empty unit.
fn parts(s: &str) -> Result<Vec<Part<'_>>, DurationError> {
    let malformed = || DurationError::Malformed(s.to_string());
    let mut rest = s;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if n == 0 {
            return Err(malformed());
        }
        let (number, tail) = rest.split_at(n);
        let u = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(u);
        out.push(Part { number, unit });
        rest = tail;
    }
    if out.is_empty() {
        return Err(malformed());
    }
    Ok(out)
}

fn seconds(input: &str, parts: &[Part]) -> Result<Duration, DurationError> {
    let mut total = 0.0;
    for p in parts {
        let n: f64 = p
            .number
            .parse()
            .map_err(|_| DurationError::Malformed(input.to_string()))?;
        let scale = match UNITS.iter().find(|(u, _)| *u == p.unit) {
            Some((_, scale)) => *scale,
            // A bare number is seconds (flags only: `parse_gateway` refuses it).
            None if p.unit.is_empty() && parts.len() == 1 => 1.0,
            None => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_string(),
                    unit: p.unit.to_string(),
                });
            }
        };
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|_| DurationError::Overflow(input.to_string()))
}

/// A duration given as a flag or environment variable: `5s`, `200ms`, `1.5s`, `1m30s`,
/// `24h`, or a bare number of seconds (`7`).
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    seconds(s, &parts(s)?)
}

/// A Gateway API duration (GEP-2257): one to four `<1-5 digits><unit>` parts, units `h`,
/// `m`, `s`, `ms` (`2s`, `150ms`, `1m30s`); anything else is `None`.
pub fn parse_gateway(s: &str) -> Option<Duration> {
    let parts = parts(s).ok()?;
    let shaped = (1..=4).contains(&parts.len())
        && parts.iter().all(|p| {
            (1..=5).contains(&p.number.len())
                && p.number.bytes().all(|b| b.is_ascii_digit())
                && UNITS.iter().any(|(u, _)| *u == p.unit)
        });
    if !shaped {
        return None;
    }
    seconds(s, &parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_go_style_durations_and_bare_seconds() {
        for (s, want) in [
            ("5s", Duration::from_secs(5)),
            ("200ms", Duration::from_millis(200)),
            ("24h", Duration::from_secs(86400)),
            ("7", Duration::from_secs(7)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s", Duration::from_secs(90)),
            (" 2m ", Duration::from_secs(120)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn flags_refuse_what_is_not_a_duration_with_the_reason() {
        assert!(matches!(
            parse("5 parsecs"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("5d"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("1m30"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(parse(""), Err(DurationError::Malformed(_))));
        assert!(matches!(parse("s"), Err(DurationError::Malformed(_))));
        assert!(matches!(parse("1.2.3s"), Err(DurationError::Malformed(_))));
        assert!(parse("1e400h").is_err());
        assert!(matches!(
            parse("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(
            parse("5 parsecs")
                .unwrap_err()
                .to_string()
                .contains("use ms, s, m or h")
        );
    }

    #[test]
    fn gateway_durations_follow_gep_2257() {
        assert_eq!(parse_gateway("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_gateway("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_gateway("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_gateway("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_gateway("0s"), Some(Duration::ZERO));
        assert_eq!(parse_gateway("99999s"), Some(Duration::from_secs(99999)));
        assert_eq!(
            parse_gateway("1h1m1s1ms"),
            Some(Duration::from_millis(3_661_001))
        );
        for bad in [
            "",
            "10",
            "1.5s",
            "-1s",
            "1d",
            "100000s",
            "1h1m1s1ms1s",
            "s",
            " 1s",
            "1S",
        ] {
            assert_eq!(parse_gateway(bad), None, "{bad}");
        }
    }
}
