//! Merkle trees shaped as RFC 9162 (Certificate Transparency v2) defines them, over BLAKE3:
//! leaves hashed as `H(0x00 || data)`, interior nodes as `H(0x01 || left || right)`, and a
//! tree of `n` leaves split at the largest power of two below `n`. Inclusion proofs are RFC
//! 9162 audit paths and are verified with its algorithm (section 2.1.3.2).

use crate::Digest;

/// The hash of a leaf's data.
pub fn leaf_hash(data: &[u8]) -> Digest {
    Digest::of_parts(&[&[0x00], data])
}

/// The hash of an interior node.
pub fn node_hash(left: &Digest, right: &Digest) -> Digest {
    Digest::of_parts(&[&[0x01], left.as_bytes(), right.as_bytes()])
}

/// The root over leaf hashes; the root of no leaves is the hash of nothing.
pub fn root(leaves: &[Digest]) -> Digest {
    match leaves.len() {
        0 => Digest::of(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path proving `leaves[index]` is in the tree, from the leaf up.
pub fn audit_path(leaves: &[Digest], index: usize) -> Vec<Digest> {
    assert!(index < leaves.len(), "leaf index out of range");
    let mut path = Vec::new();
    path_into(leaves, index, &mut path);
    path
}

fn path_into(leaves: &[Digest], index: usize, path: &mut Vec<Digest>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if index < k {
        path_into(&leaves[..k], index, path);
        path.push(root(&leaves[k..]));
    } else {
        path_into(&leaves[k..], index - k, path);
        path.push(root(&leaves[..k]));
    }
}

/// The root an audit path leads to from `leaf` at `index` in a tree of `size` leaves, or
/// `None` if the path cannot belong to such a tree.
pub fn root_from_path(leaf: Digest, index: u64, size: u64, path: &[Digest]) -> Option<Digest> {
    if index >= size {
        return None;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = leaf;
    for p in path {
        if s == 0 {
            return None;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    (s == 0).then_some(r)
}

/// Whether `path` proves `leaf` at `index` in the tree of `size` leaves with `root`.
pub fn verify(leaf: Digest, index: u64, size: u64, path: &[Digest], root: &Digest) -> bool {
    root_from_path(leaf, index, size, path).is_some_and(|r| &r == root)
}

/// The largest power of two strictly below `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_le_bytes()))
            .collect()
    }

    #[test]
    fn small_trees_have_the_rfc_shape() {
        let l = leaves(3);
        assert_eq!(root(&l[..1]), l[0]);
        assert_eq!(
            root(&l),
            node_hash(&node_hash(&l[0], &l[1]), &l[2]),
            "three leaves split 2 + 1"
        );
        assert_ne!(
            leaf_hash(b""),
            node_hash(&Digest::default(), &Digest::default())
        );
    }

    proptest! {
        #[test]
        fn every_leaf_proves_and_nothing_else_does(n in 1usize..70, salt in any::<u64>()) {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let p = audit_path(&l, i);
                prop_assert!(verify(l[i], i as u64, n as u64, &p, &r));
                // Wrong index, wrong leaf, truncated or extended path all fail. (A wrong size
                // can give the same path shape, so the size must be committed elsewhere: the
                // manifest commits each series' instance count.)
                if n > 1 {
                    prop_assert!(!verify(l[i], ((i + 1) % n) as u64, n as u64, &p, &r));
                }
                prop_assert!(!verify(leaf_hash(&salt.to_be_bytes()), i as u64, n as u64, &p, &r));
                if !p.is_empty() {
                    prop_assert!(!verify(l[i], i as u64, n as u64, &p[..p.len() - 1], &r));
                }
                let mut longer = p.clone();
                longer.push(l[0]);
                prop_assert!(!verify(l[i], i as u64, n as u64, &longer, &r));
            }
        }
    }
}
