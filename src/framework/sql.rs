//! `genecis sql`: every committed table of a run, queryable by name in a
//! DataFusion session. `table` reaches a name only one stage has;
//! `stage.table` always works (each stage is a SQL schema).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::Array;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::TableReference;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

use crate::error::{Error, Result};
use crate::framework::commit::RunStore;

#[derive(Debug, Clone)]
pub(crate) struct TableEntry {
    pub stage: String,
    pub table: String,
    pub dir: PathBuf,
    pub rows: u64,
}

/// Committed tables of a workdir, sorted by stage then table.
pub(crate) fn discover(workdir: &Path, run: &RunStore) -> Result<Vec<TableEntry>> {
    let mut out = Vec::new();
    for (rec, dir) in crate::framework::store::committed(workdir, run)? {
        // Parts missing or resized since the commit: answering without
        // them would be answering wrong.
        let damaged = rec.damaged_parts(&dir, false);
        if !damaged.is_empty() {
            return Err(Error::Data(format!(
                "stage '{}' is damaged: {}. Rebuild it (genecis run MANIFEST --only {} --force) before querying it",
                rec.stage,
                damaged.join("; "),
                rec.stage
            )));
        }
        for (name, stat) in &rec.tables {
            let tdir = dir.join(name);
            if tdir.is_dir() {
                // A truncated or overwritten part is named here, once,
                // instead of failing every query that touches it.
                for part in crate::framework::store::part_files(&tdir)? {
                    crate::framework::store::part_rows(&part)?;
                }
                out.push(TableEntry {
                    stage: rec.stage.clone(),
                    table: name.clone(),
                    dir: tdir,
                    rows: stat.rows,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::NoRun(workdir.to_path_buf()));
    }
    out.sort_by(|a, b| (&a.stage, &a.table).cmp(&(&b.stage, &b.table)));
    Ok(out)
}

/// Where queries run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// DataFusion in this process.
    Local,
    /// An Apache Ballista cluster's scheduler at `df://HOST:PORT`: the
    /// tables are registered by absolute path, which its executors must
    /// read (shared storage).
    Cluster(String),
    /// A Ballista scheduler and executor started in this process
    /// (Ballista's standalone mode): the cluster path, tried locally.
    Standalone,
}

impl Engine {
    /// `--cluster`: `df://HOST:PORT`, or `standalone`.
    pub fn parse(s: &str) -> Result<Engine> {
        let bad = |m: &str| Error::Usage {
            arg: format!("--cluster {s}"),
            message: m.to_string(),
        };
        if s == "standalone" {
            return Ok(Engine::Standalone);
        }
        let rest = s
            .strip_prefix("df://")
            .ok_or_else(|| bad("use df://HOST:PORT (a Ballista scheduler) or standalone"))?;
        match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Engine::Cluster(s.to_string()))
            }
            _ => Err(bad("use df://HOST:PORT, the scheduler's host and port")),
        }
    }
}

/// `genecis sql`: runs `query` over the run in `workdir` and writes the
/// result, or opens the interactive prompt when there is no query.
pub fn run_cli(
    workdir: &Path,
    store: &RunStore,
    query_text: Option<&str>,
    format: OutputFormat,
    out: Option<&Path>,
    engine: &Engine,
) -> Result<()> {
    if format == OutputFormat::Parquet && out.is_none() {
        return Err(Error::Usage {
            arg: "--format parquet".into(),
            message: "needs --out FILE (Parquet is not written to a terminal)".into(),
        });
    }
    if let (Engine::Cluster(url), None) = (engine, &store.local) {
        return Err(Error::Usage {
            arg: format!("--cluster {url}"),
            message: "an object-store workdir is read here through a local mirror, which a cluster's executors do not see; query it in process (drop --cluster), or run the cluster on a shared file system workdir".into(),
        });
    }
    let entries = discover(workdir, store)?;
    let rt = tokio::runtime::Runtime::new()
        .map_err(Error::io("cannot start the query runtime", workdir))?;
    let on_cluster = |e: Error| {
        match (engine, e) {
        (Engine::Cluster(url), Error::Sql(e)) => Error::Data(format!(
            "the Ballista cluster at {url} could not run the query: {e}. Is its scheduler up, and do its executors see {} at that path?",
            std::path::absolute(workdir).unwrap_or_else(|_| workdir.to_path_buf()).display()
        )),
        (_, e) => e,
    }
    };
    rt.block_on(async {
        let ctx = session_on(engine, &entries).await?;
        match query_text {
            Some(q) => {
                let df = read_only_sql(&ctx, &entries, q).await?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let mut stream = df.execute_stream().await?;
                let mut w = ResultWriter::new(format, out, schema)?;
                while let Some(b) = futures::StreamExt::next(&mut stream).await {
                    w.write(&b?)?;
                }
                w.finish()
            }
            None => repl(&ctx, &entries, &workdir.join(".sql_history")).await,
        }
    })
    .map_err(on_cluster)
}

/// A session with every table registered (information_schema on, so
/// `SHOW TABLES` and `DESCRIBE t` work). On a Ballista `engine` the
/// scheduler plans and the executors read the part files.
pub(crate) async fn session_on(engine: &Engine, entries: &[TableEntry]) -> Result<SessionContext> {
    let ctx = match engine {
        Engine::Local => {
            SessionContext::new_with_config(SessionConfig::new().with_information_schema(true))
        }
        #[cfg(feature = "ballista")]
        Engine::Cluster(url) => {
            use ballista::prelude::SessionContextExt;
            SessionContext::remote(url).await.map_err(|e| Error::Usage {
                arg: format!("--cluster {url}"),
                message: format!("cannot reach the Ballista scheduler: {e}"),
            })?
        }
        #[cfg(feature = "ballista")]
        Engine::Standalone => {
            use ballista::prelude::SessionContextExt;
            SessionContext::standalone().await?
        }
        #[cfg(not(feature = "ballista"))]
        _ => {
            return Err(Error::Usage {
                arg: "--cluster".into(),
                message: "this genecis was built without Ballista: build it with `cargo build --release --features ballista`".into(),
            })
        }
    };
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| Error::Internal("DataFusion has no default catalog".into()))?;
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in entries {
        *count.entry(e.table.as_str()).or_default() += 1;
    }
    for e in entries {
        if catalog.schema(&e.stage).is_none() {
            catalog.register_schema(&e.stage, Arc::new(MemorySchemaProvider::new()))?;
        }
        // Absolute: a cluster's executors resolve it on their machines.
        let dir = std::path::absolute(&e.dir).map_err(Error::io("cannot resolve", &e.dir))?;
        let url = format!("{}/", dir.display());
        ctx.register_parquet(
            TableReference::partial(e.stage.as_str(), e.table.as_str()),
            &url,
            ParquetReadOptions::default(),
        )
        .await?;
        if count[e.table.as_str()] == 1 && !ctx.table_exist(e.table.as_str())? {
            ctx.register_parquet(
                TableReference::bare(e.table.as_str()),
                &url,
                ParquetReadOptions::default(),
            )
            .await?;
        }
    }
    Ok(ctx)
}

/// Runs a query. An empty result still carries one empty batch, so CSV gets
/// its header and Parquet its schema.
pub(crate) async fn query(
    ctx: &SessionContext,
    entries: &[TableEntry],
    sql: &str,
) -> Result<Vec<RecordBatch>> {
    let df = read_only_sql(ctx, entries, sql).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let mut batches = df.collect().await?;
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(schema));
    }
    Ok(batches)
}

/// Plans `sql` with writes refused.
async fn read_only_sql(
    ctx: &SessionContext,
    entries: &[TableEntry],
    sql: &str,
) -> Result<datafusion::dataframe::DataFrame> {
    // Committed tables are read-only: INSERT would add a part the record
    // does not know and COPY writes wherever it is told. Results leave
    // through --out.
    let read_only = SQLOptions::new().with_allow_dml(false);
    let df = match ctx.sql_with_options(sql, read_only).await {
        Err(e) if e.to_string().contains("DML not supported") => {
            return Err(Error::Usage {
                arg: "QUERY".into(),
                message: format!(
                    "genecis sql is read-only ({}): a run's tables change only by running its stages; write a result with --out FILE",
                    e.to_string().lines().next().unwrap_or("")
                ),
            })
        }
        Err(e) => {
            // A bare name several stages have is not registered: say so.
            let text = e.to_string();
            let ambiguous = entries.iter().find(|t| {
                text.contains(&format!("table 'datafusion.public.{}' not found", t.table))
                    && entries.iter().filter(|u| u.table == t.table).count() > 1
            });
            if let Some(t) = ambiguous {
                let stages: Vec<String> = entries
                    .iter()
                    .filter(|u| u.table == t.table)
                    .map(|u| format!("{}.{}", u.stage, u.table))
                    .collect();
                return Err(Error::Usage {
                    arg: "QUERY".into(),
                    message: format!(
                        "table '{}' is ambiguous: several stages have it ({}); name one as stage.table",
                        t.table,
                        stages.join(", ")
                    ),
                });
            }
            return Err(e.into());
        }
        Ok(df) => df,
    };
    Ok(df)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

/// Writes query results in `format` to `out` (stdout when `None`).
/// Rows the table format prints; the rest are counted, not held.
const TABLE_ROWS: usize = 1000;

/// Writes a result batch by batch, so memory holds one batch at a time
/// (the table format: its first [`TABLE_ROWS`] rows).
pub(crate) struct ResultWriter {
    kind: Sink,
    out: Option<PathBuf>,
    schema: arrow::datatypes::SchemaRef,
    /// Whether a batch was written (CSV still gets its header without).
    any: bool,
}

enum Sink {
    Table {
        shown: Vec<RecordBatch>,
        kept: usize,
        rows: usize,
    },
    Csv(Box<arrow::csv::Writer<Box<dyn Write>>>),
    Json(Box<arrow::json::LineDelimitedWriter<Box<dyn Write>>>),
    Parquet(Box<parquet::arrow::ArrowWriter<std::fs::File>>),
}

impl ResultWriter {
    pub(crate) fn new(
        format: OutputFormat,
        out: Option<&Path>,
        schema: arrow::datatypes::SchemaRef,
    ) -> Result<ResultWriter> {
        let open = || -> Result<Box<dyn Write>> {
            Ok(match out {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p).map_err(Error::io("cannot create", p))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            })
        };
        let kind = match format {
            OutputFormat::Table => Sink::Table {
                shown: Vec::new(),
                kept: 0,
                rows: 0,
            },
            OutputFormat::Csv => Sink::Csv(Box::new(
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(open()?),
            )),
            OutputFormat::Json => {
                Sink::Json(Box::new(arrow::json::LineDelimitedWriter::new(open()?)))
            }
            OutputFormat::Parquet => {
                let path = out.ok_or_else(|| Error::Usage {
                    arg: "--format parquet".into(),
                    message: "needs --out FILE (Parquet is not written to a terminal)".into(),
                })?;
                let file = std::fs::File::create(path).map_err(Error::io("cannot create", path))?;
                let w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).map_err(
                    |source| Error::Parquet {
                        path: path.to_path_buf(),
                        source,
                    },
                )?;
                Sink::Parquet(Box::new(w))
            }
        };
        Ok(ResultWriter {
            kind,
            out: out.map(Path::to_path_buf),
            schema,
            any: false,
        })
    }

    fn parquet_err(&self, source: parquet::errors::ParquetError) -> Error {
        Error::Parquet {
            path: self.out.clone().unwrap_or_default(),
            source,
        }
    }

    pub(crate) fn write(&mut self, b: &RecordBatch) -> Result<()> {
        self.any = true;
        match &mut self.kind {
            Sink::Table { shown, kept, rows } => {
                *rows += b.num_rows();
                if *kept < TABLE_ROWS {
                    let take = (TABLE_ROWS - *kept).min(b.num_rows());
                    shown.push(b.slice(0, take));
                    *kept += take;
                }
            }
            Sink::Csv(w) => w.write(&lists_as_text(b)?)?,
            Sink::Json(w) => w.write(b)?,
            Sink::Parquet(w) => {
                if let Err(e) = w.write(b) {
                    return Err(self.parquet_err(e));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        if !self.any {
            self.write(&RecordBatch::new_empty(self.schema.clone()))?;
        }
        let out = self.out.clone();
        let io = |e| Error::Io {
            action: "cannot write output",
            path: out.clone().unwrap_or_else(|| "<stdout>".into()),
            source: e,
        };
        match self.kind {
            Sink::Table { shown, kept, rows } => {
                let mut sink = std::io::stdout().lock();
                let text = arrow::util::pretty::pretty_format_batches(&shown)?;
                writeln!(sink, "{text}").map_err(io)?;
                if rows > kept {
                    writeln!(
                        sink,
                        "({rows} rows; the first {kept} shown: --format csv or --out FILE gives all)"
                    )
                    .map_err(io)?;
                } else {
                    writeln!(sink, "({rows} row{})", if rows == 1 { "" } else { "s" })
                        .map_err(io)?;
                }
                sink.flush().map_err(io)
            }
            Sink::Csv(w) => w.into_inner().flush().map_err(io),
            Sink::Json(mut w) => {
                w.finish()?;
                w.into_inner().flush().map_err(io)
            }
            Sink::Parquet(w) => match w.close() {
                Ok(_) => Ok(()),
                Err(source) => Err(Error::Parquet {
                    path: out.unwrap_or_default(),
                    source,
                }),
            },
        }
    }
}

/// Writes collected batches (the prompt's results).
pub(crate) fn write_results(
    batches: &[RecordBatch],
    format: OutputFormat,
    out: Option<&Path>,
) -> Result<()> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
    let mut w = ResultWriter::new(format, out, schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()
}

/// CSV has no nested values: list columns (`scores.similarities`,
/// embeddings) become text as DuckDB prints them, `[a, b, ...]`.
fn lists_as_text(batch: &RecordBatch) -> Result<RecordBatch> {
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let nested = |t: &DataType| {
        matches!(
            t,
            DataType::List(_)
                | DataType::LargeList(_)
                | DataType::FixedSizeList(..)
                | DataType::Struct(_)
                | DataType::Map(..)
        )
    };
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| nested(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (f, col) in batch.schema().fields().iter().zip(batch.columns()) {
        if !nested(f.data_type()) {
            fields.push(f.as_ref().clone());
            columns.push(col.clone());
            continue;
        }
        let fmt = ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default())?;
        let text: arrow::array::StringArray = (0..col.len())
            .map(|i| col.is_valid(i).then(|| fmt.value(i).to_string()))
            .collect();
        fields.push(Field::new(f.name(), DataType::Utf8, true));
        columns.push(Arc::new(text) as arrow::array::ArrayRef);
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Text for `\d`: every table with its row count.
pub(crate) fn describe_tables(entries: &[TableEntry]) -> String {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in entries {
        *count.entry(e.table.as_str()).or_default() += 1;
    }
    let mut s = String::new();
    for e in entries {
        let short = if count[e.table.as_str()] == 1 {
            format!(" (also: {})", e.table)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "  {}.{}{short}: {} rows\n",
            e.stage,
            e.table,
            crate::framework::progress::thousands(e.rows)
        ));
    }
    s
}

/// The interactive prompt: statements end with `;`; `\d` lists tables,
/// `\d NAME` shows a table's columns, `\q` quits. Errors are printed and the
/// prompt goes on.
pub(crate) async fn repl(
    ctx: &SessionContext,
    entries: &[TableEntry],
    history: &Path,
) -> Result<()> {
    use rustyline::error::ReadlineError;
    let mut rl = rustyline::DefaultEditor::new().map_err(|e| Error::Usage {
        arg: "sql".into(),
        message: e.to_string(),
    })?;
    let _ = rl.load_history(history);
    println!("genecis sql: {} tables. End statements with ';'. \\d lists tables, \\d NAME describes one, \\q quits.", entries.len());
    let mut buf = String::new();
    loop {
        let prompt = if buf.is_empty() {
            "genecis> "
        } else {
            "     ..> "
        };
        let line = match rl.readline(prompt) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                buf.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("error: {e}");
                break;
            }
        };
        let trimmed = line.trim();
        if buf.is_empty() && trimmed.starts_with('\\') {
            let _ = rl.add_history_entry(trimmed);
            match trimmed.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["\\q"] => break,
                ["\\d"] => print!("{}", describe_tables(entries)),
                ["\\d", name] => match query(ctx, entries, &format!("DESCRIBE {name}")).await {
                    Ok(b) => {
                        let _ = write_results(&b, OutputFormat::Table, None);
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                _ => eprintln!("unknown command {trimmed}; try \\d, \\d NAME or \\q"),
            }
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        buf.push_str(&line);
        buf.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let stmt = std::mem::take(&mut buf);
        let _ = rl.add_history_entry(stmt.trim());
        match query(ctx, entries, &stmt).await {
            Ok(b) => {
                if let Err(e) = write_results(&b, OutputFormat::Table, None) {
                    eprintln!("error: {e}");
                }
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    let _ = rl.save_history(history);
    Ok(())
}
