//! ③ Data frames into messages (RFC 6455 §5.4, RFC 7692 §6): fragments
//! reassembled, UTF-8 checked across them (and on the inflated bytes of a
//! compressed message), permessage-deflate inflated within the size limit.
//!
//! `Assembler` is a connection's state between data frames: two pointers,
//! both `None` on an idle connection unless it keeps a deflate context. The
//! connection's frame loop (`conn::reader`) handles control frames itself
//! and feeds every Text, Binary and Continue frame here.

use super::deflate::{self, Agreed, Inflater};
use super::frame::{FrameHeader, OpCode, ProtocolError};
use super::utf8::Utf8Check;

/// A text or binary message being reassembled from fragments.
struct Fragmented {
    text: bool,
    /// RSV1 was set on its first frame: `buf` holds the inflated bytes.
    compressed: bool,
    buf: Vec<u8>,
    utf8: Utf8Check,
}

/// One connection's message in progress and its inflater.
#[derive(Default)]
pub struct Assembler {
    frag: Option<Box<Fragmented>>,
    /// permessage-deflate: the connection's inflater. With
    /// `client_no_context_takeover` it is held only while a compressed
    /// message is being read (lent by the shard, `deflate::take_spare`);
    /// otherwise it is made at the first compressed message, with the
    /// negotiated window, and kept (the client may refer back to it).
    inflater: Option<Box<Inflater>>,
}

/// A complete message: the frame's own payload (one unfragmented,
/// uncompressed frame: no copy) or the reassembled or inflated bytes.
pub enum Message<'a> {
    Frame { text: bool, payload: &'a mut [u8] },
    Assembled { text: bool, buf: Vec<u8> },
}

impl Message<'_> {
    pub fn text(&self) -> bool {
        match self {
            Message::Frame { text, .. } | Message::Assembled { text, .. } => *text,
        }
    }

    pub fn payload(&mut self) -> &mut [u8] {
        match self {
            Message::Frame { payload, .. } => payload,
            Message::Assembled { buf, .. } => buf,
        }
    }
}

impl Assembler {
    /// Holds nothing (so the connection can drop it).
    pub fn is_idle(&self) -> bool {
        self.frag.is_none() && self.inflater.is_none()
    }

    /// Bytes of the message in progress (for the size limit on the next
    /// frame's header).
    pub fn in_progress(&self) -> usize {
        self.frag.as_ref().map_or(0, |f| f.buf.len())
    }

    /// One complete, unmasked data frame (`Text`, `Binary` or `Continue`);
    /// `Some` once it ends a message. `max` bounds the inflated size.
    pub fn on_data<'a>(
        &mut self,
        h: &FrameHeader,
        payload: &'a mut [u8],
        agreed: Agreed,
        max: usize,
    ) -> Result<Option<Message<'a>>, ProtocolError> {
        use ProtocolError::*;
        match h.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.frag.is_some() {
                    return Err(BadFragmentation);
                }
                let text = h.opcode == OpCode::Text;
                if h.rsv1 {
                    // RSV1 only parses when deflate was negotiated (frame.rs).
                    let mut out = Vec::new();
                    self.inflater(agreed).inflate(payload, h.fin, &mut out, max)?;
                    if h.fin {
                        self.message_inflated(agreed);
                        // UTF-8 is checked on the inflated bytes (RFC 7692 §6.2).
                        if text && simdutf8::basic::from_utf8(&out).is_err() {
                            return Err(InvalidUtf8);
                        }
                        return Ok(Some(Message::Assembled { text, buf: out }));
                    }
                    self.start(text, true, out)?;
                } else if h.fin {
                    if text && simdutf8::basic::from_utf8(payload).is_err() {
                        return Err(InvalidUtf8);
                    }
                    return Ok(Some(Message::Frame { text, payload }));
                } else {
                    self.start(text, false, payload.to_vec())?;
                }
                Ok(None)
            }
            OpCode::Continue => {
                let Some(f) = self.frag.as_mut() else {
                    return Err(BadFragmentation);
                };
                if f.compressed {
                    let inflater = self.inflater.get_or_insert_with(|| Box::new(Inflater::new(agreed.client_bits())));
                    inflater.inflate(payload, h.fin, &mut f.buf, max)?;
                } else {
                    f.buf.extend_from_slice(payload);
                }
                if f.text && f.utf8.feed(&f.buf).is_err() {
                    return Err(InvalidUtf8);
                }
                if !h.fin {
                    return Ok(None);
                }
                let f = self.frag.take().expect("checked above");
                if f.compressed {
                    self.message_inflated(agreed);
                }
                if f.text && !f.utf8.is_complete(&f.buf) {
                    return Err(InvalidUtf8);
                }
                Ok(Some(Message::Assembled { text: f.text, buf: f.buf }))
            }
            _ => unreachable!("control frames are handled by the caller"),
        }
    }

    /// A first fragment: kept until its `Continue` with FIN.
    fn start(&mut self, text: bool, compressed: bool, buf: Vec<u8>) -> Result<(), ProtocolError> {
        let mut f = Box::new(Fragmented { text, compressed, buf, utf8: Utf8Check::default() });
        if text && f.utf8.feed(&f.buf).is_err() {
            return Err(ProtocolError::InvalidUtf8);
        }
        self.frag = Some(f);
        Ok(())
    }

    fn inflater(&mut self, agreed: Agreed) -> &mut Inflater {
        self.inflater.get_or_insert_with(|| {
            if agreed.client_no_context() {
                deflate::take_spare()
            } else {
                Box::new(Inflater::new(agreed.client_bits()))
            }
        })
    }

    /// A compressed message was read to its end.
    fn message_inflated(&mut self, agreed: Agreed) {
        if agreed.client_no_context()
            && let Some(i) = self.inflater.take()
        {
            deflate::put_spare(i);
        }
    }
}
