//! The commit protocol: how a stage's tables become its current state with
//! no lock and no rename, on a local file system or an object store.
//!
//! ```text
//! <stage>/<folder>/<table>/part-NNNNN.parquet  immutable parts; put if absent
//! <stage>/<folder>/_shards/<i>-of-<n>.json     shard i's parts (bytes, blake3, rows); put if absent
//! <stage>/_log/<version>.json                  the stage record, version 1, 2, ...; put if absent
//! ```
//! `<folder>` is the first 16 hex digits of the work's fingerprint, so two
//! plans never share a part and a rerun of one plan finds its own parts.
//! The current state is the highest log version. It is written only after
//! every shard of one sharding has put its record and every recorded part
//! is in the store at its recorded size, so no record points at a missing
//! part. Put-if-absent (`PutMode::Create`: a hard link on a file system, a
//! conditional write on S3) lets exactly one writer create a version: a
//! loser re-reads the log and finds the same plan (done) or another plan
//! (refused).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{
    CopyMode, CopyOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::store::{StageRecord, TableStat};

pub(crate) const LOG_DIR: &str = "_log";
pub(crate) const SHARDS_DIR: &str = "_shards";

/// A store and where the run lives in it.
#[derive(Clone, Debug)]
pub struct RunStore {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// The run's prefix in the store.
    pub(crate) root: Key,
    /// The workdir, when the store is the local file system there (stages
    /// then read and write the store's own files); `None` for a remote
    /// store, whose objects stages use through a local mirror.
    pub(crate) local: Option<PathBuf>,
}

/// The folder (under the stage) of a fingerprint's parts.
pub(crate) fn folder_of(fingerprint: &str) -> &str {
    // Records are checked when read (hex only); never slice inside a char.
    fingerprint.get(..16).unwrap_or(fingerprint)
}

/// The most parts or chunks a record may claim: a stage of a million
/// chunks is far beyond any run; a record claiming more is damaged (and
/// would make `status` loop for ever).
const MAX_PARTS: usize = 1 << 20;

/// Checks on what a record read from the store says, before any of it
/// builds a key, a path or a loop.
pub(crate) mod check {
    use super::MAX_PARTS;

    pub(crate) fn fingerprint(what: &str, f: &str) -> Result<(), String> {
        if (16..=64).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(format!(
                "{what} '{}' is not a fingerprint (16 to 64 hex digits)",
                f.escape_debug()
            ))
        }
    }

    pub(crate) fn blake3(what: &str, h: &str) -> Result<(), String> {
        if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(format!(
                "{what} '{}' is not a blake3 hash (64 hex digits)",
                h.escape_debug()
            ))
        }
    }

    /// A stage or table name: one plain path component.
    pub(crate) fn name(what: &str, n: &str) -> Result<(), String> {
        let ok = !n.is_empty()
            && n.len() <= 255
            && !n.starts_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(format!("{what} '{}' is not a plain name", n.escape_debug()))
        }
    }

    pub(crate) fn count(what: &str, n: usize) -> Result<(), String> {
        if n <= MAX_PARTS {
            Ok(())
        } else {
            Err(format!(
                "{what} is {n}, more than any run has ({MAX_PARTS})"
            ))
        }
    }
}

/// A record of `stage` from the store, parsed and checked: a damaged one
/// is named with what repairs it.
pub(crate) fn parse_record<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    path: impl Into<PathBuf>,
    stage: &str,
    checked: impl FnOnce(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let path: PathBuf = path.into();
    let corrupt = |message: String| Error::CorruptRecord {
        path: path.clone(),
        stage: stage.to_string(),
        message,
    };
    let rec: T = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    match checked(&rec) {
        Ok(()) => Ok(rec),
        Err(m) => Err(corrupt(m)),
    }
}

impl ShardRecord {
    /// What a shard record must hold to be used.
    pub(crate) fn check(&self, index: usize, count: usize) -> std::result::Result<(), String> {
        check::fingerprint("fingerprint", &self.fingerprint)?;
        if (self.index, self.count) != (index, count) {
            return Err(format!(
                "it says shard {} of {}, its name {index} of {count}",
                self.index, self.count
            ));
        }
        check::count("chunks", self.chunks)?;
        check::count("parts", self.parts.len())?;
        for t in &self.tables {
            check::name("table", t)?;
        }
        for p in &self.parts {
            check::name("table", &p.table)?;
            check::blake3("blake3", &p.blake3)?;
            if p.chunk >= self.chunks {
                return Err(format!("a part of chunk {} of {}", p.chunk, self.chunks));
            }
        }
        Ok(())
    }
}

/// The key (under the run's root) of `fingerprint`'s folder of `stage`.
pub(crate) fn version_key(stage: &str, fingerprint: &str) -> String {
    format!("{stage}/{}", folder_of(fingerprint))
}

/// One part file as a shard saw it in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartStat {
    pub table: String,
    pub chunk: usize,
    pub bytes: u64,
    pub blake3: String,
    pub rows: u64,
}

/// What shard `index` of `count` vouches for: every part of its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub fingerprint: String,
    pub index: usize,
    pub count: usize,
    pub chunks: usize,
    pub tables: Vec<String>,
    pub parts: Vec<PartStat>,
}

/// What a commit attempt found.
#[derive(Debug)]
pub enum Outcome {
    /// This writer created the version.
    Committed(StageRecord),
    /// Another writer of the same plan created it first (this one re-read it).
    ByAnother(StageRecord),
    /// Shards of this sharding have not all recorded their parts yet.
    Waiting { missing: Vec<usize> },
}

/// Runs a store call from synchronous code (stages and the runner are), on
/// one I/O runtime shared by every thread of the process.
pub(crate) fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("genecis-store")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => rt.block_on(f),
        Err(e) => Err(Error::Data(format!(
            "cannot start the I/O runtime of the run's store ({e}); the system is out of threads or memory"
        ))),
    }
}

fn store_err(op: &'static str, key: &Key) -> impl FnOnce(object_store::Error) -> Error {
    let key = key.to_string();
    move |source| Error::Store {
        op,
        key,
        source: Box::new(source),
    }
}

/// Where a workdir given as a path or URL lives: its store, and the local
/// folder stages work in (the workdir itself, or a mirror of a remote one).
pub fn open_workdir(spec: &str, base: &Path) -> Result<(PathBuf, RunStore)> {
    if !spec.contains("://") {
        let dir = crate::framework::stage::resolve_path(base, Path::new(spec));
        let dir = std::path::absolute(&dir).map_err(Error::io("cannot resolve", &dir))?;
        return Ok((dir.clone(), RunStore::local(&dir)?));
    }
    let bad = |why: String| Error::WorkdirUrl {
        url: spec.to_string(),
        why,
    };
    let url = url::Url::parse(spec).map_err(|e| bad(format!("is not a URL ({e})")))?;
    match url.scheme() {
        "file" => {
            let dir = url
                .to_file_path()
                .map_err(|_| bad("is not a local file URL".into()))?;
            Ok((dir.clone(), RunStore::local(&dir)?))
        }
        "s3" => s3_workdir(&url).map_err(bad),
        other => Err(bad(format!(
            "scheme '{other}' is not supported; use a path, file://, or s3://BUCKET/PREFIX"
        ))),
    }
}

#[cfg(feature = "s3")]
fn s3_workdir(url: &url::Url) -> std::result::Result<(PathBuf, RunStore), String> {
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or("has no bucket")?;
    // Endpoint, region and credentials come from the usual AWS_*
    // variables (AWS_ENDPOINT_URL and AWS_ALLOW_HTTP for S3-compatible
    // servers); S3 honours conditional writes, which the commit needs.
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
        .build()
        .map_err(|e| format!("cannot open the bucket: {e}"))?;
    let prefix = url.path().trim_matches('/');
    let mirror = match std::env::var_os("GENECIS_MIRROR") {
        Some(m) => PathBuf::from(m),
        None => {
            PathBuf::from(std::env::var_os("HOME").ok_or("HOME is not set; set GENECIS_MIRROR")?)
                .join(".cache/genecis-rs/mirror")
        }
    }
    .join(bucket)
    .join(prefix);
    Ok((
        mirror,
        RunStore {
            store: Arc::new(store),
            root: Key::from(prefix),
            local: None,
        },
    ))
}

#[cfg(not(feature = "s3"))]
fn s3_workdir(_: &url::Url) -> std::result::Result<(PathBuf, RunStore), String> {
    Err("this genecis was built without S3 support; rebuild it with `cargo build --release --features s3`".into())
}

impl RunStore {
    /// The local file system at `workdir` (which need not exist yet): the
    /// store is its `.genecis/` folder.
    pub fn local(workdir: &Path) -> Result<RunStore> {
        let store_dir = workdir.join(crate::framework::store::STORE_DIR);
        let root = Key::from_absolute_path(&store_dir).map_err(|e| Error::WorkdirUrl {
            url: workdir.display().to_string(),
            why: format!("is not a usable path ({e})"),
        })?;
        Ok(RunStore {
            store: Arc::new(object_store::local::LocalFileSystem::new()),
            root,
            local: Some(workdir.to_path_buf()),
        })
    }

    /// Any store (the in-memory one in tests), used like a remote one.
    pub fn remote(store: Arc<dyn ObjectStore>, root: &str) -> RunStore {
        RunStore {
            store,
            root: Key::from(root),
            local: None,
        }
    }

    /// Publishes the finished temp file `tmp` (at `from` in a local store)
    /// as `to` with put-if-absent and leaves the part at `local_final`;
    /// `false` when another writer published it first.
    pub(crate) async fn publish(
        &self,
        tmp: &Path,
        from: &str,
        to: &str,
        local_final: &Path,
    ) -> Result<bool> {
        if self.local.is_some() {
            // A hard link: atomic and exclusive, NFS included.
            let opts = CopyOptions {
                mode: CopyMode::Create,
                ..Default::default()
            };
            let (from, to) = (self.key(from), self.key(to));
            let created = match self.store.copy_opts(&from, &to, opts).await {
                Ok(()) => true,
                Err(object_store::Error::AlreadyExists { .. }) => false,
                Err(e) => return Err(store_err("cannot publish", &to)(e)),
            };
            std::fs::remove_file(tmp).map_err(Error::io("cannot remove", tmp))?;
            return Ok(created);
        }
        let bytes = std::fs::read(tmp).map_err(Error::io("cannot read", tmp))?;
        let created = self.put_if_absent(to, bytes).await?;
        std::fs::rename(tmp, local_final).map_err(Error::io("cannot rename", tmp))?;
        Ok(created)
    }

    /// Fetches every object under `rel` that `dir` lacks (or holds at
    /// another size) into `dir`.
    pub(crate) fn sync_down(&self, rel: &str, dir: &Path) -> Result<()> {
        block_on(async {
            for (k, size) in self.list(rel).await? {
                if k.ends_with(".tmp") {
                    continue;
                }
                let p = dir.join(&k);
                if std::fs::metadata(&p).is_ok_and(|m| m.len() == size) {
                    continue;
                }
                let Some(bytes) = self.get(&format!("{rel}/{k}")).await? else {
                    continue;
                };
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(Error::io("cannot create", parent))?;
                }
                crate::framework::store::write_atomic(&p, &bytes)?;
            }
            Ok(())
        })
    }

    /// Puts every file under `dir` that `keep` accepts (by its path
    /// relative to `dir`) at `rel/<path>`, overwriting.
    pub(crate) fn sync_up(&self, dir: &Path, rel: &str, keep: impl Fn(&str) -> bool) -> Result<()> {
        let mut todo = vec![dir.to_path_buf()];
        let mut files = Vec::new();
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).map_err(Error::io("cannot list", &d))? {
                let e = e.map_err(Error::io("cannot list", &d))?;
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if let Ok(r) = p.strip_prefix(dir) {
                    let r = r.to_string_lossy().into_owned();
                    if !r.ends_with(".tmp") && keep(&r) {
                        files.push((p, r));
                    }
                }
            }
        }
        block_on(async {
            for (p, r) in files {
                let bytes = std::fs::read(&p).map_err(Error::io("cannot read", &p))?;
                self.put(&format!("{rel}/{r}"), bytes).await?;
            }
            Ok(())
        })
    }

    pub(crate) fn key(&self, rel: &str) -> Key {
        let mut k = self.root.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            k = k.clone().join(part);
        }
        k
    }

    /// Puts `bytes` at `rel` unless something is there; `false` when it was.
    pub(crate) async fn put_if_absent(&self, rel: &str, bytes: Vec<u8>) -> Result<bool> {
        let key = self.key(rel);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_err("cannot put", &key)(e)),
        }
    }

    pub(crate) async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.key(rel);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(store_err("cannot put", &key))?;
        Ok(())
    }

    /// The bytes at `rel`, or `None` when nothing is there.
    pub(crate) async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(rel);
        match self.store.get(&key).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(store_err("cannot read", &key))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("cannot read", &key)(e)),
        }
    }

    /// Every object under `rel`, as (path relative to `rel`, size).
    pub(crate) async fn list(&self, rel: &str) -> Result<BTreeMap<String, u64>> {
        let prefix = self.key(rel);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_err("cannot list", &prefix))?;
        let skip = prefix.parts().count();
        Ok(metas
            .into_iter()
            .map(|m| {
                let rel: Vec<String> = m
                    .location
                    .parts()
                    .skip(skip)
                    .map(|p| p.as_ref().to_string())
                    .collect();
                (rel.join("/"), m.size)
            })
            .collect())
    }

    /// Deletes everything under `rel` (on a local store, the folder).
    pub(crate) async fn delete_prefix(&self, rel: &str) -> Result<()> {
        if let Some(w) = &self.local {
            let dir = w.join(crate::framework::store::STORE_DIR).join(rel);
            return match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("cannot remove", &dir)(e))
                }
                _ => Ok(()),
            };
        }
        for k in self.list(rel).await?.into_keys() {
            let key = self.key(&format!("{rel}/{k}"));
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err("cannot delete", &key)(e)),
            }
        }
        Ok(())
    }

    /// The stages that have a log, by name.
    pub(crate) async fn stage_names(&self) -> Result<Vec<String>> {
        let found = self
            .store
            .list_with_delimiter(Some(&self.root))
            .await
            .map_err(store_err("cannot list", &self.root))?;
        let mut out = Vec::new();
        for p in found.common_prefixes {
            if let Some(name) = p.filename() {
                if !self.versions(name).await?.is_empty() {
                    out.push(name.to_string());
                }
            }
        }
        Ok(out)
    }

    /// The log's versions of `stage`, ascending.
    pub(crate) async fn versions(&self, stage: &str) -> Result<Vec<u64>> {
        let mut v: Vec<u64> = self
            .list(&format!("{stage}/{LOG_DIR}"))
            .await?
            .into_keys()
            .filter_map(|k| k.strip_suffix(".json")?.parse().ok())
            .collect();
        v.sort_unstable();
        // Names are written with ten digits; a larger one was not written
        // by genecis (and its next version would overflow).
        if let Some(&bad) = v.last().filter(|&&x| x > MAX_VERSION) {
            return Err(Error::CorruptRecord {
                path: self.key(&log_key(stage, bad)).to_string().into(),
                stage: stage.to_string(),
                message: format!("log version {bad} is beyond any genecis writes ({MAX_VERSION})"),
            });
        }
        Ok(v)
    }

    pub(crate) async fn record(&self, stage: &str, version: u64) -> Result<Option<StageRecord>> {
        let rel = log_key(stage, version);
        let Some(bytes) = self.get(&rel).await? else {
            return Ok(None);
        };
        parse_record(
            &bytes,
            self.key(&rel).to_string(),
            stage,
            |r: &StageRecord| r.check(stage, Some(version)),
        )
        .map(Some)
    }

    /// The current state: the highest version of the log.
    pub(crate) async fn head(&self, stage: &str) -> Result<Option<StageRecord>> {
        match self.versions(stage).await?.last() {
            Some(&v) => self.record(stage, v).await,
            None => Ok(None),
        }
    }

    /// Puts shard `rec.index`'s record; when one is there (a duplicate of
    /// this shard finished first), re-reads it and returns it.
    pub(crate) async fn record_shard(&self, stage: &str, rec: &ShardRecord) -> Result<ShardRecord> {
        let rel = shard_key(stage, &rec.fingerprint, rec.index, rec.count);
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| Error::Internal(format!("shard record: {e}")))?;
        if self.put_if_absent(&rel, json).await? {
            return Ok(rec.clone());
        }
        let bytes = self.get(&rel).await?.unwrap_or_default();
        parse_record(
            &bytes,
            self.key(&rel).to_string(),
            stage,
            |r: &ShardRecord| r.check(rec.index, rec.count),
        )
    }

    /// Writes the stage's next version from the shard records of sharding
    /// `count`, if they are all there. `base` is the highest version this
    /// run saw before it started: a newer version of another plan means two
    /// plans wrote the stage at once, which is refused.
    pub(crate) async fn commit(
        &self,
        stage: &str,
        count: usize,
        base: u64,
        mut record: StageRecord,
    ) -> Result<Outcome> {
        let folder = version_key(stage, &record.fingerprint);
        let mut shards = Vec::with_capacity(count);
        let mut missing = Vec::new();
        for i in 0..count {
            let rel = shard_key(stage, &record.fingerprint, i, count);
            match self.get(&rel).await? {
                None => missing.push(i),
                Some(b) => shards.push(parse_record(
                    &b,
                    self.key(&rel).to_string(),
                    stage,
                    |r: &ShardRecord| r.check(i, count),
                )?),
            }
        }
        if !missing.is_empty() {
            return Ok(Outcome::Waiting { missing });
        }
        record.tables = tables_of(stage, &shards, record.chunks)?;
        // No record may point at a part that is not there as recorded.
        let present = self.list(&folder).await?;
        for (t, stat) in &record.tables {
            for (k, want) in stat.part_bytes.iter().enumerate() {
                let rel = format!("{t}/{}", crate::framework::store::part_name(k));
                if present.get(&rel) != Some(want) {
                    return Err(Error::NotReady {
                        stage: stage.to_string(),
                        reason: format!(
                            "part {folder}/{rel} is not in the store with the {want} bytes its shard recorded; rerun the stage"
                        ),
                    });
                }
            }
        }
        let mut next = base + 1;
        loop {
            // Versions written since this run started decide first.
            for v in base + 1..next {
                let Some(theirs) = self.record(stage, v).await? else {
                    continue;
                };
                if theirs.fingerprint == record.fingerprint {
                    return Ok(Outcome::ByAnother(theirs));
                }
                return Err(Error::Conflict {
                    stage: stage.to_string(),
                    ours: record.fingerprint.clone(),
                    theirs: theirs.fingerprint,
                });
            }
            record.version = next;
            let json = serde_json::to_vec_pretty(&record)
                .map_err(|e| Error::Internal(format!("stage record: {e}")))?;
            if self.put_if_absent(&log_key(stage, next), json).await? {
                return Ok(Outcome::Committed(record));
            }
            next += 1;
        }
    }

    /// Removes the part folders of versions older than `keep` whose plan
    /// differs from its (best effort: a reader may still hold them).
    pub(crate) async fn drop_superseded(&self, stage: &str, keep: &StageRecord) -> Result<()> {
        let mine = folder_of(&keep.fingerprint).to_string();
        let mut gone = std::collections::BTreeSet::new();
        for v in self.versions(stage).await? {
            if v >= keep.version {
                break;
            }
            if let Some(r) = self.record(stage, v).await? {
                let f = folder_of(&r.fingerprint).to_string();
                if f != mine && gone.insert(f) {
                    self.delete_prefix(&version_key(stage, &r.fingerprint))
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// The highest log version: what ten digits hold.
const MAX_VERSION: u64 = 9_999_999_999;

pub(crate) fn log_key(stage: &str, version: u64) -> String {
    format!("{stage}/{LOG_DIR}/{version:010}.json")
}

pub(crate) fn shard_key(stage: &str, fingerprint: &str, index: usize, count: usize) -> String {
    format!(
        "{}/{SHARDS_DIR}/{index}-of-{count}.json",
        version_key(stage, fingerprint)
    )
}

/// The record's table stats from the shard records: every table must have
/// every chunk's part exactly once; shards that disagree about a part's
/// bytes mean a stage that is not deterministic.
fn tables_of(
    stage: &str,
    shards: &[ShardRecord],
    chunks: usize,
) -> Result<BTreeMap<String, TableStat>> {
    let bad = |reason: String| Error::NotReady {
        stage: stage.to_string(),
        reason,
    };
    let mut names: Vec<String> = shards.iter().flat_map(|s| s.tables.clone()).collect();
    names.sort();
    names.dedup();
    let mut out = BTreeMap::new();
    for t in names {
        let mut slots: Vec<Option<&PartStat>> = vec![None; chunks];
        for s in shards {
            if s.chunks != chunks {
                return Err(bad(format!(
                    "shard {}/{} recorded {} chunks, this run planned {chunks}; rerun the stage",
                    s.index, s.count, s.chunks
                )));
            }
            for p in s.parts.iter().filter(|p| p.table == t) {
                let slot = slots.get_mut(p.chunk).ok_or_else(|| {
                    bad(format!(
                        "shard {}/{} recorded chunk {} of {chunks}",
                        s.index, s.count, p.chunk
                    ))
                })?;
                match slot {
                    Some(q) if q.blake3 != p.blake3 => {
                        return Err(bad(format!(
                            "two shards recorded different bytes for chunk {} of table '{t}' (the stage is not deterministic)",
                            p.chunk
                        )))
                    }
                    _ => *slot = Some(p),
                }
            }
        }
        let mut stat = TableStat {
            rows: 0,
            parts: chunks,
            part_bytes: Vec::with_capacity(chunks),
            part_blake3: Vec::with_capacity(chunks),
        };
        for (k, p) in slots.into_iter().enumerate() {
            let p = p.ok_or_else(|| bad(format!("no shard recorded chunk {k} of table '{t}'")))?;
            stat.rows += p.rows;
            stat.part_bytes.push(p.bytes);
            stat.part_blake3.push(p.blake3.clone());
        }
        out.insert(t, stat);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! The protocol on `object_store`'s in-memory store: writers race as
    //! threads, some "killed" (they stop) at a random point and rerun.

    use std::sync::Barrier;

    use object_store::memory::InMemory;

    use super::*;
    use crate::rng::Rng;

    const CHUNKS: usize = 12;

    fn record(fp: &str) -> StageRecord {
        StageRecord {
            stage: "s".into(),
            version: 0,
            kind: "k".into(),
            kind_version: "1".into(),
            fingerprint: fp.into(),
            params: serde_json::Value::Null,
            inputs: vec![],
            files: vec![],
            tables: Default::default(),
            chunks: CHUNKS,
            chunks_resumed: 0,
            rows_in: 0,
            seconds: 0.0,
            finished_unix: 0,
            tool_version: String::new(),
            notes: vec![],
        }
    }

    /// A chunk's part: a pure function of the plan and the chunk, as a
    /// deterministic stage's parts are.
    fn part(fp: &str, k: usize) -> Vec<u8> {
        format!("{fp}:{k}:").repeat(k + 1).into_bytes()
    }

    /// Where a writer stops when it is killed.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Stop {
        Never,
        AfterParts(usize),
        BeforeShardRecord,
        BeforeCommit,
    }

    /// One writer of shard `index` of `count`: parts, its record, a commit.
    fn writer(
        run: &RunStore,
        fp: &str,
        index: usize,
        count: usize,
        stop: Stop,
    ) -> Result<Option<Outcome>> {
        block_on(async {
            let mut parts = Vec::new();
            for (n, k) in (0..CHUNKS).filter(|k| k % count == index).enumerate() {
                if stop == Stop::AfterParts(n) {
                    return Ok(None);
                }
                let bytes = part(fp, k);
                let rel = format!(
                    "s/{}/t/{}",
                    folder_of(fp),
                    crate::framework::store::part_name(k)
                );
                run.put_if_absent(&rel, bytes.clone()).await?;
                parts.push(PartStat {
                    table: "t".into(),
                    chunk: k,
                    bytes: bytes.len() as u64,
                    blake3: blake3::hash(&bytes).to_hex().to_string(),
                    rows: 1,
                });
            }
            if stop == Stop::BeforeShardRecord {
                return Ok(None);
            }
            let rec = ShardRecord {
                fingerprint: fp.into(),
                index,
                count,
                chunks: CHUNKS,
                tables: vec!["t".into()],
                parts,
            };
            run.record_shard("s", &rec).await?;
            if stop == Stop::BeforeCommit {
                return Ok(None);
            }
            run.commit("s", count, 0, record(fp)).await.map(Some)
        })
    }

    /// Six writers (shards 0-3 of 4, two of them twice) start together;
    /// two are killed at random points and rerun. Exactly one commits, the
    /// others wait or re-read its version, and the one version names every
    /// part at the bytes in the store. 20 trials.
    #[test]
    fn racing_shards_commit_once_with_every_part() {
        for trial in 0..20u64 {
            let run = RunStore::remote(Arc::new(InMemory::new()), "runs/race");
            let mut rng = Rng::new(&[trial]);
            let shards = [0, 1, 2, 3, 1, 3];
            let stops = [
                Stop::AfterParts(rng.below(3) as usize),
                Stop::BeforeShardRecord,
                Stop::BeforeCommit,
            ];
            let mut plan: Vec<Stop> = vec![Stop::Never; shards.len()];
            for _ in 0..2 {
                let who = rng.below(shards.len() as u64) as usize;
                plan[who] = stops[rng.below(3) as usize];
            }
            let barrier = Barrier::new(shards.len());
            let outcomes: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = shards
                    .iter()
                    .zip(&plan)
                    .map(|(&i, &stop)| {
                        let (run, barrier) = (&run, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            writer(run, "aaaa0123456789abcdef", i, 4, stop)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
            });
            // The killed writers rerun (as their shards would).
            let mut all: Vec<Outcome> = outcomes.into_iter().flatten().collect();
            for (who, stop) in plan.iter().enumerate() {
                if *stop != Stop::Never {
                    all.extend(
                        writer(&run, "aaaa0123456789abcdef", shards[who], 4, Stop::Never).unwrap(),
                    );
                }
            }
            let committed = all
                .iter()
                .filter(|o| matches!(o, Outcome::Committed(_)))
                .count();
            assert_eq!(committed, 1, "trial {trial}: {all:?}");
            for o in &all {
                if let Outcome::ByAnother(r) = o {
                    assert_eq!(r.version, 1, "trial {trial}: a loser re-read version 1");
                }
            }
            assert_eq!(
                block_on(run.versions("s")).unwrap(),
                vec![1],
                "trial {trial}"
            );
            let head = block_on(run.head("s")).unwrap().unwrap();
            let listed =
                block_on(run.list(&format!("s/{}/t", folder_of(&head.fingerprint)))).unwrap();
            let t = &head.tables["t"];
            assert_eq!(t.parts, CHUNKS);
            for k in 0..CHUNKS {
                let want = part(&head.fingerprint, k);
                assert_eq!(
                    listed[&crate::framework::store::part_name(k)],
                    want.len() as u64
                );
                assert_eq!(t.part_bytes[k], want.len() as u64);
                assert_eq!(t.part_blake3[k], blake3::hash(&want).to_hex().to_string());
            }
        }
    }

    /// Two different plans finishing the same stage at once: one commits,
    /// the other is refused and names both fingerprints.
    #[test]
    fn two_plans_racing_on_one_stage_are_refused() {
        for trial in 0..10 {
            let run = RunStore::remote(Arc::new(InMemory::new()), "");
            let barrier = Barrier::new(2);
            let results: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = ["aaaa0123456789abcdef", "bbbb0123456789abcdef"]
                    .into_iter()
                    .map(|fp| {
                        let (run, barrier) = (&run, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            writer(run, fp, 0, 1, Stop::Never)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let ok = results
                .iter()
                .filter(|r| matches!(r, Ok(Some(Outcome::Committed(_)))))
                .count();
            let refused = results
                .iter()
                .filter(|r| matches!(r, Err(Error::Conflict { .. })))
                .count();
            assert_eq!((ok, refused), (1, 1), "trial {trial}: {results:?}");
            assert_eq!(block_on(run.versions("s")).unwrap(), vec![1]);
        }
    }

    /// A shard record whose part is not in the store (deleted, or never
    /// written) stops the commit: no record may point at a missing part.
    #[test]
    fn a_record_never_points_at_a_missing_part() {
        let run = RunStore::remote(Arc::new(InMemory::new()), "r");
        let fp = "aaaa0123456789abcdef";
        writer(&run, fp, 0, 1, Stop::BeforeCommit).unwrap();
        let gone = format!(
            "s/{}/t/{}",
            folder_of(fp),
            crate::framework::store::part_name(5)
        );
        block_on(async {
            let key = run.key(&gone);
            run.store.delete(&key).await.unwrap();
            Ok(())
        })
        .unwrap();
        let e = block_on(run.commit("s", 1, 0, record(fp))).unwrap_err();
        assert!(e.to_string().contains("part-00005.parquet"), "{e}");
        assert!(block_on(run.versions("s")).unwrap().is_empty());
        // A later plan's version supersedes: the head is the highest version.
        writer(&run, "bbbb0123456789abcdef", 0, 1, Stop::Never).unwrap();
        block_on(run.put(&gone, part(fp, 5))).unwrap();
        let Outcome::Committed(r) = block_on(run.commit("s", 1, 1, record(fp))).unwrap() else {
            panic!("plan a recommits on top of plan b")
        };
        assert_eq!(r.version, 2);
        assert_eq!(block_on(run.head("s")).unwrap().unwrap().fingerprint, fp);
    }
}
