//! Model selection: the validation split's metrics or the GeneCIS recalls
//! on a templates input, the best epoch's weights, and the `weights` rows.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use tch::Tensor;

use crate::error::{Error, Result};
use crate::eval::combiner_recalls;
use crate::framework::stage::StageContext;
use crate::model::preprocess::to_tensor;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::torch_save;
use crate::model::with_precision;
use crate::tables::embeddings::Embeddings;
use crate::tables::image_keys::{read_image_keys, read_texts, KeyRow};
use crate::tables::weights::weights_batch;

use super::*;

pub(super) enum SelectionFeatures {
    Cached(Embeddings, Embeddings),
    Encode {
        keys: Vec<KeyRow>,
        texts: Vec<String>,
        cache: Option<ImageCache>,
    },
}

pub(super) struct Selection {
    pub(super) templates: PathBuf,
    pub(super) galleries: Option<PathBuf>,
    pub(super) features: SelectionFeatures,
}

impl Trainer {
    /// What selection scores: the cached embeddings, or in fine-tune modes
    /// the templates' images and texts, encoded each epoch.
    pub(super) fn selection(
        ctx: &StageContext,
        cached: Option<(Embeddings, Embeddings)>,
    ) -> Result<Option<Selection>> {
        let Some(templates) = ctx.optional_input("templates") else {
            return Ok(None);
        };
        let features = match cached {
            Some((img, txt)) => SelectionFeatures::Cached(img, txt),
            None => {
                let Some(keys) = ctx.optional_input("image_keys") else {
                    return Err(Error::Data(
                        "selecting on templates while fine-tuning encodes their images: the templates stage's image_keys must be an input too".into(),
                    ));
                };
                let texts = match ctx.optional_input("texts") {
                    Some(d) => read_texts(d, "text")?,
                    None => Vec::new(),
                };
                SelectionFeatures::Encode {
                    keys: read_image_keys(keys)?,
                    texts,
                    cache: None,
                }
            }
        };
        Ok(Some(Selection {
            templates: templates.to_path_buf(),
            galleries: ctx.optional_input("galleries").map(Path::to_path_buf),
            features,
        }))
    }

    pub(super) fn resolve_select_by(p: &TrainParams, sel: Option<&Selection>) -> Result<String> {
        let tasks: Vec<String> = match sel {
            Some(s) => read_texts(&s.templates, "task")?,
            None => Vec::new(),
        };
        let local = tasks
            .iter()
            .filter(|t| !t.starts_with("cirr") && !t.starts_with("mit_states"))
            .count();
        if p.select_by == "auto" {
            return Ok(if tasks.iter().any(|t| t == "cirr_val") {
                "templates/cirr_val/recall_at_1".into()
            } else if local > 1 {
                "templates/average/recall_at_1".into()
            } else if let Some(t) = tasks.first() {
                format!("templates/{t}/recall_at_1")
            } else {
                "val/recall_at_1".into()
            });
        }
        if let Some(rest) = p.select_by.strip_prefix("templates/") {
            let task = rest.split('/').next().unwrap_or("");
            if !(tasks.iter().any(|t| t == task) || (task == "average" && local > 1)) {
                return Err(Error::Data(format!(
                    "select_by = {}: the templates input has no task '{task}' (it has: {})",
                    p.select_by,
                    if tasks.is_empty() {
                        "no templates input".to_string()
                    } else {
                        tasks.join(", ")
                    }
                )));
            }
        }
        Ok(p.select_by.clone())
    }

    /// Recalls of the current weights on the templates input.
    pub(super) fn score_templates(&mut self, ctx: &StageContext) -> Result<Vec<(String, f64)>> {
        let Some(sel) = &self.selection else {
            return Ok(Vec::new());
        };
        let device = self.device;
        let recalls = match &sel.features {
            SelectionFeatures::Cached(img, txt) => combiner_recalls(
                &sel.templates,
                sel.galleries.as_deref(),
                img,
                txt,
                &self.combiner,
                device,
                ctx.stage,
            )?,
            SelectionFeatures::Encode { keys, texts, cache } => {
                let clip = self
                    .clip
                    .as_ref()
                    .ok_or_else(|| Error::Internal("encoding templates without a CLIP".into()))?;
                let cache = cache
                    .as_ref()
                    .ok_or_else(|| Error::Internal("template cache not built".into()))?;
                let d = self.dim as usize;
                let mut ivals = Vec::with_capacity(keys.len() * d);
                let key_names: Vec<String> = keys.iter().map(|k| k.key.clone()).collect();
                for lo in (0..keys.len()).step_by(256) {
                    let hi = (lo + 256).min(keys.len());
                    let imgs: Vec<Tensor> = (lo..hi)
                        .map(|i| {
                            let r = cache.get(i)?;
                            let rgb = image::RgbImage::from_raw(r.width, r.height, r.data)
                                .ok_or_else(|| Error::Internal("cached image size".into()))?;
                            Ok(to_tensor(&rgb))
                        })
                        .collect::<Result<_>>()?;
                    let x = Tensor::stack(&imgs, 0).to_device(device);
                    let f = tch::no_grad(|| {
                        with_precision(device, self.amp, || clip.encode_image(&x))
                    })?;
                    ivals.extend(crate::tables::embeddings::tensor_rows(&f)?);
                }
                let tok = ClipTokenizer::new(clip.config.context_length as usize);
                let mut tvals = Vec::with_capacity(texts.len() * d);
                for chunk in texts.chunks(256) {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    let toks = tok.batch(&refs).to_device(device);
                    let f = tch::no_grad(|| {
                        with_precision(device, self.amp, || clip.encode_text(&toks))
                    })?;
                    tvals.extend(crate::tables::embeddings::tensor_rows(&f)?);
                }
                let img = Embeddings::new(&key_names, ivals, d);
                let txt = Embeddings::new(texts, tvals, d);
                combiner_recalls(
                    &sel.templates,
                    sel.galleries.as_deref(),
                    &img,
                    &txt,
                    &self.combiner,
                    device,
                    ctx.stage,
                )?
            }
        };
        let mut out = Vec::new();
        for r in recalls {
            for (k, v) in crate::eval::KS.iter().zip(r.at) {
                out.push((format!("{}/recall_at_{k}", r.task), v));
            }
        }
        Ok(out)
    }

    pub(super) fn save_best(&self, ctx: &StageContext) -> Result<()> {
        let w = |name: &str, sd: &[(String, Tensor)]| -> Result<()> {
            let path = ctx.work_dir.join(name);
            torch_save::save_state_dict(&path, sd)
                .map_err(|m| Error::Data(format!("cannot write {}: {m}", path.display())))
        };
        let comb = self.combiner_state();
        w("combiner_head.pt", &comb)?;
        let refs: Vec<(&str, &Tensor)> = comb.iter().map(|(k, t)| (k.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, ctx.work_dir.join("combiner_head.safetensors"))?;
        if self.clip.is_some() {
            w("backbone.pt", &self.backbone_state())?;
        }
        Ok(())
    }

    pub(super) fn weights_rows(&self, _p: &TrainParams, ctx: &StageContext) -> Result<RecordBatch> {
        let Some((value, epoch)) = self.progress.best else {
            return Err(Error::Internal(
                "training finished without a best epoch".into(),
            ));
        };
        let mut rows = Vec::new();
        let mut files = vec![
            ("combiner", "combiner_head.pt", "torch"),
            (
                "combiner_safetensors",
                "combiner_head.safetensors",
                "safetensors",
            ),
        ];
        if self.clip.is_some() {
            files.push(("backbone", "backbone.pt", "torch"));
        }
        for (role, file, format) in files {
            let path = ctx.work_dir.join(file);
            let bytes = std::fs::metadata(&path)
                .map_err(Error::io("cannot read", &path))?
                .len();
            rows.push((
                role.to_string(),
                file.to_string(),
                format.to_string(),
                bytes,
                epoch as u32,
                self.select_by.clone(),
                value,
            ));
        }
        weights_batch(&rows)
    }
}
