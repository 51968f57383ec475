//! The network arithmetic of en_core_web_sm's tok2vec, tagger and parser
//! lower layers, batched over the tokens of many captions so the dense
//! layers are a handful of matrix products.

use super::model::{MaxoutLn, Model, HIDDEN, N_FEATS, PIECES, WIDTH};

/// Defines `fn name(args)` whose body is compiled twice, for AVX2 and for
/// the baseline, and picked at run time. Rust does not contract `a * b + c`
/// into FMA, so both give the same numbers.
macro_rules! avx2_or_plain {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn fast($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// spaCy's string hash: MurmurHash64A, seed 1, over the UTF-8 bytes.
pub(crate) fn hash_string(s: &str) -> u64 {
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
pub(crate) fn hash_ids(val: u64, seed: u32) -> [u32; 4] {
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
pub(crate) fn word_shape(text: &str) -> String {
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
pub(crate) fn features(
    m: &Model,
    text: &str,
    norm: &str,
    space_after: bool,
    is_space: bool,
) -> [u64; 6] {
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
    linear(
        x,
        n,
        layer.n_in,
        &layer.w,
        layer.n_out * layer.pieces,
        &layer.b,
        scratch,
    );
    finish_maxout_ln(layer, scratch, out);
}

/// Maxout over the pieces, then layer norm, of pre-activations (rows of
/// pieces * n_out, piece-major, bias included).
fn finish_maxout_ln(layer: &MaxoutLn, pre: &[f32], out: &mut Vec<f32>) {
    let rows = pre.len() / (layer.n_out * layer.pieces);
    out.clear();
    out.resize(rows * layer.n_out, 0.0);
    finish_maxout_ln_rows(layer, pre, out);
}

/// Sum in eight interleaved lanes (as numpy's pairwise sum does in its
/// blocks), so the loop vectorises.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut total =
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for x in chunks.remainder() {
        total += x;
    }
    total
}

avx2_or_plain! {
fn finish_maxout_ln_rows(layer: &MaxoutLn, pre: &[f32], out: &mut [f32]) {
    let (no, np) = (layer.n_out, layer.pieces);
    let d = no as f32;
    let mut dev = [0f32; 256];
    for (row, y) in pre.chunks_exact(no * np).zip(out.chunks_exact_mut(no)) {
        y.copy_from_slice(&row[..no]);
        for p in 1..np {
            for (o, &v) in y.iter_mut().zip(&row[p * no..(p + 1) * no]) {
                *o = if v > *o { v } else { *o };
            }
        }
        let mu = lane_sum(y) / d;
        let dev = &mut dev[..no];
        for (s, v) in dev.iter_mut().zip(y.iter()) {
            *s = (v - mu) * (v - mu);
        }
        let var = lane_sum(dev) / d + 1e-8;
        let inv = 1.0 / var.sqrt();
        for ((v, g), b) in y.iter_mut().zip(&layer.g).zip(&layer.ln_b) {
            *v = (*v - mu) * inv * g + b;
        }
    }
}
}

/// A layer's output for an all-zero input window: maxout and layer norm of
/// the bias.
pub(crate) fn zero_window_output(layer: &MaxoutLn) -> Vec<f32> {
    let mut out = Vec::new();
    finish_maxout_ln(layer, &layer.b, &mut out);
    out
}

/// The embedding tables pushed through the mixing layer: row r of table c
/// times c's block of the mixing weights (rows x 288). A token's mixing
/// pre-activation is then the bias plus 24 gathered rows, instead of a
/// 576-wide product.
pub(crate) fn mix_tables(embed: &[Vec<f32>], mix: &MaxoutLn) -> Vec<Vec<f32>> {
    let m = mix.n_out * mix.pieces;
    embed
        .iter()
        .enumerate()
        .map(|(c, table)| {
            let rows = table.len() / WIDTH;
            let mut out = vec![0f32; rows * m];
            // SAFETY: table is rows x 96; the weight block starts at column
            // c*96 of the m x 576 matrix; out is rows x m.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    WIDTH,
                    m,
                    1.0,
                    table.as_ptr(),
                    WIDTH as isize,
                    1,
                    mix.w.as_ptr().add(c * WIDTH),
                    1,
                    mix.n_in as isize,
                    0.0,
                    out.as_mut_ptr(),
                    m as isize,
                    1,
                );
            }
            out
        })
        .collect()
}

avx2_or_plain! {
/// Each token's mixing pre-activation: the bias (already in `pre`) plus
/// its 24 hashed rows of the mixed tables.
fn gather_mix(m: &Model, feats: &[[u64; 6]], pre: &mut [f32]) {
    let pm = m.mix.n_out * m.mix.pieces;
    for (f, dst) in feats.iter().zip(pre.chunks_exact_mut(pm)) {
        for ((table, &id), &seed) in m.mix_tables.iter().zip(f).zip(&m.seeds) {
            let rows = table.len() / pm;
            for key in hash_ids(id, seed) {
                let r = key as usize % rows;
                for (d, e) in dst.iter_mut().zip(&table[r * pm..(r + 1) * pm]) {
                    *d += e;
                }
            }
        }
    }
}
}

/// Token vectors (n x 96) for the tokens of several docs laid end to end;
/// `lens` are the docs' token counts (the window never crosses a doc).
pub(crate) fn tok2vec(m: &Model, feats: &[[u64; 6]], lens: &[usize]) -> Vec<f32> {
    let n = feats.len();
    let pm = m.mix.n_out * m.mix.pieces;
    let mut pre = Vec::with_capacity(n * pm);
    for _ in feats {
        pre.extend_from_slice(&m.mix.b);
    }
    gather_mix(m, feats, &mut pre);
    let mut mixed = Vec::new();
    finish_maxout_ln(&m.mix, &pre, &mut mixed);
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
    // Distance of each row to the nearest word: layer L (0-based) is only
    // needed where a later layer can still reach a word (distance <= 3 - L).
    let mut dist = vec![usize::MAX; total];
    for &r in &rows {
        dist[r] = 0;
    }
    for r in 1..total {
        dist[r] = dist[r].min(dist[r - 1].saturating_add(1));
    }
    for r in (0..total - 1).rev() {
        dist[r] = dist[r].min(dist[r + 1].saturating_add(1));
    }
    let mut win = Vec::new();
    let mut y_pre = Vec::new();
    let mut y = Vec::new();
    let mut sel = Vec::new();
    for (l, layer) in m.enc.iter().enumerate() {
        let reach = 3 - l;
        sel.clear();
        // At the first layer a pad row two or more rows from any word sees
        // only zeros: its output is the layer's constant.
        sel.extend((0..total).filter(|&r| dist[r] <= reach && (l > 0 || dist[r] <= 1)));
        win.clear();
        win.resize(sel.len() * WIDTH * 3, 0.0);
        for (k, &t) in sel.iter().enumerate() {
            let dst = &mut win[k * WIDTH * 3..(k + 1) * WIDTH * 3];
            if t > 0 {
                dst[..WIDTH].copy_from_slice(&h[(t - 1) * WIDTH..t * WIDTH]);
            }
            dst[WIDTH..2 * WIDTH].copy_from_slice(&h[t * WIDTH..(t + 1) * WIDTH]);
            if t + 1 < total {
                dst[2 * WIDTH..].copy_from_slice(&h[(t + 1) * WIDTH..(t + 2) * WIDTH]);
            }
        }
        maxout_ln(layer, &win, sel.len(), &mut y_pre, &mut y);
        for (k, &t) in sel.iter().enumerate() {
            for (a, b) in h[t * WIDTH..(t + 1) * WIDTH]
                .iter_mut()
                .zip(&y[k * WIDTH..(k + 1) * WIDTH])
            {
                *a += b;
            }
        }
        if l == 0 {
            for r in 0..total {
                if (2..=reach).contains(&dist[r]) {
                    h[r * WIDTH..(r + 1) * WIDTH].copy_from_slice(&m.enc0_const);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(n * WIDTH);
    for r in rows {
        out.extend_from_slice(&h[r * WIDTH..(r + 1) * WIDTH]);
    }
    out
}

/// The best tag index per token.
pub(crate) fn tag(m: &Model, vecs: &[f32]) -> Vec<usize> {
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
pub(crate) fn argmax(v: impl Iterator<Item = f32>) -> usize {
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
pub(crate) fn parser_precompute(m: &Model, vecs: &[f32]) -> Vec<f32> {
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
pub(crate) fn parser_scores(m: &Model, pre: &[f32], ids: &[i32; N_FEATS], scores: &mut Vec<f32>) {
    scores.clear();
    scores.extend_from_slice(&m.upper_b);
    parser_scores_body(m, pre, ids, scores);
}

avx2_or_plain! {
fn parser_scores_body(m: &Model, pre: &[f32], ids: &[i32; N_FEATS], scores: &mut [f32]) {
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
    let na = scores.len();
    for (j, &hj) in hidden.iter().enumerate() {
        let w = &m.upper_wt[j * na..(j + 1) * na];
        for (s, x) in scores.iter_mut().zip(w) {
            *s += x * hj;
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from spaCy's StringStore and thinc's NumpyOps().hash.
    #[test]
    fn hashes_match_spacy_and_thinc() {
        assert_eq!(hash_string("the"), 7425985699627899538);
        assert_eq!(hash_string("faux"), 7955077185209643164);
        assert_eq!(hash_string("xxxx"), 13110060611322374290);
        assert_eq!(hash_string(""), 0);
        assert_eq!(
            hash_ids(7425985699627899538, 8),
            [2332737498, 1315472909, 1351622599, 1973209364]
        );
        assert_eq!(
            hash_ids(1, 8),
            [1161550108, 2247783286, 1742325162, 1224191281]
        );
        assert_eq!(
            hash_ids(432, 8),
            [57223276, 3286657089, 2233318562, 635018337]
        );
    }

    #[test]
    fn shapes_follow_spacy() {
        assert_eq!(word_shape("Hello"), "Xxxxx");
        assert_eq!(word_shape("1990s"), "ddddx");
        assert_eq!(word_shape("199000s"), "ddddx");
        assert_eq!(word_shape("aaaaaaa"), "xxxx");
        assert_eq!(word_shape("t-shirt"), "x-xxxx");
    }
}
