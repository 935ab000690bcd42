//! Room namespaces (PROTOCOL.md §10): per-prefix room options from the TOML
//! file's `[[namespace]]` tables. The longest matching prefix wins; a room
//! no namespace matches takes the top-level options (the flags).
//!
//! What acts on them: `history_size` and `history_ttl_secs` (history is
//! kept only for rooms whose namespace has `history_size > 0`: no other room
//! name creates history state anywhere), `presence`, `join_leave`,
//! `presence_grace_ms` (`services::presence`), `client_publish` and
//! `deliver_to_publisher` (`services::ops`, `conn::Conn::expect_own`).

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

use super::HistorySettings;

/// One `[[namespace]]` table as written.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct NamespaceOptions {
    pub prefix: String,
    pub history_size: Option<usize>,
    pub history_ttl_secs: Option<u64>,
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
    pub presence_grace_ms: Option<u64>,
    pub client_publish: Option<ClientPublish>,
    pub deliver_to_publisher: Option<bool>,
}

/// `client_publish`: who may publish into a namespace's rooms from a
/// WebSocket.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientPublish {
    /// A connection whose grant allows the room.
    #[default]
    Any,
    /// Only connections subscribed to the room.
    Members,
    /// Nobody: the server API only.
    None,
}

/// A namespace's resolved options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Empty for the default namespace (the top level).
    pub prefix: Box<str>,
    /// `None`: no history for these rooms.
    pub history: Option<HistorySettings>,
    pub presence: bool,
    pub join_leave: bool,
    pub presence_grace: Duration,
    pub client_publish: ClientPublish,
    pub deliver_to_publisher: bool,
}

/// Every namespace, longest prefix first, and the default.
#[derive(Debug, Clone)]
pub struct Namespaces {
    default: Namespace,
    list: Vec<Namespace>,
}

impl Namespaces {
    /// The top level (`history`: from `--history-size`/`--history-ttl-secs`)
    /// and the file's tables, checked: a bad or duplicate prefix, a bad
    /// value or an impossible combination stops the node with a message
    /// naming the key.
    pub fn resolve(
        history: Option<HistorySettings>,
        ttl_secs: u64,
        tables: &[NamespaceOptions],
    ) -> anyhow::Result<Self> {
        let default = Namespace {
            prefix: "".into(),
            history,
            presence: false,
            join_leave: false,
            presence_grace: Duration::from_millis(5000),
            client_publish: ClientPublish::Any,
            deliver_to_publisher: true,
        };
        let mut list: Vec<Namespace> = Vec::with_capacity(tables.len());
        for t in tables {
            let p = t.prefix.as_str();
            if p.is_empty() || !crate::protocol::is_valid_name(p) {
                bail!("[[namespace]] prefix {p:?}: must be non-empty and use room-name characters only");
            }
            if list.iter().any(|n| &*n.prefix == p) {
                bail!("[[namespace]] prefix {p:?}: given twice");
            }
            let size = t.history_size.or(history.map(|h| h.size)).unwrap_or(0);
            let ttl = t.history_ttl_secs.or(history.map(|h| h.ttl.as_secs())).unwrap_or(ttl_secs);
            if size > 0 && !(1..=super::MAX_TTL_SECS).contains(&ttl) {
                bail!("[[namespace]] prefix {p:?}: history_ttl_secs must be between 1 and {}", super::MAX_TTL_SECS);
            }
            let presence = t.presence.unwrap_or(default.presence);
            let join_leave = t.join_leave.unwrap_or(default.join_leave);
            if join_leave && !presence {
                bail!("[[namespace]] prefix {p:?}: join_leave needs presence = true");
            }
            list.push(Namespace {
                prefix: p.into(),
                history: (size > 0).then(|| HistorySettings { size, ttl: Duration::from_secs(ttl) }),
                presence,
                join_leave,
                presence_grace: t.presence_grace_ms.map_or(default.presence_grace, Duration::from_millis),
                client_publish: t.client_publish.unwrap_or(default.client_publish),
                deliver_to_publisher: t.deliver_to_publisher.unwrap_or(default.deliver_to_publisher),
            });
        }
        list.sort_by_key(|n| std::cmp::Reverse(n.prefix.len()));
        Ok(Namespaces { default, list })
    }

    /// The namespace of `room`: the longest matching prefix, else the default.
    pub fn of(&self, room: &str) -> &Namespace {
        self.list.iter().find(|n| room.starts_with(&*n.prefix)).unwrap_or(&self.default)
    }

    /// `room`'s history settings; `None`: the room keeps no history.
    pub fn history(&self, room: &str) -> Option<HistorySettings> {
        self.of(room).history
    }

    /// Does any room keep history (the default or a namespace)?
    pub fn any_history(&self) -> bool {
        self.default.history.is_some() || self.list.iter().any(|n| n.history.is_some())
    }

    /// The largest `history_size` of any namespace (what one read may ask).
    pub fn max_history_size(&self) -> usize {
        std::iter::once(&self.default).chain(&self.list).filter_map(|n| n.history.map(|h| h.size)).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(prefix: &str) -> NamespaceOptions {
        NamespaceOptions { prefix: prefix.into(), ..Default::default() }
    }

    #[test]
    fn the_longest_prefix_wins_and_unset_keys_take_the_top_level() {
        let top = Some(HistorySettings { size: 10, ttl: Duration::from_secs(60) });
        let tables = [
            NamespaceOptions { history_size: Some(200), history_ttl_secs: Some(600), ..ns("chat:") },
            NamespaceOptions { history_size: Some(0), ..ns("chat:cursor:") },
            ns("feed:"),
        ];
        let n = Namespaces::resolve(top, 300, &tables).unwrap();
        assert_eq!(n.history("chat:1"), Some(HistorySettings { size: 200, ttl: Duration::from_secs(600) }));
        assert_eq!(n.history("chat:cursor:1"), None, "0 turns history off");
        assert_eq!(n.history("feed:x"), top, "unset keys take the top level");
        assert_eq!(n.history("lobby"), top, "no match: the default");
        assert_eq!(n.max_history_size(), 200);
        assert!(n.any_history());
        let n = Namespaces::resolve(None, 300, &[NamespaceOptions { history_size: Some(5), ..ns("chat:") }]).unwrap();
        assert_eq!(n.history("lobby"), None, "history only where configured");
        assert_eq!(n.history("chat:a").map(|h| h.ttl), Some(Duration::from_secs(300)));
    }

    #[test]
    fn bad_tables_are_refused_naming_the_key() {
        let err = |t: &[NamespaceOptions]| format!("{:#}", Namespaces::resolve(None, 300, t).unwrap_err());
        assert!(err(&[ns("")]).contains("prefix"));
        assert!(err(&[ns("bad prefix")]).contains("prefix"));
        assert!(err(&[ns("a:"), ns("a:")]).contains("twice"));
        let jl = NamespaceOptions { join_leave: Some(true), ..ns("a:") };
        assert!(err(&[jl]).contains("join_leave"));
        let ttl = NamespaceOptions { history_size: Some(3), history_ttl_secs: Some(0), ..ns("a:") };
        assert!(err(&[ttl]).contains("history_ttl_secs"));
    }
}
