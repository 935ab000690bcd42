//! `--redis` → `Spec`, parsed once at start-up (PROTOCOL.md §8). In: the
//! option's text. Out: which topology, where to start looking, and how to
//! log in (`RedisUrl`, one per Redis server connected to).
//!
//! - `redis://[user:pass@]host[:port][/db]` — one Redis (`Spec::Single`);
//! - `redis+sentinel://[user:pass@]h1:p1,h2:p2/MASTER[/db]` — the primary
//!   named MASTER as the sentinels report it (default port 26379). The user
//!   and password log in to the primary; the sentinels are asked without;
//! - `redis://h1,redis://h2,...` — several independent servers, channels
//!   spread over them by jump consistent hash (`Spec::Several`);
//! - `redis+cluster://[user:pass@]h1:p1,h2:p2` — Redis Cluster seeds
//!   (default port 6379; a cluster has only database 0).
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

/// Redis Sentinel's default port.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// What `--redis` names (PROTOCOL.md §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Single(RedisUrl),
    /// `redis://a,redis://b,...`: independent servers, each channel on one
    /// of them by jump consistent hash (`topology.rs`), in this order.
    Several(Vec<RedisUrl>),
    /// `login` carries the user, password and db for the primary; its host
    /// and port are the first sentinel's (only for display).
    Sentinel {
        sentinels: Vec<HostPort>,
        master: String,
        login: RedisUrl,
    },
    /// `login`: user and password for every cluster node; db is 0.
    Cluster {
        seeds: Vec<HostPort>,
        login: RedisUrl,
    },
}

/// One `host:port` of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Spec {
    pub fn parse(s: &str) -> Result<Spec, UrlError> {
        let s = s.trim();
        let (scheme, rest) = s.split_once("://").ok_or(UrlError::Scheme)?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "redis" | "rediss" if s.contains(',') => {
                let urls = s
                    .split(',')
                    .map(|u| if u.contains("://") { RedisUrl::parse(u) } else { Err(UrlError::SeveralHosts) })
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Spec::Several(urls));
            }
            "redis" | "rediss" => return RedisUrl::parse(s).map(Spec::Single),
            "redis+sentinel" | "redis+cluster" => {}
            "rediss+sentinel" | "rediss+cluster" => return Err(UrlError::Tls),
            _ => return Err(UrlError::Scheme),
        }
        if rest.contains(['?', '#']) {
            return Err(UrlError::Query);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (user, password, hosts) = split_userinfo(authority)?;
        let default_port = if scheme == "redis+sentinel" { DEFAULT_SENTINEL_PORT } else { DEFAULT_PORT };
        let hosts = hosts
            .split(',')
            .map(|h| parse_hostport(h, default_port).map(|(host, port)| HostPort { host: host.to_string(), port }))
            .collect::<Result<Vec<_>, _>>()?;
        let first = &hosts[0];
        let mut login = RedisUrl { host: first.host.clone(), port: first.port, user, password, db: 0 };
        if scheme == "redis+sentinel" {
            let mut parts = path.trim_end_matches('/').splitn(2, '/');
            let master = parts.next().unwrap_or_default();
            if master.is_empty() {
                return Err(UrlError::NoMaster);
            }
            let master = percent_decode_str(master).decode_utf8().map_err(|_| UrlError::Encoding)?.into_owned();
            login.db = match parts.next() {
                None | Some("") => 0,
                Some(db) => db.parse().map_err(|_| UrlError::Db)?,
            };
            Ok(Spec::Sentinel { sentinels: hosts, master, login })
        } else {
            match path.trim_end_matches('/') {
                "" | "0" => Ok(Spec::Cluster { seeds: hosts, login }),
                _ => Err(UrlError::ClusterDb),
            }
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let login = |f: &mut fmt::Formatter<'_>, u: &RedisUrl| match (&u.user, &u.password) {
            (Some(u), _) => write!(f, "{u}:***@"),
            (None, Some(_)) => f.write_str(":***@"),
            (None, None) => Ok(()),
        };
        let list = |hosts: &[HostPort]| hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(",");
        match self {
            Spec::Single(u) => fmt::Display::fmt(u, f),
            Spec::Several(urls) => f.write_str(&urls.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(",")),
            Spec::Sentinel { sentinels, master, login: u } => {
                f.write_str("redis+sentinel://")?;
                login(f, u)?;
                write!(f, "{}/{master}/{}", list(sentinels), u.db)
            }
            Spec::Cluster { seeds, login: u } => {
                f.write_str("redis+cluster://")?;
                login(f, u)?;
                f.write_str(&list(seeds))
            }
        }
    }
}

/// Splits `[user:pass@]hosts` at the last `@` (a raw `@` in a password
/// still works) and percent-decodes user and password.
fn split_userinfo(authority: &str) -> Result<(Option<String>, Option<String>, &str), UrlError> {
    let (userinfo, hosts) = match authority.rfind('@') {
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
    Ok((user, password.filter(|p| !p.is_empty()), hosts))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn parse_hostport(hostport: &str, default_port: u16) -> Result<(&str, u16), UrlError> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or(UrlError::NoHost)?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return Err(UrlError::Port),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, parse_port(p)?),
            None => (hostport, default_port),
        }
    };
    if host.is_empty() {
        return Err(UrlError::NoHost);
    }
    Ok((host, port))
}

/// Why a `--redis` value was refused (the operator's fault).
#[derive(Debug, PartialEq, Eq)]
pub enum UrlError {
    Scheme,
    NoMaster,
    ClusterDb,
    SeveralHosts,
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
            UrlError::Scheme => "expected redis://[user:pass@]host[:port][/db], redis+sentinel://[user:pass@]h1:p1,h2:p2/MASTER[/db] or redis+cluster://[user:pass@]h1:p1,h2:p2",
            UrlError::NoMaster => "redis+sentinel:// needs the primary's name as the path: redis+sentinel://h1:26379,h2:26379/mymaster",
            UrlError::SeveralHosts => {
                "redis:// takes one host; list several servers as redis://h1:p1,redis://h2:p2, or use redis+sentinel:// or redis+cluster://"
            }
            UrlError::ClusterDb => "redis+cluster:// has no database: a cluster has only database 0",
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
        let (user, password, hostport) = split_userinfo(authority)?;
        if hostport.contains(',') {
            return Err(UrlError::SeveralHosts);
        }
        let (host, port) = parse_hostport(hostport, DEFAULT_PORT)?;
        let db = match path.trim_end_matches('/') {
            "" => 0,
            p => p.parse().map_err(|_| UrlError::Db)?,
        };
        Ok(RedisUrl { host: host.to_string(), port, user, password, db })
    }

    /// `host:port` for `ToSocketAddrs`.
    pub fn addr(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// The same login at another server (a cluster node, the primary a
    /// sentinel named).
    pub fn at(&self, host: &str, port: u16) -> RedisUrl {
        RedisUrl { host: host.to_string(), port, ..self.clone() }
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

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort { host: host.into(), port }
    }

    #[test]
    fn parses_sentinel_and_cluster_lists() {
        let Ok(Spec::Sentinel { sentinels, master, login }) =
            Spec::parse("redis+sentinel://app:p%40w@10.0.0.1:26380,[::1],h3/mymaster/2")
        else {
            panic!("a sentinel spec")
        };
        assert_eq!(sentinels, [hp("10.0.0.1", 26380), hp("::1", 26379), hp("h3", 26379)]);
        assert_eq!(master, "mymaster");
        assert_eq!((login.user.as_deref(), login.password.as_deref(), login.db), (Some("app"), Some("p@w"), 2));
        let Ok(Spec::Cluster { seeds, login }) = Spec::parse("REDIS+CLUSTER://:pw@127.0.0.1:7000,127.0.0.1:7001/")
        else {
            panic!("a cluster spec")
        };
        assert_eq!(seeds, [hp("127.0.0.1", 7000), hp("127.0.0.1", 7001)]);
        assert_eq!((login.user, login.password.as_deref(), login.db), (None, Some("pw"), 0));
        assert_eq!(Spec::parse("redis://h:1/3"), Ok(Spec::Single(url("h", 1, None, None, 3))));
        assert_eq!(
            Spec::parse("redis://a:1,redis://:pw@b:2/1"),
            Ok(Spec::Several(vec![url("a", 1, None, None, 0), url("b", 2, None, Some("pw"), 1)]))
        );
        assert_eq!(
            Spec::parse("redis+sentinel://u:secret@a:1,b:2/m").unwrap().to_string(),
            "redis+sentinel://u:***@a:1,b:2/m/0"
        );
        assert_eq!(Spec::parse("redis+cluster://a,b:7").unwrap().to_string(), "redis+cluster://a:6379,b:7");
    }

    #[test]
    fn refuses_bad_topology_urls() {
        assert_eq!(Spec::parse("redis+sentinel://h1,h2"), Err(UrlError::NoMaster));
        assert_eq!(Spec::parse("redis+sentinel://h1/"), Err(UrlError::NoMaster));
        assert_eq!(Spec::parse("redis+sentinel://h1/m/x"), Err(UrlError::Db));
        assert_eq!(Spec::parse("redis+cluster://h1:7000/3"), Err(UrlError::ClusterDb));
        assert_eq!(Spec::parse("redis+cluster://h1:7000,"), Err(UrlError::NoHost));
        assert_eq!(Spec::parse("redis+cluster://h1:0"), Err(UrlError::Port));
        assert_eq!(Spec::parse("redis+cluster://u@h1"), Err(UrlError::UserWithoutPassword));
        assert_eq!(Spec::parse("rediss+cluster://h1"), Err(UrlError::Tls));
        assert_eq!(Spec::parse("redis+mesh://h1"), Err(UrlError::Scheme));
        assert_eq!(Spec::parse("redis://a:1,b:2"), Err(UrlError::SeveralHosts));
        assert_eq!(Spec::parse("redis://a:1,redis://b:2/x"), Err(UrlError::Db));
        assert_eq!(Spec::parse("redis+cluster://h?x=1"), Err(UrlError::Query));
    }
}
