//! Fair selection: top-k with ties in uniformly random order, and uniform sampling without
//! replacement from a score level spread over buckets. Pure (the RNG is passed in).

use std::collections::HashSet;

use rand::{Rng, RngCore, seq::SliceRandom};

use crate::score::SCALE;

/// The `k` best of `items` by score (descending); equal scores in uniformly random order.
pub(crate) fn top_k_fair<T: Copy>(
    items: &[(u16, T)],
    k: usize,
    rng: &mut dyn RngCore,
) -> Vec<(u16, T)> {
    // No special case for `k == 0` or no items: the threshold walk then picks nobody.
    let mut hist = vec![0usize; usize::from(SCALE) + 1];
    for &(s, _) in items {
        hist[usize::from(s)] += 1;
    }
    // The lowest score that still makes the cut, and how many strictly above it.
    let mut above = 0usize;
    let mut threshold = 0u16;
    for s in (0..=SCALE).rev() {
        let n = hist[usize::from(s)];
        if above + n >= k {
            threshold = s;
            break;
        }
        above += n;
    }
    let mut chosen: Vec<(u16, T)> = items.iter().copied().filter(|x| x.0 > threshold).collect();
    let mut at: Vec<(u16, T)> = items.iter().copied().filter(|x| x.0 == threshold).collect();
    let need = k.saturating_sub(chosen.len()).min(at.len());
    let (picked, _) = at.partial_shuffle(rng, need);
    chosen.extend_from_slice(picked);
    chosen.shuffle(rng);
    chosen.sort_by_key(|x| std::cmp::Reverse(x.0)); // stable: keeps the random order within a score
    chosen
}

/// Draws up to `need` members uniformly without replacement from the union of `buckets`,
/// skipping those `eligible` rejects, in the order drawn (uniformly random). Rejection sampling
/// while the level is large; enumeration when it is small or rejections pile up.
pub(crate) fn sample_level<'a, M>(
    buckets: &[&'a [M]],
    need: usize,
    eligible: impl Fn(&M) -> bool,
    rng: &mut dyn RngCore,
) -> Vec<&'a M> {
    let total: usize = buckets.iter().map(|b| b.len()).sum();
    let mut out = Vec::with_capacity(need);
    let enumerate_rest = |taken: &HashSet<usize>, out: &mut Vec<&'a M>, rng: &mut dyn RngCore| {
        let mut rest: Vec<&'a M> = Vec::new();
        let mut pos = 0usize;
        for b in buckets {
            for m in b.iter() {
                if !taken.contains(&pos) && eligible(m) {
                    rest.push(m);
                }
                pos += 1;
            }
        }
        let n = (need - out.len()).min(rest.len());
        let (picked, _) = rest.partial_shuffle(rng, n);
        out.extend_from_slice(picked);
    };
    let mut taken: HashSet<usize> = HashSet::new();
    if total <= 4 * need + 32 {
        enumerate_rest(&taken, &mut out, rng);
        return out;
    }
    let mut starts = Vec::with_capacity(buckets.len());
    let mut acc = 0usize;
    for b in buckets {
        starts.push(acc);
        acc += b.len();
    }
    let mut attempts = 8 * need + 64;
    while out.len() < need && attempts > 0 {
        attempts -= 1;
        let r = rng.random_range(0..total);
        if !taken.insert(r) {
            continue;
        }
        let bi = starts.partition_point(|&s| s <= r) - 1;
        let m = &buckets[bi][r - starts[bi]];
        if eligible(m) {
            out.push(m);
        }
    }
    if out.len() < need {
        enumerate_rest(&taken, &mut out, rng);
    }
    out
}
