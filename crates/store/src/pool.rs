//! Buffers for the bytes a put reads and seals (and a node receives), handed back once
//! written and used again.
//!
//! A put touches every byte of its input three times (read, seal, write). With a fresh
//! allocation per file and per object, the kernel zeroes a fresh page for every 4 KiB of them
//! first (an allocator hands large blocks back and maps new ones), and that zeroing cost more
//! than the digests and the sealing together. Reusing a bounded set of buffers removes it.

use std::sync::Mutex;

use bytes::Bytes;

/// At most this many bytes of buffers are kept for reuse: what a STOW-RS request of a CT
/// series holds at once (a buffer per part) plus a put's chunks in flight, with room.
const KEPT_BYTES: usize = 256 << 20;
/// Buffers smaller than this are left to the allocator (it reuses small blocks well).
const MIN_BYTES: usize = 64 << 10;

/// The kept buffers and the sum of their capacities.
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

static FREE: Mutex<Free> = Mutex::new(Free {
    buffers: Vec::new(),
    bytes: 0,
});

/// An empty buffer with room for at least `len` bytes.
pub fn take(len: usize) -> Vec<u8> {
    if len >= MIN_BYTES {
        let mut free = FREE.lock().expect("not poisoned");
        // The smallest that fits, so that a small request does not take a large buffer a
        // large one then has to allocate afresh.
        let best = free
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut v = free.buffers.swap_remove(i);
            free.bytes -= v.capacity();
            v.clear();
            return v;
        }
    }
    Vec::with_capacity(class(len))
}

/// The capacity a new buffer for `len` bytes gets: the next of 2^k and 1.5 * 2^k. Buffers
/// made for somewhat different lengths (an instance as received, as a STOW-RS part with its
/// headers, sealed with its tag) then fit each other's requests. With exact sizes, the
/// sealing of objects took the larger part buffers and gave back smaller ones, and a STOW-RS
/// of a CT series found no fitting buffer for nearly every part.
fn class(len: usize) -> usize {
    if len < MIN_BYTES {
        return len;
    }
    let p = len.next_power_of_two();
    let between = p / 4 * 3;
    if len <= between { between } else { p }
}

/// Hands a buffer back for reuse.
pub fn give(v: Vec<u8>) {
    if v.capacity() < MIN_BYTES {
        return;
    }
    let mut free = FREE.lock().expect("not poisoned");
    if free.bytes + v.capacity() <= KEPT_BYTES {
        free.bytes += v.capacity();
        free.buffers.push(v);
    }
}

/// Hands back the buffer under `b` if nothing else refers to it (the whole allocation, also
/// when `b` is a slice of it).
pub fn give_bytes(b: Bytes) {
    if b.len() < MIN_BYTES {
        return;
    }
    if let Some(v) = reclaim(b) {
        give(v);
    }
}

/// The allocation under `b`, empty, if nothing else refers to it.
fn reclaim(b: Bytes) -> Option<Vec<u8>> {
    let mut m = b.try_into_mut().ok()?;
    // Emptied first: turning a buffer back into a vector moves its contents to the front of
    // the allocation, which is a copy of all of it when it is a slice.
    m.clear();
    Some(Vec::from(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffers_come_in_a_few_sizes() {
        assert_eq!(class(100), 100);
        assert_eq!(class(64 << 10), 64 << 10);
        assert_eq!(class(527_000), 768 << 10);
        assert_eq!(class(600_000), 768 << 10);
        assert_eq!(class(800_000), 1 << 20);
        assert_eq!(class((4 << 20) + 4096), 6 << 20);
        for len in [65_536, 70_000, 524_288, 1_000_000, 3 << 20, 9_999_999] {
            let c = class(len);
            assert!(c >= len && c < len * 3 / 2 + 1, "{len} -> {c}");
        }
    }

    #[test]
    fn buffers_come_back_empty_and_large_enough() {
        let mut v = take(100_000);
        v.extend_from_slice(&[7u8; 100_000]);
        give_bytes(Bytes::from(v));
        let again = take(90_000);
        assert!(again.is_empty());
        assert!(again.capacity() >= 90_000);
        // A slice of a buffer gives back the whole allocation, emptied.
        let mut v = Vec::with_capacity(400_000);
        v.extend_from_slice(&[9u8; 300_000]);
        let at = v.as_ptr();
        let whole = Bytes::from(v);
        let slice = whole.slice(1000..200_000);
        assert!(reclaim(slice.clone()).is_none(), "still shared");
        drop(whole);
        let back = reclaim(slice).expect("unique");
        assert!(back.is_empty());
        assert_eq!(back.as_ptr(), at);
        assert_eq!(back.capacity(), 400_000);
        // A buffer still referred to elsewhere is not taken back.
        let shared = Bytes::from(vec![1u8; 100_000]);
        let other = shared.clone();
        give_bytes(shared);
        assert_eq!(other.len(), 100_000);
    }
}
