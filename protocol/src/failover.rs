//! Which broker node to try next, for both services' connection supervisors. Pure (no clock, no
//! I/O): the supervisor keeps its own backoff and asks this only *which* URL to dial.
//!
//! The rule (issue 15): try the nodes in the configured order, starting after the last one that
//! failed. A node "fails" when a connection attempt to it fails or when a session on it ends.
//! So a service on node 1 whose node dies goes to node 2 (not back to the dead node 1), and
//! the services that share one URL list move together, which keeps them on one node when
//! they can be (the match queue's home is whoever declared it first; see ARCHITECTURE.md).

/// The rotation over `n ≥ 1` nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRotation {
    n: usize,
    next: usize,
}

impl NodeRotation {
    /// Starts at the first node. `n` is the number of URLs (at least one; 0 is read as 1).
    pub fn new(n: usize) -> NodeRotation {
        NodeRotation {
            n: n.max(1),
            next: 0,
        }
    }

    /// The node to dial now.
    pub fn current(&self) -> usize {
        self.next
    }

    /// Node `i` failed (an attempt, or a session on it ended): the next to dial is the one
    /// after it, wrapping around.
    pub fn failed(&mut self, i: usize) {
        self.next = (i % self.n + 1) % self.n;
    }

    /// A session on node `i` came up: dial it first again if nothing fails.
    pub fn connected(&mut self, i: usize) {
        self.next = i % self.n;
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_node_is_always_the_one() {
        let mut r = NodeRotation::new(1);
        assert_eq!(r.current(), 0);
        r.failed(0);
        assert_eq!(r.current(), 0);
        assert_eq!(NodeRotation::new(0).len(), 1);
    }

    #[test]
    fn starts_after_the_last_failed_node() {
        let mut r = NodeRotation::new(3);
        assert_eq!(r.current(), 0);
        r.failed(0);
        assert_eq!(r.current(), 1);
        r.connected(1);
        r.failed(1);
        assert_eq!(r.current(), 2);
        r.failed(2);
        assert_eq!(r.current(), 0, "wraps around");
    }

    proptest! {
        /// Whatever happened before, consecutive failures from any node visit every node
        /// exactly once in `n` attempts, in configured order after the failed one.
        #[test]
        fn failures_visit_every_node_once_in_order(
            n in 1usize..8,
            history in proptest::collection::vec((any::<bool>(), 0usize..16), 0..20),
            start in 0usize..16,
        ) {
            let mut r = NodeRotation::new(n);
            for (ok, i) in history {
                if ok { r.connected(i) } else { r.failed(i) }
                prop_assert!(r.current() < n);
            }
            let first = start % n;
            r.failed(first);
            let mut seen = Vec::new();
            for _ in 0..n {
                let i = r.current();
                prop_assert!(i < n);
                seen.push(i);
                r.failed(i);
            }
            let expected: Vec<usize> = (1..=n).map(|k| (first + k) % n).collect();
            prop_assert_eq!(seen, expected);
        }

        /// A node that came up is dialled again first; a failure never picks the failed node
        /// again while there is another.
        #[test]
        fn connected_sticks_and_failed_moves_on(n in 1usize..8, i in 0usize..8) {
            let i = i % n;
            let mut r = NodeRotation::new(n);
            r.connected(i);
            prop_assert_eq!(r.current(), i);
            r.failed(i);
            if n > 1 {
                prop_assert_ne!(r.current(), i);
            } else {
                prop_assert_eq!(r.current(), 0);
            }
        }
    }
}
