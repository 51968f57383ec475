//! A parsed caption: tokens with tag, POS, dependency arc and lemma, made
//! by the same steps as `nlp(caption)` with en_core_web_sm (tok2vec,
//! tagger, parser, attribute_ruler, lemmatizer; NER and senter play no
//! part in noun chunks).

use super::model::{Model, Move, RulerEntry, TokSpec};
use super::nn;
use super::state::State;
use super::tokenize::tokenize;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub text: String,
    pub space_after: bool,
    pub norm: String,
    pub tag: &'static str,
    pub pos: &'static str,
    pub morph: &'static str,
    pub dep: &'static str,
    pub head: usize,
    pub lemma: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Doc {
    pub tokens: Vec<Token>,
}

impl Doc {
    /// Children of `i` in index order (spaCy's lefts then rights).
    pub(crate) fn children(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.tokens.len()).filter(move |&c| c != i && self.tokens[c].head == i)
    }

    /// The leftmost token of `i`'s subtree.
    pub(crate) fn left_edge(&self, i: usize) -> usize {
        let mut best = i;
        let mut stack = vec![i];
        let mut seen = vec![false; self.tokens.len()];
        seen[i] = true;
        while let Some(t) = stack.pop() {
            best = best.min(t);
            for c in self.children(t) {
                if !seen[c] {
                    seen[c] = true;
                    stack.push(c);
                }
            }
        }
        best
    }
}

/// Parses captions together: one batch of matrix products for all tokens.
pub(crate) fn analyse(m: &'static Model, captions: &[&str]) -> Vec<Doc> {
    let raw: Vec<_> = captions.iter().map(|c| tokenize(c, &m.special)).collect();
    let lens: Vec<usize> = raw.iter().map(Vec::len).collect();
    let mut docs: Vec<Doc> = Vec::with_capacity(raw.len());
    let mut feats = Vec::new();
    for toks in raw {
        let mut d = Doc::default();
        for t in toks {
            let norm = t.norm.unwrap_or_else(|| {
                m.lexeme_norm
                    .get(&nn::hash_string(&t.text))
                    .or_else(|| m.base_norms.get(&t.text))
                    .cloned()
                    .unwrap_or_else(|| t.text.to_lowercase())
            });
            let is_space = t.text.chars().all(char::is_whitespace);
            feats.push(nn::features(m, &t.text, &norm, t.space_after, is_space));
            d.tokens.push(Token {
                text: t.text,
                space_after: t.space_after,
                norm,
                tag: "",
                pos: "",
                morph: "",
                dep: "",
                head: 0,
                lemma: String::new(),
            });
        }
        docs.push(d);
    }
    if feats.is_empty() {
        return docs;
    }
    let vecs = nn::tok2vec(m, &feats, &lens);
    let tags = nn::tag(m, &vecs);
    let pre = nn::parser_precompute(m, &vecs);
    let row = pre.len() / feats.len();
    let mut start = 0;
    let mut scores = Vec::new();
    for (d, &len) in docs.iter_mut().zip(&lens) {
        for (k, t) in d.tokens.iter_mut().enumerate() {
            t.tag = m.tags[tags[start + k]].as_str();
        }
        let dpre = &pre[start * row..(start + len) * row];
        let mut st = State::new(len);
        // One move per step; a state that no valid move fits is ended as
        // spaCy does. The bound only guards against a looping model.
        let mut steps = 0;
        while !st.is_final() && steps < 10 * len + 10 {
            steps += 1;
            nn::parser_scores(m, dpre, &st.context(), &mut scores);
            let valid = [
                st.is_valid(Move::Shift),
                st.is_valid(Move::Reduce),
                st.is_valid(Move::Left),
                st.is_valid(Move::Right),
                st.is_valid(Move::Break),
            ];
            let mut best: Option<usize> = None;
            for (a, act) in m.actions.iter().enumerate() {
                if valid[act.mv as usize] && best.is_none_or(|b| scores[a] > scores[b]) {
                    best = Some(a);
                }
            }
            match best {
                Some(a) => st.apply(m.actions[a].mv, a as u16),
                None => st.force_final(),
            }
        }
        let (heads, labels) = st.into_arcs();
        for (i, t) in d.tokens.iter_mut().enumerate() {
            t.head = heads[i] as usize;
            t.dep = if t.head == i {
                "ROOT"
            } else {
                m.actions[labels[i] as usize].label.as_str()
            };
        }
        deprojectivize(d);
        attribute_ruler(m, d);
        for i in 0..d.tokens.len() {
            if d.tokens[i].lemma.is_empty() {
                d.tokens[i].lemma = lemmatize(m, &d.tokens[i]);
            }
        }
        start += len;
    }
    docs
}

/// Re-attaches arcs whose label says "X||Y" under the nearest Y below the
/// head (breadth first), as spaCy's nonproj.deprojectivize.
fn deprojectivize(d: &mut Doc) {
    for i in 0..d.tokens.len() {
        let Some((new_label, head_label)) = d.tokens[i].dep.split_once("||") else {
            continue;
        };
        let head = d.tokens[i].head;
        let mut queue = vec![head];
        let mut found = None;
        let mut seen = vec![false; d.tokens.len()];
        'bfs: while !queue.is_empty() {
            let mut next = Vec::new();
            for q in queue {
                for c in d.children(q).collect::<Vec<_>>() {
                    if c == i || seen[c] {
                        continue;
                    }
                    seen[c] = true;
                    if d.tokens[c].dep == head_label {
                        found = Some(c);
                        break 'bfs;
                    }
                    next.push(c);
                }
            }
            queue = next;
        }
        d.tokens[i].head = found.unwrap_or(head);
        d.tokens[i].dep = new_label;
    }
}

fn spec_matches(s: &TokSpec, t: &Token, lower: &str) -> bool {
    s.tag.as_ref().is_none_or(|c| c.test(t.tag))
        && s.dep.as_ref().is_none_or(|c| c.test(t.dep))
        && s.lower.as_ref().is_none_or(|c| c.test(lower))
        && s.is_space
            .is_none_or(|b| b == t.text.chars().all(char::is_whitespace))
}

/// The attribute ruler: every pattern that matches sets its attributes;
/// later patterns win.
fn attribute_ruler(m: &'static Model, d: &mut Doc) {
    let n = d.tokens.len();
    let lower: Vec<String> = d.tokens.iter().map(|t| t.text.to_lowercase()).collect();
    let apply = |e: &'static RulerEntry, t: &mut Token| {
        if let Some(p) = &e.pos {
            t.pos = p;
        }
        if let Some(x) = &e.morph {
            t.morph = if x == "_" { "" } else { x };
        }
        if let Some(x) = &e.lemma {
            t.lemma = x.clone();
        }
        if let Some(x) = &e.tag {
            t.tag = x;
        }
        if let Some(x) = &e.dep {
            t.dep = x;
        }
    };
    // Match everything against the tagged and parsed doc first, then set
    // the attributes in ruler order (later entries win), as spaCy does.
    let mut hits: Vec<(usize, usize)> = Vec::new();
    for start in 0..n {
        let cands = m
            .ruler_by_tag
            .get(d.tokens[start].tag)
            .unwrap_or(&m.ruler_any);
        for &ei in cands {
            let e = &m.ruler[ei];
            for pat in &e.patterns {
                let k = pat.len();
                if k == 0 || start + k > n {
                    continue;
                }
                if (0..k).all(|j| spec_matches(&pat[j], &d.tokens[start + j], &lower[start + j])) {
                    let idx = if e.index < 0 {
                        k as i64 + e.index
                    } else {
                        e.index
                    };
                    if (0..k as i64).contains(&idx) {
                        hits.push((ei, start + idx as usize));
                    }
                }
            }
        }
    }
    hits.sort_by_key(|h| h.0);
    for (ei, t) in hits {
        apply(&m.ruler[ei], &mut d.tokens[t]);
    }
}

fn morph_get<'a>(morph: &'a str, key: &str) -> Option<&'a str> {
    morph
        .split('|')
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// spaCy's English rule lemmatizer.
fn lemmatize(m: &Model, t: &Token) -> String {
    let pos = t.pos.to_lowercase();
    if pos.is_empty() || pos == "eol" || pos == "space" {
        return t.text.to_lowercase();
    }
    let mg = |k: &str| morph_get(t.morph, k);
    let base = (pos == "noun" && mg("Number") == Some("Sing"))
        || (pos == "verb" && mg("VerbForm") == Some("Inf"))
        || (pos == "verb"
            && mg("VerbForm") == Some("Fin")
            && mg("Tense") == Some("Pres")
            && mg("Number").is_none())
        || (pos == "adj" && mg("Degree") == Some("Pos"))
        || mg("VerbForm") == Some("Inf")
        || mg("VerbForm") == Some("None")
        || mg("Degree") == Some("Pos");
    if base {
        return t.text.to_lowercase();
    }
    let (index, exc, rules) = (
        m.lemma.index.get(&pos),
        m.lemma.exc.get(&pos),
        m.lemma.rules.get(&pos),
    );
    let nonempty = index.is_some_and(|x| !x.is_empty())
        || exc.is_some_and(|x| !x.is_empty())
        || rules.is_some_and(|x| !x.is_empty());
    if !nonempty {
        return if pos == "propn" {
            t.text.clone()
        } else {
            t.text.to_lowercase()
        };
    }
    let s = t.text.to_lowercase();
    let mut forms: Vec<String> = Vec::new();
    let mut oov: Vec<String> = Vec::new();
    for (old, new) in rules.into_iter().flatten() {
        if let Some(stem) = s.strip_suffix(old.as_str()) {
            let form = format!("{stem}{new}");
            if form.is_empty() {
                continue;
            }
            let in_index = index.is_some_and(|ix| ix.contains(&form));
            if in_index {
                forms.insert(0, form);
            } else if !form.chars().all(char::is_alphabetic) {
                forms.push(form);
            } else {
                oov.push(form);
            }
        }
    }
    let mut dedup: Vec<String> = Vec::new();
    for f in forms {
        if !dedup.contains(&f) {
            dedup.push(f);
        }
    }
    let mut forms = dedup;
    for f in exc.and_then(|e| e.get(&s)).into_iter().flatten() {
        if !forms.contains(f) {
            forms.insert(0, f.clone());
        }
    }
    if forms.is_empty() {
        forms.extend(oov);
    }
    forms.into_iter().next().unwrap_or_else(|| t.text.clone())
}
