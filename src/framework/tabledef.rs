//! What a stage kind declares about its tables (the output tables'
//! schemas, the input tables it reads) and which chunks a shard owns:
//! the vocabulary the store and the stage contract share.

use arrow::datatypes::{DataType, SchemaRef};

use crate::error::{Error, Result};

/// The columns of a table: fixed, or with an embedding column whose width
/// (the model's embedding width `d`) each run sets.
#[derive(Debug, Clone)]
pub enum Columns {
    Fixed(SchemaRef),
    Embedding {
        build: fn(i32) -> SchemaRef,
        /// The `fixed_size_list<f32>[d]` column.
        column: &'static str,
    },
}

/// An output table of a stage kind.
#[derive(Debug, Clone)]
pub struct TableDef {
    pub name: &'static str,
    pub columns: Columns,
}

impl TableDef {
    pub(crate) fn new(name: &'static str, schema: SchemaRef) -> TableDef {
        TableDef {
            name,
            columns: Columns::Fixed(schema),
        }
    }

    /// A table with an embedding column of the run's width.
    pub(crate) fn embedding(
        name: &'static str,
        build: fn(i32) -> SchemaRef,
        column: &'static str,
    ) -> TableDef {
        TableDef {
            name,
            columns: Columns::Embedding { build, column },
        }
    }

    /// The exact schema of this run's parts: `width` is the embedding width
    /// the stage's plan found.
    pub(crate) fn schema(&self, width: Option<i32>) -> Result<SchemaRef> {
        match (&self.columns, width) {
            (Columns::Fixed(s), _) => Ok(s.clone()),
            (Columns::Embedding { build, .. }, Some(d)) => Ok(build(d)),
            (Columns::Embedding { .. }, None) => Err(Error::Internal(format!(
                "table '{}' has an embedding column but the stage's plan set no width",
                self.name
            ))),
        }
    }

    /// `name(col type, ...)`, `?` marking nullable columns, `d` the
    /// per-run embedding width.
    pub(crate) fn describe(&self) -> String {
        let (schema, wide) = match &self.columns {
            Columns::Fixed(s) => (s.clone(), None),
            Columns::Embedding { build, column } => (build(1), Some(*column)),
        };
        let cols: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| {
                let ty = match f.data_type() {
                    DataType::FixedSizeList(item, _) if Some(f.name().as_str()) == wide => {
                        format!("FixedSizeList(d x {})", item.data_type())
                    }
                    other => other.to_string(),
                };
                format!(
                    "{} {ty}{}",
                    f.name(),
                    if f.is_nullable() { "?" } else { "" }
                )
            })
            .collect();
        format!("{}({})", self.name, cols.join(", "))
    }
}

/// A table a kind reads from its inputs.
#[derive(Debug, Clone, Copy)]
pub struct InputTable {
    pub name: &'static str,
    /// Read when an input provides it; the stage works without it.
    pub optional: bool,
    /// Optional tables of one group: at least one must be provided.
    pub group: Option<&'static str>,
}

impl InputTable {
    pub(crate) const fn required(name: &'static str) -> InputTable {
        InputTable {
            name,
            optional: false,
            group: None,
        }
    }
    pub(crate) const fn optional(name: &'static str) -> InputTable {
        InputTable {
            name,
            optional: true,
            group: None,
        }
    }
    /// Optional, but the stage needs at least one table of `group`.
    pub(crate) const fn one_of(name: &'static str, group: &'static str) -> InputTable {
        InputTable {
            name,
            optional: true,
            group: Some(group),
        }
    }
}

/// Run one shard `index` of `count` (0-based): the chunks `k` with
/// `k % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub(crate) fn owns(&self, chunk: usize) -> bool {
        chunk % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `I/N` with `0 <= I < N`.
    fn from_str(s: &str) -> std::result::Result<Shard, String> {
        let bad = || format!("'{s}': expected I/N with 0 <= I < N, e.g. 3/16");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}
