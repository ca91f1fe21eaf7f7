//! Member identity: how a member's ID follows from its name.

/// A member ID derived from its name (FNV-1a, 64 bits; never 0, which etcd's API reads as "no
/// member"): stable across restarts and the same on every member, so that a name given to
/// `lockctl member add` and the ID every member shows agree without a round of messages.
pub fn member_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_stable_and_nonzero() {
        assert_eq!(member_id("n1"), member_id("n1"));
        assert_ne!(member_id("n1"), member_id("n2"));
        assert_ne!(member_id(""), 0);
    }
}
