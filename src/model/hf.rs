//! Hugging Face `CLIPModel` weights in OpenAI's layout, so one set of
//! forward passes serves both: transformers' `modeling_clip.py` computes
//! the same functions under other names, with q, k and v as three Linears
//! (concatenated here into `in_proj`, the order nn.MultiheadAttention
//! splits them in) and the projections as bias-free Linears (transposed
//! into OpenAI's matrices).

use std::collections::HashMap;

use tch::Tensor;

use super::{ModelError, Result, StateDict};

/// One HF encoder layer's tensors under OpenAI's names.
fn layer(rest: &str) -> Option<String> {
    let map = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
        ("self_attn.out_proj.", "attn.out_proj."),
    ];
    map.iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|s| format!("{to}{s}")))
}

/// Renames and reshapes every tensor; a key this mapping does not know is
/// an error naming it (nothing is dropped silently but `position_ids`, a
/// buffer of the indices 0..n).
pub(crate) fn to_openai_layout(sd: StateDict) -> Result<StateDict> {
    let path = sd.path.clone();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    // q, k, v per attention block, joined once all three are seen.
    let mut qkv: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    let mut keys: Vec<String> = sd.tensors.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let t = sd.tensors[&key].shallow_clone();
        let (tower, rest) = if let Some(r) = key.strip_prefix("text_model.") {
            ("", r)
        } else if let Some(r) = key.strip_prefix("vision_model.") {
            ("visual.", r)
        } else {
            match key.as_str() {
                "text_projection.weight" => {
                    out.insert("text_projection".into(), t.transpose(0, 1).contiguous());
                }
                "visual_projection.weight" => {
                    out.insert("visual.proj".into(), t.transpose(0, 1).contiguous());
                }
                "logit_scale" => {
                    out.insert(key.clone(), t);
                }
                _ => return Err(unknown(&sd, &key)),
            }
            continue;
        };
        let name = if let Some(r) = rest.strip_prefix("encoder.layers.") {
            let (i, r) = r.split_once('.').ok_or_else(|| unknown(&sd, &key))?;
            let block = format!("{tower}transformer.resblocks.{i}");
            if let Some(p) = ["q_proj.", "k_proj.", "v_proj."].iter().position(|p| {
                r.strip_prefix("self_attn.")
                    .is_some_and(|s| s.starts_with(p))
            }) {
                let what = &r["self_attn.q_proj.".len()..];
                let slot = qkv
                    .entry(format!("{block}.attn.in_proj_{what}"))
                    .or_insert([None, None, None]);
                slot[p] = Some(t);
                continue;
            }
            format!("{block}.{}", layer(r).ok_or_else(|| unknown(&sd, &key))?)
        } else {
            let mapped = match (tower, rest) {
                (_, r) if r.ends_with("embeddings.position_ids") => continue,
                ("", "embeddings.token_embedding.weight") => "token_embedding.weight".to_string(),
                ("", "embeddings.position_embedding.weight") => "positional_embedding".to_string(),
                ("", r) if r.starts_with("final_layer_norm.") => {
                    format!("ln_final.{}", &r["final_layer_norm.".len()..])
                }
                (_, "embeddings.class_embedding") => "class_embedding".to_string(),
                (_, "embeddings.patch_embedding.weight") => "conv1.weight".to_string(),
                (_, "embeddings.position_embedding.weight") => "positional_embedding".to_string(),
                // sic: transformers' name.
                (_, r) if r.starts_with("pre_layrnorm.") => {
                    format!("ln_pre.{}", &r["pre_layrnorm.".len()..])
                }
                (_, r) if r.starts_with("post_layernorm.") => {
                    format!("ln_post.{}", &r["post_layernorm.".len()..])
                }
                _ => return Err(unknown(&sd, &key)),
            };
            format!("{tower}{mapped}")
        };
        out.insert(name, t);
    }
    for (name, parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(ModelError::Missing {
                path: path.clone(),
                key: name.replace("in_proj_", "{q,k,v}_proj."),
                hint: " (an attention block lacks one of its q, k, v projections)".into(),
            });
        };
        out.insert(name, Tensor::cat(&[q, k, v], 0));
    }
    Ok(StateDict { path, tensors: out })
}

fn unknown(sd: &StateDict, key: &str) -> ModelError {
    ModelError::Unexpected {
        path: sd.path.clone(),
        key: key.to_string(),
        count: 1,
        model: "a Hugging Face CLIPModel".into(),
    }
}
