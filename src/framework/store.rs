//! The run directory: stage folders, part files, the stage log and the
//! workdir lock. The commit protocol itself is in [`crate::framework::commit`].
//!
//! ```text
//! <workdir>/.genecis/<stage>/_log/0000000001.json                stage record versions (the truth)
//! <workdir>/.genecis/<stage>/<folder>/<table>/part-00000.parquet  one fingerprint's parts, immutable
//! <workdir>/.genecis/<stage>/<folder>/_shards/0-of-1.json         what each shard wrote
//! <workdir>/<stage> -> .genecis/<stage>/<folder>                  the head's folder, for people
//! ```
//! `.genecis/` is the run's store (an object store's prefix has the same
//! keys); `<workdir>/<stage>` is a link genecis points at the head after
//! each commit, so `<workdir>/<stage>/<table>/` reads as it always has. It
//! is a view: genecis itself resolves stages through the log.
//! A chunk is finished when every output table has its part; parts are
//! written under a temp name and published with put-if-absent, so a part
//! is complete or absent, and finished chunks are kept on resume.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::commit::{self, block_on, folder_of, PartStat, RunStore, ShardRecord};
use crate::framework::tabledef::{Shard, TableDef};

/// The record of the old layout (`<stage>/_stage.json` beside its tables),
/// read once to move such a stage into the log layout.
pub(crate) const RECORD_FILE: &str = "_stage.json";
const WORK_DIR: &str = ".work";
const LOCK_FILE: &str = ".genecis.lock";
/// The run's store inside a local workdir (or a remote run's mirror).
pub(crate) const STORE_DIR: &str = ".genecis";
/// Written into every stage folder genecis creates: what marks a folder as
/// genecis's to replace or delete, even when a crash left it without a log.
const OWNER_FILE: &str = "_genecis";

/// Whether genecis made `dir` (a stage folder or one of its fingerprint
/// folders): its marker, its log or an old-layout record is there.
pub(crate) fn made_by_genecis(dir: &Path) -> bool {
    [OWNER_FILE, RECORD_FILE]
        .iter()
        .any(|f| dir.join(f).is_file())
        || dir.join(commit::LOG_DIR).is_dir()
}

/// Refuses a folder genecis would replace or delete but did not make.
pub(crate) fn ensure_ours(dir: &Path, role: &str) -> Result<()> {
    if dir.exists() && !(dir.is_dir() && made_by_genecis(dir)) {
        return Err(Error::NotOurs {
            path: dir.to_path_buf(),
            why: format!("is in the way of {role} but was not made by genecis"),
        });
    }
    Ok(())
}

/// Removes a folder genecis made; refuses anything else.
pub(crate) fn remove_ours(dir: &Path, role: &str) -> Result<()> {
    ensure_ours(dir, role)?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(Error::io("cannot remove", dir))?;
    }
    Ok(())
}

/// Whether `workdir` holds a genecis run (a lock file, a store, an old
/// work folder, or a stage folder).
pub(crate) fn holds_run(workdir: &Path) -> bool {
    workdir.join(LOCK_FILE).is_file()
        || workdir.join(STORE_DIR).is_dir()
        || workdir.join(WORK_DIR).is_dir()
        || fs::read_dir(workdir).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| made_by_genecis(&e.path()))
        })
}

/// A file a stage read, as fingerprinted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> Result<FileStamp> {
        let meta = fs::metadata(path).map_err(Error::io("cannot read", path))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Ok(FileStamp {
            path: path.to_path_buf(),
            size: meta.len(),
            mtime_ns,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputStamp {
    /// As written in the manifest (`captions`, `graphs.relations`).
    pub name: String,
    pub stage: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableStat {
    pub rows: u64,
    pub parts: usize,
    /// Size of each part file, so `status` notices one that was truncated
    /// or overwritten after the commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub part_bytes: Vec<u64>,
    /// blake3 of each part file, so bytes overwritten at the same size are
    /// noticed too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub part_blake3: Vec<String>,
}

/// blake3 of a file, hex.
pub(crate) fn file_blake3(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).map_err(Error::io("cannot open", path))?;
    std::io::copy(&mut f, &mut h).map_err(Error::io("cannot read", path))?;
    Ok(h.finalize().to_hex().to_string())
}

/// One version of a stage's log: what was run, from what, and what it
/// produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    /// The log version (1, 2, ...); 0 in an old-layout `_stage.json`.
    #[serde(default)]
    pub version: u64,
    pub kind: String,
    pub kind_version: String,
    pub fingerprint: String,
    pub params: serde_json::Value,
    pub inputs: Vec<InputStamp>,
    pub files: Vec<FileStamp>,
    pub tables: BTreeMap<String, TableStat>,
    pub chunks: usize,
    pub chunks_resumed: usize,
    pub rows_in: u64,
    pub seconds: f64,
    pub finished_unix: u64,
    pub tool_version: String,
    #[serde(default)]
    pub notes: Vec<String>,
}

impl StageRecord {
    /// What a record of `stage` (log `version`, when read from the log)
    /// must hold before its fields build keys, paths or loops.
    pub(crate) fn check(
        &self,
        stage: &str,
        version: Option<u64>,
    ) -> std::result::Result<(), String> {
        use commit::check;
        if self.stage != stage {
            return Err(format!(
                "it is a record of stage '{}', found under '{stage}'",
                self.stage.escape_debug()
            ));
        }
        if let Some(v) = version.filter(|&v| v != self.version) {
            return Err(format!("it says version {}, its name {v}", self.version));
        }
        check::fingerprint("fingerprint", &self.fingerprint)?;
        for i in &self.inputs {
            check::name("input stage", &i.stage)?;
            check::fingerprint("input fingerprint", &i.fingerprint)?;
        }
        check::count("chunks", self.chunks)?;
        if self.chunks_resumed > self.chunks {
            return Err(format!(
                "{} of {} chunks resumed",
                self.chunks_resumed, self.chunks
            ));
        }
        check::count("tables", self.tables.len())?;
        for (name, t) in &self.tables {
            check::name("table", name)?;
            check::count(&format!("table {name}'s parts"), t.parts)?;
            for (what, n) in [
                ("sizes", t.part_bytes.len()),
                ("hashes", t.part_blake3.len()),
            ] {
                if n != 0 && n != t.parts {
                    return Err(format!(
                        "table {name} has {} parts but {n} part {what}",
                        t.parts
                    ));
                }
            }
            for h in &t.part_blake3 {
                check::blake3(&format!("table {name}'s part hash"), h)?;
            }
        }
        Ok(())
    }

    /// The head record of `stage` in `run`.
    pub(crate) fn head(run: &RunStore, stage: &str) -> Result<Option<StageRecord>> {
        block_on(run.head(stage))
    }

    /// [`StageRecord::damaged_parts`] against a remote store: missing parts
    /// and parts of another size (a remote store is not read whole).
    pub(crate) fn damaged_in_store(&self, run: &RunStore) -> Result<Vec<String>> {
        let rel = commit::version_key(&self.stage, &self.fingerprint);
        let listed = block_on(run.list(&rel))?;
        let mut out = Vec::new();
        for (name, stat) in &self.tables {
            for (k, want) in stat.part_bytes.iter().enumerate() {
                let key = format!("{name}/{}", part_name(k));
                match listed.get(&key) {
                    None => out.push(format!("part {rel}/{key} is missing from the store")),
                    Some(got) if got != want => out.push(format!(
                        "part {rel}/{key} has {got} bytes in the store, the stage wrote {want}"
                    )),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// The folder of this record's parts under `workdir`.
    pub(crate) fn dir(&self, workdir: &Path) -> PathBuf {
        version_dir(workdir, &self.stage, &self.fingerprint)
    }

    /// What is wrong with the committed part files in `dir`: missing ones,
    /// ones whose size differs from the record and, with `content`, ones
    /// whose blake3 differs (every byte read: `status` and `run` pay this,
    /// `sql` does not). Empty when all are intact.
    pub(crate) fn damaged_parts(&self, dir: &Path, content: bool) -> Vec<String> {
        let mut out = Vec::new();
        for (name, stat) in &self.tables {
            for k in 0..stat.parts {
                let p = dir.join(name).join(part_name(k));
                match (fs::metadata(&p), stat.part_bytes.get(k)) {
                    (Err(_), _) => out.push(format!("part file {} is missing", p.display())),
                    (Ok(m), Some(&want)) if m.len() != want => out.push(format!(
                        "part file {} has {} bytes, the stage wrote {want} (truncated or overwritten)",
                        p.display(),
                        m.len()
                    )),
                    _ => {
                        let want = stat.part_blake3.get(k).filter(|_| content);
                        if let Some(want) = want {
                            if file_blake3(&p).ok().as_ref() != Some(want) {
                                out.push(format!(
                                    "part file {} differs from what the stage wrote (blake3; overwritten in place)",
                                    p.display()
                                ));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// The committed stages of a run: each head record with its local folder
/// (a remote run's folders are fetched into its mirror first).
pub(crate) fn committed(workdir: &Path, run: &RunStore) -> Result<Vec<(StageRecord, PathBuf)>> {
    let names = block_on(run.stage_names())?;
    let mut out = Vec::new();
    for n in names {
        if let Some(rec) = StageRecord::head(run, &n)? {
            let dir = rec.dir(workdir);
            if run.local.is_none() {
                run.sync_down(&commit::version_key(&n, &rec.fingerprint), &dir)?;
                point_view(workdir, &rec);
            }
            out.push((rec, dir));
        }
    }
    out.sort_by(|a, b| a.0.stage.cmp(&b.0.stage));
    Ok(out)
}

/// A run named on the command line: a manifest, a workdir folder, or a
/// workdir URL.
pub(crate) fn open_target(target: &Path) -> Result<(PathBuf, RunStore)> {
    if target.is_file() {
        return crate::framework::manifest::workdir_of(target);
    }
    commit::open_workdir(&target.to_string_lossy(), Path::new("."))
}

pub(crate) fn part_name(chunk: usize) -> String {
    format!("part-{chunk:05}.parquet")
}

/// The stage's view: a link to its head's folder.
pub(crate) fn stage_dir(workdir: &Path, stage: &str) -> PathBuf {
    workdir.join(stage)
}

/// The stage's folder in the run's store.
pub(crate) fn store_stage_dir(workdir: &Path, stage: &str) -> PathBuf {
    workdir.join(STORE_DIR).join(stage)
}

/// Where the parts and side files of `fingerprint`'s work on `stage` live.
pub(crate) fn version_dir(workdir: &Path, stage: &str, fingerprint: &str) -> PathBuf {
    store_stage_dir(workdir, stage).join(folder_of(fingerprint))
}

/// Moves an old-layout stage (`<stage>/_stage.json` beside its tables)
/// into the store: the folder becomes its fingerprint's folder, its record
/// log version 1. Local workdirs only; a no-op otherwise.
pub(crate) fn migrate_old_layout(run: &RunStore, workdir: &Path, stage: &str) -> Result<()> {
    if run.local.is_none() || !old_layout(workdir, stage) {
        return Ok(());
    }
    let dir = stage_dir(workdir, stage);
    let old = dir.join(RECORD_FILE);
    let text = fs::read_to_string(&old).map_err(Error::io("cannot read", &old))?;
    let mut rec: StageRecord =
        commit::parse_record(text.as_bytes(), old.clone(), stage, |r: &StageRecord| {
            r.check(stage, None)
        })?;
    let folder = rec.dir(workdir);
    let parent = store_stage_dir(workdir, stage);
    fs::create_dir_all(&parent).map_err(Error::io("cannot create", &parent))?;
    write_atomic(
        &parent.join(OWNER_FILE),
        format!("genecis stage {stage}\n").as_bytes(),
    )?;
    remove_ours(&folder, &format!("stage '{stage}''s work"))?;
    fs::rename(&dir, &folder).map_err(Error::io("cannot move", &dir))?;
    let moved = folder.join(RECORD_FILE);
    fs::remove_file(&moved).map_err(Error::io("cannot remove", &moved))?;
    if block_on(run.versions(stage))?.is_empty() {
        rec.version = 1;
        let json = serde_json::to_vec_pretty(&rec)
            .map_err(|e| Error::Internal(format!("stage record: {e}")))?;
        block_on(run.put_if_absent(&commit::log_key(stage, 1), json))?;
    }
    point_view(workdir, &rec);
    Ok(())
}

/// Whether `<workdir>/<stage>` is a stage committed in the old layout.
pub(crate) fn old_layout(workdir: &Path, stage: &str) -> bool {
    let dir = stage_dir(workdir, stage);
    let is_link = fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink());
    !is_link && dir.join(RECORD_FILE).is_file()
}

/// Points the view `<workdir>/<stage>` at the head's folder (a link
/// replaced by a rename: readers see the old or the new folder, whole).
pub(crate) fn point_view(workdir: &Path, rec: &StageRecord) {
    let link = stage_dir(workdir, &rec.stage);
    let target = Path::new(STORE_DIR)
        .join(&rec.stage)
        .join(folder_of(&rec.fingerprint));
    if fs::read_link(&link).is_ok_and(|t| t == target) {
        return;
    }
    let tmp = workdir.join(format!(
        ".{}.link-{}-{}",
        rec.stage,
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    if std::os::unix::fs::symlink(&target, &tmp).is_ok() && fs::rename(&tmp, &link).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

/// Writes one stage's tables chunk by chunk into its fingerprint's folder,
/// keeping chunks an earlier, interrupted run finished. Every batch must
/// match its table's declared schema exactly.
pub struct StageWriter {
    run: RunStore,
    stage: String,
    fingerprint: String,
    /// Local folder of the parts (in the workdir, or its mirror for a
    /// remote store).
    dir: PathBuf,
    tables: Vec<(&'static str, SchemaRef)>,
    props: WriterProperties,
}

/// Temp names unique across the processes and threads that may write the
/// same chunk at once.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl StageWriter {
    /// Opens the fingerprint's folder. `fresh` (a forced, unsharded run)
    /// drops what an earlier run left there; `exclusive` (an unsharded run)
    /// also drops other plans' unfinished folders.
    pub(crate) fn open(
        run: &RunStore,
        workdir: &Path,
        stage: &str,
        fingerprint: &str,
        fresh: bool,
        exclusive: bool,
    ) -> Result<StageWriter> {
        let sdir = store_stage_dir(workdir, stage);
        let dir = version_dir(workdir, stage, fingerprint);
        let rel = commit::version_key(stage, fingerprint);
        ensure_ours(&sdir, &format!("stage '{stage}'"))?;
        fs::create_dir_all(&sdir).map_err(Error::io("cannot create", &sdir))?;
        write_atomic(
            &sdir.join(OWNER_FILE),
            format!("genecis stage {stage}\n").as_bytes(),
        )?;
        if fresh {
            remove_ours(&dir, &format!("stage '{stage}''s work"))?;
            block_on(run.delete_prefix(&rel))?;
        }
        if exclusive && run.local.is_some() {
            let head = block_on(run.head(stage))?.map(|r| folder_of(&r.fingerprint).to_string());
            for e in fs::read_dir(&sdir).map_err(Error::io("cannot list", &sdir))? {
                let e = e.map_err(Error::io("cannot list", &sdir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                let other = e.file_type().is_ok_and(|t| t.is_dir())
                    && !name.starts_with(['_', '.'])
                    && name != folder_of(fingerprint)
                    && Some(&name) != head.as_ref();
                if other {
                    remove_ours(&e.path(), &format!("stage '{stage}''s unfinished work"))?;
                }
            }
        }
        fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
        write_atomic(
            &dir.join(OWNER_FILE),
            format!("genecis stage {stage}\n").as_bytes(),
        )?;
        if run.local.is_none() {
            // What other processes finished is in the store: fetch it.
            run.sync_down(&rel, &dir)?;
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(1).map_err(|e| Error::Internal(format!("zstd level: {e}")))?,
            ))
            .set_created_by(format!("genecis {}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(StageWriter {
            run: run.clone(),
            stage: stage.to_string(),
            fingerprint: fingerprint.to_string(),
            dir,
            tables: Vec::new(),
            props,
        })
    }

    /// The tables and their exact schemas, known once the stage has planned.
    pub(crate) fn declare(&mut self, tables: Vec<(&'static str, SchemaRef)>) -> Result<()> {
        for (name, _) in &tables {
            let p = self.dir.join(name);
            fs::create_dir_all(&p).map_err(Error::io("cannot create", &p))?;
        }
        self.tables = tables;
        Ok(())
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn rel(&self, tail: &str) -> String {
        format!(
            "{}/{tail}",
            commit::version_key(&self.stage, &self.fingerprint)
        )
    }

    /// A chunk is finished when every table has its part file.
    pub(crate) fn chunk_done(&self, chunk: usize) -> bool {
        !self.tables.is_empty()
            && self
                .tables
                .iter()
                .all(|(t, _)| self.dir.join(t).join(part_name(chunk)).is_file())
    }

    /// Writes the chunk's batch for every table (empty batches included, so
    /// that "all tables have the part" marks it finished). Each part is
    /// written under a temp name and published with put-if-absent: when
    /// another process published the chunk first, its part (the same bytes:
    /// stages are deterministic) stays.
    pub(crate) fn write_chunk(&self, chunk: usize, batches: &[(&str, RecordBatch)]) -> Result<()> {
        for (name, _) in &self.tables {
            let n = batches.iter().filter(|(b, _)| b == name).count();
            if n != 1 {
                return Err(Error::Internal(format!(
                    "chunk {chunk} has {n} batches for table '{name}', expected one"
                )));
            }
        }
        for (name, batch) in batches {
            let Some((_, schema)) = self.tables.iter().find(|(t, _)| t == name) else {
                return Err(Error::Internal(format!(
                    "chunk {chunk} has a batch for '{name}', which the stage does not declare"
                )));
            };
            if batch.schema().fields() != schema.fields() {
                return Err(Error::Internal(format!(
                    "chunk {chunk} of table '{name}' has columns ({}) but the table declares ({})",
                    columns(&batch.schema()),
                    columns(schema),
                )));
            }
        }
        for (name, batch) in batches {
            let final_path = self.dir.join(name).join(part_name(chunk));
            let tmp_name = format!(
                "{}.{}-{}.tmp",
                part_name(chunk),
                std::process::id(),
                TMP_SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let tmp = self.dir.join(name).join(&tmp_name);
            let file = File::create(&tmp).map_err(Error::io("cannot create", &tmp))?;
            let perr = |source| Error::Parquet {
                path: tmp.clone(),
                source,
            };
            let mut w = ArrowWriter::try_new(file, batch.schema(), Some(self.props.clone()))
                .map_err(perr)?;
            w.write(batch).map_err(perr)?;
            w.close().map_err(perr)?;
            let from = self.rel(&format!("{name}/{tmp_name}"));
            let to = self.rel(&format!("{name}/{}", part_name(chunk)));
            block_on(self.run.publish(&tmp, &from, &to, &final_path))?;
        }
        Ok(())
    }

    /// This shard's record: every part of the chunks it owns, as they are
    /// (written by this process or found finished).
    pub(crate) fn shard_record(&self, shard: Shard, chunks: usize) -> Result<ShardRecord> {
        let mut parts = Vec::new();
        for (t, _) in &self.tables {
            for k in (0..chunks).filter(|&k| shard.owns(k)) {
                let p = self.dir.join(t).join(part_name(k));
                let f = File::open(&p).map_err(Error::io("cannot open", &p))?;
                let bytes = f.metadata().map_err(Error::io("cannot read", &p))?.len();
                let r = SerializedFileReader::new(f).map_err(|source| Error::Parquet {
                    path: p.clone(),
                    source,
                })?;
                parts.push(PartStat {
                    table: t.to_string(),
                    chunk: k,
                    bytes,
                    blake3: file_blake3(&p)?,
                    rows: r.metadata().file_metadata().num_rows() as u64,
                });
            }
        }
        Ok(ShardRecord {
            fingerprint: self.fingerprint.clone(),
            index: shard.index,
            count: shard.count,
            chunks,
            tables: self.tables.iter().map(|(t, _)| t.to_string()).collect(),
            parts,
        })
    }

    /// Uploads the side files (reports, weights) a stage wrote beside its
    /// tables; a local store already holds them.
    pub(crate) fn push_side_files(&self) -> Result<()> {
        if self.run.local.is_some() {
            return Ok(());
        }
        let rel = commit::version_key(&self.stage, &self.fingerprint);
        self.run.sync_up(&self.dir, &rel, |p| {
            !p.starts_with(commit::SHARDS_DIR)
                && !self
                    .tables
                    .iter()
                    .any(|(t, _)| p.starts_with(&format!("{t}/")))
        })
    }
}

fn columns(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Number of finished chunks an interrupted run of `fingerprint` left (for
/// `status`).
pub(crate) fn resumable_chunks(
    run: &RunStore,
    stage: &str,
    fingerprint: &str,
    tables: &[TableDef],
) -> Result<usize> {
    if tables.is_empty() {
        return Ok(0);
    }
    let listed = block_on(run.list(&commit::version_key(stage, fingerprint)))?;
    let count = |t: &TableDef| {
        listed
            .keys()
            .filter(|k| {
                k.strip_prefix(t.name)
                    .and_then(|r| r.strip_prefix("/part-"))
                    .is_some_and(|r| r.ends_with(".parquet"))
            })
            .count()
    };
    Ok(tables.iter().map(count).min().unwrap_or(0))
}

/// The part files of a table folder, in chunk order.
pub(crate) fn part_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map_err(Error::io("cannot list", dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "parquet")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The stage a committed table folder belongs to
/// (`<workdir>/.genecis/<stage>/<folder>/<table>`), for messages.
pub(crate) fn stage_of(table_dir: &Path) -> String {
    table_dir
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rows of a committed part file, from its footer; a file that does not
/// read as Parquet is named with the fix.
pub(crate) fn part_rows(path: &Path) -> Result<u64> {
    let f = File::open(path).map_err(Error::io("cannot open", path))?;
    let r = SerializedFileReader::new(f).map_err(|source| Error::DamagedPart {
        path: path.to_path_buf(),
        stage: stage_of(path.parent().unwrap_or(path)),
        source,
    })?;
    Ok(r.metadata().file_metadata().num_rows() as u64)
}

/// Every batch of one committed part file.
pub(crate) fn read_part(path: &Path) -> Result<Vec<RecordBatch>> {
    let damaged = |source| Error::DamagedPart {
        path: path.to_path_buf(),
        stage: stage_of(path.parent().unwrap_or(path)),
        source,
    };
    let f = File::open(path).map_err(Error::io("cannot open", path))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(damaged)?
        .with_batch_size(65536)
        .build()
        .map_err(damaged)?;
    reader.map(|b| b.map_err(|e| damaged(e.into()))).collect()
}

/// Every batch of a table folder (all parts, in chunk order).
pub fn read_table(dir: &Path) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for p in part_files(dir)? {
        out.extend(read_part(&p)?);
    }
    Ok(out)
}

/// A column of a batch from one of our own tables, by name.
/// In a table of (role, file) rows written by a stage (a `weights` or
/// `sources` table), the file of `role`, resolved against that stage's
/// version folder (the table folder's parent).
pub(crate) fn role_file(dir: &Path, role: &str, file_col: &str) -> Result<Option<PathBuf>> {
    let stage = dir.parent().unwrap_or(dir);
    for b in read_table(dir)? {
        let roles = arrow::array::AsArray::as_string::<i32>(column(&b, "role")?).clone();
        let files = arrow::array::AsArray::as_string::<i32>(column(&b, file_col)?).clone();
        if let Some(i) = (0..b.num_rows()).find(|&i| roles.value(i) == role) {
            return Ok(Some(stage.join(files.value(i))));
        }
    }
    Ok(None)
}

pub(crate) fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| {
        Error::Internal(format!(
            "an input batch has no column '{name}' (columns: {})",
            batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // Unique per process and call: concurrent writers never share a temp.
    let tmp = path.with_extension(format!(
        "{}-{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, bytes).map_err(Error::io("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("cannot rename", &tmp))
}

/// Held for the length of a run: a local optimisation that keeps an
/// unsharded run and shards of the same workdir on one machine apart. The
/// commit protocol does not rely on it: where the file system has no
/// `flock` (Lustre without `-o flock`, some NFS mounts) runs go on without.
/// `flock` locks vanish with the process, so a killed run never leaves a
/// stale lock behind.
pub struct WorkdirLock {
    _file: Option<File>,
}

impl WorkdirLock {
    /// Exclusive for an unsharded run; shared for `--shard` runs, so shards
    /// (duplicates of one shard included) run side by side but never beside
    /// an unsharded run.
    pub fn acquire(workdir: &Path, shard: Option<Shard>) -> Result<WorkdirLock> {
        fs::create_dir_all(workdir).map_err(Error::io("cannot create workdir", workdir))?;
        let path = workdir.join(LOCK_FILE);
        let main = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(Error::io("cannot open lock file", &path))?;
        let holder = || {
            fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let got = match shard {
            None => main.try_lock(),
            Some(_) => main.try_lock_shared(),
        };
        match got {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = holder();
                return Err(Error::Locked {
                    workdir: workdir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "unknown process".into()
                    } else {
                        holder
                    },
                });
            }
            Err(fs::TryLockError::Error(e)) => {
                eprintln!(
                    "note: {} cannot be locked ({e}); going on without the local lock (commits do not need it)",
                    path.display()
                );
                return Ok(WorkdirLock { _file: None });
            }
        }
        if shard.is_none() {
            fs::write(&path, format!("pid {}", std::process::id()))
                .map_err(Error::io("cannot write", &path))?;
        }
        Ok(WorkdirLock { _file: Some(main) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn schema(ty: DataType) -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("x", ty, false)]))
    }

    #[test]
    fn every_batch_is_checked_against_the_declared_schema() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunStore::local(dir.path()).unwrap();
        let mut w =
            StageWriter::open(&run, dir.path(), "s", "0123456789abcdef", false, true).unwrap();
        w.declare(vec![("t", schema(DataType::Int64))]).unwrap();
        let ints = RecordBatch::try_new(
            schema(DataType::Int64),
            vec![Arc::new(Int64Array::from(vec![1, 2]))],
        )
        .unwrap();
        let strings = RecordBatch::try_new(
            schema(DataType::Utf8),
            vec![Arc::new(StringArray::from(vec!["a"]))],
        )
        .unwrap();
        let e = w.write_chunk(0, &[("t", strings)]).unwrap_err();
        assert!(
            matches!(e, Error::Internal(ref m) if m.contains("declares")),
            "{e}"
        );
        let e = w.write_chunk(0, &[]).unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");
        let e = w
            .write_chunk(0, &[("t", ints.clone()), ("u", ints.clone())])
            .unwrap_err();
        assert!(
            matches!(e, Error::Internal(ref m) if m.contains("'u'")),
            "{e}"
        );
        assert!(!w.chunk_done(0));
        w.write_chunk(0, &[("t", ints)]).unwrap();
        assert!(w.chunk_done(0));
    }
}
