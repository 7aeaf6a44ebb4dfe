//! A cache of recently written or read token rows (ciphertext and metadata
//! only — what the database holds anyway), so that most detokenize calls
//! skip SQLite's point read. In WAL mode every read transaction after a
//! commit drops the connection's page cache; under group commit that is
//! every read.
//!
//! Correctness rests on one rule: only the writer thread, right after a
//! commit and before answering anyone, inserts rows it wrote and removes
//! rows it deleted or rewrote. A reader may add a row it read from the
//! database only if no removal happened since it started reading (the
//! epoch is unchanged); a row read just before a delete can therefore never
//! outlive the delete in the cache.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use crate::domain::store::TokenRecord;
use crate::domain::token::Token;

pub struct TokenCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    map: HashMap<Token, Arc<TokenRecord>>,
    /// Insertion order, for first-in-first-out eviction.
    order: VecDeque<Token>,
    /// Bumped on every removal.
    epoch: u64,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::with_capacity(capacity.min(1 << 16)),
                order: VecDeque::new(),
                epoch: 0,
            }),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, t: &Token) -> Option<Arc<TokenRecord>> {
        self.lock().map.get(t).cloned()
    }

    /// The epoch to pass to [`TokenCache::fill`] after a database read.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Adds a row a reader read, unless anything was removed since `epoch`.
    pub fn fill(&self, epoch: u64, rec: Arc<TokenRecord>) {
        let mut g = self.lock();
        if g.epoch == epoch {
            Self::put_locked(&mut g, self.capacity, rec);
        }
    }

    /// Writer only: a row it just committed. The row is shared with the
    /// request that carried it, so the writer neither copies nor frees it.
    pub fn put(&self, rec: Arc<TokenRecord>) {
        let mut g = self.lock();
        Self::put_locked(&mut g, self.capacity, rec);
    }

    /// Writer only: rows it just deleted or rewrote.
    pub fn remove(&self, tokens: impl IntoIterator<Item = Token>) {
        let mut g = self.lock();
        g.epoch += 1;
        for t in tokens {
            g.map.remove(&t);
        }
    }

    fn put_locked(g: &mut Inner, capacity: usize, rec: Arc<TokenRecord>) {
        if capacity == 0 {
            return;
        }
        let t = rec.token;
        if g.map.insert(t, rec).is_none() {
            g.order.push_back(t);
        }
        while g.map.len() > capacity {
            match g.order.pop_front() {
                Some(old) => {
                    g.map.remove(&old);
                }
                None => break,
            }
        }
        // Removed tokens leave stale entries in `order`; keep it bounded.
        if g.order.len() > capacity * 2 {
            let Inner { map, order, .. } = &mut *g;
            order.retain(|t| map.contains_key(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{record, token};

    #[test]
    fn fill_after_a_removal_is_refused() {
        let c = TokenCache::new(10);
        let e = c.epoch();
        c.remove([token(1)]);
        c.fill(e, Arc::new(record(token(1), "acme")));
        assert!(
            c.get(&token(1)).is_none(),
            "a stale read must not be cached"
        );
        let e = c.epoch();
        c.fill(e, Arc::new(record(token(1), "acme")));
        assert!(c.get(&token(1)).is_some());
        c.remove([token(1)]);
        assert!(c.get(&token(1)).is_none());
    }

    #[test]
    fn capacity_is_bounded_first_in_first_out() {
        let c = TokenCache::new(3);
        for i in 0..5 {
            c.put(Arc::new(record(token(i), "acme")));
        }
        assert!(c.get(&token(0)).is_none() && c.get(&token(1)).is_none());
        assert!(c.get(&token(4)).is_some());
        let none = TokenCache::new(0);
        none.put(Arc::new(record(token(1), "acme")));
        assert!(none.get(&token(1)).is_none());
    }
}
