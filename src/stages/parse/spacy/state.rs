//! spaCy's arc-eager parser state and moves (spacy/pipeline/_parser_internals
//! _state.pxd and arc_eager.pyx), including its quirks: a Reduce on a
//! headless word puts it back on the buffer, and an arc that is replaced
//! stays in the child lists unless it was the head's newest one.

use super::model::Move;

#[derive(Clone, Copy)]
struct Arc {
    head: i32,
    child: i32,
}

pub(crate) struct State {
    n: i32,
    heads: Vec<i32>,
    labels: Vec<u16>,
    stack: Vec<i32>,
    rebuffer: Vec<i32>,
    b_i: i32,
    unshiftable: Vec<bool>,
    sent_start: Vec<bool>,
    left: Vec<Vec<Arc>>,
    right: Vec<Vec<Arc>>,
}

impl State {
    pub(crate) fn new(n: usize) -> State {
        State {
            n: n as i32,
            heads: vec![-1; n],
            labels: vec![0; n],
            stack: Vec::new(),
            rebuffer: Vec::new(),
            b_i: 0,
            unshiftable: vec![false; n],
            sent_start: vec![false; n],
            left: vec![Vec::new(); n],
            right: vec![Vec::new(); n],
        }
    }

    fn s(&self, i: usize) -> i32 {
        if i >= self.stack.len() {
            -1
        } else {
            self.stack[self.stack.len() - 1 - i]
        }
    }

    fn b(&self, i: usize) -> i32 {
        if i < self.rebuffer.len() {
            self.rebuffer[self.rebuffer.len() - 1 - i]
        } else {
            let b = self.b_i + (i - self.rebuffer.len()) as i32;
            if b >= self.n {
                -1
            } else {
                b
            }
        }
    }

    fn nth_child(arcs: &[Vec<Arc>], head: i32, idx: usize) -> i32 {
        if head < 0 || idx < 1 {
            return -1;
        }
        let mut k = 0;
        for a in arcs[head as usize].iter().rev() {
            if a.child != -1 {
                k += 1;
                if k == idx {
                    return a.child;
                }
            }
        }
        -1
    }

    fn l(&self, head: i32, idx: usize) -> i32 {
        Self::nth_child(&self.left, head, idx)
    }

    fn r(&self, head: i32, idx: usize) -> i32 {
        Self::nth_child(&self.right, head, idx)
    }

    pub(crate) fn context(&self) -> [i32; 8] {
        [
            self.b(0),
            self.b(1),
            self.s(0),
            self.s(1),
            self.s(2),
            self.l(self.b(0), 1),
            self.l(self.s(0), 1),
            self.r(self.s(0), 1),
        ]
    }

    fn buffer_len(&self) -> i32 {
        (self.n - self.b_i) + self.rebuffer.len() as i32
    }

    pub(crate) fn is_final(&self) -> bool {
        self.stack.is_empty() && self.buffer_len() == 0
    }

    fn is_sent_start(&self, w: i32) -> bool {
        w >= 0 && w < self.n && self.sent_start[w as usize]
    }

    fn push(&mut self) {
        let b0 = if let Some(b) = self.rebuffer.pop() {
            b
        } else {
            self.b_i += 1;
            self.b_i - 1
        };
        self.stack.push(b0);
    }

    fn add_arc(&mut self, head: i32, child: i32, label: u16) {
        let c = child as usize;
        if self.heads[c] >= 0 {
            let old = self.heads[c];
            let arcs = if old > child {
                &mut self.left[old as usize]
            } else {
                &mut self.right[old as usize]
            };
            // spaCy only removes the old arc when it is the newest; its
            // loop over the others edits a copy.
            if arcs
                .last()
                .is_some_and(|a| a.head == old && a.child == child)
            {
                arcs.pop();
            }
        }
        let a = Arc { head, child };
        if head > child {
            self.left[head as usize].push(a);
        } else {
            self.right[head as usize].push(a);
        }
        self.heads[c] = head;
        self.labels[c] = label;
    }

    pub(crate) fn is_valid(&self, mv: Move) -> bool {
        match mv {
            Move::Shift => {
                if self.stack.is_empty() {
                    true
                } else {
                    !(self.buffer_len() < 2
                        || self.is_sent_start(self.b(0))
                        || self.b(0) >= 0 && self.unshiftable[self.b(0) as usize])
                }
            }
            Move::Reduce => !self.stack.is_empty(),
            Move::Left | Move::Right => {
                !self.stack.is_empty() && self.buffer_len() != 0 && !self.is_sent_start(self.b(0))
            }
            Move::Break => {
                self.buffer_len() >= 2
                    && self.b(1) == self.b(0) + 1
                    && !self.is_sent_start(self.b(1))
            }
        }
    }

    pub(crate) fn apply(&mut self, mv: Move, label: u16) {
        match mv {
            Move::Shift => self.push(),
            Move::Reduce => {
                let s0 = self.s(0);
                if self.heads[s0 as usize] >= 0 || self.stack.len() == 1 {
                    self.stack.pop();
                } else {
                    self.unshiftable[s0 as usize] = true;
                    self.rebuffer.push(s0);
                    self.stack.pop();
                }
            }
            Move::Left => {
                let (b0, s0) = (self.b(0), self.s(0));
                self.add_arc(b0, s0, label);
                if b0 >= 0 {
                    self.unshiftable[b0 as usize] = false;
                }
                self.stack.pop();
            }
            Move::Right => {
                let (s0, b0) = (self.s(0), self.b(0));
                self.add_arc(s0, b0, label);
                self.push();
            }
            Move::Break => {
                let b1 = self.b(1);
                self.sent_start[b1 as usize] = true;
            }
        }
    }

    /// Ends a parse that no valid move can continue.
    pub(crate) fn force_final(&mut self) {
        self.stack.clear();
        self.rebuffer.clear();
        self.b_i = self.n;
    }

    /// Head per token (itself when it has none) and the arc label id (0: root).
    pub(crate) fn into_arcs(self) -> (Vec<i32>, Vec<u16>) {
        let heads = self
            .heads
            .iter()
            .enumerate()
            .map(|(i, &h)| if h < 0 { i as i32 } else { h })
            .collect();
        (heads, self.labels)
    }
}
