//! Rendezvous (highest random weight) hashing: which member owns a key.
//!
//! Every member scores every key with a hash of (member address, key); the highest score owns
//! it. Replicas that see the same members agree without talking to each other, whatever order
//! they list them in, and when a member leaves only the keys it owned move (each to its own
//! second choice, so they spread over the others). This module knows only strings.

use std::cmp::Reverse;

use sha2::{Digest as _, Sha256};

/// The weight of `key` on the member at `address`: the first 8 bytes of
/// sha256(address || 0x00 || key), big-endian. The separator keeps ("a", "bc") and ("ab", "c")
/// apart; SHA-256 rather than a fast hash because it is already at hand, a few hundred
/// nanoseconds per member is nothing next to a miss, and it leaves no room for an adversary
/// who chooses keys (digests) to pile them on one member.
pub fn score(address: &str, key: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(address.as_bytes());
    hasher.update([0u8]);
    hasher.update(key.as_bytes());
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// The owner of `key` among `members`: the highest score, a tie going to the smallest address
/// (so it does not depend on the order). `None` when there are no members.
pub fn pick<'a>(members: impl IntoIterator<Item = &'a str>, key: &str) -> Option<&'a str> {
    pick_by(members, |address| score(address, key))
}

fn pick_by<'a>(
    members: impl IntoIterator<Item = &'a str>,
    score: impl Fn(&str) -> u64,
) -> Option<&'a str> {
    members
        .into_iter()
        .max_by_key(|address| (score(address), Reverse(*address)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> impl Iterator<Item = String> {
        (0..10_000u32).map(|i| format!("sha256:{:064x}", u64::from(i) * 7_919))
    }

    #[test]
    fn owner_does_not_depend_on_member_order() {
        let orders: [[&str; 3]; 3] = [
            ["10.0.0.1:5001", "10.0.0.2:5001", "10.0.0.3:5001"],
            ["10.0.0.3:5001", "10.0.0.1:5001", "10.0.0.2:5001"],
            ["10.0.0.2:5001", "10.0.0.3:5001", "10.0.0.1:5001"],
        ];
        for key in keys().take(1000) {
            let owners: Vec<_> = orders
                .iter()
                .map(|o| pick(o.iter().copied(), &key))
                .collect();
            assert!(owners.iter().all(|o| *o == owners[0]), "{key}: {owners:?}");
        }
        assert_eq!(pick([], "sha256:00"), None);
    }

    #[test]
    fn ties_go_to_the_smallest_address_whatever_the_order() {
        for order in [["b:1", "a:1", "c:1"], ["c:1", "b:1", "a:1"]] {
            assert_eq!(pick_by(order, |_| 7), Some("a:1"));
            assert_eq!(pick_by(order, |a| u64::from(a != "a:1")), Some("b:1"));
        }
    }

    #[test]
    fn removing_a_member_moves_only_its_keys_and_spreads_them() {
        let all = ["10.0.0.1:5001", "10.0.0.2:5001", "10.0.0.3:5001"];
        let removed = all[1];
        let rest = [all[0], all[2]];
        let mut moved_to = [0usize; 2];
        let mut removed_owned = 0;
        for key in keys() {
            let before = pick(all, &key).unwrap();
            let after = pick(rest, &key).unwrap();
            if before == removed {
                removed_owned += 1;
                moved_to[rest.iter().position(|a| *a == after).unwrap()] += 1;
            } else {
                assert_eq!(before, after, "{key} moved although its owner stayed");
            }
        }
        assert!(removed_owned > 2_500, "{removed_owned}");
        // The removed member's share goes to both others, not all to one.
        for count in moved_to {
            assert!(
                count * 100 > removed_owned * 35,
                "{moved_to:?} of {removed_owned}"
            );
        }
    }

    #[test]
    fn three_members_share_keys_roughly_evenly() {
        let all = ["regmirror-0:5001", "regmirror-1:5001", "regmirror-2:5001"];
        let mut counts = [0usize; 3];
        for key in keys() {
            let owner = pick(all, &key).unwrap();
            counts[all.iter().position(|a| *a == owner).unwrap()] += 1;
        }
        for count in counts {
            assert!((2_500..=4_200).contains(&count), "{counts:?}");
        }
        // Tag keys too.
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            let repository = format!("library/app{}", i % 100);
            let key =
                super::super::Cluster::tag_key("docker.io", &repository, &(i / 100).to_string());
            let owner = pick(all, &key).unwrap();
            counts[all.iter().position(|a| *a == owner).unwrap()] += 1;
        }
        for count in counts {
            assert!((2_500..=4_200).contains(&count), "{counts:?}");
        }
    }
}
