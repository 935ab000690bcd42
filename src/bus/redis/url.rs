//! `--redis redis://[user:pass@]host[:port][/db]` → `RedisUrl`, parsed once at
//! start-up. In: the option's text. Out: where to connect and how to log in.
//!
//! `redis://:pass@host` (empty user) logs in with the password alone
//! (`AUTH pass`, the `default` user); `redis://user:pass@host` with
//! `AUTH user pass` (Redis 6 ACL). User and password are percent-decoded, so
//! a password holding `@`, `:` or `/` is written `%40`, `%3A`, `%2F`.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Redis's default port.
const DEFAULT_PORT: u16 = 6379;

#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// A host name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `None`: log in with the password alone (or not at all).
    pub user: Option<String>,
    pub password: Option<String>,
    /// `SELECT`ed after login. Pub/sub channels do not depend on it, but a
    /// database Redis refuses is still an error worth reporting.
    pub db: u32,
}

/// Why a `--redis` value was refused (the operator's fault).
#[derive(Debug, PartialEq, Eq)]
pub enum UrlError {
    Scheme,
    Tls,
    NoHost,
    Port,
    Db,
    UserWithoutPassword,
    Encoding,
    Query,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UrlError::Scheme => "expected redis://[user:pass@]host[:port][/db]",
            UrlError::Tls => "rediss:// (TLS) is not supported; use redis:// on a trusted network or a TLS proxy",
            UrlError::NoHost => "no host",
            UrlError::Port => "the port must be a number from 1 to 65535",
            UrlError::Db => "the database (path) must be a number, e.g. redis://host:6379/0",
            UrlError::UserWithoutPassword => "a user needs a password: redis://user:pass@host (or redis://:pass@host)",
            UrlError::Encoding => "user or password is not valid percent-encoded UTF-8",
            UrlError::Query => "query parameters are not supported",
        })
    }
}

impl std::error::Error for UrlError {}

impl RedisUrl {
    pub fn parse(s: &str) -> Result<RedisUrl, UrlError> {
        let s = s.trim();
        let (scheme, rest) = s.split_once("://").ok_or(UrlError::Scheme)?;
        if scheme.eq_ignore_ascii_case("rediss") {
            return Err(UrlError::Tls);
        }
        if !scheme.eq_ignore_ascii_case("redis") {
            return Err(UrlError::Scheme);
        }
        if rest.contains(['?', '#']) {
            return Err(UrlError::Query);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        // The last '@' ends the user info: a raw '@' in a password still works.
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (decode(u)?.filter(|u| !u.is_empty()), decode(p)?),
                None if info.is_empty() => (None, None),
                None => return Err(UrlError::UserWithoutPassword),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(UrlError::NoHost)?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None if after.is_empty() => DEFAULT_PORT,
                None => return Err(UrlError::Port),
            };
            (host, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (hostport, DEFAULT_PORT),
            }
        };
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let db = match path.trim_end_matches('/') {
            "" => 0,
            p => p.parse().map_err(|_| UrlError::Db)?,
        };
        Ok(RedisUrl { host: host.to_string(), port, user, password: password.filter(|p| !p.is_empty()), db })
    }

    /// `host:port` for `ToSocketAddrs`.
    pub fn addr(&self) -> (&str, u16) {
        (&self.host, self.port)
    }
}

/// Never prints the password (`Debug` is used in logs and errors).
impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis://")?;
        match (&self.user, &self.password) {
            (Some(u), _) => write!(f, "{u}:***@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            (None, None) => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}/{}", self.host, self.port, self.db)
        } else {
            write!(f, "{}:{}/{}", self.host, self.port, self.db)
        }
    }
}

fn parse_port(p: &str) -> Result<u16, UrlError> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(UrlError::Port),
        Ok(n) => Ok(n),
    }
}

fn decode(s: &str) -> Result<Option<String>, UrlError> {
    let d = percent_decode_str(s).decode_utf8().map_err(|_| UrlError::Encoding)?;
    Ok(Some(d.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str, port: u16, user: Option<&str>, password: Option<&str>, db: u32) -> RedisUrl {
        RedisUrl { host: host.into(), port, user: user.map(Into::into), password: password.map(Into::into), db }
    }

    #[test]
    fn parses_every_documented_form() {
        assert_eq!(RedisUrl::parse("redis://127.0.0.1:6380"), Ok(url("127.0.0.1", 6380, None, None, 0)));
        assert_eq!(RedisUrl::parse("redis://localhost"), Ok(url("localhost", 6379, None, None, 0)));
        assert_eq!(RedisUrl::parse("redis://h:1/3"), Ok(url("h", 1, None, None, 3)));
        assert_eq!(RedisUrl::parse("redis://h:1/"), Ok(url("h", 1, None, None, 0)));
        assert_eq!(RedisUrl::parse("redis://:s3cret@h"), Ok(url("h", 6379, None, Some("s3cret"), 0)));
        assert_eq!(RedisUrl::parse("REDIS://app:pw@h:7/2"), Ok(url("h", 7, Some("app"), Some("pw"), 2)));
        assert_eq!(RedisUrl::parse("redis://[::1]:7000/1"), Ok(url("::1", 7000, None, None, 1)));
        assert_eq!(RedisUrl::parse("redis://[::1]"), Ok(url("::1", 6379, None, None, 0)));
    }

    #[test]
    fn user_and_password_are_percent_decoded_and_split_at_the_last_at_sign() {
        assert_eq!(RedisUrl::parse("redis://a%3Ab:p%40ss%2F@h"), Ok(url("h", 6379, Some("a:b"), Some("p@ss/"), 0)));
        assert_eq!(RedisUrl::parse("redis://u:p@ss@h:1"), Ok(url("h", 1, Some("u"), Some("p@ss"), 0)));
        assert_eq!(RedisUrl::parse("redis://u:p%FF@h"), Err(UrlError::Encoding));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        assert_eq!(RedisUrl::parse("rediss://h"), Err(UrlError::Tls));
        assert_eq!(RedisUrl::parse("http://h"), Err(UrlError::Scheme));
        assert_eq!(RedisUrl::parse("h:6379"), Err(UrlError::Scheme));
        assert_eq!(RedisUrl::parse("redis://"), Err(UrlError::NoHost));
        assert_eq!(RedisUrl::parse("redis://:pw@"), Err(UrlError::NoHost));
        assert_eq!(RedisUrl::parse("redis://h:0"), Err(UrlError::Port));
        assert_eq!(RedisUrl::parse("redis://h:99999"), Err(UrlError::Port));
        assert_eq!(RedisUrl::parse("redis://h:1/x"), Err(UrlError::Db));
        assert_eq!(RedisUrl::parse("redis://user@h"), Err(UrlError::UserWithoutPassword));
        assert_eq!(RedisUrl::parse("redis://h/0?timeout=1"), Err(UrlError::Query));
    }

    #[test]
    fn display_hides_the_password() {
        let u = RedisUrl::parse("redis://app:topsecret@h:7/2").unwrap();
        assert_eq!(u.to_string(), "redis://app:***@h:7/2");
        assert!(!format!("{u:?}").contains("topsecret"));
        assert_eq!(RedisUrl::parse("redis://:pw@[::1]:1").unwrap().to_string(), "redis://:***@[::1]:1/0");
    }
}
