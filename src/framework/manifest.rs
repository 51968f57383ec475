//! Manifests: the raw TOML as written, and the validated [`Plan`] it
//! resolves into before any work starts (kinds bound, params typed, inputs
//! resolved, order fixed, fingerprints computed).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, ManifestIssue, Result};
use crate::framework::commit::{open_workdir, RunStore};
use crate::framework::stage::{resolve_path, BoundStage, Registry, StageKind};
use crate::framework::store::{FileStamp, InputStamp};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    pipeline: RawPipeline,
    #[serde(default, rename = "stage")]
    stages: Vec<Spanned<RawStage>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    workdir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Spanned<String>,
    kind: Spanned<String>,
    #[serde(default)]
    inputs: Vec<Spanned<String>>,
    #[serde(default)]
    params: Option<Spanned<toml::Table>>,
}

/// `--set stage.param=value` from the command line.
#[derive(Debug, Clone)]
pub(crate) struct SetOverride {
    pub stage: String,
    pub param: String,
    pub value: toml::Value,
}

impl SetOverride {
    /// `stage.param=value`; the value is read as a TOML value (`5000`,
    /// `true`, `"text"`), and as a plain string when it is not one.
    pub(crate) fn parse(arg: &str) -> Result<SetOverride> {
        let usage = |m: &str| Error::Usage {
            arg: format!("--set {arg}"),
            message: m.to_string(),
        };
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| usage("expected STAGE.PARAM=VALUE"))?;
        let (stage, param) = key
            .trim()
            .split_once('.')
            .ok_or_else(|| usage("expected STAGE.PARAM=VALUE"))?;
        if stage.is_empty() || param.is_empty() {
            return Err(usage("expected STAGE.PARAM=VALUE"));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        Ok(SetOverride {
            stage: stage.to_string(),
            param: param.to_string(),
            value,
        })
    }
}

/// A resolved input: a whole stage or one of its tables.
#[derive(Debug, Clone)]
pub struct InputBinding {
    pub written: String,
    pub stage: String,
    pub tables: Vec<String>,
}

pub struct PlannedStage {
    pub name: String,
    pub kind: &'static dyn StageKind,
    pub bound: Box<dyn BoundStage>,
    pub params: serde_json::Value,
    pub inputs: Vec<InputBinding>,
    pub input_files: Vec<PathBuf>,
    pub files: Vec<FileStamp>,
    pub fingerprint: String,
    pub line: Option<usize>,
}

impl PlannedStage {
    pub(crate) fn input_stamps(&self, plan: &Plan) -> Vec<InputStamp> {
        self.inputs
            .iter()
            .map(|b| InputStamp {
                name: b.written.clone(),
                stage: b.stage.clone(),
                fingerprint: plan
                    .stage(&b.stage)
                    .map(|s| s.fingerprint.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Input tables by table name -> committed folder (the input stage's
    /// folder of its planned fingerprint: inputs run only when current).
    pub(crate) fn input_dirs(&self, plan: &Plan) -> BTreeMap<String, PathBuf> {
        let mut m = BTreeMap::new();
        for b in &self.inputs {
            let fp = plan
                .stage(&b.stage)
                .map(|s| s.fingerprint.as_str())
                .unwrap_or_default();
            for t in &b.tables {
                m.insert(
                    t.clone(),
                    crate::framework::store::version_dir(&plan.workdir, &b.stage, fp).join(t),
                );
            }
        }
        m
    }
}

pub struct Plan {
    pub manifest_path: PathBuf,
    pub name: String,
    pub base_dir: PathBuf,
    /// The local folder stages work in: the workdir, or the mirror of a
    /// remote one.
    pub workdir: PathBuf,
    /// Where the run's parts and log live (the workdir's file system, or
    /// an object store).
    pub store: RunStore,
    /// In dependency order (manifest order where dependencies allow).
    pub stages: Vec<PlannedStage>,
}

impl Plan {
    pub(crate) fn stage(&self, name: &str) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Names of `name` and every stage that depends on it, directly or not.
    pub(crate) fn downstream_of(&self, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        for s in &self.stages {
            if s.inputs.iter().any(|b| out.contains(&b.stage)) && !out.contains(&s.name) {
                out.push(s.name.clone());
            }
        }
        out
    }

    /// Reads, validates and resolves a manifest. On any problem, returns one
    /// error listing all of them; nothing is written.
    pub(crate) fn load(
        path: &Path,
        sets: &[SetOverride],
        workdir_override: Option<&Path>,
        registry: &Registry,
    ) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ManifestRead {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawManifest = toml::from_str(&text).map_err(|e| Error::ManifestSyntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let abs = std::path::absolute(path).map_err(Error::io("cannot resolve", path))?;
        let base_dir = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let src = Source {
            text: &text,
            raw: &raw,
            base_dir: &base_dir,
        };
        let mut issues = Issues::default();

        if raw.pipeline.name.trim().is_empty() {
            issues.add(None, None, "pipeline.name", "must not be empty".into());
        }
        if raw.stages.is_empty() {
            issues.add(
                None,
                None,
                "stage",
                "the manifest has no [[stage]] tables; add at least one".into(),
            );
        }
        let (workdir, store) = match workdir_override {
            Some(w) => open_workdir(&w.to_string_lossy(), Path::new("."))?,
            None => {
                let w = raw
                    .pipeline
                    .workdir
                    .clone()
                    .unwrap_or_else(|| format!("runs/{}", raw.pipeline.name));
                open_workdir(&w, &base_dir)?
            }
        };

        let seen = check_names(&src, &mut issues);
        let overrides = overrides(&src, sets, &seen, &mut issues);
        let (kinds, bounds, raw_params) = bind_kinds(&src, registry, &overrides, &mut issues);
        let (index, bindings, input_files) = bind_inputs(&src, &kinds, &raw_params, &mut issues);
        let stamps = stamp_files(&src, &bounds, &input_files, &mut issues);
        let order = order(&src, &bindings, &index, &mut issues);
        let n = raw.stages.len();
        let line_of = |offset: usize| src.line_of(offset);
        if !issues.0.is_empty() {
            return Err(Error::ManifestInvalid {
                path: path.to_path_buf(),
                issues: issues.0,
            });
        }

        // Fingerprints, in dependency order.
        let mut bounds: Vec<Option<Box<dyn BoundStage>>> = bounds;
        let mut done: Vec<Option<PlannedStage>> = (0..n).map(|_| None).collect();
        for &i in &order {
            let st = raw.stages[i].get_ref();
            let kind = kinds[i].unwrap();
            let bound = bounds[i].take().unwrap();
            let params = bound.canonical_params();
            let inputs_fp: Vec<(String, String)> = bindings[i]
                .iter()
                .map(|b| {
                    (
                        b.written.clone(),
                        done[index[b.stage.as_str()]]
                            .as_ref()
                            .unwrap()
                            .fingerprint
                            .clone(),
                    )
                })
                .collect();
            let fingerprint = fingerprint(
                kind.kind(),
                &kind.code_version(),
                &params,
                &inputs_fp,
                &stamps[i],
            );
            done[i] = Some(PlannedStage {
                name: st.name.get_ref().clone(),
                kind,
                bound,
                params,
                inputs: bindings[i].clone(),
                input_files: input_files[i].clone(),
                files: stamps[i].clone(),
                fingerprint,
                line: line_of(raw.stages[i].span().start),
            });
        }
        let stages = order.iter().map(|&i| done[i].take().unwrap()).collect();
        Ok(Plan {
            manifest_path: path.to_path_buf(),
            name: raw.pipeline.name,
            base_dir,
            workdir,
            store,
            stages,
        })
    }
}

fn names(stages: &[Spanned<RawStage>]) -> String {
    stages
        .iter()
        .map(|s| s.get_ref().name.get_ref().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hash of everything that determines a stage's output.
pub(crate) fn fingerprint(
    kind: &str,
    version: &str,
    params: &serde_json::Value,
    inputs: &[(String, String)],
    files: &[FileStamp],
) -> String {
    let doc = serde_json::json!({
        "kind": kind,
        "version": version,
        "params": params,
        "inputs": inputs,
        "files": files,
    });
    let hash = blake3::hash(&serde_json::to_vec(&doc).unwrap());
    hash.to_hex()[..32].to_string()
}

/// The workdir a manifest names (its local folder and its store), without
/// validating its stages (for `sql`, which reads finished runs even when
/// their inputs have moved).
pub(crate) fn workdir_of(path: &Path) -> Result<(PathBuf, RunStore)> {
    #[derive(Deserialize)]
    struct Head {
        pipeline: RawPipeline,
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::ManifestRead {
        path: path.to_path_buf(),
        source,
    })?;
    let head: Head = toml::from_str::<toml::Table>(&text)
        .and_then(|t| {
            let p = t
                .get("pipeline")
                .cloned()
                .unwrap_or(toml::Value::Table(Default::default()));
            let mut m = toml::Table::new();
            m.insert("pipeline".into(), p);
            toml::Value::Table(m).try_into()
        })
        .map_err(|e| Error::ManifestSyntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let abs = std::path::absolute(path).map_err(Error::io("cannot resolve", path))?;
    let base = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let w = head
        .pipeline
        .workdir
        .unwrap_or_else(|| format!("runs/{}", head.pipeline.name));
    open_workdir(&w, &base)
}

/// The manifest being loaded: its text (for line numbers), its raw form
/// and the folder its relative paths start from.
struct Source<'a> {
    text: &'a str,
    raw: &'a RawManifest,
    base_dir: &'a Path,
}

impl Source<'_> {
    /// 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> Option<usize> {
        Some(
            self.text[..offset.min(self.text.len())]
                .matches('\n')
                .count()
                + 1,
        )
    }
}

/// Every problem found so far: a manifest is rejected with all of them.
#[derive(Default)]
struct Issues(Vec<ManifestIssue>);

impl Issues {
    fn add(&mut self, line: Option<usize>, stage: Option<&str>, field: &str, message: String) {
        self.0.push(ManifestIssue {
            line,
            stage: stage.map(str::to_string),
            field: field.to_string(),
            message,
        })
    }
}

/// A stage name's longest: file names stop at 255 bytes, and a stage's
/// commit adds a suffix.
const MAX_STAGE_NAME: usize = 100;
/// Schemas of DataFusion's own that a stage's schema would collide with.
const RESERVED_NAMES: [&str; 2] = ["information_schema", "public"];

/// Stage names: unique, usable as folder names and SQL schema names.
fn check_names(src: &Source, issues: &mut Issues) -> HashMap<String, usize> {
    let raw = src.raw;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for s in &raw.stages {
        let name = s.get_ref().name.get_ref();
        let line = src.line_of(s.get_ref().name.span().start);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            || name.starts_with('-')
        {
            issues.add(
                line,
                Some(name),
                "name",
                "use letters, digits, '_' and '-' only (it names a folder and a SQL schema)".into(),
            );
        }
        if name.len() > MAX_STAGE_NAME {
            issues.add(
                line,
                Some(name),
                "name",
                format!(
                    "{} characters; use at most {MAX_STAGE_NAME} (it names folders)",
                    name.len()
                ),
            );
        }
        if RESERVED_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
            issues.add(
                line,
                Some(name),
                "name",
                format!("'{name}' is a schema SQL itself uses; name the stage otherwise"),
            );
        }
        if let Some(first) = seen.insert(name.clone(), line.unwrap_or(0)) {
            issues.add(
                line,
                Some(name),
                "name",
                format!("duplicate stage name (first used on line {first})"),
            );
        }
    }

    seen
}

/// `--set` overrides by stage; each must name a stage.
fn overrides<'s>(
    src: &Source,
    sets: &'s [SetOverride],
    seen: &HashMap<String, usize>,
    issues: &mut Issues,
) -> HashMap<&'s str, Vec<&'s SetOverride>> {
    let raw = src.raw;
    let mut overrides: HashMap<&str, Vec<&SetOverride>> = HashMap::new();
    for o in sets {
        if seen.contains_key(&o.stage) {
            overrides.entry(o.stage.as_str()).or_default().push(o);
        } else {
            issues.add(
                None,
                Some(&o.stage),
                "--set",
                format!(
                    "no stage named '{}' in this manifest (stages: {})",
                    o.stage,
                    names(&raw.stages)
                ),
            );
        }
    }

    overrides
}

type Bound = (
    Vec<Option<&'static dyn StageKind>>,
    Vec<Option<Box<dyn BoundStage>>>,
    Vec<toml::Table>,
);

/// Each stage's kind and typed params (overrides applied).
fn bind_kinds(
    src: &Source,
    registry: &Registry,
    overrides: &HashMap<&str, Vec<&SetOverride>>,
    issues: &mut Issues,
) -> Bound {
    let (raw, base_dir) = (src.raw, src.base_dir);
    let mut kinds: Vec<Option<&'static dyn StageKind>> = Vec::new();
    let mut bounds: Vec<Option<Box<dyn BoundStage>>> = Vec::new();
    let mut raw_params: Vec<toml::Table> = Vec::new();
    for s in &raw.stages {
        let st = s.get_ref();
        let name = st.name.get_ref().as_str();
        let kind = registry.lookup(st.kind.get_ref());
        if kind.is_none() {
            let known = registry.names();
            issues.add(
                src.line_of(st.kind.span().start),
                Some(name),
                "kind",
                format!(
                    "unknown stage kind '{}'; known kinds: {}",
                    st.kind.get_ref(),
                    known.join(", ")
                ),
            );
        }
        kinds.push(kind);
        let mut params = st
            .params
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_default();
        for o in overrides.get(name).into_iter().flatten() {
            params.insert(o.param.clone(), o.value.clone());
        }
        let params_line = st
            .params
            .as_ref()
            .map(|p| p.span().start)
            .and_then(|o| src.line_of(o))
            .or(src.line_of(s.span().start));
        raw_params.push(params.clone());
        let bound = match kind.map(|k| k.bind(params, base_dir)) {
            Some(Ok(b)) => Some(b),
            Some(Err(problems)) => {
                for f in problems {
                    issues.add(params_line, Some(name), &f.field, f.message);
                }
                None
            }
            None => None,
        };
        bounds.push(bound);
    }

    (kinds, bounds, raw_params)
}

type Inputs<'a> = (
    HashMap<&'a str, usize>,
    Vec<Vec<InputBinding>>,
    Vec<Vec<PathBuf>>,
);

/// Inputs: a stage, `stage.table`, or a file; every table a kind needs
/// from exactly one input.
fn bind_inputs<'a>(
    src: &Source<'a>,
    kinds: &[Option<&'static dyn StageKind>],
    raw_params: &[toml::Table],
    issues: &mut Issues,
) -> Inputs<'a> {
    let (raw, base_dir) = (src.raw, src.base_dir);
    let index: HashMap<&str, usize> = raw
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.get_ref().name.get_ref().as_str(), i))
        .collect();
    let mut bindings: Vec<Vec<InputBinding>> = Vec::new();
    let mut input_files: Vec<Vec<PathBuf>> = Vec::new();
    for (i, s) in raw.stages.iter().enumerate() {
        let st = s.get_ref();
        let name = st.name.get_ref().as_str();
        let mut bs = Vec::new();
        let mut files = Vec::new();
        for (j, inp) in st.inputs.iter().enumerate() {
            let written = inp.get_ref().as_str();
            let line = src.line_of(inp.span().start);
            let field = format!("inputs[{j}]");
            let (head, tail) = match written.split_once('.') {
                Some((h, t)) if index.contains_key(h) => (h, Some(t)),
                _ => (written, None),
            };
            if let Some(&up) = index.get(head) {
                if up == i {
                    issues.add(
                        line,
                        Some(name),
                        &field,
                        "a stage cannot read its own output".into(),
                    );
                    continue;
                }
                let Some(up_kind) = kinds[up] else { continue };
                let tables: Vec<String> = up_kind
                    .output_tables()
                    .iter()
                    .map(|t| t.name.to_string())
                    .collect();
                match tail {
                    None => bs.push(InputBinding {
                        written: written.into(),
                        stage: head.into(),
                        tables,
                    }),
                    Some(t) if tables.iter().any(|x| x == t) => bs.push(InputBinding {
                        written: written.into(),
                        stage: head.into(),
                        tables: vec![t.into()],
                    }),
                    Some(t) => issues.add(
                        line,
                        Some(name),
                        &field,
                        format!(
                            "stage '{head}' ({}) has no table '{t}'; its tables are: {}",
                            up_kind.kind(),
                            tables.join(", ")
                        ),
                    ),
                }
            } else {
                let p = resolve_path(base_dir, Path::new(written));
                if p.exists() {
                    files.push(p);
                } else {
                    issues.add(
                        line,
                        Some(name),
                        &field,
                        format!(
                            "'{written}' is neither a stage of this manifest (stages: {}) nor an existing file (looked for {})",
                            names(&raw.stages),
                            p.display()
                        ),
                    );
                }
            }
        }
        // Every table the kind needs must come from exactly one input;
        // an optional one from at most one.
        if let Some(k) = kinds[i] {
            for need in k.input_tables() {
                let providers: Vec<_> = bs
                    .iter()
                    .filter(|b: &&InputBinding| b.tables.iter().any(|t| t == need.name))
                    .map(|b| b.written.as_str())
                    .collect();
                match providers.len() {
                    0 if need.optional => {}
                    0 => issues.add(
                        src.line_of(s.span().start),
                        Some(name),
                        "inputs",
                        format!(
                            "kind '{}' needs a table '{}'; list the stage that makes it in inputs",
                            k.kind(),
                            need.name
                        ),
                    ),
                    1 => {}
                    _ => issues.add(
                        src.line_of(s.span().start),
                        Some(name),
                        "inputs",
                        format!(
                            "table '{}' comes from several inputs ({}); name one as 'stage.{}'",
                            need.name,
                            providers.join(", "),
                            need.name
                        ),
                    ),
                }
            }
            let mut groups: Vec<&str> = k.input_tables().iter().filter_map(|t| t.group).collect();
            groups.dedup();
            for g in groups {
                let members: Vec<&str> = k
                    .input_tables()
                    .iter()
                    .filter(|t| t.group == Some(g))
                    .map(|t| t.name)
                    .collect();
                if !bs
                    .iter()
                    .any(|b| b.tables.iter().any(|t| members.contains(&t.as_str())))
                {
                    issues.add(
                        src.line_of(s.span().start),
                        Some(name),
                        "inputs",
                        format!(
                            "kind '{}' needs one of the tables {} ({g}); list a stage that makes one in inputs",
                            k.kind(),
                            members.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(k) = kinds[i] {
            let tables: Vec<String> = bs.iter().flat_map(|b| b.tables.iter().cloned()).collect();
            for f in k.validate_inputs(&raw_params[i], &tables) {
                let field = if f.field == "inputs" {
                    f.field
                } else {
                    format!("params.{}", f.field)
                };
                issues.add(src.line_of(s.span().start), Some(name), &field, f.message);
            }
        }
        bindings.push(bs);
        input_files.push(files);
    }

    (index, bindings, input_files)
}

/// The files params and inputs name: they must exist; their stamps go
/// into the fingerprints.
fn stamp_files(
    src: &Source,
    bounds: &[Option<Box<dyn BoundStage>>],
    input_files: &[Vec<PathBuf>],
    issues: &mut Issues,
) -> Vec<Vec<FileStamp>> {
    let (raw, base_dir) = (src.raw, src.base_dir);
    let mut stamps: Vec<Vec<FileStamp>> = Vec::new();
    for (i, s) in raw.stages.iter().enumerate() {
        let name = s.get_ref().name.get_ref().as_str();
        let mut st = Vec::new();
        let mut all: Vec<(String, PathBuf)> = input_files[i]
            .iter()
            .map(|p| ("inputs".to_string(), p.clone()))
            .collect();
        if let Some(b) = &bounds[i] {
            all.extend(
                b.files(base_dir)
                    .into_iter()
                    .map(|(f, p)| (format!("params.{f}"), p)),
            );
        }
        for (field, p) in all {
            match FileStamp::of(&p) {
                Ok(stamp) => st.push(stamp),
                Err(_) => issues.add(
                    s.get_ref()
                        .params
                        .as_ref()
                        .map(|x| x.span().start)
                        .and_then(|o| src.line_of(o)),
                    Some(name),
                    &field,
                    format!(
                        "{} does not exist (relative paths are resolved against {})",
                        p.display(),
                        base_dir.display()
                    ),
                ),
            }
        }
        stamps.push(st);
    }

    stamps
}

/// Dependencies first, manifest order otherwise; a cycle is an issue.
fn order(
    src: &Source,
    bindings: &[Vec<InputBinding>],
    index: &HashMap<&str, usize>,
    issues: &mut Issues,
) -> Vec<usize> {
    let raw = src.raw;
    let n = raw.stages.len();
    let deps: Vec<Vec<usize>> = bindings
        .iter()
        .map(|bs| {
            bs.iter()
                .filter_map(|b| index.get(b.stage.as_str()).copied())
                .collect()
        })
        .collect();
    let mut order = Vec::with_capacity(n);
    let mut placed = vec![false; n];
    while order.len() < n {
        let next = (0..n).find(|&i| !placed[i] && deps[i].iter().all(|&d| placed[d]));
        match next {
            Some(i) => {
                placed[i] = true;
                order.push(i);
            }
            None => {
                let stuck: Vec<_> = (0..n)
                    .filter(|&i| !placed[i])
                    .map(|i| raw.stages[i].get_ref().name.get_ref().clone())
                    .collect();
                let first = (0..n).find(|&i| !placed[i]).unwrap();
                issues.add(
                    src.line_of(raw.stages[first].span().start),
                    Some(&stuck[0]),
                    "inputs",
                    format!("the inputs of stages {} form a cycle", stuck.join(", ")),
                );
                break;
            }
        }
    }

    order
}
