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
//! rules of §4 (key, 403, listener) are checked once, for the batch
//! (`routes::batch`).
//!
//! Bounds: the body is read whole under `--max-body-bytes` (1 MiB by
//! default, `read_body`): 1000 commands fit with up to ~1 KB each. The reply
//! holds one body per command; a publish's is at most its `results`, one
//! entry per target it named, each at most about 100 bytes more than the
//! name in the request (an epoch is at most 64 bytes): a 1 MiB batch of
//! one-byte history-room names, the worst case, draws about 25 MiB.

use std::future::Future;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

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

/// Runs a batch: `call(method, params)` is the named call's answer body
/// (`None`: no such method). `Ok` is the reply body, `Err` the 400 body of
/// a batch that is not a list of 1 to `MAX_COMMANDS` commands. (The calls
/// come in as a function so that this file imports nothing of `http`.)
pub async fn run<'a, F, Fut>(body: &'a [u8], call: F) -> Result<Bytes, &'static str>
where
    F: Fn(&str, &'a [u8]) -> Option<Fut>,
    Fut: Future<Output = Bytes>,
{
    let commands = match serde_json::from_slice::<BatchBody>(body) {
        Ok(b) if !b.commands.is_empty() && b.commands.len() <= MAX_COMMANDS => b.commands,
        Ok(_) => return Err(r#"{"error":"bad_request","message":"a batch has 1 to 1000 commands"}"#),
        Err(_) => {
            return Err(
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
        let Some(answer) = call(&cmd.method, cmd.params.get().as_bytes()) else {
            out.extend_from_slice(
                br#"{"error":"unknown_method","message":"method is publish, disconnect, subscribe or unsubscribe"}"#,
            );
            continue;
        };
        out.extend_from_slice(&answer.await);
    }
    out.extend_from_slice(b"]}");
    Ok(Bytes::from(out))
}
