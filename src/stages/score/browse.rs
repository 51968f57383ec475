//! What the report browses and the error analysis tables: each template's
//! outcome per method (rank, the top three retrieved), recall by
//! condition, and the audit.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Builder, RecordBatch, StringBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type};

use super::html::{self, Card, ConditionRecall, Page};
use crate::error::{Error, Result};
use crate::eval::audit::{self, AuditRow, KeyedTemplate};
use crate::eval::{normalized, Method, Recall, TaskRows};
use crate::framework::stage::StageContext;
use crate::tables::embeddings::Embeddings;

pub(crate) static BY_CONDITION_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("condition", DataType::Utf8, false),
        Field::new("n", DataType::UInt64, false),
        Field::new("recall_at_1", DataType::Float64, false),
        Field::new("recall_at_2", DataType::Float64, false),
        Field::new("recall_at_3", DataType::Float64, false),
    ]))
});

type Outcome = Option<(u32, Vec<(String, f32)>)>;

pub(super) struct Browse<'a> {
    tasks: &'a [TaskRows],
    img: &'a Embeddings,
    /// Embedding row -> image key.
    keys: Vec<&'a str>,
    methods: Vec<Method>,
    /// (task index, template position) -> outcome per method.
    outcomes: HashMap<(usize, usize), Vec<Outcome>>,
}

impl<'a> Browse<'a> {
    pub(crate) fn new(
        tasks: &'a [TaskRows],
        img: &'a Embeddings,
        scores: &RecordBatch,
        methods: &[Method],
    ) -> Result<Browse<'a>> {
        let mut keys = vec![""; img.index.len()];
        for (k, &i) in &img.index {
            keys[i] = k.as_str();
        }
        let col = |n: &str| crate::framework::store::column(scores, n).cloned();
        let task = col("task")?;
        let task = task.as_string::<i32>();
        let id = col("template_id")?;
        let id = id.as_primitive::<UInt32Type>();
        let method = col("method")?;
        let method = method.as_string::<i32>();
        let rank = col("target_rank")?;
        let rank = rank.as_primitive::<UInt32Type>();
        let sims = col("similarities")?;
        let sims = sims.as_list::<i32>();
        let top = col("top_keys")?;
        let top = top.as_list::<i32>();
        let task_index: HashMap<&str, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.task.as_str(), i))
            .collect();
        let positions: Vec<HashMap<u32, usize>> = tasks
            .iter()
            .map(|t| {
                t.template_ids
                    .iter()
                    .enumerate()
                    .map(|(p, &i)| (i, p))
                    .collect()
            })
            .collect();
        let mut outcomes: HashMap<(usize, usize), Vec<Outcome>> = HashMap::new();
        for r in 0..scores.num_rows() {
            let (Some(&ti), Some(mi)) = (
                task_index.get(task.value(r)),
                methods.iter().position(|m| m.name() == method.value(r)),
            ) else {
                continue;
            };
            let Some(&pos) = positions[ti].get(&id.value(r)) else {
                continue;
            };
            // Hidden labels (CIRR test1): nothing to browse by outcome.
            if tasks[ti].global.as_ref().is_some_and(|g| g.hidden()) {
                continue;
            }
            let s = sims.value(r);
            let s: Vec<f32> = s.as_primitive::<Float32Type>().values().to_vec();
            let best: Vec<(String, f32)> = if top.is_valid(r) {
                let tk = top.value(r);
                let tk = tk.as_string::<i32>();
                (0..tk.len().min(3))
                    .map(|j| (tk.value(j).to_string(), s[j]))
                    .collect()
            } else {
                let cands = &tasks[ti].candidates[pos];
                let mut order: Vec<usize> = (0..s.len()).collect();
                order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
                order
                    .into_iter()
                    .take(3)
                    .map(|j| (keys[cands[j]].to_string(), s[j]))
                    .collect()
            };
            let e = outcomes
                .entry((ti, pos))
                .or_insert_with(|| vec![None; methods.len()]);
            e[mi] = Some((rank.value(r), best));
        }
        Ok(Browse {
            tasks,
            img,
            keys,
            methods: methods.to_vec(),
            outcomes,
        })
    }

    fn target(&self, ti: usize, pos: usize) -> &str {
        let t = &self.tasks[ti];
        match &t.global {
            Some(g) => g
                .relevant
                .get(pos)
                .and_then(|r| r.first())
                .map(|&p| g.keys[p].as_str())
                .unwrap_or(""),
            None => self.keys[t.candidates[pos][0]],
        }
    }

    /// `recall_by_condition`: per (task, method, condition).
    pub(crate) fn by_condition(&self) -> Vec<ConditionRecall> {
        let mut groups: BTreeMap<(usize, usize, &str), Vec<u32>> = BTreeMap::new();
        for (&(ti, pos), outs) in &self.outcomes {
            for (mi, o) in outs.iter().enumerate() {
                if let Some((rank, _)) = o {
                    groups
                        .entry((ti, mi, self.tasks[ti].conditions[pos].as_str()))
                        .or_default()
                        .push(*rank);
                }
            }
        }
        groups
            .into_iter()
            .map(|((ti, mi, cond), ranks)| {
                let n = ranks.len() as u64;
                let at = [1u32, 2, 3]
                    .map(|k| ranks.iter().filter(|&&r| r <= k).count() as f64 / n as f64);
                ConditionRecall {
                    task: self.tasks[ti].task.clone(),
                    method: self.methods[mi].name(),
                    condition: cond.to_string(),
                    n,
                    at,
                }
            })
            .collect()
    }

    /// The audit of the GeneCIS (15-candidate) tasks; `near` is the cosine
    /// from which two images count as one picture.
    pub(crate) fn audit(&self, near: f32) -> Vec<AuditRow> {
        let mut ts: Vec<KeyedTemplate> = Vec::new();
        let mut ranks: HashMap<(String, u32), Vec<(String, u32)>> = HashMap::new();
        for (ti, t) in self.tasks.iter().enumerate() {
            if t.global.is_some() {
                continue;
            }
            for (pos, &id) in t.template_ids.iter().enumerate() {
                let c = &t.candidates[pos];
                ts.push(KeyedTemplate {
                    task: &t.task,
                    id,
                    condition: &t.conditions[pos],
                    reference: self.keys[t.reference[pos]],
                    target: self.keys[c[0]],
                    gallery: c[1..].iter().map(|&r| self.keys[r]).collect(),
                });
                if let Some(outs) = self.outcomes.get(&(ti, pos)) {
                    let rs = outs
                        .iter()
                        .zip(&self.methods)
                        .filter_map(|(o, m)| o.as_ref().map(|(r, _)| (m.name().to_string(), *r)))
                        .collect();
                    ranks.insert((t.task.clone(), id), rs);
                }
            }
        }
        let unit: HashMap<&str, Vec<f32>> = ts
            .iter()
            .flat_map(|t| {
                std::iter::once(t.reference)
                    .chain(std::iter::once(t.target))
                    .chain(t.gallery.iter().copied())
            })
            .filter_map(|k| self.img.get(k).map(|v| (k, normalized(v))))
            .collect();
        let lookup = |k: &str| unit.get(k).map(|v| v.as_slice());
        let mut rows = audit::key_checks(&ts);
        rows.extend(audit::embedding_checks(&ts, &lookup, near));
        rows.extend(audit::failure_checks(&ts, &ranks));
        rows.sort_by(|a, b| {
            (&a.task, a.template_id, a.check).cmp(&(&b.task, b.template_id, b.check))
        });
        rows
    }

    /// Writes `report.html` and its thumbnails into the stage folder.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_html(
        &self,
        ctx: &StageContext,
        title: &str,
        recalls: &[Recall],
        by_condition: &[ConditionRecall],
        audit_rows: &[AuditRow],
        paired: &[crate::eval::PairedRow],
        combiner: &Option<PathBuf>,
    ) -> Result<PathBuf> {
        let key_rows = match ctx.optional_input("image_keys") {
            Some(d) => crate::tables::image_keys::read_image_keys(d)?
                .into_iter()
                .map(|k| (k.key.clone(), k))
                .collect(),
            None => HashMap::new(),
        };
        let mut cards = Vec::new();
        for (ti, t) in self.tasks.iter().enumerate() {
            for (pos, &id) in t.template_ids.iter().enumerate() {
                let Some(outs) = self.outcomes.get(&(ti, pos)) else {
                    continue;
                };
                cards.push(Card {
                    task: t.task.clone(),
                    id,
                    condition: t.conditions[pos].clone(),
                    reference: self.keys[t.reference[pos]].to_string(),
                    target: self.target(ti, pos).to_string(),
                    outcomes: outs.clone(),
                });
            }
        }
        let mut wanted: Vec<&str> = Vec::new();
        for c in &cards {
            wanted.push(&c.reference);
            wanted.push(&c.target);
            for (_, top) in c.outcomes.iter().flatten() {
                wanted.extend(top.iter().map(|(k, _)| k.as_str()));
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let thumbs =
            html::write_thumbnails(&ctx.work_dir, &wanted, &key_rows).map_err(Error::Data)?;
        let missing = wanted.len() - thumbs.len();
        if missing > 0 && !key_rows.is_empty() {
            ctx.note(format!(
                "report.html: {missing} image(s) without a thumbnail (file unreadable)"
            ));
        }
        let page = Page {
            title,
            recalls,
            methods: self.methods.iter().map(|m| m.name()).collect(),
            cards,
            by_condition,
            audit: audit_rows,
            paired,
            provenance: provenance(ctx, combiner),
            manifest_text: std::fs::read_to_string(ctx.manifest).unwrap_or_default(),
        };
        ctx.write_file("report.html", html::render(&page, &thumbs).as_bytes())
    }
}

fn file_hash(p: &Path) -> Option<String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(p).ok()?;
    std::io::copy(&mut f, &mut h).ok()?;
    Some(h.finalize().to_hex()[..16].to_string())
}

/// The tool, the manifest, each input stage's kind and the files its
/// params name (checkpoints, template files), hashed.
fn provenance(ctx: &StageContext, combiner: &Option<PathBuf>) -> Vec<(String, String)> {
    let mut out = vec![
        ("genecis".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("manifest".into(), ctx.manifest.display().to_string()),
    ];
    for rec in &ctx.input_records {
        let name = &rec.stage;
        let fp = &rec.fingerprint;
        out.push((
            format!("stage {name}"),
            format!("fingerprint {}", &fp[..fp.len().min(16)]),
        ));
        if let Some(params) = rec.params.as_object() {
            for (k, val) in params {
                let Some(s) = val.as_str() else { continue };
                let p = ctx.resolve(Path::new(s));
                if p.is_file() {
                    let h = file_hash(&p).unwrap_or_else(|| "unreadable".into());
                    out.push((
                        format!("{name}.{k}"),
                        format!("{} (blake3 {h})", p.display()),
                    ));
                }
            }
        }
    }
    if let Some(c) = combiner {
        let h = file_hash(c).unwrap_or_else(|| "unreadable".into());
        out.push(("combiner".into(), format!("{} (blake3 {h})", c.display())));
    }
    out
}

pub(crate) fn by_condition_batch(rows: &[ConditionRecall]) -> Result<RecordBatch> {
    let mut task = StringBuilder::new();
    let mut method = StringBuilder::new();
    let mut cond = StringBuilder::new();
    let mut n = UInt64Builder::new();
    let mut at: [Float64Builder; 3] = Default::default();
    for r in rows {
        task.append_value(&r.task);
        method.append_value(r.method);
        cond.append_value(&r.condition);
        n.append_value(r.n);
        for (b, v) in at.iter_mut().zip(r.at) {
            b.append_value(v);
        }
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(task.finish()),
        Arc::new(method.finish()),
        Arc::new(cond.finish()),
        Arc::new(n.finish()),
    ];
    cols.extend(at.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    Ok(RecordBatch::try_new(BY_CONDITION_SCHEMA.clone(), cols)?)
}
