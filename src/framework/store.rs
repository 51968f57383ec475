//! The run directory: committed stages, in-progress work, part files, the
//! `_stage.json` records and the workdir lock.
//!
//! ```text
//! <workdir>/<stage>/_stage.json
//! <workdir>/<stage>/<table>/part-00000.parquet      committed
//! <workdir>/.work/<stage>/_work.json                 in progress (fingerprint)
//! <workdir>/.work/<stage>/<table>/part-00000.parquet  finished chunks, kept on resume
//! ```
//! A chunk is finished when every output table has its part; a stage is
//! committed by renaming its work folder into place.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::tabledef::{Shard, TableDef};

pub(crate) const RECORD_FILE: &str = "_stage.json";
const WORK_FILE: &str = "_work.json";
const WORK_DIR: &str = ".work";
const LOCK_FILE: &str = ".genecis.lock";
/// Written into every stage folder genecis creates and kept through the
/// commit: what marks a folder as genecis's to replace or delete, even when
/// a crash left it without its record.
const OWNER_FILE: &str = "_genecis";

/// Whether genecis made `dir` (a stage or work folder): its marker, its
/// record or its work record is there.
pub(crate) fn made_by_genecis(dir: &Path) -> bool {
    [OWNER_FILE, RECORD_FILE, WORK_FILE]
        .iter()
        .any(|f| dir.join(f).is_file())
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

/// Whether `workdir` holds a genecis run (a lock file, a work folder, or a
/// committed stage).
pub(crate) fn holds_run(workdir: &Path) -> bool {
    workdir.join(LOCK_FILE).is_file()
        || workdir.join(WORK_DIR).is_dir()
        || fs::read_dir(workdir).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| made_by_genecis(&e.path()))
        })
}

/// The folders a run of `stage` may replace: its committed folder, its
/// work folder and the commit's set-aside copy.
pub(crate) fn stage_folders(workdir: &Path, stage: &str) -> [(PathBuf, String); 3] {
    [
        (stage_dir(workdir, stage), format!("stage '{stage}'")),
        (work_dir(workdir, stage), format!("stage '{stage}''s work")),
        (
            workdir.join(WORK_DIR).join(format!("{stage}.old")),
            format!("stage '{stage}''s commit"),
        ),
    ]
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
    /// or overwritten after the commit (absent in records of older runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub part_bytes: Vec<u64>,
    /// blake3 of each part file, so bytes overwritten at the same size are
    /// noticed too (absent in records of older runs).
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

/// `_stage.json`: what was run, from what, and what it produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
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
    pub(crate) fn read(stage_dir: &Path) -> Result<Option<StageRecord>> {
        let path = stage_dir.join(RECORD_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot read", &path)(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::CorruptRecord {
                path,
                message: e.to_string(),
            })
    }

    /// What is wrong with the committed part files: missing ones, ones
    /// whose size differs from the record and, with `content`, ones whose
    /// blake3 differs (every byte read: `status` and `run` pay this, `sql`
    /// does not). Empty when all are intact.
    pub(crate) fn damaged_parts(&self, stage_dir: &Path, content: bool) -> Vec<String> {
        let mut out = Vec::new();
        for (name, stat) in &self.tables {
            for k in 0..stat.parts {
                let p = stage_dir.join(name).join(part_name(k));
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

pub(crate) fn part_name(chunk: usize) -> String {
    format!("part-{chunk:05}.parquet")
}

pub(crate) fn stage_dir(workdir: &Path, stage: &str) -> PathBuf {
    workdir.join(stage)
}

pub(crate) fn work_dir(workdir: &Path, stage: &str) -> PathBuf {
    workdir.join(WORK_DIR).join(stage)
}

#[derive(Serialize, Deserialize)]
struct WorkInfo {
    fingerprint: String,
}

/// Writes one stage's tables chunk by chunk into its work folder, keeping
/// chunks finished by an earlier, interrupted run with the same fingerprint.
/// Every batch must match its table's declared schema exactly.
pub struct StageWriter {
    dir: PathBuf,
    tables: Vec<(&'static str, SchemaRef)>,
    props: WriterProperties,
}

impl StageWriter {
    /// Opens (or, when its fingerprint differs, clears) the work folder.
    pub(crate) fn open(workdir: &Path, stage: &str, fingerprint: &str) -> Result<StageWriter> {
        let dir = work_dir(workdir, stage);
        let info_path = dir.join(WORK_FILE);
        let reusable = fs::read_to_string(&info_path)
            .ok()
            .and_then(|t| serde_json::from_str::<WorkInfo>(&t).ok())
            .is_some_and(|w| w.fingerprint == fingerprint);
        if !reusable {
            remove_ours(&dir, &format!("stage '{stage}''s work"))?;
        }
        fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
        write_atomic(
            &dir.join(OWNER_FILE),
            format!("genecis stage {stage}\n").as_bytes(),
        )?;
        if !reusable {
            let info = serde_json::to_string(&WorkInfo {
                fingerprint: fingerprint.to_string(),
            })
            .map_err(|e| Error::Internal(format!("work record: {e}")))?;
            write_atomic(&info_path, info.as_bytes())?;
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(1).map_err(|e| Error::Internal(format!("zstd level: {e}")))?,
            ))
            .set_created_by(format!("genecis {}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(StageWriter {
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
    /// written under a temp name and renamed.
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
                    batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| format!("{}: {}", f.name(), f.data_type()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    schema
                        .fields()
                        .iter()
                        .map(|f| format!("{}: {}", f.name(), f.data_type()))
                        .collect::<Vec<_>>()
                        .join(", "),
                )));
            }
        }
        for (name, batch) in batches {
            let final_path = self.dir.join(name).join(part_name(chunk));
            let tmp = self
                .dir
                .join(name)
                .join(format!(".{}.tmp", part_name(chunk)));
            let file = File::create(&tmp).map_err(Error::io("cannot create", &tmp))?;
            let perr = |source| Error::Parquet {
                path: tmp.clone(),
                source,
            };
            let mut w = ArrowWriter::try_new(file, batch.schema(), Some(self.props.clone()))
                .map_err(perr)?;
            w.write(batch).map_err(perr)?;
            w.close().map_err(perr)?;
            fs::rename(&tmp, &final_path).map_err(Error::io("cannot rename", &tmp))?;
        }
        Ok(())
    }

    /// Row counts (from the part files' footers) and part sizes.
    fn table_stats(&self, chunks: usize) -> Result<BTreeMap<String, TableStat>> {
        let mut out = BTreeMap::new();
        for (t, _) in &self.tables {
            let mut rows = 0u64;
            let mut part_bytes = Vec::with_capacity(chunks);
            let mut part_blake3 = Vec::with_capacity(chunks);
            for k in 0..chunks {
                let p = self.dir.join(t).join(part_name(k));
                part_blake3.push(file_blake3(&p)?);
                let f = File::open(&p).map_err(Error::io("cannot open", &p))?;
                part_bytes.push(f.metadata().map_err(Error::io("cannot read", &p))?.len());
                let r = SerializedFileReader::new(f).map_err(|source| Error::Parquet {
                    path: p.clone(),
                    source,
                })?;
                rows += r.metadata().file_metadata().num_rows() as u64;
            }
            out.insert(
                t.to_string(),
                TableStat {
                    rows,
                    parts: chunks,
                    part_bytes,
                    part_blake3,
                },
            );
        }
        Ok(out)
    }

    /// Moves the work folder into `<workdir>/<stage>` with its record. The
    /// old committed folder, if any, is invalidated first (record removed),
    /// so a crash in between leaves the stage "missing", never half-new.
    pub(crate) fn commit(
        self,
        workdir: &Path,
        stage: &str,
        mut record: StageRecord,
        chunks: usize,
    ) -> Result<StageRecord> {
        for k in 0..chunks {
            if !self.chunk_done(k) {
                return Err(Error::NotReady {
                    stage: stage.to_string(),
                    reason: format!("chunk {k} of {chunks} is not finished"),
                });
            }
        }
        record.tables = self.table_stats(chunks)?;
        record.chunks = chunks;
        let json = serde_json::to_string_pretty(&record)
            .map_err(|e| Error::Internal(format!("stage record: {e}")))?;
        write_atomic(&self.dir.join(RECORD_FILE), json.as_bytes())?;
        let _ = fs::remove_file(self.dir.join(WORK_FILE));
        let dest = stage_dir(workdir, stage);
        let trash = workdir.join(WORK_DIR).join(format!("{stage}.old"));
        ensure_ours(&dest, &format!("stage '{stage}'"))?;
        remove_ours(&trash, &format!("stage '{stage}''s commit"))?;
        if dest.exists() {
            let _ = fs::remove_file(dest.join(RECORD_FILE));
            fs::rename(&dest, &trash).map_err(Error::io("cannot move aside", &dest))?;
            fs::rename(&self.dir, &dest).map_err(Error::io("cannot commit", &self.dir))?;
            fs::remove_dir_all(&trash).map_err(Error::io("cannot remove", &trash))?;
        } else {
            fs::rename(&self.dir, &dest).map_err(Error::io("cannot commit", &self.dir))?;
        }
        Ok(record)
    }
}

/// Number of finished chunks in an interrupted run's work folder, if its
/// fingerprint matches (for `status`).
pub(crate) fn resumable_chunks(
    workdir: &Path,
    stage: &str,
    fingerprint: &str,
    tables: &[TableDef],
) -> usize {
    let dir = work_dir(workdir, stage);
    let ok = fs::read_to_string(dir.join(WORK_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<WorkInfo>(&t).ok())
        .is_some_and(|w| w.fingerprint == fingerprint);
    if !ok || tables.is_empty() {
        return 0;
    }
    let count = |t: &TableDef| {
        fs::read_dir(dir.join(t.name))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.starts_with("part-") && n.ends_with(".parquet")
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    tables.iter().map(count).min().unwrap_or(0)
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

/// The stage a committed table folder belongs to (`<workdir>/<stage>/<table>`).
fn stage_of(table_dir: &Path) -> String {
    table_dir
        .parent()
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
/// folder (the table folder's parent).
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
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(Error::io("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("cannot rename", &tmp))
}

/// Held for the length of a run. `flock` locks vanish with the process, so a
/// killed run never leaves a stale lock behind.
pub struct WorkdirLock {
    _files: Vec<File>,
}

impl WorkdirLock {
    /// Exclusive for a whole run; shared (plus an exclusive per-shard lock)
    /// for `--shard` runs, so shards of one stage can run side by side but
    /// never beside an unsharded run.
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
        let busy = |holder: String| Error::Locked {
            workdir: workdir.to_path_buf(),
            holder: if holder.is_empty() {
                "unknown process".into()
            } else {
                holder
            },
        };
        let mut files = Vec::new();
        match shard {
            None => {
                if main.try_lock().is_err() {
                    return Err(busy(holder()));
                }
                fs::write(&path, format!("pid {}", std::process::id()))
                    .map_err(Error::io("cannot write", &path))?;
                files.push(main);
            }
            Some(s) => {
                if main.try_lock_shared().is_err() {
                    return Err(busy(holder()));
                }
                files.push(main);
                let sp = workdir.join(format!("{LOCK_FILE}.shard-{}-of-{}", s.index, s.count));
                let f = fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&sp)
                    .map_err(Error::io("cannot open lock file", &sp))?;
                if f.try_lock().is_err() {
                    return Err(busy(format!("shard {s} is already running")));
                }
                files.push(f);
            }
        }
        Ok(WorkdirLock { _files: files })
    }

    /// Serialises the final commit between concurrently finishing shards.
    pub(crate) fn commit_guard(workdir: &Path) -> Result<File> {
        let p = workdir.join(WORK_DIR).join(".commit.lock");
        fs::create_dir_all(p.parent().unwrap()).map_err(Error::io("cannot create", &p))?;
        let f = File::create(&p).map_err(Error::io("cannot open lock file", &p))?;
        f.lock().map_err(Error::io("cannot lock", &p))?;
        Ok(f)
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
        let mut w = StageWriter::open(dir.path(), "s", "fp").unwrap();
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
