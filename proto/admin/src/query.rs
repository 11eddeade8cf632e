//! Query strings, as the debug endpoints read them.

/// Decodes a query value (`%XX` and `+`); malformed escapes stay as they are. Works on
/// bytes, so a `%` before a multi-byte character cannot split it (a slice of the `str`
/// there would panic on a peer's input).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of `key` in `query` (`a=1&b=2`), percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        assert_eq!(percent_decode("spiffe%3A%2F%2Fa%2Fb"), "spiffe://a/b");
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        // A `%` before a multi-byte character, and a sign where a hex digit belongs.
        assert_eq!(percent_decode("%aé"), "%aé");
        assert_eq!(percent_decode("%é"), "%é");
        assert_eq!(percent_decode("%+1x"), "% 1x");
    }

    #[test]
    fn finds_the_first_value_of_a_key() {
        assert_eq!(
            query_param(Some("level=debug"), "level").as_deref(),
            Some("debug")
        );
        assert_eq!(
            query_param(Some("x=1&level=a%3Db&level=c"), "level").as_deref(),
            Some("a=b")
        );
        assert_eq!(query_param(Some("levels=1"), "level"), None);
        assert_eq!(query_param(Some("level"), "level"), None);
        assert_eq!(query_param(None, "level"), None);
    }
}
