//! `POST /api/batch` `{"commands":[{"method":M,"params":P},…]}` (PROTOCOL.md
//! §12): at most `MAX_COMMANDS` calls (M = publish, disconnect, subscribe,
//! unsubscribe, P the body that call takes alone), answered
//! `{"replies":[…]}` in order, each the JSON body the call alone answers
//! (`routes::Call::run`, the same function its own route runs), or
//! `{"error":..}` for a command that is not `{"method":M,"params":P}` or
//! names no such call. The batch's own status is 200 once its body is a
//! list of 1 to 1000 commands; each reply says how its call went.
//!
//! The commands run one after another, each finished (as far as its own
//! answer waits: the backplane took it) before the next starts, so a
//! batch's subscribe comes before its next publish on every node. The
//! rules of §4 (key, 403, listener) are checked once, for the batch.
//!
//! Bounds: the body is read whole under `--max-body-bytes` (1 MiB by
//! default, `read_body`): 1000 commands fit with up to ~1 KB each. The reply
//! holds one body per command; a publish's is at most its `results`, one
//! entry per target it named, so the reply grows with the request: about
//! 12 times its size at worst (one-byte room names in history rooms).

use std::rc::Rc;

use bytes::Bytes;
use http::request::Parts;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Reply;
use super::routes::{Call, refused};
use crate::services::Services;

/// Most commands in one batch.
pub const MAX_COMMANDS: usize = 1000;

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    commands: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Command<'a> {
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    params: &'a RawValue,
}

pub async fn batch(svc: &Rc<Services>, head: &Parts, body: &[u8]) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let commands = match serde_json::from_slice::<BatchBody>(body) {
        Ok(b) if !b.commands.is_empty() && b.commands.len() <= MAX_COMMANDS => b.commands,
        Ok(_) => return json(400, r#"{"error":"bad_request","message":"a batch has 1 to 1000 commands"}"#),
        Err(_) => {
            return json(
                400,
                r#"{"error":"bad_request","message":"expected {\"commands\":[{\"method\":M,\"params\":P},...]}"}"#,
            );
        }
    };
    let mut out = Vec::with_capacity(16 + commands.len() * 16);
    out.extend_from_slice(br#"{"replies":["#);
    for (i, raw) in commands.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let Ok(cmd) = serde_json::from_str::<Command>(raw.get()) else {
            out.extend_from_slice(br#"{"error":"bad_request","message":"a command is {\"method\":M,\"params\":P}"}"#);
            continue;
        };
        let Some(call) = Call::named(&cmd.method) else {
            out.extend_from_slice(
                br#"{"error":"unknown_method","message":"method is publish, disconnect, subscribe or unsubscribe"}"#,
            );
            continue;
        };
        let answer = call.run(svc, cmd.params.get().as_bytes()).await;
        out.extend_from_slice(&answer.body);
    }
    out.extend_from_slice(b"]}");
    Reply::new(200, "application/json", Bytes::from(out))
}

fn json(status: u16, body: &'static str) -> Reply {
    Reply::new(status, "application/json", Bytes::from_static(body.as_bytes()))
}
