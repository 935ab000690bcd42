//! Untrusted request heads through monoio-http's decoder as corecast calls it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use monoio_codec::Decoder;
use monoio_http::h1::codec::decoder::RequestHeadDecoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(monoio_codec::Decoded::Some(head)) = RequestHeadDecoder.decode(&mut buf) {
        let _ = head.uri.path();
        let _ = head.uri.query();
    }
});
