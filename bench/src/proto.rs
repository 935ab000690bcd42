//! The peers' client protocols, so that the same scenarios (`fanout`, `idle`,
//! `connect`) can load the anchor servers of `shared/peers/` side by side
//! with corecast. Stage: the worker's join step and receive path, for every
//! protocol but corecast's own (which stays in `worker.rs`/`payload.rs`).
//!
//! In: the WebSocket text messages a server sends. Out: what they mean for
//! the worker ([`Incoming`]), the frames that join a connection to the one
//! channel `bench` ([`Join`]), and the publish frames ([`publish_frame`]).
//!
//! * `raw` (seed-go, seed-node, rust-tokio, uws): connected means subscribed;
//!   every text frame a client sends goes to every connection, the sender
//!   included, byte for byte.
//! * `socketio`: engine.io v4 packets over the websocket transport: OPEN
//!   (`0{…}`), then our socket.io CONNECT `40`, answered by `40{"sid":…}`;
//!   events are `42["msg",<json>]`; the server's PING `2` wants a PONG `3`.
//! * `centrifuge` (0.15, protocol v1 JSON): `{"id":1,"method":0}` CONNECT and
//!   `{"id":2,"method":1,"params":{"channel":"bench"}}` SUBSCRIBE, sent as one
//!   newline-separated batch; the subscribe reply (`"id":2`) means joined.
//!   PUBLISH is method 3; a publication push is a reply with no `id` and a
//!   `result` holding `"channel"`; the server may batch replies, one per line.
//!
//! Every peer publish carries the same data object,
//! `{"t":<send ns>,"s":<seq>,"k":<sender>,"p":"xx…"}`, so latency is measured
//! the same way as for corecast (send time stamped when the frame is written,
//! CLOCK_MONOTONIC, subtracted at the receiver). Peers echo a message to its
//! sender; `k` lets the sender recognise its own copy, which it takes as the
//! ack of that publish (never as a delivery). Copies of other senders'
//! messages reaching a sender are ignored: only subscriber connections count
//! deliveries, on every server.

use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};

use crate::payload::{StampedFrame, after_key, parse_u64};

/// Which client protocol the generator speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `shared/PROTOCOL.md`: rooms, subscribe, publish with acks.
    #[default]
    Corecast,
    /// Text frames broadcast to every connection (seed-go, seed-node, rust-tokio, uws).
    Raw,
    /// socket.io 4 / engine.io 4 over the websocket transport.
    Socketio,
    /// centrifuge 0.15, protocol v1 JSON (`method` + `params`).
    Centrifuge,
}

/// The one channel the peers have; centrifuge subscribes to it by name.
pub const CHANNEL: &str = "bench";

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Corecast => "corecast",
            Protocol::Raw => "raw",
            Protocol::Socketio => "socketio",
            Protocol::Centrifuge => "centrifuge",
        }
    }

    /// The path a URL without one connects to.
    pub fn default_path(self) -> &'static str {
        match self {
            Protocol::Corecast | Protocol::Raw => "/ws",
            Protocol::Socketio => "/socket.io/?EIO=4&transport=websocket",
            Protocol::Centrifuge => "/connection/websocket",
        }
    }

    /// Peers have one channel for everything: no rooms.
    pub fn has_rooms(self) -> bool {
        self == Protocol::Corecast
    }
}

/// What a connection does once upgraded to join the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// Nothing: upgraded means subscribed.
    Ready,
    /// Wait for the server to speak first (engine.io OPEN).
    Wait,
    /// Send this text payload, then wait for [`Incoming::Joined`].
    Send(Vec<u8>),
}

pub fn join(protocol: Protocol) -> Join {
    match protocol {
        Protocol::Corecast | Protocol::Raw => Join::Ready,
        Protocol::Socketio => Join::Wait,
        Protocol::Centrifuge => Join::Send(
            format!(
                "{{\"id\":1,\"method\":0,\"params\":{{}}}}\n{{\"id\":2,\"method\":1,\"params\":{{\"channel\":\"{CHANNEL}\"}}}}"
            )
            .into_bytes(),
        ),
    }
}

/// A peer's publish frame, masked, with the data object's slots ready for
/// [`StampedFrame::stamp`]`(t, seq, sender)`.
pub fn publish_frame(protocol: Protocol, data_size: usize, mask: [u8; 4]) -> StampedFrame {
    let (prefix, suffix) = match protocol {
        Protocol::Corecast | Protocol::Raw => (String::new(), ""),
        Protocol::Socketio => ("42[\"msg\",".to_string(), "]"),
        // The command id is only echoed in the reply, which is not used: the
        // sender's ack is its own publication coming back, as for the others.
        Protocol::Centrifuge => {
            (format!("{{\"id\":3,\"method\":3,\"params\":{{\"channel\":\"{CHANNEL}\",\"data\":"), "}}")
        }
    };
    StampedFrame::wrapped(&prefix, suffix, data_size, mask)
}

/// What one server message means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A published message: its send time and sender, if it carries ours.
    Message { t: Option<u64>, sender: Option<u64> },
    /// The join step is complete: the connection is subscribed.
    Joined,
    /// Answer with this text payload (engine.io OPEN → CONNECT, PING → PONG).
    Reply(&'static [u8]),
    /// The server refused something (socket.io CONNECT_ERROR/DISCONNECT,
    /// engine.io CLOSE, a centrifuge error reply).
    Error,
    /// Anything else (centrifuge's connect and publish replies).
    Other,
}

/// Precompiled searchers for the keys of the peer data object.
pub struct PeerScanner {
    t: Finder<'static>,
    k: Finder<'static>,
    id: Finder<'static>,
    channel: Finder<'static>,
    error: Finder<'static>,
}

impl Default for PeerScanner {
    fn default() -> Self {
        PeerScanner {
            t: Finder::new(br#""t""#),
            k: Finder::new(br#""k""#),
            id: Finder::new(br#""id""#),
            channel: Finder::new(br#""channel""#),
            error: Finder::new(br#""error""#),
        }
    }
}

impl PeerScanner {
    /// Classifies one message (for centrifuge: one line of a frame, see [`lines`]).
    pub fn classify(&self, protocol: Protocol, msg: &[u8]) -> Incoming {
        match protocol {
            Protocol::Corecast | Protocol::Raw => self.message(msg),
            Protocol::Socketio => match msg {
                // engine.io OPEN: answer with socket.io CONNECT to namespace "/".
                [b'0', ..] => Incoming::Reply(b"40"),
                // engine.io PING (the server pings in EIO=4): PONG.
                [b'2'] => Incoming::Reply(b"3"),
                // socket.io CONNECT ack, `40{"sid":…}`.
                [b'4', b'0', ..] => Incoming::Joined,
                [b'4', b'2', ..] => self.message(msg),
                // socket.io DISCONNECT / CONNECT_ERROR, engine.io CLOSE.
                [b'4', b'1', ..] | [b'4', b'4', ..] | [b'1', ..] => Incoming::Error,
                _ => Incoming::Other,
            },
            Protocol::Centrifuge => {
                // A push has no id; a publication's result names its channel.
                if self.channel.find(msg).is_some() && after_key(&self.id, msg).is_none() {
                    self.message(msg)
                } else if after_key(&self.error, msg).is_some() {
                    Incoming::Error
                } else if after_key(&self.id, msg).and_then(parse_u64) == Some(2) {
                    Incoming::Joined
                } else {
                    Incoming::Other
                }
            }
        }
    }

    fn message(&self, msg: &[u8]) -> Incoming {
        Incoming::Message {
            t: after_key(&self.t, msg).and_then(parse_u64),
            sender: after_key(&self.k, msg).and_then(parse_u64),
        }
    }
}

/// The messages in one frame: centrifuge batches replies one per line; every
/// other protocol sends one message per frame.
pub fn lines(protocol: Protocol, frame: &[u8]) -> impl Iterator<Item = &[u8]> {
    let split = protocol == Protocol::Centrifuge;
    let mut rest = Some(frame);
    std::iter::from_fn(move || {
        loop {
            let r = rest?;
            let (line, tail) = match memchr::memchr(b'\n', r) {
                Some(i) if split => (&r[..i], Some(&r[i + 1..])),
                _ => (r, None),
            };
            rest = tail;
            if !line.is_empty() || !split {
                return Some(line);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws;

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    fn unmasked(frame: &[u8]) -> Vec<u8> {
        let (h, n) = ws::FrameHeader::parse(frame).unwrap().unwrap();
        assert_eq!((h.opcode, h.mask), (ws::OP_TEXT, Some(MASK)));
        let mut p = frame[n..].to_vec();
        ws::apply_mask(&mut p, MASK, 0);
        p
    }

    #[test]
    fn publish_frames_are_what_each_peer_expects() {
        let raw = unmasked(publish_frame(Protocol::Raw, 100, MASK).stamp(123, 4, 5));
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!((v["t"].as_u64(), v["s"].as_u64(), v["k"].as_u64()), (Some(123), Some(4), Some(5)));
        assert_eq!(raw.len(), 100);

        let sio = unmasked(publish_frame(Protocol::Socketio, 100, MASK).stamp(9, 1, 2));
        assert!(sio.starts_with(b"42"));
        let v: serde_json::Value = serde_json::from_slice(&sio[2..]).unwrap();
        assert_eq!((v[0].as_str(), v[1]["t"].as_u64(), v[1]["k"].as_u64()), (Some("msg"), Some(9), Some(2)));

        let cf = unmasked(publish_frame(Protocol::Centrifuge, 100, MASK).stamp(7, 0, 3));
        let v: serde_json::Value = serde_json::from_slice(&cf).unwrap();
        assert_eq!((v["method"].as_u64(), v["params"]["channel"].as_str()), (Some(3), Some(CHANNEL)));
        assert_eq!((v["params"]["data"]["t"].as_u64(), v["params"]["data"]["k"].as_u64()), (Some(7), Some(3)));
    }

    #[test]
    fn raw_frames_are_messages_with_their_stamp() {
        let sc = PeerScanner::default();
        let got = sc.classify(Protocol::Raw, br#"{"t":1500 ,"s":2,"k":17,"p":"xx"}"#);
        assert_eq!(got, Incoming::Message { t: Some(1500), sender: Some(17) });
        // Someone else's text still counts as a message, without a stamp.
        assert_eq!(sc.classify(Protocol::Raw, b"hello"), Incoming::Message { t: None, sender: None });
    }

    #[test]
    fn socketio_session_opens_connects_pongs_and_receives() {
        let sc = PeerScanner::default();
        let p = Protocol::Socketio;
        let open = br#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(sc.classify(p, open), Incoming::Reply(b"40"));
        assert_eq!(sc.classify(p, br#"40{"sid":"xyz"}"#), Incoming::Joined);
        assert_eq!(sc.classify(p, b"2"), Incoming::Reply(b"3"));
        let event = br#"42["msg",{"t":42,"s":0,"k":3,"p":"x"}]"#;
        assert_eq!(sc.classify(p, event), Incoming::Message { t: Some(42), sender: Some(3) });
        assert_eq!(sc.classify(p, br#"44{"message":"Invalid namespace"}"#), Incoming::Error);
        assert_eq!(sc.classify(p, b"41"), Incoming::Error);
        assert_eq!(sc.classify(p, b"6"), Incoming::Other);
    }

    #[test]
    fn centrifuge_replies_are_told_from_publications() {
        let sc = PeerScanner::default();
        let p = Protocol::Centrifuge;
        let Join::Send(batch) = join(p) else { panic!("centrifuge sends connect + subscribe") };
        let cmds: Vec<serde_json::Value> =
            batch.split(|&b| b == b'\n').map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!((cmds[0]["method"].as_u64(), cmds[1]["method"].as_u64()), (Some(0), Some(1)));
        assert_eq!(cmds[1]["params"]["channel"], CHANNEL);

        let connect_reply = br#"{"id":1,"result":{"client":"5f0c","version":""}}"#;
        assert_eq!(sc.classify(p, connect_reply), Incoming::Other);
        assert_eq!(sc.classify(p, br#"{"id":2,"result":{}}"#), Incoming::Joined);
        assert_eq!(sc.classify(p, br#"{"id":3,"result":{}}"#), Incoming::Other);
        let push = br#"{"result":{"channel":"bench","data":{"data":{"t":77,"s":1,"k":0,"p":"x"}}}}"#;
        assert_eq!(sc.classify(p, push), Incoming::Message { t: Some(77), sender: Some(0) });
        let refused = br#"{"id":2,"error":{"code":103,"message":"permission denied"}}"#;
        assert_eq!(sc.classify(p, refused), Incoming::Error);
    }

    #[test]
    fn centrifuge_batches_split_into_lines_and_others_do_not() {
        let batch = b"{\"id\":1}\n{\"id\":2}\n";
        let got: Vec<&[u8]> = lines(Protocol::Centrifuge, batch).collect();
        assert_eq!(got, vec![&b"{\"id\":1}"[..], &b"{\"id\":2}"[..]]);
        let one: Vec<&[u8]> = lines(Protocol::Raw, b"a\nb").collect();
        assert_eq!(one, vec![&b"a\nb"[..]]);
        assert_eq!(lines(Protocol::Socketio, b"").count(), 1);
    }
}
