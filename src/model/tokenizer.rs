//! CLIP's BPE tokenizer with `clip.tokenize(..., truncate=True)` semantics.

use tch::Tensor;

pub struct ClipTokenizer {
    inner: instant_clip_tokenizer::Tokenizer,
    pub context_length: usize,
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new(77)
    }
}

impl ClipTokenizer {
    pub(crate) fn new(context_length: usize) -> ClipTokenizer {
        ClipTokenizer {
            inner: instant_clip_tokenizer::Tokenizer::new(),
            context_length: context_length.max(3),
        }
    }

    /// `[sot] + bpe(text) + [eot]`, truncated to the context with the last
    /// token forced to eot, zero-padded.
    pub(crate) fn encode(&self, text: &str) -> Vec<i64> {
        let mut toks = Vec::new();
        self.inner.encode(text, &mut toks);
        let mut ids: Vec<i64> = Vec::with_capacity(self.context_length);
        ids.push(self.inner.start_of_text().to_u16() as i64);
        ids.extend(toks.iter().map(|t| t.to_u16() as i64));
        ids.truncate(self.context_length - 1);
        ids.push(self.inner.end_of_text().to_u16() as i64);
        ids.resize(self.context_length, 0);
        ids
    }

    /// `[sot] + bpe(text) + [eot]`, zero-padded, or the token count when
    /// it does not fit: `clip.tokenize(..., truncate=False)`, which raises.
    pub(crate) fn encode_exact(&self, text: &str) -> Result<Vec<i64>, usize> {
        let mut toks = Vec::new();
        self.inner.encode(text, &mut toks);
        if toks.len() + 2 > self.context_length {
            return Err(toks.len() + 2);
        }
        Ok(self.encode(text))
    }

    /// A [N, context] int64 tensor.
    pub fn batch(&self, texts: &[&str]) -> Tensor {
        let flat: Vec<i64> = texts.iter().flat_map(|t| self.encode(t)).collect();
        Tensor::from_slice(&flat).view([texts.len() as i64, self.context_length as i64])
    }
}
