//! The browser origins allowed to open WebSockets on this edge
//! (`--allowed-origins`), against cross-site WebSocket hijacking: a page on
//! another site cannot make its visitors' browsers talk to Herald.
//! Browsers always send `Origin` on a WebSocket upgrade; other clients need
//! not, and are not asked to.

use std::fmt;

/// The allow-list: exact origins (`https://app.example.com`) and patterns
/// (`https://*.example.com`) whose `*` stands for one or more subdomain
/// labels, never for the scheme or the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedOrigins {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    scheme: String,
    /// Without the `*.` of a pattern; lowercase.
    host: String,
    /// The port as given, `None` for the scheme's default.
    port: Option<u16>,
    wildcard: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{entry:?} is not an origin: {why} (write scheme://host or scheme://host:port, e.g. https://app.example.com or https://*.example.com)"
)]
pub struct OriginError {
    entry: String,
    why: &'static str,
}

impl AllowedOrigins {
    /// Parses a comma-separated list; every entry must be well formed and
    /// at least one must be given.
    pub fn parse(list: &str) -> Result<AllowedOrigins, OriginError> {
        let entries = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                parse_origin(e, true).map_err(|why| OriginError {
                    entry: e.to_string(),
                    why,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Err(OriginError {
                entry: list.to_string(),
                why: "the list is empty",
            });
        }
        Ok(AllowedOrigins { entries })
    }

    /// Whether a request's `Origin` header value is on the list. A value
    /// that is not an origin (`null`, a path, garbage) never is.
    pub fn allows(&self, origin: &str) -> bool {
        let Ok(origin) = parse_origin(origin.trim(), false) else {
            return false;
        };
        self.entries.iter().any(|e| e.matches(&origin))
    }
}

impl Entry {
    fn matches(&self, origin: &Entry) -> bool {
        if self.scheme != origin.scheme || self.port != origin.port {
            return false;
        }
        if !self.wildcard {
            return self.host == origin.host;
        }
        // At least one whole label before the suffix: `*.example.com` does
        // not match `example.com`, nor `badexample.com`.
        origin
            .host
            .strip_suffix(self.host.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .is_some_and(|labels| !labels.is_empty())
    }
}

impl fmt::Display for AllowedOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{}://{}{}",
                e.scheme,
                if e.wildcard { "*." } else { "" },
                e.host
            )?;
            if let Some(port) = e.port {
                write!(f, ":{port}")?;
            }
        }
        Ok(())
    }
}

/// `scheme://host[:port]`, lowercased, the scheme's default port dropped
/// (browsers leave it out of `Origin`, operators may write it). A pattern's
/// host starts with `*.` when `pattern` allows it.
fn parse_origin(text: &str, pattern: bool) -> Result<Entry, &'static str> {
    let text = text.to_ascii_lowercase();
    let (scheme, rest) = text.split_once("://").ok_or("no scheme")?;
    let mut chars = scheme.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_lowercase())
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err("bad scheme");
    }
    if rest.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or fragment");
    }
    if rest.contains('@') {
        return Err("an origin has no user name");
    }
    let (host, port) = split_port(rest)?;
    let (host, wildcard) = match host.strip_prefix("*.") {
        Some(suffix) if pattern => (suffix, true),
        Some(_) => return Err("a wildcard"),
        None => (host, false),
    };
    if host.contains('*') {
        return Err(
            "a wildcard may only stand for whole leading labels, as in https://*.example.com",
        );
    }
    let ip6 = host.starts_with('[') && host.ends_with(']') && !wildcard;
    let ok_host = if ip6 {
        host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            })
    };
    if !ok_host {
        return Err("bad host");
    }
    let default = match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Ok(Entry {
        scheme: scheme.to_string(),
        host: host.to_string(),
        port: port.filter(|p| Some(*p) != default),
        wildcard,
    })
}

/// Splits `host[:port]`, where host may be a bracketed IPv6 address.
fn split_port(rest: &str) -> Result<(&str, Option<u16>), &'static str> {
    let colon = match rest.rfind(']') {
        Some(end) => rest[end..].find(':').map(|i| end + i),
        None => rest.rfind(':'),
    };
    match colon {
        None => Ok((rest, None)),
        Some(i) => {
            let port = &rest[i + 1..];
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err("bad port");
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => Ok((&rest[..i], Some(p))),
                _ => Err("bad port"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> AllowedOrigins {
        AllowedOrigins::parse(s).unwrap()
    }

    #[test]
    fn exact_origins_match_exactly() {
        let o = list("https://app.example.com, http://localhost:3000");
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("http://localhost:3000"));
        assert!(!o.allows("http://app.example.com"), "another scheme");
        assert!(!o.allows("https://app.example.com:8443"), "another port");
        assert!(!o.allows("https://evil.app.example.com"), "a subdomain");
        assert!(!o.allows("https://app.example.com.evil.net"));
        assert!(!o.allows("http://localhost"));
        assert!(!o.allows("http://localhost:3001"));
    }

    #[test]
    fn case_and_default_ports_are_normalized() {
        let o = list("HTTPS://App.Example.COM:443,http://Example.org");
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("https://APP.example.com:443"));
        assert!(o.allows("http://example.org:80"));
        assert_eq!(o.to_string(), "https://app.example.com, http://example.org");
    }

    #[test]
    fn a_wildcard_stands_for_one_or_more_labels() {
        let o = list("https://*.example.com");
        assert!(o.allows("https://a.example.com"));
        assert!(o.allows("https://a.b.example.com"));
        assert!(!o.allows("https://example.com"), "no label at all");
        assert!(!o.allows("https://badexample.com"), "not a whole label");
        assert!(!o.allows("http://a.example.com"), "not the scheme");
        assert!(!o.allows("https://a.example.com:8443"), "not the port");
        assert!(!o.allows("https://a.example.com.evil.net"));
        let with_port = list("http://*.dev.test:8080");
        assert!(with_port.allows("http://x.dev.test:8080"));
        assert!(!with_port.allows("http://x.dev.test"));
    }

    #[test]
    fn what_is_not_an_origin_is_never_allowed() {
        let o = list("https://*.example.com,https://example.com");
        for bad in [
            "null",
            "",
            "example.com",
            "https://example.com/",
            "https://*.example.com",
            "https://user@example.com",
            "https://example.com:0",
            "https://example.com:99999",
            "https://exa mple.com",
        ] {
            assert!(!o.allows(bad), "{bad:?}");
        }
    }

    #[test]
    fn ip_literals() {
        let o = list("http://127.0.0.1:8080,http://[::1]:8080");
        assert!(o.allows("http://127.0.0.1:8080"));
        assert!(o.allows("http://[::1]:8080"));
        assert!(!o.allows("http://[::1]"));
    }

    #[test]
    fn malformed_entries_are_refused_with_the_entry_named() {
        for (bad, why) in [
            ("app.example.com", "no scheme"),
            ("https://app.example.com/", "no path"),
            ("https://app.example.com:https", "bad port"),
            ("https://*example.com", "wildcard"),
            ("https://app.*.com", "wildcard"),
            ("*://app.example.com", "bad scheme"),
            ("https://*", "wildcard"),
            ("https://", "bad host"),
            ("https://a..b", "bad host"),
            ("https://app.example.com:0", "bad port"),
        ] {
            let e = AllowedOrigins::parse(&format!("https://ok.example.com,{bad}")).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(&format!("{bad:?}")), "{text}");
            assert!(text.contains(why), "{bad}: {text}");
        }
        assert!(AllowedOrigins::parse(" , ").is_err());
        assert!(AllowedOrigins::parse("https://a.example.com,").is_ok());
    }
}
