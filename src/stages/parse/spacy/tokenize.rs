//! spaCy's English tokenizer, as far as captions need it: split on spaces,
//! the model's special cases ("dont" -> "do" "nt", "i've"), web addresses
//! kept whole, then prefix, suffix and infix punctuation with spaCy's
//! character classes. The algorithm is ported, not its full regexes; the
//! split agrees with spaCy's on all 15,833 CC3M validation captions and on
//! the odd captions of tests/fixtures/spacy_parity.jsonl. Two things are
//! approximated: the URL pattern (a scheme, "www." or a dotted host with a
//! common top-level domain), and runs of several spaces (one space here,
//! space tokens in spaCy).

use std::collections::HashMap;

pub(crate) struct RawTok {
    pub text: String,
    pub space_after: bool,
    pub norm: Option<String>,
}

type Special = HashMap<String, Vec<(String, Option<String>)>>;

/// Single characters spaCy strips from either end of a word (its
/// LIST_PUNCT, LIST_QUOTES and LIST_CURRENCY, less the multi-character ones).
const PUNCT: &[char] = &[
    '…', ',', ':', ';', '!', '?', '¿', '؟', '¡', '(', ')', '[', ']', '{', '}', '<', '>', '_', '#',
    '*', '&', '。', '？', '！', '，', '、', '；', '：', '～', '·', '।', '،', '۔', '؛', '٪',
];
const QUOTES: &[char] = &[
    '\'', '"', '”', '“', '`', '‘', '´', '’', '‚', '„', '»', '«', '「', '」', '『', '』', '（',
    '）', '〔', '〕', '【', '】', '《', '》', '〈', '〉', '⟦', '⟧',
];
const CURRENCY: &[char] = &[
    '$', '£', '€', '¥', '฿', '₽', '﷼', '₴', '₠', '₡', '₢', '₣', '₤', '₥', '₦', '₧', '₨', '₩', '₪',
    '₫', '₭', '₮', '₯', '₰', '₱', '₲', '₳', '₵', '₶', '₷', '₸', '₹', '₺', '₼', '₾', '₿',
];
const UNITS: &[&str] = &[
    "km", "km²", "km³", "m", "m²", "m³", "dm", "dm²", "dm³", "cm", "cm²", "cm³", "mm", "mm²",
    "mm³", "ha", "µm", "nm", "yd", "in", "ft", "kg", "g", "mg", "µg", "t", "lb", "oz", "m/s",
    "km/h", "kmh", "mph", "hpa", "pa", "mbar", "mb", "kb", "gb", "tb", "%",
];

fn is_quote(c: char) -> bool {
    QUOTES.contains(&c)
}

/// Length in bytes of the prefix spaCy would strip, or 0.
fn find_prefix(s: &str) -> usize {
    let mut it = s.chars();
    let Some(c) = it.next() else { return 0 };
    if c == '.' {
        let dots = s.chars().take_while(|&d| d == '.').count();
        return if dots >= 2 { dots } else { 0 };
    }
    let plus_ok = c == '+' && !it.next().is_some_and(|d| d.is_ascii_digit());
    if matches!(c, '§' | '%' | '=' | '—' | '–')
        || plus_ok
        || PUNCT.contains(&c)
        || is_quote(c)
        || CURRENCY.contains(&c)
    {
        c.len_utf8()
    } else {
        0
    }
}

/// Length in bytes of the suffix spaCy would strip, or 0: of the
/// alternatives that end the word, the one that starts first.
fn find_suffix(s: &str) -> usize {
    let chars: Vec<char> = s.chars().collect();
    let n = chars.len();
    if n == 0 {
        return 0;
    }
    let bytes_of = |k: usize| chars[n - k..].iter().map(|c| c.len_utf8()).sum::<usize>();
    let mut best = 0usize; // in chars
    let last = chars[n - 1];
    let prev = |k: usize| if n > k { Some(chars[n - 1 - k]) } else { None };
    // Ellipsis: a run of two or more dots.
    let dots = chars.iter().rev().take_while(|&&c| c == '.').count();
    if dots >= 2 {
        best = best.max(dots);
    }
    if PUNCT.contains(&last) || is_quote(last) || matches!(last, '—' | '–') {
        best = best.max(1);
    }
    if n >= 2 && matches!(chars[n - 2], '\'' | '’') && matches!(last, 's' | 'S') {
        best = best.max(2);
    }
    if last == '+' && prev(1).is_some_and(|c| c.is_ascii_digit()) {
        best = best.max(1);
    }
    if CURRENCY.contains(&last) && prev(1).is_some_and(|c| c.is_ascii_digit()) {
        best = best.max(1);
    }
    let lower = s.to_lowercase();
    for u in UNITS {
        let k = u.chars().count();
        if n > k
            && lower.ends_with(u)
            && chars[n - 1 - k].is_ascii_digit()
            && s.ends_with(&s[s.len() - u.len()..])
        {
            best = best.max(k);
        }
    }
    if last == '.' {
        if let Some(p) = prev(1) {
            if p.is_lowercase()
                || p.is_ascii_digit()
                || matches!(p, '%' | '²' | '-' | '+')
                || is_quote(p)
                || PUNCT.contains(&p)
                || (p.is_uppercase() && prev(2).is_some_and(char::is_uppercase))
            {
                best = best.max(1);
            }
        }
    }
    if best == 0 {
        0
    } else {
        bytes_of(best)
    }
}

/// A web address spaCy's url_match keeps whole ("www.example.com/page").
/// An approximation of its URL pattern: a scheme or "www.", or a dotted
/// host ending in a common top-level domain, with an optional path.
fn url_like(s: &str) -> bool {
    if !s.contains('.') {
        return false;
    }
    let l = s.to_ascii_lowercase();
    if (l.starts_with("http://") || l.starts_with("https://") || l.starts_with("www."))
        && l.len() > 8
        && l[4..].contains('.')
    {
        return true;
    }
    let host = l.split('/').next().unwrap_or("");
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() >= 2
        && labels
            .iter()
            .all(|x| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && matches!(
            *labels.last().unwrap(),
            "com" | "org" | "net" | "edu" | "gov" | "io" | "co" | "uk" | "de" | "info"
        )
}

/// Splits one space-free chunk into tokens, as spaCy's _split_affixes and
/// _attach_tokens: strip a prefix and a suffix per round until a special
/// case or nothing is left, then split infixes.
fn split_chunk(chunk: &str, special: &Special, out: &mut Vec<RawTok>) {
    let mut s: &str = chunk;
    let mut prefixes: Vec<&str> = Vec::new();
    let mut suffixes: Vec<&str> = Vec::new();
    let mut last_len = usize::MAX;
    while !s.is_empty() && s.len() != last_len {
        if special.contains_key(s) || url_like(s) {
            break;
        }
        last_len = s.len();
        let pre = find_prefix(s);
        if pre != 0 {
            let minus = &s[pre..];
            if !minus.is_empty() && special.contains_key(minus) {
                prefixes.push(&s[..pre]);
                s = minus;
                break;
            }
        }
        let suf = find_suffix(&s[pre..]);
        if suf != 0 {
            let minus = &s[..s.len() - suf];
            if !minus.is_empty() && special.contains_key(minus) {
                suffixes.push(&s[s.len() - suf..]);
                s = minus;
                break;
            }
        }
        if pre != 0 && suf != 0 && pre + suf <= s.len() {
            prefixes.push(&s[..pre]);
            suffixes.push(&s[s.len() - suf..]);
            s = &s[pre..s.len() - suf];
        } else if pre != 0 {
            prefixes.push(&s[..pre]);
            s = &s[pre..];
        } else if suf != 0 {
            suffixes.push(&s[s.len() - suf..]);
            s = &s[..s.len() - suf];
        }
    }
    let plain = |t: &str| RawTok {
        text: t.to_string(),
        space_after: false,
        norm: None,
    };
    out.extend(prefixes.into_iter().map(plain));
    if !s.is_empty() {
        if let Some(sp) = special.get(s) {
            out.extend(sp.iter().map(|(t, n)| RawTok {
                text: t.clone(),
                space_after: false,
                norm: n.clone(),
            }));
        } else if url_like(s) {
            out.push(plain(s));
        } else {
            split_infixes(s, out);
        }
    }
    out.extend(suffixes.into_iter().rev().map(plain));
}

/// Infixes: ellipses, hyphens between a letter or digit and a letter,
/// "[:<>=/]" likewise, commas between letters, arithmetic between digits.
fn split_infixes(s: &str, out: &mut Vec<RawTok>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| chars.get(i).map(|x| x.1);
    let alpha = |x: Option<char>| x.is_some_and(char::is_alphabetic);
    let alnum = |x: Option<char>| x.is_some_and(|c| c.is_alphabetic() || c.is_ascii_digit());
    let digit = |x: Option<char>| x.is_some_and(|c| c.is_ascii_digit());
    let mut pieces: Vec<(usize, usize)> = Vec::new(); // infix char ranges
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        let prev = if i > 0 { at(i - 1) } else { None };
        let one_char = c == '…'
            || (matches!(c, '+' | '-' | '*' | '^')
                && digit(prev)
                && at(i + 1).is_some_and(|q| q.is_ascii_digit() || q == '-'))
            || (c == ',' && alpha(prev) && alpha(at(i + 1)))
            || (matches!(c, ':' | '<' | '>' | '=' | '/') && alnum(prev) && alpha(at(i + 1)))
            || (c == '.'
                && prev.is_some_and(|p| p.is_lowercase() || p == '\'' || p == '"')
                && at(i + 1).is_some_and(|q| q.is_uppercase() || q == '\'' || q == '"'));
        let mut len = usize::from(one_char);
        if c == '.' {
            let run = chars[i..].iter().take_while(|x| x.1 == '.').count();
            if run >= 2 {
                len = run;
            }
        } else if len == 0 && matches!(c, '-' | '–' | '—' | '~') && alnum(prev) {
            // "-", "--", "---", "——": the shortest that a letter follows.
            let run = chars[i..].iter().take_while(|x| x.1 == c).count().min(3);
            let max = if matches!(c, '~' | '–') { 1 } else { run };
            len = (1..=max).find(|&k| alpha(at(i + k))).unwrap_or(0);
        }
        if len > 0 {
            pieces.push((i, i + len));
            i += len;
        } else {
            i += 1;
        }
    }
    let byte = |k: usize| chars.get(k).map_or(s.len(), |x| x.0);
    let mut start = 0;
    let mut push = |a: usize, b: usize| {
        if b > a {
            out.push(RawTok {
                text: s[byte(a)..byte(b)].to_string(),
                space_after: false,
                norm: None,
            });
        }
    };
    for (a, b) in pieces {
        push(start, a);
        push(a, b);
        start = b;
    }
    push(start, n);
}

/// Tokens of a caption. Whitespace runs count as one space (spaCy would
/// make extra spaces tokens of their own; captions rarely have them).
pub(crate) fn tokenize(text: &str, special: &Special) -> Vec<RawTok> {
    let mut out: Vec<RawTok> = Vec::new();
    for chunk in text.split_whitespace() {
        if let Some(last) = out.last_mut() {
            last.space_after = true;
        }
        split_chunk(chunk, special, &mut out);
    }
    out
}
