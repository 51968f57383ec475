//! The rules of SceneGraphParser 0.1.0 (on spaCy en_core_web_sm) rebuilt
//! over Penn tags: tag fix-ups for captions, NP chunking, multi-word
//! prepositions, and a left-to-right predicate pass that decides subjects,
//! objects and PP attachment the way the spaCy parse usually does.
//! `../shared/research/sgparser.md` explains each rule.

use std::collections::HashSet;
use std::sync::LazyLock;

use super::attach::{AttachModel, Decision};
use super::chunks::{self, ChunkModel};

/// A tagged token: lower-cased surface, Penn tag (or AUX), lemma.
#[derive(Debug, Clone)]
pub struct Tok {
    pub word: String,
    pub tag: &'static str,
    pub lemma: String,
    /// The chunk role the learned model gives (`chunks::O/M/H`); None
    /// without a model or for tokens it does not decide.
    pub role: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Np {
    pub start: usize,
    pub end: usize,
    /// Token indices of the head nouns (0.1.0: at most the last two).
    pub head_toks: Vec<usize>,
    pub mods: Vec<usize>,
    conj: Option<usize>,
    conj_of: Option<usize>,
    pobj_of: Option<Attach>,
    prep: String,
    of_head: Option<usize>,
    dobj_of: Option<usize>,
    /// A pronoun chunk (PRON in spaCy): never the noun a PP hangs on (rule 6 needs NOUN).
    pron: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Attach {
    /// To a noun phrase.
    N(usize),
    /// To the verb at this item index.
    V(usize),
    /// The agent of a passive verb at this item index.
    By(usize),
    Drop,
}

#[derive(Debug, Clone)]
enum Item {
    Np(usize),
    /// A token that is not part of a noun phrase, with its (possibly
    /// rewritten) kind: a tag, or "V" once it is taken as a verb.
    Tok(&'static str, usize),
    /// A multi-word preposition ("in front of") or adjective+preposition
    /// ("next to"); `true` for the former.
    Prep(String, bool),
}

pub struct Graph {
    pub nps: Vec<Np>,
    /// Indices into `nps` of the entities, in order (fake nouns removed).
    pub entities: Vec<usize>,
    /// (subject np, relation text, object np).
    pub relations: Vec<(usize, String, usize)>,
}

const NOUN: &[&str] = &["NN", "NNS", "NNP", "NNPS"];
const ADJ: &[&str] = &["JJ", "JJR", "JJS"];
const AUX: &[&str] = &[
    "is", "are", "was", "were", "be", "been", "being", "'s", "'re", "am",
];
const PRON: &[&str] = &[
    "he", "she", "it", "they", "we", "i", "you", "him", "her", "them", "us", "me",
];
const VBG_COMPOUNDS: &[&str] = &[
    "sitting", "swimming", "living", "dining", "parking", "shopping", "cutting", "baking",
    "washing", "wedding", "waiting", "boarding", "changing", "dressing", "skating", "skiing",
    "camping",
];

/// Subordinators the tagger calls IN: never relation words.
const NOT_PREP: &[&str] = &[
    "that", "while", "whilst", "because", "although", "though", "if", "unless", "whether", "since",
    "so",
];
const REL_PRON: &[&str] = &["that", "which", "who", "what"];
const DEMONSTRATIVES: &[&str] = &["this", "these", "those", "all"];
/// Nouns that a demonstrative or "last"/"next" turns into a time adverbial
/// (spaCy's npadvmod, never a chunk root): "this year", "last night".
const TIME_NOUNS: &[&str] = &[
    "year",
    "years",
    "day",
    "days",
    "night",
    "nights",
    "week",
    "weeks",
    "month",
    "months",
    "morning",
    "evening",
    "afternoon",
    "weekend",
    "season",
    "summer",
    "winter",
    "spring",
    "today",
    "tonight",
    "time",
];
const TIME_DETS: &[&str] = &["this", "last", "next", "every", "each", "that"];
/// Nationality nouns hang on the last noun directly, so two compounds come
/// out reversed in 0.1.0 ("american football player" -> "football american player").
const DEMONYMS: &[&str] = &[
    "american",
    "british",
    "english",
    "french",
    "german",
    "italian",
    "spanish",
    "chinese",
    "japanese",
    "indian",
    "african",
    "european",
    "asian",
    "australian",
    "canadian",
    "mexican",
    "russian",
    "irish",
    "scottish",
    "korean",
    "brazilian",
    "christian",
    "dutch",
    "greek",
    "swedish",
    "thai",
];
/// Nouns that modify a participle as spaCy's npadvmod ("hand drawn",
/// "snow covered", "middle aged"): not chunk roots.
const NOUN_PARTICIPLE_MODIFIERS: &[&str] = &[
    "hand",
    "home",
    "machine",
    "custom",
    "self",
    "snow",
    "ice",
    "sun",
    "moss",
    "ivy",
    "water",
    "fog",
    "mist",
    "cloud",
    "rock",
    "stone",
    "wood",
    "oil",
    "salt",
    "sugar",
    "chocolate",
    "cream",
    "rain",
    "tree",
    "grass",
    "flower",
    "gold",
    "silver",
    "blood",
    "mud",
    "sand",
    "middle",
    "computer",
    "sea",
    "star",
    "sky",
    "wind",
];
const QUANT_PRON: &[&str] = &[
    "some", "many", "most", "all", "both", "each", "several", "few",
];

fn is_verb_like(tag: &str) -> bool {
    matches!(
        tag,
        "VB" | "VBD" | "VBG" | "VBN" | "VBP" | "VBZ" | "AUX" | "MD"
    )
}

const PHRASAL_PREPS: &[&str] = &[
    "in front of",
    "on top of",
    "on the side of",
    "on side of",
    "in addition to",
    "in spite of",
    "on account of",
    "with regard to",
    "in regard to",
    "in reference to",
];
/// Adjective/adverb + preposition pairs that spaCy hangs as amod/advmod of
/// the noun before them (rule 7: "next to").
const ADV_PREPS: &[(&str, &str)] = &[
    ("next", "to"),
    ("close", "to"),
    ("closer", "to"),
    ("far", "from"),
    ("away", "from"),
    ("ahead", "of"),
    ("full", "of"),
    ("outside", "of"),
    ("inside", "of"),
    ("similar", "to"),
    ("prior", "to"),
    ("back", "to"),
    ("suitable", "for"),
    ("worthy", "of"),
    ("reminiscent", "of"),
    ("regardless", "of"),
    ("critical", "of"),
    ("ready", "for"),
];

pub static PHRASAL_VERBS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("lexicon/phrasal_verbs.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

fn is(tag: &str, set: &[&str]) -> bool {
    set.contains(&tag)
}

/// Caption-specific corrections of the Brill tagger, in order.
pub fn fix_tags(t: &mut [Tok]) {
    let n = t.len();
    for i in 0..n {
        let prev = if i > 0 { Some(t[i - 1].tag) } else { None };
        let next = t.get(i + 1).map(|x| x.tag);
        let tag = t[i].tag;
        let w = t[i].word.as_str();
        let new = if w == "'s" {
            // Possessive unless a verb phrase or an attribute follows.
            if matches!(
                next,
                Some("DT" | "VBG" | "VBN" | "RB" | "IN" | "JJ" | "PRP$" | "CD")
            ) {
                "AUX"
            } else {
                "POS"
            }
        } else if AUX.contains(&w) {
            "AUX"
        } else if NOT_PREP.contains(&w) && matches!(tag, "IN" | "WDT") {
            "SUB"
        } else if matches!(tag, "VBZ" | "VBP")
            && matches!(
                prev,
                Some("VBG" | "VBN" | "DT" | "JJ" | "CD" | "PRP$" | "IN")
            )
        {
            if w.ends_with('s') {
                "NNS"
            } else {
                "NN"
            }
        } else if matches!(tag, "JJ" | "JJR")
            && matches!(prev, Some("DT" | "JJ"))
            && (next.is_none()
                || matches!(next, Some("IN" | "."))
                || (next == Some("CC") && !t.get(i + 2).is_some_and(|x| is(x.tag, ADJ))))
        {
            "NN"
        } else if tag == "VBG" && next.is_some_and(|x| is(x, NOUN)) && VBG_COMPOUNDS.contains(&w) {
            // Lexicalised "-ing" modifiers ("sitting room", "swimming pool").
            "NN"
        } else if tag == "NNS" && i > 0 && REL_PRON.contains(&t[i - 1].word.as_str()) {
            // "that travels", "which features": a verb after a relative pronoun.
            "VBZ"
        } else if tag == "NNS"
            && matches!(prev, Some("NN" | "NNS"))
            && matches!(next, Some("DT" | "PRP$"))
        {
            "VBZ"
        } else if (tag == "TO" && matches!(next, Some("DT" | "NN" | "NNS" | "PRP$" | "JJ" | "CD")))
            || (tag == "RP"
                && !matches!(w, "up" | "out" | "off")
                && matches!(next, Some("DT" | "NN" | "NNS" | "PRP$" | "JJ")))
        {
            "IN"
        } else if tag == "VBG"
            && matches!(prev, Some("DT" | "JJ" | "PRP$"))
            && next.is_some_and(|x| is(x, NOUN))
        {
            "JJ"
        } else if tag == "VBN"
            && matches!(
                prev,
                Some("DT" | "JJ" | "PRP$" | "VB" | "VBZ" | "VBP" | "VBD" | "VBG" | "IN" | "CD")
            )
            && next.is_some_and(|x| is(x, NOUN))
        {
            // "added beauty", "the cobbled streets": a participle before its noun.
            "JJ"
        } else {
            tag
        };
        t[i].tag = new;
    }
}

fn chunk(t: &[Tok], nps: &mut Vec<Np>, strict: bool) -> Vec<Item> {
    // 0.1.0 prepends only the direct compound child: the last two nouns.
    let keep = if strict { 2 } else { usize::MAX };
    let n = t.len();
    let mut items = Vec::new();
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j < n && matches!(t[j].tag, "DT" | "PDT" | "PRP$" | "CD") {
            j += 1;
        }
        while j < n
            && (is(t[j].tag, ADJ)
                || (t[j].tag == "CC"
                    && j + 1 < n
                    && is(t[j + 1].tag, ADJ)
                    && j > i
                    && is(t[j - 1].tag, ADJ)))
        {
            j += 1;
        }
        let mut k = j;
        while k < n && is(t[k].tag, NOUN) {
            k += 1;
        }
        // "person 's house": the possessor is inside the chunk of "house".
        if k > j && k + 1 < n && t[k].tag == "POS" {
            let mut m = k + 1;
            while m < n && (matches!(t[m].tag, "DT" | "CD" | "PRP$") || is(t[m].tag, ADJ)) {
                m += 1;
            }
            let mut e = m;
            while e < n && is(t[e].tag, NOUN) {
                e += 1;
            }
            if e > m {
                let head_toks: Vec<usize> = (m.max(e.saturating_sub(keep))..e).collect();
                let mods = (i..j)
                    .chain(k + 1..m)
                    .filter(|&x| !matches!(t[x].tag, "CC" | "PRP$" | "POS"))
                    .collect();
                items.push(Item::Np(nps.len()));
                nps.push(Np::new(i, e, head_toks, mods));
                i = e;
                continue;
            }
        }
        if k > j {
            let mut head_toks: Vec<usize> = (j.max(k.saturating_sub(keep))..k).collect();
            if strict && k - j >= 3 {
                if t[j..k - 2].iter().any(|x| x.role.is_some()) {
                    // Nouns the model puts in the head are further direct
                    // compounds of the root: 0.1.0 prepends each in turn,
                    // so they come out right to left ("hop hip artist").
                    head_toks = std::iter::once(k - 2)
                        .chain((j..k - 2).rev().filter(|&x| t[x].role == Some(chunks::H)))
                        .chain(std::iter::once(k - 1))
                        .collect();
                } else if DEMONYMS.contains(&t[k - 3].word.as_str()) {
                    head_toks = vec![k - 2, k - 3, k - 1];
                }
            }
            let mods = (i..j)
                .filter(|&x| !matches!(t[x].tag, "CC" | "PRP$"))
                .collect();
            items.push(Item::Np(nps.len()));
            nps.push(Np::new(i, k, head_toks, mods));
            i = k;
        } else if (t[i].tag == "PRP" && PRON.contains(&t[i].word.as_str()))
            || (REL_PRON.contains(&t[i].word.as_str())
                && (t.get(i + 1).is_some_and(|x| is_verb_like(x.tag))
                    || (t.get(i + 1).is_some_and(|x| x.tag == "RB")
                        && t.get(i + 2).is_some_and(|x| is_verb_like(x.tag)))))
            || (QUANT_PRON.contains(&t[i].word.as_str())
                && t.get(i + 1).is_some_and(|x| x.word == "of"))
            || (DEMONSTRATIVES.contains(&t[i].word.as_str())
                && t.get(i + 1)
                    .is_none_or(|x| is_verb_like(x.tag) || matches!(x.tag, "IN" | "," | "." | ":")))
            || (t[i].word == "her"
                && t.get(i + 1)
                    .is_none_or(|x| !is(x.tag, NOUN) && !is(x.tag, ADJ) && x.tag != "CD"))
            || (t[i].word == "what"
                && t.get(i + 1)
                    .is_some_and(|x| !matches!(x.tag, "DT" | "JJ" | "NN" | "NNS")))
        {
            // Pronouns are chunks of their own in spaCy 3 (0.1.0 keeps them),
            // and so are relative pronouns that are subjects ("that featured")
            // and quantifiers before "of" ("some of").
            items.push(Item::Np(nps.len()));
            let mut np = Np::new(i, i + 1, vec![i], Vec::new());
            np.pron = true;
            nps.push(np);
            i += 1;
        } else {
            items.push(Item::Tok(t[i].tag, i));
            i += 1;
        }
    }
    items
}

impl Np {
    fn new(start: usize, end: usize, head_toks: Vec<usize>, mods: Vec<usize>) -> Np {
        Np {
            start,
            end,
            head_toks,
            mods,
            conj: None,
            conj_of: None,
            pobj_of: None,
            prep: String::new(),
            of_head: None,
            dobj_of: None,
            pron: false,
        }
    }

    pub fn head(&self, t: &[Tok]) -> String {
        join(self.head_toks.iter().map(|&i| t[i].word.as_str()))
    }
}

fn join<'a>(words: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for w in words {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(w);
    }
    s
}

/// Words of an item (an NP spans several tokens).
fn item_words<'a>(it: &Item, t: &'a [Tok], nps: &[Np]) -> Vec<&'a str> {
    match it {
        Item::Np(k) => (nps[*k].start..nps[*k].end)
            .map(|x| t[x].word.as_str())
            .collect(),
        Item::Tok(_, i) => vec![t[*i].word.as_str()],
        Item::Prep(..) => Vec::new(),
    }
}

/// Collapses phrasal prepositions and adjective+preposition pairs.
fn collapse(items: Vec<Item>, t: &[Tok], nps: &[Np]) -> Vec<Item> {
    let mut out = Vec::with_capacity(items.len());
    let mut i = 0;
    'outer: while i < items.len() {
        if let Item::Tok(_, ti) = items[i] {
            for mw in PHRASAL_PREPS {
                let ws: Vec<&str> = mw.split(' ').collect();
                if t[ti].word != ws[0] {
                    continue;
                }
                let mut toks: Vec<&str> = Vec::new();
                let mut k = i;
                while k < items.len() && toks.len() < ws.len() {
                    toks.extend(item_words(&items[k], t, nps));
                    k += 1;
                }
                if toks == ws {
                    out.push(Item::Prep(mw.to_string(), true));
                    i = k;
                    continue 'outer;
                }
            }
            if let Some(Item::Tok(_, tj)) = items.get(i + 1) {
                let pair = (t[ti].word.as_str(), t[*tj].word.as_str());
                if ADV_PREPS.contains(&pair) {
                    out.push(Item::Prep(format!("{} {}", pair.0, pair.1), false));
                    i += 2;
                    continue;
                }
            }
        }
        out.push(items[i].clone());
        i += 1;
    }
    out
}

/// The scene graph of one tagged caption.
/// Attachment options for a PP after noun phrase `k`: the noun itself, then
/// up the chain of what it hangs on (conjunct host, the verb it is the
/// object of, the noun or verb its own PP hangs on), the clause subject, and
/// no attachment. Each with an edge label and its depth in the chain.
fn candidates(
    k: usize,
    nps: &[Np],
    clause_subj: Option<usize>,
) -> Vec<(Attach, &'static str, usize)> {
    let mut v = vec![(Attach::N(k), "low", 0)];
    let mut cur = Some(k);
    let mut depth = 0;
    while let Some(j) = cur {
        depth += 1;
        cur = None;
        if depth > 4 {
            break;
        }
        let np = &nps[j];
        if let Some(c) = np.conj_of {
            v.push((Attach::N(c), "conj", depth));
            cur = Some(c);
        } else if let Some(vv) = np.dobj_of {
            v.push((Attach::V(vv), "dobj", depth));
        } else {
            match np.pobj_of {
                Some(Attach::N(h)) => {
                    v.push((Attach::N(h), "pobjN", depth));
                    cur = Some(h);
                }
                Some(Attach::V(vv)) => v.push((Attach::V(vv), "pobjV", depth)),
                _ => {}
            }
        }
    }
    if let Some(cs) = clause_subj {
        v.push((Attach::N(cs), "clause", 0));
    }
    v.push((Attach::Drop, "drop", 0));
    first_of_each(&mut v);
    v
}

/// Keeps the first option for each attachment.
fn first_of_each(v: &mut Vec<(Attach, &'static str, usize)>) {
    let mut seen = Vec::new();
    v.retain(|(a, _, _)| {
        let new = !seen.contains(a);
        seen.push(*a);
        new
    });
}

/// The options of a pending PP, decided when its object is known.
struct Pending {
    opts: Vec<(Attach, &'static str, usize)>,
    rule: usize,
    prep: String,
    /// Item index of the preposition.
    at: usize,
    /// The preposition of the noun phrase before it ("" when none).
    prev_prep: String,
    /// What the preposition follows: "np", or the tag of the item before it.
    ctx: &'static str,
}

const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

fn bucket(d: usize) -> &'static str {
    match d {
        0 | 1 => "1",
        2 => "2",
        3 => "3",
        4 | 5 => "4-5",
        _ => "6+",
    }
}

fn last_word(s: &str) -> &str {
    s.rsplit(' ').next().unwrap_or("")
}

/// Emits the features of each option of `pd` for object `obj` as
/// `(option, feature)` (into a reused buffer: scoring allocates nothing per
/// feature), and returns each option's subject noun phrase.
fn option_features(
    pd: &Pending,
    obj: usize,
    t: &[Tok],
    nps: &[Np],
    items: &[Item],
    subj_of: &[Option<usize>],
    mut emit: impl FnMut(usize, &[&str]),
) -> Vec<Option<usize>> {
    let oh = last_word(&nps[obj].head(t)).to_string();
    let p = &pd.prep;
    let pp = if pd.prev_prep.is_empty() {
        "-"
    } else {
        pd.prev_prep.as_str()
    };
    let mut subjects = Vec::with_capacity(pd.opts.len());
    let first_tag = t.first().map(|x| x.tag).unwrap_or("-");
    let verb_before = items[..pd.at.min(items.len())]
        .iter()
        .any(|it| matches!(it, Item::Tok("V" | "AUX", _)));
    let first_np = items.iter().find_map(|it| match it {
        Item::Np(j) => Some(*j),
        _ => None,
    });
    let low = match pd.opts.first() {
        Some((Attach::N(j), _, _)) => last_word(&nps[*j].head(t)).to_string(),
        _ => "-".into(),
    };
    let n = pd.opts.len();
    for (i, (a, k, depth)) in pd.opts.iter().enumerate() {
        let (subject, pos, vt, vl) = match *a {
            Attach::N(j) => (
                Some(j),
                items
                    .iter()
                    .position(|it| matches!(it, Item::Np(x) if *x == j)),
                "-",
                "-".to_string(),
            ),
            Attach::V(v) => {
                let (tag, lemma) = match items[v] {
                    Item::Tok(_, vt) => (t[vt].tag, t[vt].lemma.clone()),
                    _ => ("-", "-".to_string()),
                };
                (subj_of[v], Some(v), tag, lemma)
            }
            _ => (None, None, "-", "-".to_string()),
        };
        let sh = subject
            .map(|j| last_word(&nps[j].head(t)).to_string())
            .unwrap_or_else(|| "-".into());
        let dist = pos.map(|x| bucket(pd.at.saturating_sub(x))).unwrap_or("-");
        let none = if subject.is_none() { "true" } else { "false" };
        let sfirst = if subject.is_some() && subject == first_np {
            "true"
        } else {
            "false"
        };
        let vb4 = if verb_before { "true" } else { "false" };
        let d = DIGITS[(*depth).min(9)];
        let nn = DIGITS[n.min(9)];
        let mut put = |parts: &[&str]| emit(i, parts);
        put(&[k]);
        put(&[k, "|d=", d]);
        put(&[k, "|p=", p]);
        put(&[k, "|pp=", pp]);
        put(&[k, "|p=", p, "|pp=", pp]);
        put(&[k, "|sh=", &sh]);
        put(&[k, "|p=", p, "|sh=", &sh]);
        put(&[k, "|oh=", &oh]);
        put(&[k, "|p=", p, "|oh=", &oh]);
        put(&[k, "|dist=", dist]);
        put(&[k, "|p=", p, "|dist=", dist]);
        put(&[k, "|vt=", vt]);
        put(&[k, "|vl=", &vl]);
        put(&[k, "|p=", p, "|vl=", &vl]);
        put(&[k, "|none=", none]);
        put(&[k, "|first=", first_tag]);
        put(&[k, "|vb4=", vb4]);
        put(&[k, "|sfirst=", sfirst]);
        put(&[k, "|p=", p, "|lh=", &low]);
        put(&[k, "|n=", nn]);
        if pd.ctx != "np" {
            put(&[k, "|ctx=", pd.ctx]);
            put(&[k, "|ctx=", pd.ctx, "|p=", p]);
        }
        if i == pd.rule {
            put(&["rule"]);
            put(&["rule|", k]);
            put(&["rule|ctx=", pd.ctx]);
            put(&["rule|p=", p]);
            put(&["rule|p=", p, "|pp=", pp]);
        }
        subjects.push(subject);
    }
    subjects
}

/// The heads a subject expands to (itself and its conjunct; none: empty).
fn with_conjunct(s: Option<usize>, nps: &[Np], t: &[Tok]) -> Vec<String> {
    s.map(|j| {
        std::iter::once(j)
            .chain(nps[j].conj)
            .map(|x| nps[x].head(t))
            .collect()
    })
    .unwrap_or_default()
}

/// The subjects a verb may take: (subject, kinds naming it, is the rules'
/// choice), one entry per distinct subject.
type VerbOptions = Vec<(Option<usize>, Vec<&'static str>, bool)>;

/// Candidate subjects of the verb at item `idx`: the noun phrase right
/// before it, the last one, that one's conjunct host or the noun its PP
/// hangs on, the clause subject, the previous verb's subject, or none.
fn verb_options(
    idx: usize,
    rule: Option<usize>,
    last_np: Option<usize>,
    clause_subj: Option<usize>,
    prev_verb_subj: Option<usize>,
    items: &[Item],
    nps: &[Np],
) -> VerbOptions {
    let prev = match items.get(idx.wrapping_sub(1)) {
        Some(Item::Np(p)) => Some(*p),
        _ => None,
    };
    let head = last_np.and_then(|l| match nps[l].pobj_of {
        Some(Attach::N(h)) => Some(h),
        _ => None,
    });
    let cands: [(&'static str, Option<usize>); 7] = [
        ("v:prev", prev),
        ("v:last", last_np),
        ("v:host", last_np.and_then(|l| nps[l].conj_of)),
        ("v:head", head),
        ("v:clause", clause_subj),
        ("v:pverb", prev_verb_subj),
        ("v:none", None),
    ];
    let mut v: VerbOptions = Vec::new();
    for (k, s) in cands {
        if s.is_none() && k != "v:none" {
            continue;
        }
        match v.iter_mut().find(|o| o.0 == s) {
            Some(o) => o.1.push(k),
            None => v.push((s, vec![k], false)),
        }
    }
    match v.iter_mut().find(|o| o.0 == rule) {
        Some(o) => o.2 = true,
        None => v.push((rule, vec!["v:rule"], true)),
    }
    v
}

/// Emits `(option, feature)` for each verb-subject option.
fn verb_option_features(
    opts: &VerbOptions,
    verb: &Tok,
    prev_kind: &str,
    t: &[Tok],
    nps: &[Np],
    mut emit: impl FnMut(usize, &[&str]),
) {
    let (vt, vw) = (verb.tag, verb.word.as_str());
    let pk = if prev_kind.is_empty() { "-" } else { prev_kind };
    for (i, (s, kinds, rule)) in opts.iter().enumerate() {
        let h = s.map(|j| last_word(&nps[j].head(t)).to_string());
        let h = h.as_deref().unwrap_or("-");
        let pp = s.map_or("-", |j| {
            if nps[j].prep.is_empty() {
                "-"
            } else {
                nps[j].prep.as_str()
            }
        });
        let pron = if s.is_some_and(|j| nps[j].pron) {
            "pron"
        } else {
            "-"
        };
        let mut put = |parts: &[&str]| emit(i, parts);
        for k in kinds {
            put(&[k]);
            put(&[k, "|vt=", vt]);
            put(&[k, "|pk=", pk]);
            put(&[k, "|vt=", vt, "|pk=", pk]);
            put(&[k, "|vw=", vw]);
            put(&[k, "|h=", h]);
            put(&[k, "|pp=", pp]);
            put(&[k, "|pron=", pron]);
        }
        put(&["v:h=", h, "|vw=", vw]);
        put(&["v:pp=", pp, "|vt=", vt]);
        if *rule {
            put(&["vrule"]);
            put(&["vrule|vt=", vt, "|pk=", pk]);
        }
    }
}

/// Parses with the rules; `chunks` corrects chunk roles and `model`
/// chooses PP attachments when given; `trace` receives every attachment
/// decision (for training).
pub fn parse(
    mut t: Vec<Tok>,
    strict_v010: bool,
    model: Option<&AttachModel>,
    chunks: Option<&ChunkModel>,
    mut trace: Option<&mut Vec<Decision>>,
) -> (Vec<Tok>, Graph) {
    fix_tags(&mut t);
    if let Some(c) = chunks {
        c.apply(&mut t, strict_v010);
    }
    let mut nps = Vec::new();
    let items = chunk(&t, &mut nps, strict_v010);
    let mut items = collapse(items, &t, &nps);

    let mut rels: Vec<(usize, String, usize)> = Vec::new();
    let mut subj_of: Vec<Option<usize>> = vec![None; items.len()];
    let mut last_np: Option<usize> = None;
    let mut verb: Option<usize> = None;
    let mut pending: Option<(String, Attach)> = None;
    let mut prev_kind: &str = "";
    let mut passive: Option<usize> = None;
    let mut clause_subj: Option<usize> = None;
    let mut pending_opts: Option<Pending> = None;
    // Attachment options are listed only when something will use them.
    let deciding = model.is_some() || trace.is_some();
    // Verb particles ("looking up in the air"): a PP after one hangs as if
    // the particle were not there.
    let mut particle_at = vec![false; items.len()];
    // Per verb item, the (relation, object) pairs its subject takes; and the
    // traced verb-subject decisions (verb item, trace index) to label with them.
    let mut verb_pairs: Vec<Vec<(String, usize)>> = vec![Vec::new(); items.len()];
    let mut verb_decisions: Vec<(usize, usize)> = Vec::new();

    for idx in 0..items.len() {
        match items[idx].clone() {
            Item::Np(np) => {
                if let Some((rel, mut att)) = pending.take() {
                    if let Some(pd) = pending_opts.take() {
                        let n = pd.opts.len();
                        let mut feats: Vec<Vec<String>> = vec![Vec::new(); n];
                        let mut scores = vec![0f32; n];
                        let tracing = trace.is_some();
                        let subjects =
                            option_features(&pd, np, &t, &nps, &items, &subj_of, |i, f| {
                                if let Some(m) = model {
                                    scores[i] += m.weight_of_parts(f);
                                }
                                if tracing {
                                    feats[i].push(f.concat());
                                }
                            });
                        let chosen = match model {
                            Some(_) => super::attach::argmax(&scores),
                            None => pd.rule,
                        };
                        att = pd.opts[chosen].0;
                        if let Some(tr) = trace.as_deref_mut() {
                            tr.push(Decision {
                                options: feats,
                                subjects: subjects
                                    .iter()
                                    .map(|s| with_conjunct(*s, &nps, &t))
                                    .collect(),
                                pairs: vec![(rel.clone(), nps[np].head(&t))],
                            });
                        }
                    }
                    match att {
                        Attach::N(h) => rels.push((h, rel.clone(), np)),
                        Attach::V(v) => {
                            verb_pairs[v].push((rel.clone(), np));
                            if let Some(s) = subj_of[v] {
                                rels.push((s, rel.clone(), np));
                            }
                        }
                        Attach::By(v) => {
                            subj_of[v] = Some(np);
                            if let Some(p) = passive {
                                if let Item::Tok(_, vt) = items[v] {
                                    rels.push((np, t[vt].word.clone(), p));
                                }
                            }
                        }
                        Attach::Drop => {}
                    }
                    nps[np].pobj_of = Some(att);
                    nps[np].prep = rel.rsplit(' ').next().unwrap_or("").to_string();
                    if rel == "of" {
                        if let Attach::N(h) = att {
                            nps[np].of_head = Some(h);
                        }
                    }
                } else if prev_kind == "CC"
                    && last_np.is_some()
                    && idx >= 2
                    && matches!(items[idx - 2], Item::Np(_))
                {
                    let Item::Np(prev_np) = items[idx - 2] else {
                        unreachable!()
                    };
                    // "a cup of coffee and a book": a determined conjunct joins
                    // X of "X of Y"; a bare one ("fruits and nuts") joins Y.
                    let determined = matches!(t[nps[np].start].tag, "DT" | "PRP$" | "CD");
                    let host = if determined {
                        nps[prev_np].of_head.unwrap_or(prev_np)
                    } else {
                        prev_np
                    };
                    if nps[host].conj.is_none() {
                        nps[host].conj = Some(np);
                    }
                    nps[np].conj_of = Some(host);
                    if let Some(a) = nps[host].pobj_of {
                        nps[np].pobj_of = Some(a);
                        nps[np].prep = nps[host].prep.clone();
                    }
                    last_np = Some(np);
                } else if let (Some(v), true) = (verb, prev_kind == "V" || prev_kind == "AUX") {
                    let Item::Tok(_, vt) = items[v] else {
                        unreachable!()
                    };
                    if prev_kind == "AUX" {
                        if let Some(cs) = clause_subj {
                            rels.push((cs, t[vt].word.clone(), np));
                        }
                    } else {
                        verb_pairs[v].push((t[vt].word.clone(), np));
                        if let Some(s) = subj_of[v] {
                            rels.push((s, t[vt].word.clone(), np));
                        }
                    }
                    nps[np].dobj_of = Some(v);
                    last_np = Some(np);
                } else {
                    last_np = Some(np);
                    if clause_subj.is_none() {
                        clause_subj = Some(np);
                    }
                }
                prev_kind = "NP";
            }
            Item::Prep(p, phrasal) => {
                let prev = if idx > 0 { Some(&items[idx - 1]) } else { None };
                pending_opts = None;
                pending = Some(if phrasal {
                    match prev {
                        Some(Item::Np(h)) => (p, Attach::N(*h)),
                        // 0.1.0 drops a phrasal preposition after a verb or copula (rule 5).
                        Some(Item::Tok("V", _)) if !strict_v010 => (p, Attach::V(idx - 1)),
                        Some(Item::Tok("AUX", _)) if !strict_v010 => {
                            (p, clause_subj.map_or(Attach::Drop, Attach::N))
                        }
                        _ => (p, Attach::Drop),
                    }
                } else {
                    let att = attach_prep(
                        &p,
                        prev,
                        idx,
                        &t,
                        &nps,
                        &subj_of,
                        passive,
                        (!strict_v010).then_some(clause_subj).flatten(),
                    );
                    pending_opts = deciding
                        .then(|| options_for(&p, prev, att, idx, &nps, clause_subj, last_np, verb))
                        .flatten();
                    (p.clone(), att)
                });
                prev_kind = "P";
            }
            Item::Tok(tag, ti) => {
                let particle = matches!(
                    t[ti].word.as_str(),
                    "up" | "out" | "off" | "away" | "back"
                ) && matches!(items.get(idx.wrapping_sub(1)), Some(Item::Tok("V", vt))
                        if !PHRASAL_VERBS.contains(format!("{} {}", t[*vt].lemma, t[ti].word).as_str()));
                let subordinator = matches!(
                    t[ti].word.as_str(),
                    "after" | "before" | "as" | "until" | "since"
                ) && matches!(items.get(idx + 1), Some(Item::Np(_)))
                    && matches!(
                        items.get(idx + 2),
                        Some(Item::Tok("VBZ" | "VBD" | "VBP" | "MD" | "AUX", _))
                    );
                if subordinator {
                    // "after airliner returned": a clause follows, not a noun phrase.
                    prev_kind = "SUB";
                    continue;
                }
                if particle {
                    // "opening up a fireplace": a verb particle, not a preposition;
                    // the noun after it is the verb's object.
                    particle_at[idx] = true;
                    continue;
                }
                if matches!(tag, "IN" | "TO") {
                    let mut pi = idx;
                    while pi > 0 && particle_at[pi - 1] {
                        pi -= 1;
                    }
                    let prev = if pi > 0 { Some(&items[pi - 1]) } else { None };
                    let p = t[ti].word.clone();
                    let att = attach_prep(
                        &p,
                        prev,
                        pi,
                        &t,
                        &nps,
                        &subj_of,
                        passive,
                        (!strict_v010).then_some(clause_subj).flatten(),
                    );
                    pending_opts = deciding
                        .then(|| options_for(&p, prev, att, idx, &nps, clause_subj, last_np, verb))
                        .flatten();
                    // Phrasal verb: "sitting on" keeps the verb when its lemma + P is listed.
                    let rel = match prev {
                        Some(Item::Tok("V", vt))
                            if pi == idx
                                && PHRASAL_VERBS
                                    .contains(format!("{} {}", t[*vt].lemma, p).as_str()) =>
                        {
                            format!("{} {}", t[*vt].word, p)
                        }
                        _ => p,
                    };
                    pending = Some((rel, att));
                    prev_kind = "P";
                } else if tag == "AUX" {
                    verb = Some(idx);
                    prev_kind = "AUX";
                    if let Some(ln) = last_np {
                        // "a man and a woman are ...": the first conjunct is the subject.
                        clause_subj = Some(nps[ln].conj_of.unwrap_or(ln));
                    }
                } else if matches!(tag, "VBG" | "VBN" | "VBZ" | "VBD" | "VBP" | "VB") {
                    items[idx] = Item::Tok("V", ti);
                    if prev_kind == "MD" {
                        subj_of[idx] = last_np.or(clause_subj);
                    } else if prev_kind == "AUX" {
                        if tag == "VBN" {
                            passive = clause_subj;
                        } else if clause_subj.is_some() {
                            subj_of[idx] = clause_subj;
                        }
                    } else if prev_kind == "NP" && matches!(tag, "VBN" | "VBG") {
                        // A participle (acl) hangs on the noun right before it,
                        // even inside a PP ("pair of sneakers isolated on ...").
                        if let Some(Item::Np(p)) = items.get(idx.wrapping_sub(1)) {
                            subj_of[idx] = Some(*p);
                        }
                    } else if prev_kind == "NP" {
                        if let Some(ln) = last_np {
                            subj_of[idx] = if matches!(tag, "VBZ" | "VBD" | "VBP" | "VB")
                                && nps[ln].conj_of.is_some()
                            {
                                nps[ln].conj_of
                            } else {
                                Some(ln)
                            };
                        }
                    }
                    if deciding {
                        let opts = verb_options(
                            idx,
                            subj_of[idx],
                            last_np,
                            clause_subj,
                            verb.and_then(|v| subj_of[v]),
                            &items,
                            &nps,
                        );
                        if opts.len() > 1 {
                            let n = opts.len();
                            let mut feats: Vec<Vec<String>> = vec![Vec::new(); n];
                            let mut scores = vec![0f32; n];
                            let tracing = trace.is_some();
                            verb_option_features(&opts, &t[ti], prev_kind, &t, &nps, |i, f| {
                                if let Some(m) = model {
                                    scores[i] += m.weight_of_parts(f);
                                }
                                if tracing {
                                    feats[i].push(f.concat());
                                }
                            });
                            if model.is_some() {
                                subj_of[idx] = opts[super::attach::argmax(&scores)].0;
                            }
                            if let Some(tr) = trace.as_deref_mut() {
                                verb_decisions.push((idx, tr.len()));
                                tr.push(Decision {
                                    options: feats,
                                    subjects: opts
                                        .iter()
                                        .map(|(s, _, _)| with_conjunct(*s, &nps, &t))
                                        .collect(),
                                    pairs: Vec::new(),
                                });
                            }
                        }
                    }
                    verb = Some(idx);
                    prev_kind = "V";
                } else {
                    // "image may contain : person": the colon does not end the verb phrase.
                    if !(tag == ":" && prev_kind == "V") {
                        prev_kind = tag;
                    }
                }
            }
        }
    }

    if let Some(tr) = trace {
        for (v, at) in verb_decisions {
            tr[at].pairs = verb_pairs[v]
                .iter()
                .flat_map(|(r, o)| {
                    std::iter::once(*o)
                        .chain(nps[*o].conj)
                        .map(|x| (r.clone(), nps[x].head(&t)))
                })
                .collect();
        }
    }
    // Conjunctions expand one level (0.1.0 does not recurse).
    let mut relations = Vec::new();
    for (s, r, o) in rels {
        let ss: Vec<usize> = std::iter::once(s).chain(nps[s].conj).collect();
        let os: Vec<usize> = std::iter::once(o).chain(nps[o].conj).collect();
        for &x in &ss {
            for &y in &os {
                relations.push((x, r.clone(), y));
            }
        }
    }
    let entities = items
        .iter()
        .enumerate()
        .filter_map(|(idx, it)| match it {
            Item::Np(k) if !is_adverbial(&nps[*k], &t, items.get(idx + 1)) => Some(*k),
            _ => None,
        })
        .collect();
    (
        t,
        Graph {
            nps,
            entities,
            relations,
        },
    )
}

/// The options to decide between when a PP follows a noun phrase (not for
/// "of", which always hangs on its noun, nor after a bare pronoun).
#[allow(clippy::too_many_arguments)]
fn options_for(
    p: &str,
    prev: Option<&Item>,
    rule: Attach,
    idx: usize,
    nps: &[Np],
    clause_subj: Option<usize>,
    last_np: Option<usize>,
    verb: Option<usize>,
) -> Option<Pending> {
    if p == "of" {
        return None;
    }
    let (mut opts, prev_prep, ctx) = match prev {
        Some(Item::Np(k)) => {
            let np = &nps[*k];
            if np.pron && np.dobj_of.is_none() && np.pobj_of.is_none() {
                return None;
            }
            (candidates(*k, nps, clause_subj), np.prep.clone(), "np")
        }
        // Right after its verb or copula a PP keeps the rules' reading
        // ("sitting on"; 0.1.0 drops copula + PP, later versions do not).
        Some(Item::Tok("V" | "AUX", _)) => return None,
        // After an adverb, adjective, comma...: the verb, then the last noun
        // phrase and what it hangs on.
        _ => {
            let mut v = Vec::new();
            if let Some(vv) = verb {
                v.push((Attach::V(vv), "verb", 0));
            }
            match last_np {
                Some(k) => v.extend(candidates(k, nps, clause_subj)),
                None => v.extend(clause_subj.map(|cs| (Attach::N(cs), "clause", 0))),
            }
            v.push((Attach::Drop, "drop", 0));
            first_of_each(&mut v);
            let ctx = match prev {
                Some(Item::Tok(tag, _)) => *tag,
                Some(_) => "prep",
                None => "start",
            };
            (v, String::new(), ctx)
        }
    };
    if opts.len() < 2 {
        return None;
    }
    let rule_idx = match opts.iter().position(|(a, _, _)| *a == rule) {
        Some(i) => i,
        None => {
            opts.push((rule, "rulex", 0));
            opts.len() - 1
        }
    };
    Some(Pending {
        opts,
        rule: rule_idx,
        prep: p.to_string(),
        at: idx,
        prev_prep,
        ctx,
    })
}

/// Noun phrases spaCy attaches as npadvmod (never chunk roots): "this
/// year", "last night", and the noun of "hand drawn".
fn is_adverbial(np: &Np, t: &[Tok], next: Option<&Item>) -> bool {
    let first = t[np.start].word.as_str();
    let head = np
        .head_toks
        .last()
        .map(|&h| t[h].word.as_str())
        .unwrap_or("");
    if np.end - np.start >= 2 && TIME_DETS.contains(&first) && TIME_NOUNS.contains(&head) {
        return true;
    }
    np.end - np.start == 1
        && NOUN_PARTICIPLE_MODIFIERS.contains(&head)
        && matches!(next, Some(Item::Tok(_, v)) if t[*v].tag == "VBN" && *v == np.end)
}

#[allow(clippy::too_many_arguments)]
fn attach_prep(
    p: &str,
    prev: Option<&Item>,
    idx: usize,
    t: &[Tok],
    nps: &[Np],
    subj_of: &[Option<usize>],
    passive: Option<usize>,
    copula_subject: Option<usize>,
) -> Attach {
    match prev {
        Some(Item::Tok("V", vt)) => {
            let v = idx - 1;
            if p == "by" && passive.is_some() {
                Attach::By(v)
            } else if p == "by" && t[*vt].tag == "VBN" {
                // The agent of a reduced passive ("surrounded by bushes"): rule 2 skips it.
                Attach::Drop
            } else {
                Attach::V(v)
            }
        }
        // Copula + PP: no relation in 0.1.0 on spaCy 3; the later AUX rule
        // gives (subject, P, object) (`copula_subject` is set only then).
        Some(Item::Tok("AUX", _)) => copula_subject.map_or(Attach::Drop, Attach::N),
        Some(Item::Np(k))
            if nps[*k].pron && nps[*k].dobj_of.is_none() && nps[*k].pobj_of.is_none() =>
        {
            Attach::Drop
        }
        Some(Item::Np(k)) => {
            let np = &nps[*k];
            if p == "of" {
                Attach::N(*k)
            } else if let Some(v) = np.dobj_of.filter(|&v| subj_of[v].is_some() && p != "for") {
                Attach::V(v)
            } else if let Some(host) = np.pobj_of {
                let low = np.prep == "with"
                    || np.prep == "for"
                    || np.prep == "during"
                    || np.prep == "by"
                    || matches!(host, Attach::By(_))
                    || (np.prep == "of" && matches!(p, "by" | "with" | "for"));
                if low {
                    Attach::N(*k)
                } else if np.prep == "of" {
                    match host {
                        Attach::N(h) => Attach::N(h),
                        other => other,
                    }
                } else {
                    host
                }
            } else if let Some(c) = np.conj_of {
                Attach::N(c)
            } else {
                Attach::N(*k)
            }
        }
        _ => Attach::Drop,
    }
}
