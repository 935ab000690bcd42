//! Client-to-server payload unmasking (RFC 6455 §5.3), in place.

/// XORs `buf` with the 4-byte `key`, as if `buf` began at payload offset 0.
///
/// The fast path works a `u64` at a time; `unmask_bytewise` is the reference
/// it is tested against at every length and alignment.
#[inline]
pub fn unmask(buf: &mut [u8], key: [u8; 4]) {
    let key64 = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    // SAFETY: `align_to_mut` only yields properly aligned u64 in the middle part,
    // and every bit pattern is a valid u8 / u64.
    let (head, mid, tail) = unsafe { buf.align_to_mut::<u64>() };
    unmask_bytewise_from(head, key, 0);
    // The middle part starts at payload offset head.len(), so rotate the key.
    let shift = head.len() % 4;
    let k = [key[shift], key[(shift + 1) % 4], key[(shift + 2) % 4], key[(shift + 3) % 4]];
    let k64 = if shift == 0 { key64 } else { u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]) };
    for w in mid.iter_mut() {
        *w ^= k64;
    }
    let done = head.len() + mid.len() * 8;
    unmask_bytewise_from(tail, key, done);
}

#[inline]
fn unmask_bytewise_from(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(offset + i) % 4];
    }
}

/// The obvious implementation, kept as the oracle for `unmask`.
pub fn unmask_bytewise(buf: &mut [u8], key: [u8; 4]) {
    unmask_bytewise_from(buf, key, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_unmask_matches_bytewise_at_every_length_and_alignment() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for align in 0..8 {
            for len in 0..(src.len() - align) {
                let mut a = src.clone();
                let mut b = src.clone();
                unmask(&mut a[align..align + len], key);
                unmask_bytewise(&mut b[align..align + len], key);
                assert_eq!(a, b, "align {align} len {len}");
            }
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: a masked "Hello".
        let mut p = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        unmask(&mut p, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(&p, b"Hello");
    }
}
