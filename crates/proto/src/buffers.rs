//! Recycled batch buffers, used on both ends of a stream: the daemon samples into them, a
//! client converts compact batches into them.
//!
//! A 128³ batch of two `f32` patches is ~21 MB. Allocated fresh for every batch and freed on
//! another thread once sent, such buffers come from and go back to the kernel each time: every
//! page faults in, is zeroed and is unmapped again, which cost the daemon more CPU than cutting
//! the patches. The pool keeps the buffers of sent batches (as [`Bytes`] owners that return
//! their vector when the last message part referring to them is dropped) and hands them to the
//! next batch. It is bounded in buffers and bytes, so it never holds more than a few batches.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// A bounded stack of spare buffers.
pub struct BufferPool {
    free: Mutex<Spare>,
    max_buffers: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Spare {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool keeping at most `max_buffers` spare buffers of at most `max_bytes` in total.
    pub fn new(max_buffers: usize, max_bytes: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Spare::default()),
            max_buffers,
            max_bytes,
        })
    }

    /// A spare buffer with room for at least `len` bytes, or an empty one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut spare = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        // The smallest buffer that fits, so that large buffers stay for large batches.
        let pick = spare
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match pick {
            Some(i) => {
                let buf = spare.buffers.swap_remove(i);
                spare.bytes -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    /// Keeps `buf` for a later batch if the pool has room; otherwise frees it.
    fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap == 0 {
            return;
        }
        let mut spare = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.buffers.len() < self.max_buffers && spare.bytes + cap <= self.max_bytes {
            spare.bytes += cap;
            spare.buffers.push(buf);
        }
    }

    /// `buf` as shared bytes whose allocation comes back to the pool when the last reference
    /// is dropped.
    pub fn share(self: &Arc<BufferPool>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Recycled {
            buf,
            pool: Arc::clone(self),
        })
    }

    /// Spare buffers and their bytes now.
    #[cfg(test)]
    fn spare(&self) -> (usize, usize) {
        let spare = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        (spare.buffers.len(), spare.bytes)
    }
}

/// A buffer lent to [`Bytes`]; returns to its pool on drop.
struct Recycled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_reference_goes() {
        let pool = BufferPool::new(4, 1 << 20);
        let bytes = pool.share(vec![7u8; 1000]);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.spare().0, 0, "a slice still refers to the buffer");
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        assert_eq!(pool.spare().0, 1);
        let again = pool.take(500);
        assert!(again.capacity() >= 1000);
        assert_eq!(pool.spare(), (0, 0));
        // Too small for the request: a new (empty) vector instead.
        pool.give(vec![0u8; 100]);
        assert_eq!(pool.take(1000).capacity(), 0);
        assert_eq!(pool.spare().0, 1);
    }

    #[test]
    fn the_pool_is_bounded_in_buffers_and_bytes() {
        let pool = BufferPool::new(2, 3000);
        for _ in 0..5 {
            drop(pool.share(vec![0u8; 1000]));
        }
        assert_eq!(pool.spare(), (2, 2000));
        let pool = BufferPool::new(10, 2500);
        for _ in 0..5 {
            drop(pool.share(vec![0u8; 1000]));
        }
        assert_eq!(pool.spare(), (2, 2000));
    }

    #[test]
    fn the_smallest_fitting_buffer_is_taken() {
        let pool = BufferPool::new(4, 1 << 20);
        pool.give(Vec::with_capacity(4000));
        pool.give(Vec::with_capacity(1000));
        pool.give(Vec::with_capacity(2000));
        assert_eq!(pool.take(1500).capacity(), 2000);
        assert_eq!(pool.take(1).capacity(), 1000);
    }
}
