//! Interning of seller, category and text product-id strings: a product
//! state holds 4-byte symbols instead of strings.

use foldhash::HashMap;

pub type Sym = u32;

#[derive(Default)]
pub struct Interner {
    ids: HashMap<Box<str>, Sym>,
    names: Vec<Box<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(&sym) = self.ids.get(s) {
            return sym;
        }
        let sym = self.names.len() as Sym;
        self.names.push(s.into());
        self.ids.insert(s.into(), sym);
        sym
    }

    pub fn get(&self, s: &str) -> Option<Sym> {
        self.ids.get(s).copied()
    }

    pub fn name(&self, sym: Sym) -> &str {
        &self.names[sym as usize]
    }
}
