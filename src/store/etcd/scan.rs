//! Reading a whole key range, page by page, at one revision, in time linear in its size.
//!
//! etcd answers a range read with a limit by walking *every* key of the range to count them (the
//! reply's `count`; etcd-io/etcd#16510), so paging through a range by moving its start after the
//! last key read walks the rest of the range once per page: quadratic, minutes for a few million
//! keys. Here each read covers a window, the span of keys the previous page covered, so etcd
//! counts about one page per read. Windows follow each other, so every key is read exactly once.

use tokio::sync::mpsc;

use super::client::{pb::mvccpb::KeyValue, EtcdClient, RangeRequest};
use crate::error::{Error, Result};

/// Keys per read.
const PAGE: i64 = 10_000;

/// Sends every key-value in `[start, end)` at one revision into `pages`, a page at a time in key
/// order; returns that revision (the newest when called, if `revision` is 0). The next read is
/// sent as soon as a page is queued, so etcd reads while the receiver applies (the channel's
/// bound is how far ahead).
pub async fn scan(
    client: &EtcdClient,
    start: Vec<u8>,
    end: Vec<u8>,
    mut revision: i64,
    pages: mpsc::Sender<Vec<KeyValue>>,
) -> Result<i64> {
    let mut from = start;
    // The window's width as a number over `LEN` bytes, first one value of the third byte
    // after `start`: small, so the first reads are cheap however large the range.
    let mut width = vec![0u8; LEN];
    width[(from.len() + 2).min(LEN - 1)] = 1;
    loop {
        let to = add(&from, &width)
            .filter(|k| k.as_slice() < end.as_slice())
            .unwrap_or_else(|| end.clone());
        let page = client
            .range(RangeRequest {
                key: from.clone(),
                range_end: to.clone(),
                limit: PAGE,
                revision,
                ..Default::default()
            })
            .await?;
        if revision == 0 {
            revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        let more = page.more;
        let read = page.kvs.len() as i64;
        let last = page.kvs.last().map(|kv| kv.key.clone());
        pages
            .send(page.kvs)
            .await
            .map_err(|_| Error::Storage("the etcd scan's receiver stopped".into()))?;
        match (more, last) {
            (true, Some(last)) => {
                // Too wide: the next window spans what this page covered.
                width = sub(&last, &from);
                from = last;
                from.push(0);
            }
            _ => {
                if to == end {
                    return Ok(revision);
                }
                // Room to spare: wider in proportion, at most 16 times (a window too wide
                // costs etcd a count of all it holds).
                let mut grow = 1;
                while grow < 16 && read * grow * 2 <= PAGE {
                    grow *= 2;
                }
                width = times(&width, grow as u32);
                from = to;
            }
        }
    }
}

/// Keys as numbers: big-endian over `LEN` bytes, padded with zeros (keys longer than that are
/// cut, which only makes a window end earlier; the next starts where it ended).
const LEN: usize = 512;

fn number(key: &[u8]) -> [u8; LEN] {
    let mut n = [0u8; LEN];
    let k = &key[..key.len().min(LEN)];
    n[..k.len()].copy_from_slice(k);
    n
}

/// `a + b`, none on overflow.
fn add(a: &[u8], b: &[u8]) -> Option<Vec<u8>> {
    let (a, b) = (number(a), number(b));
    let mut out = [0u8; LEN];
    let mut carry = 0u16;
    for i in (0..LEN).rev() {
        let s = a[i] as u16 + b[i] as u16 + carry;
        out[i] = s as u8;
        carry = s >> 8;
    }
    (carry == 0).then(|| out.to_vec())
}

/// `a * k` for `k` a power of two, the largest number on overflow.
fn times(a: &[u8], k: u32) -> Vec<u8> {
    let shift = k.trailing_zeros();
    let a = number(a);
    let mut out = [0u8; LEN];
    let mut carry = 0u16;
    for i in (0..LEN).rev() {
        let v = ((a[i] as u16) << shift) | carry;
        out[i] = v as u8;
        carry = v >> 8;
    }
    if carry != 0 {
        return vec![0xff; LEN];
    }
    out.to_vec()
}

/// `a - b`, at least 1.
fn sub(a: &[u8], b: &[u8]) -> Vec<u8> {
    let (a, b) = (number(a), number(b));
    if a <= b {
        let mut one = vec![0u8; LEN];
        one[LEN - 1] = 1;
        return one;
    }
    let mut out = [0u8; LEN];
    let mut borrow = 0i16;
    for i in (0..LEN).rev() {
        let mut d = a[i] as i16 - b[i] as i16 - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        out[i] = d as u8;
    }
    out.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_step_by_the_span_a_page_covered() {
        let from = b"/p/e\x00\x00\x00\x00\x00\x00\x00\x01".to_vec();
        let last = b"/p/e\x00\x00\x00\x00\x00\x00\x27\x10".to_vec();
        let w = sub(&last, &from);
        let next = add(&last, &w).expect("no overflow");
        assert_eq!(&next[..12], b"/p/e\x00\x00\x00\x00\x00\x00\x4e\x1f");
        assert!(next.as_slice() > last.as_slice());
    }

    #[test]
    fn widths_grow_by_powers_of_two() {
        let mut w = vec![0u8; LEN];
        w[LEN - 1] = 0x81;
        let t = times(&w, 4);
        assert_eq!(&t[LEN - 2..], &[0x02, 0x04]);
        assert_eq!(times(&[0xff; LEN], 2), vec![0xff; LEN]);
    }

    #[test]
    fn a_sum_past_the_largest_key_is_none_and_a_difference_is_never_zero() {
        assert_eq!(add(&[0xff; LEN], &[1]), None);
        let one = sub(b"a", b"b");
        assert_eq!(one.iter().map(|b| *b as u32).sum::<u32>(), 1);
    }
}
