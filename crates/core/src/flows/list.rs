//! Intrusive doubly linked lists over the places of an array in shared memory: links are
//! positions + 1 (0 = none), so all-zero memory is a valid empty list and nothing is
//! ever allocated. Push, remove and pop are O(1); they are how the flow table finds its
//! eviction victim and its expired entries without scanning.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Links {
    prev: u32,
    next: u32,
}

/// Something that sits in at most one list at a time through its `Links`.
pub trait Linked {
    fn links(&self) -> &Links;
    fn links_mut(&mut self) -> &mut Links;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct List {
    head: u32,
    tail: u32,
    pub len: u32,
}

impl List {
    /// Oldest entry.
    pub fn front(&self) -> Option<usize> {
        (self.head as usize).checked_sub(1)
    }

    pub fn back(&self) -> Option<usize> {
        (self.tail as usize).checked_sub(1)
    }

    pub fn push_back<T: Linked>(&mut self, items: &mut [T], pos: usize) {
        let me = pos as u32 + 1;
        *items[pos].links_mut() = Links { prev: self.tail, next: 0 };
        match self.back() {
            Some(t) => items[t].links_mut().next = me,
            None => self.head = me,
        }
        self.tail = me;
        self.len += 1;
    }

    /// Takes `pos` out of this list; it must be in it.
    pub fn remove<T: Linked>(&mut self, items: &mut [T], pos: usize) {
        let Links { prev, next } = *items[pos].links();
        match (prev as usize).checked_sub(1) {
            Some(p) => items[p].links_mut().next = next,
            None => self.head = next,
        }
        match (next as usize).checked_sub(1) {
            Some(n) => items[n].links_mut().prev = prev,
            None => self.tail = prev,
        }
        *items[pos].links_mut() = Links::default();
        self.len -= 1;
    }

    pub fn pop_front<T: Linked>(&mut self, items: &mut [T]) -> Option<usize> {
        let p = self.front()?;
        self.remove(items, p);
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Default)]
    struct Item(Links);
    impl Linked for Item {
        fn links(&self) -> &Links {
            &self.0
        }
        fn links_mut(&mut self) -> &mut Links {
            &mut self.0
        }
    }

    fn order(l: &List, items: &[Item]) -> Vec<usize> {
        let mut out = vec![];
        let mut at = l.front();
        while let Some(p) = at {
            out.push(p);
            at = (items[p].0.next as usize).checked_sub(1);
        }
        out
    }

    #[test]
    fn push_remove_pop_keep_order_against_a_model() {
        let mut items = vec![Item::default(); 32];
        let mut list = List::default();
        let mut model: std::collections::VecDeque<usize> = Default::default();
        let mut rng = crate::capture::testframes::xorshift(3);
        for _ in 0..10_000 {
            let p = (rng() % 32) as usize;
            match rng() % 3 {
                0 if model.contains(&p) => {
                    list.remove(&mut items, p);
                    model.retain(|&q| q != p);
                }
                1 => assert_eq!(list.pop_front(&mut items), model.pop_front()),
                _ if !model.contains(&p) => {
                    list.push_back(&mut items, p);
                    model.push_back(p);
                }
                _ => {}
            }
            assert_eq!(order(&list, &items), model.iter().copied().collect::<Vec<_>>());
            assert_eq!(list.len as usize, model.len());
            assert_eq!(list.back(), model.back().copied());
        }
    }
}
