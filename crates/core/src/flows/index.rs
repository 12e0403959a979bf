//! An open-addressing hash index over the positions of another array: linear probing,
//! backward-shift deletion (no tombstones, so a lookup never walks a run of dead
//! entries). Entries are positions + 1; 0 is empty. The length is a power of two of at
//! least twice the array it indexes, so runs stay short. Lookup, insert and removal are
//! O(1) on average whatever the array's size.

/// Index length for an array of `capacity` places.
pub fn len_for(capacity: usize) -> usize {
    (capacity * 2).next_power_of_two().max(2)
}

fn home(index: &[u32], hash: u64) -> usize {
    hash as usize & (index.len() - 1)
}

/// The index slot holding a position for which `is_key` holds, or the empty slot where
/// it would go (`false`).
pub fn find(index: &[u32], hash: u64, is_key: impl Fn(usize) -> bool) -> (usize, bool) {
    let mask = index.len() - 1;
    let mut i = home(index, hash);
    loop {
        match index[i] {
            0 => return (i, false),
            v if is_key(v as usize - 1) => return (i, true),
            _ => i = (i + 1) & mask,
        }
    }
}

/// Empties slot `i`, shifting later entries of the same probe run back so lookups never
/// stop at a hole. `hash_of` gives the hash of the key at a position.
pub fn remove(index: &mut [u32], mut i: usize, hash_of: impl Fn(usize) -> u64) {
    let mask = index.len() - 1;
    index[i] = 0;
    let mut j = i;
    loop {
        j = (j + 1) & mask;
        let v = index[j];
        if v == 0 {
            return;
        }
        let k = home(index, hash_of(v as usize - 1));
        // The entry at j may stay if its home lies cyclically in (i, j].
        let stays = if i <= j { i < k && k <= j } else { i < k || k <= j };
        if !stays {
            index[i] = v;
            index[j] = 0;
            i = j;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inserts_and_removals_keep_every_key_findable() {
        // Keys are positions in `keys`; hash = key value, so collisions are frequent.
        let mut keys = vec![0u64; 64];
        let mut index = vec![0u32; len_for(64)];
        let mut rng = crate::capture::testframes::xorshift(11);
        let mut live = std::collections::BTreeMap::new(); // key -> position
        let mut free: Vec<usize> = (0..64).rev().collect();
        for step in 0..20_000 {
            let k = (rng() % 100) as u64;
            let (i, found) = find(&index, k, |p| keys[p] == k && live.get(&k) == Some(&p));
            if found {
                let p = index[i] as usize - 1;
                remove(&mut index, i, |q| keys[q]);
                live.remove(&k);
                free.push(p);
            } else if let Some(p) = free.pop() {
                keys[p] = k;
                index[i] = p as u32 + 1;
                live.insert(k, p);
            }
            for (&k, &p) in &live {
                let (i, found) = find(&index, k, |q| keys[q] == k);
                assert!(found && index[i] as usize - 1 == p, "step {step}: {k} lost");
            }
        }
    }
}
