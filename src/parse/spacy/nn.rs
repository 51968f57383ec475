//! The network arithmetic of en_core_web_sm's tok2vec, tagger and parser
//! lower layers, batched over the tokens of many captions so the dense
//! layers are a handful of matrix products.

use super::model::{MaxoutLn, Model, HIDDEN, N_FEATS, PIECES, WIDTH};

/// spaCy's string hash: MurmurHash64A, seed 1, over the UTF-8 bytes.
pub fn hash_string(s: &str) -> u64 {
    if s.is_empty() {
        return 0;
    }
    murmur64a(s.as_bytes(), 1)
}

fn murmur64a(key: &[u8], seed: u64) -> u64 {
    const M: u64 = 0xc6a4_a793_5bd1_e995;
    const R: u32 = 47;
    let mut h = seed ^ (key.len() as u64).wrapping_mul(M);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let mut k = u64::from_le_bytes(c.try_into().unwrap());
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate() {
            h ^= (b as u64) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> R;
    h = h.wrapping_mul(M);
    h ^= h >> R;
    h
}

/// thinc's MurmurHash3_x86_128_uint64: four 32-bit keys for one id.
pub fn hash_ids(val: u64, seed: u32) -> [u32; 4] {
    let seed = seed as u64;
    let mut h1 = val;
    h1 = h1.wrapping_mul(0x87c3_7b91_1142_53d5);
    h1 = h1.rotate_left(31);
    h1 = h1.wrapping_mul(0x4cf5_ad43_2745_937f);
    h1 ^= seed;
    h1 ^= 8;
    let mut h2 = seed;
    h2 ^= 8;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    let fmix = |mut h: u64| {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h
    };
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    [h1 as u32, (h1 >> 32) as u32, h2 as u32, (h2 >> 32) as u32]
}

/// spaCy's word shape ("Xxxxx", "dd", "xxxx'x").
pub fn word_shape(text: &str) -> String {
    if text.chars().count() >= 100 {
        return "LONG".into();
    }
    let mut out = String::new();
    let mut last = None;
    let mut seq = 0;
    for c in text.chars() {
        let sc = if c.is_alphabetic() {
            if c.is_uppercase() {
                'X'
            } else {
                'x'
            }
        } else if c.is_numeric() {
            'd'
        } else {
            c
        };
        if Some(sc) == last {
            seq += 1;
        } else {
            seq = 0;
            last = Some(sc);
        }
        if seq < 4 {
            out.push(sc);
        }
    }
    out
}

/// A string's id in spaCy's StringStore: its symbol id, else its hash.
fn string_id(m: &Model, s: &str) -> u64 {
    m.symbols.get(s).copied().unwrap_or_else(|| hash_string(s))
}

/// The six feature ids of a token: NORM, PREFIX, SUFFIX, SHAPE, SPACY, IS_SPACE.
pub fn features(m: &Model, text: &str, norm: &str, space_after: bool, is_space: bool) -> [u64; 6] {
    let chars: Vec<char> = text.chars().collect();
    let prefix: String = chars.iter().take(1).collect();
    let suffix: String = chars[chars.len().saturating_sub(3)..].iter().collect();
    [
        string_id(m, norm),
        string_id(m, &prefix),
        string_id(m, &suffix),
        string_id(m, &word_shape(text)),
        space_after as u64,
        is_space as u64,
    ]
}

/// out (n x m) = x (n x k) . w (m x k)^T + bias.
fn linear(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, bias: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(n * m, 0.0);
    if n == 0 {
        return;
    }
    // SAFETY: the slices hold n*k, m*k and n*m values, as the strides say.
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            m,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
    for row in out.chunks_exact_mut(m) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

fn maxout_ln(layer: &MaxoutLn, x: &[f32], n: usize, scratch: &mut Vec<f32>, out: &mut Vec<f32>) {
    let np = layer.pieces;
    linear(
        x,
        n,
        layer.n_in,
        &layer.w,
        layer.n_out * np,
        &layer.b,
        scratch,
    );
    out.clear();
    out.resize(n * layer.n_out, 0.0);
    let d = layer.n_out as f32;
    for (row, y) in scratch
        .chunks_exact(layer.n_out * np)
        .zip(out.chunks_exact_mut(layer.n_out))
    {
        for (o, p) in y.iter_mut().zip(row.chunks_exact(np)) {
            *o = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
        let mu = y.iter().sum::<f32>() / d;
        let var = y.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d + 1e-8;
        let inv = 1.0 / var.sqrt();
        for ((v, g), b) in y.iter_mut().zip(&layer.g).zip(&layer.ln_b) {
            *v = (*v - mu) * inv * g + b;
        }
    }
}

/// Token vectors (n x 96) for the tokens of several docs laid end to end;
/// `lens` are the docs' token counts (the window never crosses a doc).
pub fn tok2vec(m: &Model, feats: &[[u64; 6]], lens: &[usize]) -> Vec<f32> {
    let n = feats.len();
    let mut x = vec![0f32; n * WIDTH * 6];
    for (t, f) in feats.iter().enumerate() {
        for c in 0..6 {
            let table = &m.embed[c];
            let rows = table.len() / WIDTH;
            let dst = &mut x[t * WIDTH * 6 + c * WIDTH..t * WIDTH * 6 + (c + 1) * WIDTH];
            for key in hash_ids(f[c], m.seeds[c]) {
                let r = key as usize % rows;
                for (d, e) in dst.iter_mut().zip(&table[r * WIDTH..(r + 1) * WIDTH]) {
                    *d += e;
                }
            }
        }
    }
    let mut scratch = Vec::new();
    let mut mixed = Vec::new();
    maxout_ln(&m.mix, &x, n, &mut scratch, &mut mixed);
    // thinc's with_array(pad=4) lays the docs end to end with four zero
    // rows before, between and after them, and the encoder runs over the
    // pad rows too: they are the context of each doc's first and last words.
    const PAD: usize = 4;
    let total = n + PAD * (lens.len() + 1);
    let mut h = vec![0f32; total * WIDTH];
    let mut rows = Vec::with_capacity(n);
    let mut at = PAD;
    let mut src = 0;
    for &len in lens {
        for _ in 0..len {
            h[at * WIDTH..(at + 1) * WIDTH].copy_from_slice(&mixed[src * WIDTH..(src + 1) * WIDTH]);
            rows.push(at);
            at += 1;
            src += 1;
        }
        at += PAD;
    }
    let mut win = vec![0f32; total * WIDTH * 3];
    let mut y = Vec::new();
    for layer in &m.enc {
        for t in 0..total {
            let dst = &mut win[t * WIDTH * 3..(t + 1) * WIDTH * 3];
            if t > 0 {
                dst[..WIDTH].copy_from_slice(&h[(t - 1) * WIDTH..t * WIDTH]);
            } else {
                dst[..WIDTH].fill(0.0);
            }
            dst[WIDTH..2 * WIDTH].copy_from_slice(&h[t * WIDTH..(t + 1) * WIDTH]);
            if t + 1 < total {
                dst[2 * WIDTH..].copy_from_slice(&h[(t + 1) * WIDTH..(t + 2) * WIDTH]);
            } else {
                dst[2 * WIDTH..].fill(0.0);
            }
        }
        maxout_ln(layer, &win, total, &mut scratch, &mut y);
        for (a, b) in h.iter_mut().zip(&y) {
            *a += b;
        }
    }
    let mut out = Vec::with_capacity(n * WIDTH);
    for r in rows {
        out.extend_from_slice(&h[r * WIDTH..(r + 1) * WIDTH]);
    }
    out
}

/// The best tag index per token.
pub fn tag(m: &Model, vecs: &[f32]) -> Vec<usize> {
    let n = vecs.len() / WIDTH;
    let nt = m.tags.len();
    let mut scores = Vec::new();
    linear(vecs, n, WIDTH, &m.tagger_w, nt, &m.tagger_b, &mut scores);
    scores
        .chunks_exact(nt)
        .map(|row| argmax(row.iter().copied()))
        .collect()
}

/// First index of the largest value.
pub fn argmax(v: impl Iterator<Item = f32>) -> usize {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, x) in v.enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best
}

/// The parser's per-token precomputed lower layer: n x (nF * nH * nP).
pub fn parser_precompute(m: &Model, vecs: &[f32]) -> Vec<f32> {
    let n = vecs.len() / WIDTH;
    let mut proj = Vec::new();
    linear(vecs, n, WIDTH, &m.proj_w, HIDDEN, &m.proj_b, &mut proj);
    let mut out = Vec::new();
    let zeros = vec![0f32; N_FEATS * HIDDEN * PIECES];
    linear(
        &proj,
        n,
        HIDDEN,
        &m.lower_w,
        N_FEATS * HIDDEN * PIECES,
        &zeros,
        &mut out,
    );
    out
}

/// Action scores of one parser state from its context token ids (-1: none).
/// `pre` holds the doc's rows of [`parser_precompute`].
pub fn parser_scores(m: &Model, pre: &[f32], ids: &[i32; N_FEATS], scores: &mut Vec<f32>) {
    const FO: usize = HIDDEN * PIECES;
    let mut unmaxed = [0f32; FO];
    for (f, &id) in ids.iter().enumerate() {
        let src = if id < 0 {
            &m.lower_pad[f * FO..(f + 1) * FO]
        } else {
            let base = id as usize * N_FEATS * FO + f * FO;
            &pre[base..base + FO]
        };
        for (u, s) in unmaxed.iter_mut().zip(src) {
            *u += s;
        }
    }
    let mut hidden = [0f32; HIDDEN];
    for (j, h) in hidden.iter_mut().enumerate() {
        let a = unmaxed[j * PIECES] + m.lower_b[j * PIECES];
        let b = unmaxed[j * PIECES + 1] + m.lower_b[j * PIECES + 1];
        *h = if b > a { b } else { a };
    }
    let na = m.actions.len();
    scores.clear();
    scores.extend_from_slice(&m.upper_b);
    for (a, s) in scores.iter_mut().enumerate().take(na) {
        let w = &m.upper_w[a * HIDDEN..(a + 1) * HIDDEN];
        *s += w.iter().zip(&hidden).map(|(x, y)| x * y).sum::<f32>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_spacy() {
        assert_eq!(word_shape("Hello"), "Xxxxx");
        assert_eq!(word_shape("1990s"), "dddx");
        assert_eq!(word_shape("aaaaaaa"), "xxxx");
        assert_eq!(word_shape("t-shirt"), "x-xxxx");
    }
}
