//! The GeneCIS evaluation, shared by `score` and `train`'s model
//! selection: templates resolved to embedding rows, queries built per
//! method, candidates ranked by the original's rule, recalls
//! (eval/eval_functions.py, utils/model_utils.py).

pub(crate) mod audit;
pub(crate) mod rank;
pub(crate) mod stats;
pub(crate) mod template_file;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::combiner::Combiner;
use crate::tables::embeddings::Embeddings;
pub(crate) use rank::rank_global;
pub(crate) use template_file::TASKS;

/// The K of every recall computed; reports show 1/2/3 (GeneCIS, CIRR's
/// Recall_subset) or 1/5/10 (global tasks; CIRR also reports 50).
pub(crate) const KS: [usize; 6] = [1, 2, 3, 5, 10, 50];

/// Gallery images a global query keeps, best first: CIRR's test server
/// takes the top 50.
pub(crate) const GLOBAL_TOP: usize = 50;

/// The task of a global task's Recall_subset (CIRR): ranked within each
/// query's subset, like a GeneCIS task, but not in the GeneCIS average.
pub(crate) fn subset_task(task: &str) -> String {
    format!("{task}_subset")
}

fn is_subset_task(task: &str) -> bool {
    task.ends_with("_subset")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Method {
    ImageOnly,
    TextOnly,
    ImagePlusText,
    Combiner,
    /// Textual inversion (LinCIR's GeneCIS protocol): the reference's
    /// feature mapped to a pseudo word by Pic2Word's IM2TEXT, SEARLE's or
    /// LinCIR's Phi, in a prompt CLIP's text tower encodes.
    Pic2word,
    Searle,
    Lincir,
    /// A method whose scores or query embeddings an `import-scores` stage
    /// brought in; never a manifest's `methods` entry.
    #[serde(skip)]
    Imported(Name),
}

/// An imported method's interned name ([`Method::imported`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Name(pub &'static str);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Name, D::Error> {
        Ok(Name(Method::imported(&String::deserialize(d)?).name()))
    }
}

/// The built-in methods' names, for messages.
pub(crate) const BUILT_IN: [&str; 7] = [
    "image_only",
    "text_only",
    "image_plus_text",
    "combiner",
    "pic2word",
    "searle",
    "lincir",
];

impl Method {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Method::ImageOnly => "image_only",
            Method::TextOnly => "text_only",
            Method::ImagePlusText => "image_plus_text",
            Method::Combiner => "combiner",
            Method::Pic2word => "pic2word",
            Method::Searle => "searle",
            Method::Lincir => "lincir",
            Method::Imported(Name(name)) => name,
        }
    }

    /// An imported method, its name interned: results and ranks key on
    /// `&'static str`, and a run imports a handful of names.
    pub(crate) fn imported(name: &str) -> Method {
        static NAMES: std::sync::Mutex<BTreeSet<&'static str>> =
            std::sync::Mutex::new(BTreeSet::new());
        let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
        let name = match names.get(name) {
            Some(n) => *n,
            None => {
                let n: &'static str = Box::leak(name.to_string().into_boxed_str());
                names.insert(n);
                n
            }
        };
        Method::Imported(Name(name))
    }
}

/// Which CLIP features a query is built from: raw ones (as the original
/// evaluation does) or L2-normalised ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FeatureInput {
    Raw,
    Normalized,
}

impl FeatureInput {
    pub(crate) fn name(self) -> &'static str {
        match self {
            FeatureInput::Raw => "raw",
            FeatureInput::Normalized => "normalized",
        }
    }
}

/// How queries are built from features: score's params of the same names,
/// the original's by default.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryConfig {
    /// Weight of the text in image_plus_text: normalize((1-w) img + w txt).
    pub text_weight: f64,
    pub image_plus_text_input: FeatureInput,
    pub combiner_input: FeatureInput,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            text_weight: 0.5,
            image_plus_text_input: FeatureInput::Raw,
            combiner_input: FeatureInput::Raw,
        }
    }
}

/// One `scores` row as evaluation emits it: task, template id, method,
/// target rank, similarities, top keys (global tasks).
pub(crate) type EmitRow<'a> = dyn FnMut(&str, u32, Method, u32, &[f32], Option<&[&str]>) + 'a;

pub(crate) fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// 1-based rank of candidate 0 under a stable descending sort.
pub(crate) fn target_rank(sims: &[f32]) -> u32 {
    1 + sims[1..].iter().filter(|&&s| s > sims[0]).count() as u32
}

/// One task's templates, resolved to embedding rows.
pub(crate) struct TaskRows {
    pub task: String,
    pub template_ids: Vec<u32>,
    pub conditions: Vec<String>,
    pub reference: Vec<usize>,
    pub text: Vec<usize>,
    /// GeneCIS tasks: target first.
    pub candidates: Vec<Vec<usize>>,
    pub global: Option<GlobalRows>,
}

/// A global task: its gallery and, per query, where the reference and the
/// hits stand in it.
pub(crate) struct GlobalRows {
    /// Embedding rows, in gallery order.
    pub gallery: Vec<usize>,
    pub keys: Vec<String>,
    pub mask: Vec<Option<usize>>,
    pub relevant: Vec<Vec<usize>>,
    /// Per query, the gallery positions of its subset (CIRR), or none.
    pub subsets: Vec<Vec<usize>>,
}

impl GlobalRows {
    /// No query has a hit: the labels are hidden (CIRR test1); no recall.
    pub(crate) fn hidden(&self) -> bool {
        self.relevant.iter().all(Vec::is_empty)
    }
}

/// `galleries`: set -> image keys in order.
pub(crate) fn read_galleries(dir: Option<&Path>) -> Result<HashMap<String, Vec<String>>, String> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let Some(dir) = dir else {
        return Ok(out);
    };
    for b in crate::framework::store::read_table(dir).map_err(|e| crate::error::report(&e))? {
        let set = b
            .column_by_name("gallery_set")
            .ok_or("galleries has no gallery_set")?;
        let key = b
            .column_by_name("image_key")
            .ok_or("galleries has no image_key")?;
        let (set, key) = (set.as_string::<i32>(), key.as_string::<i32>());
        for i in 0..b.num_rows() {
            out.entry(set.value(i).to_string())
                .or_default()
                .push(key.value(i).to_string());
        }
    }
    Ok(out)
}

pub(crate) fn read_templates(
    dir: &Path,
    galleries: &HashMap<String, Vec<String>>,
    img: &Embeddings,
    txt: &Embeddings,
    stage: &str,
) -> Result<Vec<TaskRows>, String> {
    let mut by_task: Vec<TaskRows> = Vec::new();
    // Gallery positions of each set's keys.
    let positions: HashMap<&str, HashMap<&str, usize>> = galleries
        .iter()
        .map(|(set, keys)| {
            (
                set.as_str(),
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| (k.as_str(), i))
                    .collect(),
            )
        })
        .collect();
    let missing = |what: &str, k: &str, task: &str, id: u32| {
        format!(
            "{task} template {id} needs the {what} '{k}', which has no embedding: list the stage that makes this task's templates in the inputs of the embed stage feeding '{stage}'"
        )
    };
    for b in crate::framework::store::read_table(dir).map_err(|e| e.to_string())? {
        let col = |n: &str| {
            b.column_by_name(n)
                .cloned()
                .ok_or(format!("templates has no column {n}"))
        };
        let task = col("task")?;
        let task = task.as_string::<i32>();
        let id = col("template_id")?;
        let id = id.as_primitive::<arrow::datatypes::UInt32Type>();
        let cond = col("condition")?;
        let cond = cond.as_string::<i32>();
        let r = col("reference_key")?;
        let r = r.as_string::<i32>();
        let t = col("target_key")?;
        let t = t.as_string::<i32>();
        let g = col("gallery_keys")?;
        let g = g.as_list::<i32>();
        let gs = col("gallery_set")?;
        let gs = gs.as_string::<i32>();
        let tk = col("target_keys")?;
        let tk = tk.as_list::<i32>();
        for i in 0..b.num_rows() {
            let name = task.value(i);
            let tid = id.value(i);
            let pos = match by_task.iter().position(|x| x.task == name) {
                Some(p) => p,
                None => {
                    let global = match gs.is_valid(i) {
                        false => None,
                        true => {
                            let set = gs.value(i);
                            let keys = galleries.get(set).ok_or_else(|| {
                                format!("{name} ranks the gallery '{set}', which the galleries table does not hold: list the templates stage (not just its templates table) in the inputs of '{stage}'")
                            })?;
                            let gallery = keys
                                .iter()
                                .map(|k| {
                                    img.index
                                        .get(k.as_str())
                                        .copied()
                                        .ok_or_else(|| missing("gallery image", k, name, tid))
                                })
                                .collect::<Result<Vec<_>, String>>()?;
                            Some(GlobalRows {
                                gallery,
                                keys: keys.clone(),
                                mask: Vec::new(),
                                relevant: Vec::new(),
                                subsets: Vec::new(),
                            })
                        }
                    };
                    by_task.push(TaskRows {
                        task: name.to_string(),
                        template_ids: Vec::new(),
                        conditions: Vec::new(),
                        reference: Vec::new(),
                        text: Vec::new(),
                        candidates: Vec::new(),
                        global,
                    });
                    by_task.len() - 1
                }
            };
            let get = |k: &str, what: &str| {
                img.index
                    .get(k)
                    .copied()
                    .ok_or_else(|| missing(what, k, name, tid))
            };
            let tr = &mut by_task[pos];
            tr.template_ids.push(tid);
            tr.conditions.push(cond.value(i).to_string());
            tr.reference.push(get(r.value(i), "reference image")?);
            tr.text.push(
                txt.index
                    .get(cond.value(i))
                    .copied()
                    .ok_or_else(|| missing("condition text", cond.value(i), name, tid))?,
            );
            let members = g.value(i);
            if let Some(g) = &mut tr.global {
                let pos = &positions[gs.value(i)];
                g.mask.push(pos.get(r.value(i)).copied());
                // Gallery positions of a list of keys (hits, subset members).
                let positions = |keys: ArrayRef, what: &str| {
                    let keys = keys.as_string::<i32>();
                    (0..keys.len())
                        .map(|j| {
                            pos.get(keys.value(j)).copied().ok_or_else(|| {
                                format!(
                                    "{name} template {tid}: {what} '{}' is not in its gallery",
                                    keys.value(j)
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()
                };
                g.relevant.push(positions(tk.value(i), "target")?);
                g.subsets.push(positions(members, "subset member")?);
                continue;
            }
            let mut c = vec![get(t.value(i), "target image")?];
            let gl = g.value(i);
            let gl = gl.as_string::<i32>();
            for j in 0..gl.len() {
                c.push(get(gl.value(j), "gallery image")?);
            }
            tr.candidates.push(c);
        }
    }
    // The paper's task order, then any others by name.
    by_task.sort_by_key(|t| {
        (
            TASKS
                .iter()
                .position(|x| *x == t.task)
                .unwrap_or(TASKS.len()),
            t.task.clone(),
        )
    });
    Ok(by_task)
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recall {
    pub task: String,
    pub method: &'static str,
    /// Recall at each of [`KS`].
    pub at: [f64; 6],
    pub n: u64,
    /// A global task (reported at K = 1, 5, 10).
    pub global: bool,
    /// 95% bootstrap intervals of R@1, R@2, R@3 ([`stats`]); NaN until
    /// [`with_intervals`] sets them.
    pub ci: [(f64, f64); 3],
}

/// Per-template ranks of each (task, method), in template order: what the
/// intervals and paired tests resample.
pub(crate) type RankTable = HashMap<(String, &'static str), Vec<u32>>;

/// Stable seed part for a name (tasks and methods seed their resamples).
fn name_seed(s: &str) -> u64 {
    let h = blake3::hash(s.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Hits at K of ranks.
pub(crate) fn hits(ranks: &[u32], k: u32) -> Vec<bool> {
    ranks.iter().map(|&r| r <= k).collect()
}

/// The ranks a recall row was computed from: its task's, or for
/// `average` each GeneCIS task's (the strata the average is over).
fn strata<'a>(
    recalls: &[Recall],
    ranks: &'a RankTable,
    task: &str,
    method: &'static str,
) -> Vec<&'a [u32]> {
    if task == "average" {
        recalls
            .iter()
            .filter(|r| {
                r.method == method && !r.global && r.task != "average" && !is_subset_task(&r.task)
            })
            .filter_map(|r| ranks.get(&(r.task.clone(), method)).map(Vec::as_slice))
            .collect()
    } else {
        ranks
            .get(&(task.to_string(), method))
            .map(|v| vec![v.as_slice()])
            .unwrap_or_default()
    }
}

/// Sets every recall's 95% intervals at K = 1, 2, 3: a percentile
/// bootstrap over the task's templates (`resamples`, seeded by `seed`, the
/// task and the method), within each task for `average`.
pub(crate) fn with_intervals(
    recalls: &mut [Recall],
    ranks: &RankTable,
    resamples: usize,
    seed: u64,
) {
    use rayon::prelude::*;
    // Each row's resamples are seeded by its own names: the same intervals
    // whatever the thread count.
    let all = recalls.to_vec();
    recalls.par_iter_mut().for_each(|r| {
        let st = strata(&all, ranks, &r.task, r.method);
        for (i, k) in [1u32, 2, 3].into_iter().enumerate() {
            let h: Vec<Vec<bool>> = st.iter().map(|s| hits(s, k)).collect();
            let refs: Vec<&[bool]> = h.iter().map(Vec::as_slice).collect();
            let parts = [seed, name_seed(&r.task), name_seed(r.method), k as u64];
            r.ci[i] = stats::recall_interval(&refs, resamples, &parts);
        }
    });
}

/// One row of the `paired` table.
pub(crate) struct PairedRow {
    pub task: String,
    pub a: &'static str,
    pub b: &'static str,
    pub p: stats::Paired,
}

/// Every pair of methods on every task (and the average): the paired
/// bootstrap interval of the difference in R@1 and McNemar's exact test.
pub(crate) fn paired_rows(
    recalls: &[Recall],
    ranks: &RankTable,
    resamples: usize,
    seed: u64,
) -> Vec<PairedRow> {
    let mut tasks: Vec<&str> = Vec::new();
    let mut methods: Vec<&'static str> = Vec::new();
    for r in recalls {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    use rayon::prelude::*;
    let mut jobs = Vec::new();
    for t in tasks {
        for (i, &a) in methods.iter().enumerate() {
            for &b in &methods[i + 1..] {
                jobs.push((t, a, b));
            }
        }
    }
    jobs.par_iter()
        .filter_map(|&(t, a, b)| {
            let (sa, sb) = (strata(recalls, ranks, t, a), strata(recalls, ranks, t, b));
            if sa.is_empty() || sa.len() != sb.len() {
                return None;
            }
            let ha: Vec<Vec<bool>> = sa.iter().map(|s| hits(s, 1)).collect();
            let hb: Vec<Vec<bool>> = sb.iter().map(|s| hits(s, 1)).collect();
            let ra: Vec<&[bool]> = ha.iter().map(Vec::as_slice).collect();
            let rb: Vec<&[bool]> = hb.iter().map(Vec::as_slice).collect();
            let parts = [seed, name_seed(t), name_seed(a), name_seed(b)];
            Some(PairedRow {
                task: t.to_string(),
                a,
                b,
                p: stats::paired(&ra, &rb, resamples, &parts),
            })
        })
        .collect()
}

impl Recall {
    fn from_ranks(task: &str, method: &'static str, ranks: &[u32], global: bool) -> Recall {
        let n = ranks.len() as u64;
        Recall {
            task: task.to_string(),
            method,
            at: KS.map(|k| {
                ranks.iter().filter(|&&r| r as usize <= k).count() as f64 / n.max(1) as f64
            }),
            n,
            global,
            ci: [(f64::NAN, f64::NAN); 3],
        }
    }

    /// The (K, recall) pairs a report shows: 1/2/3, or 1/5/10 for global tasks.
    pub(crate) fn shown(&self) -> [(usize, f64); 3] {
        let pick = if self.global { [0, 3, 4] } else { [0, 1, 2] };
        pick.map(|i| (KS[i], self.at[i]))
    }
}

/// What an `import-scores` stage brought in for one method.
pub(crate) enum Given {
    /// Per (task, template id): one similarity per candidate, in the
    /// template's order (target first). GeneCIS tasks only.
    Similarities(HashMap<(String, u32), Vec<f32>>),
    /// Per (task, template id): a query embedding, ranked against the
    /// method's own gallery embeddings by cosine, as the built-in methods.
    Embeddings {
        queries: HashMap<(String, u32), Vec<f32>>,
        gallery: Embeddings,
    },
    /// Per (task, template id): a query embedding, ranked against the
    /// CLIP's own image embeddings (the textual-inversion methods).
    Queries(HashMap<(String, u32), Vec<f32>>),
}

/// Methods whose queries or scores come from outside [`evaluate`], by name.
pub(crate) type GivenMethods = HashMap<&'static str, Given>;

/// Queries of each method against each task's candidates (or gallery):
/// each `scores` row to `emit`, and one Recall per (task, method), plus the
/// GeneCIS average when several GeneCIS tasks were scored. Imported
/// methods take their similarities or queries from `given`; one imported
/// as similarities has no row for a global task.
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate(
    tasks: &[TaskRows],
    img: &Embeddings,
    txt: &Embeddings,
    p: &QueryConfig,
    methods: &[Method],
    combiner: Option<&Combiner>,
    given: &GivenMethods,
    device: Device,
    emit: &mut EmitRow<'_>,
) -> Result<Vec<Recall>> {
    let img_n: Vec<Vec<f32>> = (0..img.index.len())
        .map(|i| normalized(img.row(i)))
        .collect();
    let txt_n: Vec<Vec<f32>> = (0..txt.index.len())
        .map(|i| normalized(txt.row(i)))
        .collect();
    let mut row_keys = vec![""; img.index.len()];
    for (k, &r) in &img.index {
        row_keys[r] = k.as_str();
    }
    // Each imported-embeddings method's unit gallery vectors, by img row.
    let mut own_units: HashMap<&'static str, Vec<Vec<f32>>> = HashMap::new();
    for &m in methods {
        let needs = matches!(
            m,
            Method::Imported(_) | Method::Pic2word | Method::Searle | Method::Lincir
        );
        match given.get(m.name()) {
            Some(Given::Embeddings { gallery, .. }) => {
                let units = row_keys
                    .iter()
                    .map(|k| gallery.get(k).map(normalized).unwrap_or_default())
                    .collect();
                own_units.insert(m.name(), units);
            }
            None if needs => {
                return Err(Error::Internal(format!(
                    "method {} has no queries",
                    m.name()
                )))
            }
            _ => {}
        }
    }
    let mut recalls: Vec<Recall> = Vec::new();
    for t in tasks {
        // A global gallery goes to the device once per task (and per
        // imported-embeddings method, whose gallery is its own).
        let to_device = |units: &[Vec<f32>], g: &GlobalRows, dim: usize| -> Result<Tensor> {
            let flat: Vec<f32> = g
                .gallery
                .iter()
                .flat_map(|&r| units[r].iter().copied())
                .collect();
            if flat.len() != g.gallery.len() * dim {
                return Err(Error::Data(format!(
                    "{}: an imported gallery lacks one of its images or has another width; rerun the import-scores stage",
                    t.task
                )));
            }
            Ok(Tensor::f_from_slice(&flat)?
                .f_view([g.gallery.len() as i64, dim as i64])?
                .f_to_device(device)?)
        };
        let gallery = match &t.global {
            Some(g) => Some(to_device(&img_n, g, img.dim)?),
            None => None,
        };
        for &method in methods {
            let given_method = given.get(method.name());
            let key = |i: usize| (t.task.clone(), t.template_ids[i]);
            let lacking = |i: usize| {
                Error::Data(format!(
                    "{} template {}: method {} has no query for it (an imported method: rerun its import-scores stage on these templates)",
                    t.task,
                    t.template_ids[i],
                    method.name()
                ))
            };
            if let Some(Given::Similarities(s)) = given_method {
                if t.global.is_some() {
                    continue;
                }
                let mut ranks = Vec::with_capacity(t.template_ids.len());
                for i in 0..t.template_ids.len() {
                    let sims = s.get(&key(i)).ok_or_else(|| lacking(i))?;
                    if sims.len() != t.candidates[i].len() {
                        return Err(Error::Data(format!(
                            "{} template {}: {} imported similarities for {} candidates",
                            t.task,
                            t.template_ids[i],
                            sims.len(),
                            t.candidates[i].len()
                        )));
                    }
                    ranks.push(rank_local(t, i, method, sims, emit)?);
                }
                recalls.push(Recall::from_ranks(&t.task, method.name(), &ranks, false));
                continue;
            }
            let queries: Vec<Vec<f32>> = match method {
                Method::ImageOnly => t.reference.iter().map(|&r| img_n[r].clone()).collect(),
                Method::TextOnly => t.text.iter().map(|&x| txt_n[x].clone()).collect(),
                Method::ImagePlusText => t
                    .reference
                    .iter()
                    .zip(&t.text)
                    .map(|(&r, &x)| {
                        let w = p.text_weight as f32;
                        let (a, b) = match p.image_plus_text_input {
                            FeatureInput::Raw => (img.row(r), txt.row(x)),
                            FeatureInput::Normalized => (&img_n[r][..], &txt_n[x][..]),
                        };
                        let mix: Vec<f32> = a
                            .iter()
                            .zip(b)
                            .map(|(a, b)| (1.0 - w) * a + w * b)
                            .collect();
                        normalized(&mix)
                    })
                    .collect(),
                Method::Combiner => {
                    let comb = combiner.ok_or_else(|| {
                        Error::Internal("combiner method without a combiner".into())
                    })?;
                    combined(t, img, txt, &img_n, &txt_n, p, comb, device)?
                }
                Method::Imported(_) | Method::Pic2word | Method::Searle | Method::Lincir => {
                    let (Some(Given::Embeddings { queries, .. }) | Some(Given::Queries(queries))) =
                        given_method
                    else {
                        return Err(Error::Internal("a method without its queries".into()));
                    };
                    (0..t.template_ids.len())
                        .map(|i| {
                            queries
                                .get(&key(i))
                                .map(|q| normalized(q))
                                .ok_or_else(|| lacking(i))
                        })
                        .collect::<Result<_>>()?
                }
            };
            // The unit vectors candidates are compared with: the CLIP's
            // image embeddings, or an imported method's own gallery.
            let (units, dim) = match (own_units.get(method.name()), given_method) {
                (Some(u), Some(Given::Embeddings { gallery, .. })) => (u, gallery.dim),
                _ => (&img_n, img.dim),
            };
            let mut sub_recall = None;
            let ranks = match (&t.global, &gallery) {
                (Some(g), Some(clip_gallery)) => {
                    let own;
                    let gallery = match own_units.get(method.name()) {
                        Some(u) => {
                            own = to_device(u, g, dim)?;
                            &own
                        }
                        None => clip_gallery,
                    };
                    let flat: Vec<f32> = queries.iter().flatten().copied().collect();
                    if flat.len() != queries.len() * dim {
                        return Err(Error::Data(format!(
                            "{}: the {} queries are not all {dim} wide like its gallery",
                            t.task,
                            method.name()
                        )));
                    }
                    let ranked = rank_global(
                        &flat,
                        dim,
                        gallery,
                        &g.mask,
                        &g.relevant,
                        GLOBAL_TOP + 1,
                        device,
                    )?;
                    // Hidden labels: rank 0, no recall.
                    let hidden = g.hidden();
                    let sub_task = subset_task(&t.task);
                    let mut sub_ranks = Vec::new();
                    for (i, r) in ranked.iter().enumerate() {
                        // The reference is no candidate: left out of the list.
                        let top: Vec<(u32, f32)> = r
                            .top
                            .iter()
                            .copied()
                            .filter(|x| Some(x.0 as usize) != g.mask[i])
                            .take(GLOBAL_TOP)
                            .collect();
                        let sims: Vec<f32> = top.iter().map(|x| x.1).collect();
                        let keys: Vec<&str> =
                            top.iter().map(|x| g.keys[x.0 as usize].as_str()).collect();
                        let rank = if hidden { 0 } else { r.rank };
                        emit(&t.task, t.template_ids[i], method, rank, &sims, Some(&keys));
                        // Recall_subset: the target among the subset (the
                        // reference is not in it), by the same tie rule as
                        // GeneCIS; hidden labels: the subset's best three.
                        let subset = &g.subsets[i];
                        if subset.is_empty() {
                            continue;
                        }
                        let q = &queries[i];
                        let sim = |m: usize| dot(q, &units[g.gallery[m]]);
                        if hidden {
                            let mut order: Vec<usize> = subset.clone();
                            order.sort_by(|&a, &b| sim(b).total_cmp(&sim(a)));
                            order.truncate(3);
                            let sims: Vec<f32> = order.iter().map(|&m| sim(m)).collect();
                            let keys: Vec<&str> =
                                order.iter().map(|&m| g.keys[m].as_str()).collect();
                            emit(&sub_task, t.template_ids[i], method, 0, &sims, Some(&keys));
                        } else {
                            let target = g.relevant[i][0];
                            let cands: Vec<usize> = std::iter::once(target)
                                .chain(subset.iter().copied().filter(|&m| m != target))
                                .collect();
                            let sims: Vec<f32> = cands.iter().map(|&m| sim(m)).collect();
                            let rank = target_rank(&sims);
                            emit(&sub_task, t.template_ids[i], method, rank, &sims, None);
                            sub_ranks.push(rank);
                        }
                    }
                    if hidden {
                        continue;
                    }
                    if !sub_ranks.is_empty() {
                        sub_recall = Some(Recall::from_ranks(
                            &sub_task,
                            method.name(),
                            &sub_ranks,
                            false,
                        ));
                    }
                    ranked.iter().map(|r| r.rank).collect::<Vec<_>>()
                }
                _ => {
                    let mut ranks = Vec::with_capacity(queries.len());
                    for (i, q) in queries.iter().enumerate() {
                        let mut sims = Vec::with_capacity(t.candidates[i].len());
                        for &c in &t.candidates[i] {
                            if units[c].len() != q.len() {
                                return Err(Error::Data(format!(
                                    "{} template {}: the {} query is {} wide but the candidate '{}' is {} wide (or has no embedding)",
                                    t.task,
                                    t.template_ids[i],
                                    method.name(),
                                    q.len(),
                                    row_keys[c],
                                    units[c].len()
                                )));
                            }
                            sims.push(dot(q, &units[c]));
                        }
                        ranks.push(rank_local(t, i, method, &sims, emit)?);
                    }
                    ranks
                }
            };
            recalls.push(Recall::from_ranks(
                &t.task,
                method.name(),
                &ranks,
                t.global.is_some(),
            ));
            recalls.extend(sub_recall);
        }
    }
    let names: Vec<&'static str> = methods.iter().map(|m| m.name()).collect();
    push_averages(&mut recalls, &names);
    Ok(recalls)
}

/// The rank of template `i`'s target from its candidates' similarities;
/// the row to `emit`. A NaN or infinite similarity is an error.
fn rank_local(
    t: &TaskRows,
    i: usize,
    method: Method,
    sims: &[f32],
    emit: &mut EmitRow<'_>,
) -> Result<u32> {
    if sims.iter().any(|s| !s.is_finite()) {
        return Err(Error::Data(format!(
            "{} template {}: a {} similarity is NaN or infinite; no rank is made from it",
            t.task,
            t.template_ids[i],
            method.name()
        )));
    }
    let rank = target_rank(sims);
    emit(&t.task, t.template_ids[i], method, rank, sims, None);
    Ok(rank)
}

/// The Combiner's unit outputs for a task's queries.
#[allow(clippy::too_many_arguments)]
fn combined(
    t: &TaskRows,
    img: &Embeddings,
    txt: &Embeddings,
    img_n: &[Vec<f32>],
    txt_n: &[Vec<f32>],
    p: &QueryConfig,
    comb: &Combiner,
    device: Device,
) -> Result<Vec<Vec<f32>>> {
    let pick = |rows: &[usize], e: &Embeddings, n: &[Vec<f32>]| -> Tensor {
        let flat: Vec<f32> = rows
            .iter()
            .flat_map(|&r| match p.combiner_input {
                FeatureInput::Raw => e.row(r).to_vec(),
                FeatureInput::Normalized => n[r].clone(),
            })
            .collect();
        Tensor::from_slice(&flat)
            .view([rows.len() as i64, e.dim as i64])
            .to_device(device)
    };
    let mut out = Vec::with_capacity(t.reference.len());
    // Blocks keep a large global task's activations small.
    for (refs, texts) in t.reference.chunks(4096).zip(t.text.chunks(4096)) {
        let qi = pick(refs, img, img_n);
        let qt = pick(texts, txt, txt_n);
        let y = tch::no_grad(|| comb.forward(&qi, &qt))?;
        let flat = Vec::<f32>::try_from(y.to_device(Device::Cpu).contiguous().view([-1]))?;
        if flat.iter().any(|x| !x.is_finite()) {
            return Err(Error::Data(format!(
                "the Combiner gives NaN or infinite outputs on task {}: its weights or its inputs are broken; no score is made from them",
                t.task
            )));
        }
        out.extend(flat.chunks(img.dim).map(normalized));
    }
    Ok(out)
}

/// The GeneCIS average per method (the mean of its GeneCIS tasks'
/// recalls), when more than one GeneCIS task was scored.
fn push_averages(recalls: &mut Vec<Recall>, methods: &[&'static str]) {
    let local: BTreeSet<&str> = recalls
        .iter()
        .filter(|r| !r.global && !is_subset_task(&r.task))
        .map(|r| r.task.as_str())
        .collect();
    if local.len() < 2 {
        return;
    }
    for &method in methods {
        let rs: Vec<&Recall> = recalls
            .iter()
            .filter(|r| r.method == method && !r.global && !is_subset_task(&r.task))
            .collect();
        let mut at = [0.0; 6];
        for r in &rs {
            for (a, v) in at.iter_mut().zip(r.at) {
                *a += v / rs.len() as f64;
            }
        }
        let n = rs.iter().map(|r| r.n).sum();
        recalls.push(Recall {
            task: "average".into(),
            method,
            at,
            n,
            global: false,
            ci: [(f64::NAN, f64::NAN); 3],
        });
    }
}

/// The recalls of the templates `keep` accepts (by task and template id):
/// the audited subset. `ids` holds each (task, method)'s template ids in
/// the order of its ranks.
pub(crate) fn subset_recalls(
    recalls: &[Recall],
    ranks: &RankTable,
    ids: &RankTable,
    keep: impl Fn(&str, u32) -> bool,
) -> (Vec<Recall>, RankTable) {
    let mut kept = RankTable::new();
    let mut out = Vec::new();
    let mut methods: Vec<&'static str> = Vec::new();
    for r in recalls.iter().filter(|r| r.task != "average") {
        let key = (r.task.clone(), r.method);
        let (Some(rk), Some(id)) = (ranks.get(&key), ids.get(&key)) else {
            continue;
        };
        let k: Vec<u32> = rk
            .iter()
            .zip(id)
            .filter(|(_, &i)| keep(&r.task, i))
            .map(|(&x, _)| x)
            .collect();
        out.push(Recall::from_ranks(&r.task, r.method, &k, r.global));
        kept.insert(key, k);
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    push_averages(&mut out, &methods);
    (out, kept)
}

/// A Combiner's recalls on the templates (what `train` selects by).
pub(crate) fn combiner_recalls(
    templates: &Path,
    galleries: Option<&Path>,
    img: &Embeddings,
    txt: &Embeddings,
    combiner: &Combiner,
    device: Device,
    stage: &str,
) -> Result<Vec<Recall>> {
    let galleries = read_galleries(galleries).map_err(Error::Data)?;
    let tasks = read_templates(templates, &galleries, img, txt, stage).map_err(Error::Data)?;
    evaluate(
        &tasks,
        img,
        txt,
        &QueryConfig::default(),
        &[Method::Combiner],
        Some(combiner),
        &GivenMethods::new(),
        device,
        &mut |_, _, _, _, _, _| {},
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_strictly_better_candidates() {
        assert_eq!(target_rank(&[0.9, 0.1, 0.2]), 1);
        assert_eq!(target_rank(&[0.5, 0.6, 0.4, 0.7]), 3);
        // A tie keeps candidate order: the target (index 0) stays ahead.
        assert_eq!(target_rank(&[0.5, 0.5, 0.1]), 1);
    }
}
