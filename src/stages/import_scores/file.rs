//! A user's file of scores or embeddings, read into named columns
//! whatever its format: Parquet (any string, integer and numeric list
//! types), CSV (a header; lists as `[0.1, 0.2]` as pandas writes them, or
//! separated by spaces or semicolons) and NumPy `.npz` (`np.savez`: 1-D
//! string and integer arrays, 2-D float arrays).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type};

use crate::error::{Error, Result};

pub(crate) enum Col {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Values(Vec<Option<Vec<f32>>>),
}

/// A file's columns by name, each `n` long.
pub(crate) struct UserTable {
    pub path: PathBuf,
    pub n: usize,
    cols: BTreeMap<String, Col>,
}

const ADVICE: &str = "give a Parquet, CSV or .npz file with the columns the import-scores section of the README lists";

fn bad(path: &Path, message: String) -> Error {
    Error::BadInputFile {
        what: "imported scores file",
        path: path.to_path_buf(),
        message,
        advice: ADVICE,
    }
}

impl UserTable {
    pub(crate) fn read(path: &Path) -> Result<UserTable> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let (n, cols) = match ext.as_str() {
            "parquet" | "pq" => read_parquet(path)?,
            "csv" => read_csv(path)?,
            "npz" => read_npz(path)?,
            _ => {
                return Err(bad(
                    path,
                    format!("'.{ext}' is not a format this reads (.parquet, .csv, .npz)"),
                ))
            }
        };
        Ok(UserTable {
            path: path.to_path_buf(),
            n,
            cols,
        })
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.cols.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&Col> {
        self.cols.get(name).ok_or_else(|| {
            bad(
                &self.path,
                format!(
                    "no column '{name}'; it has: {}",
                    self.cols.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    pub(crate) fn text(&self, name: &str) -> Result<Vec<Option<String>>> {
        match self.get(name)? {
            Col::Text(v) => Ok(v.clone()),
            Col::Int(v) => Ok(v.iter().map(|x| x.map(|x| x.to_string())).collect()),
            Col::Values(_) => Err(bad(
                &self.path,
                format!("column '{name}' holds lists, not text"),
            )),
        }
    }

    /// Integers; a text column (CSV) is parsed, a value that is no
    /// integer becomes None (a reject of its row).
    pub(crate) fn ints(&self, name: &str) -> Result<Vec<Option<i64>>> {
        match self.get(name)? {
            Col::Int(v) => Ok(v.clone()),
            Col::Text(v) => Ok(v
                .iter()
                .map(|x| x.as_deref().and_then(|s| s.trim().parse().ok()))
                .collect()),
            Col::Values(_) => Err(bad(
                &self.path,
                format!("column '{name}' holds lists, not integers"),
            )),
        }
    }

    /// Lists of numbers; a text column (CSV) is parsed, a list with a
    /// value that is no number becomes None.
    pub(crate) fn values(&self, name: &str) -> Result<Vec<Option<Vec<f32>>>> {
        match self.get(name)? {
            Col::Values(v) => Ok(v.clone()),
            Col::Text(v) => Ok(v
                .iter()
                .map(|x| x.as_deref().and_then(parse_list))
                .collect()),
            Col::Int(_) => Err(bad(
                &self.path,
                format!("column '{name}' holds single integers, not lists"),
            )),
        }
    }
}

/// `[0.1, 0.2]`, `0.1 0.2` or `0.1;0.2`; `nan` and `inf` parse (and are
/// refused later as not finite).
fn parse_list(s: &str) -> Option<Vec<f32>> {
    let s = s.trim();
    let s = s.strip_prefix('[').unwrap_or(s);
    let s = s.strip_suffix(']').unwrap_or(s);
    s.split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<f32>().ok())
        .collect()
}

fn read_parquet(path: &Path) -> Result<(usize, BTreeMap<String, Col>)> {
    let file = std::fs::File::open(path).map_err(Error::io("cannot open", path))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| bad(path, format!("not a Parquet file: {e}")))?;
    let mut cols: BTreeMap<String, Col> = BTreeMap::new();
    let mut n = 0;
    for b in reader {
        let b = b.map_err(|e| bad(path, format!("unreadable: {e}")))?;
        for (f, a) in b.schema().fields().iter().zip(b.columns()) {
            if let Some(part) = column(a) {
                match (cols.get_mut(f.name()), part) {
                    (None, part) => {
                        cols.insert(f.name().clone(), part);
                    }
                    (Some(Col::Text(v)), Col::Text(w)) => v.extend(w),
                    (Some(Col::Int(v)), Col::Int(w)) => v.extend(w),
                    (Some(Col::Values(v)), Col::Values(w)) => v.extend(w),
                    _ => return Err(bad(path, format!("column '{}' changes type", f.name()))),
                }
            }
        }
        n += b.num_rows();
    }
    Ok((n, cols))
}

/// An Arrow column as text, integers or float lists; other types (a
/// float column, a struct) are not columns this reads.
fn column(a: &ArrayRef) -> Option<Col> {
    use arrow::compute::cast;
    match a.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..) => {
            let s = cast(a, &DataType::Utf8).ok()?;
            Some(Col::Text(
                s.as_string::<i32>()
                    .iter()
                    .map(|x| x.map(str::to_string))
                    .collect(),
            ))
        }
        t if t.is_integer() => {
            let s = cast(a, &DataType::Int64).ok()?;
            Some(Col::Int(s.as_primitive::<Int64Type>().iter().collect()))
        }
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::ListView(_) => {
            let to = DataType::List(Arc::new(Field::new("item", DataType::Float32, true)));
            let s = cast(a, &to).ok()?;
            let l = s.as_list::<i32>();
            Some(Col::Values(
                (0..l.len())
                    .map(|i| {
                        l.is_valid(i).then(|| {
                            let v = l.value(i);
                            let v = v.as_primitive::<Float32Type>();
                            // A missing value is NaN: refused as not finite.
                            v.iter().map(|x| x.unwrap_or(f32::NAN)).collect()
                        })
                    })
                    .collect(),
            ))
        }
        _ => None,
    }
}

fn read_csv(path: &Path) -> Result<(usize, BTreeMap<String, Col>)> {
    let file = std::fs::File::open(path).map_err(Error::io("cannot open", path))?;
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&file), &mut first)
        .map_err(Error::io("cannot read", path))?;
    let names: Vec<String> = first
        .trim_end_matches(['\r', '\n'])
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect();
    let schema = Arc::new(arrow::datatypes::Schema::new(
        names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let file = std::fs::File::open(path).map_err(Error::io("cannot open", path))?;
    let reader = arrow::csv::ReaderBuilder::new(schema)
        .with_header(true)
        .build(file)
        .map_err(|e| bad(path, format!("not CSV: {e}")))?;
    let mut cols: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let mut n = 0;
    for b in reader {
        let b = b.map_err(|e| bad(path, format!("not CSV: {e}")))?;
        for (name, a) in names.iter().zip(b.columns()) {
            cols.entry(name.clone())
                .or_default()
                .extend(a.as_string::<i32>().iter().map(|x| x.map(str::to_string)));
        }
        n += b.num_rows();
    }
    Ok((
        n,
        cols.into_iter().map(|(k, v)| (k, Col::Text(v))).collect(),
    ))
}

/// `np.savez`'s archive: one `.npy` per array, stored.
fn read_npz(path: &Path) -> Result<(usize, BTreeMap<String, Col>)> {
    let file = std::fs::File::open(path).map_err(Error::io("cannot open", path))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| bad(path, format!("not an .npz archive: {e}")))?;
    let mut cols = BTreeMap::new();
    let mut n: Option<usize> = None;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| {
            bad(path, format!("cannot read an array (np.savez_compressed's archives are not read; use np.savez): {e}"))
        })?;
        let name = entry
            .name()
            .map_err(|e| bad(path, format!("an array has no readable name: {e}")))?
            .trim_end_matches(".npy")
            .to_string();
        // Never more than the member can hold: np.savez stores its arrays;
        // DEFLATE expands at most 1032:1.
        let can_hold = match entry.compression() {
            zip::CompressionMethod::Stored => entry.compressed_size(),
            _ => entry.compressed_size().saturating_mul(1032),
        };
        let limit = entry.size().min(can_hold);
        let mut bytes = Vec::new();
        (&mut entry)
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(Error::io("cannot read", path))?;
        let (rows, col) = npy(&bytes).map_err(|m| bad(path, format!("array '{name}': {m}")))?;
        if n.is_some_and(|n| n != rows) {
            return Err(bad(
                path,
                format!("array '{name}' has {rows} rows, another {}", n.unwrap_or(0)),
            ));
        }
        n = Some(rows);
        cols.insert(name, col);
    }
    Ok((n.unwrap_or(0), cols))
}

/// One `.npy` (format 1.0 to 3.0, little-endian, C order): its rows and
/// its column.
fn npy(b: &[u8]) -> Result<(usize, Col), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unknown .npy version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|_| "header is not text")?;
    let field = |k: &str| -> Option<&str> {
        let at = header.find(&format!("'{k}':"))? + k.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = field("descr").ok_or("no descr")?;
    let descr = descr.strip_prefix('\'').ok_or("bad descr")?;
    let descr = &descr[..descr.find('\'').ok_or("bad descr")?];
    // A dtype is a byte order, a kind and an item size, all ASCII ('<f4').
    if descr.len() < 3 || !descr.is_ascii() {
        return Err(format!("dtype '{descr}' is not one this reads"));
    }
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran order: save np.ascontiguousarray(a)".into());
    }
    let shape = field("shape").ok_or("no shape")?;
    let shape = shape.strip_prefix('(').ok_or("bad shape")?;
    let shape = &shape[..shape.find(')').ok_or("bad shape")?];
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| "bad shape"))
        .collect::<Result<_, _>>()?;
    let data = &b[start + hlen..];
    let rows = *shape.first().ok_or("a 0-d array")?;
    let (kind, size) = descr.split_at(2);
    let size: usize = size
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("dtype {descr} is not one this reads"))?;
    // Every allocation below is bounded by the bytes the member holds: the
    // header's shape is checked against them first, without overflow.
    let item = if kind.ends_with('U') {
        size.checked_mul(4)
    } else {
        Some(size)
    };
    let width = shape[1..].iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let need = item
        .zip(width)
        .and_then(|(item, width)| rows.checked_mul(width)?.checked_mul(item));
    let Some(need) = need.filter(|&n| n <= data.len()) else {
        return Err(format!(
            "its header claims shape {shape:?} of {descr}, more than the {} bytes of data it holds",
            data.len()
        ));
    };
    let width = width.unwrap_or(0);
    if need == 0 && rows > 0 {
        return Err(format!(
            "shape {shape:?}: {rows} rows of nothing (a zero-width array)"
        ));
    }
    let num = |i: usize| -> Option<f64> {
        let c = &data[i * size..(i + 1) * size];
        Some(match (kind, size) {
            ("<f", 4) => f32::from_le_bytes(c.try_into().ok()?) as f64,
            ("<f", 8) => f64::from_le_bytes(c.try_into().ok()?),
            ("<i", 4) => i32::from_le_bytes(c.try_into().ok()?) as f64,
            ("<i", 8) => i64::from_le_bytes(c.try_into().ok()?) as f64,
            ("<u", 4) => u32::from_le_bytes(c.try_into().ok()?) as f64,
            ("<u", 8) => u64::from_le_bytes(c.try_into().ok()?) as f64,
            _ => return None,
        })
    };
    match (kind, shape.len()) {
        ("<U", 1) => Ok((
            rows,
            Col::Text(
                (0..rows)
                    .map(|r| {
                        let s: String = data[r * 4 * size..(r + 1) * 4 * size]
                            .chunks(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .take_while(|&u| u != 0)
                            .filter_map(char::from_u32)
                            .collect();
                        Some(s)
                    })
                    .collect(),
            ),
        )),
        ("|S", 1) => Ok((
            rows,
            Col::Text(
                (0..rows)
                    .map(|r| {
                        let c = &data[r * size..(r + 1) * size];
                        let c = &c[..c.iter().position(|&x| x == 0).unwrap_or(c.len())];
                        String::from_utf8(c.to_vec()).ok()
                    })
                    .collect(),
            ),
        )),
        ("<i" | "<u", 1) => Ok((
            rows,
            Col::Int((0..rows).map(|r| num(r).map(|x| x as i64)).collect()),
        )),
        ("<f", 2) => Ok((
            rows,
            Col::Values(
                (0..rows)
                    .map(|r| {
                        let mut v: Option<Vec<f32>> = (0..width)
                            .map(|j| num(r * width + j).map(|x| x as f32))
                            .collect();
                        // Rows of shorter templates are padded with NaN.
                        if let Some(v) = &mut v {
                            while v.last().is_some_and(|x| x.is_nan()) {
                                v.pop();
                            }
                        }
                        v
                    })
                    .collect(),
            ),
        )),
        ("|O", _) => Err("holds Python objects: save strings with .astype(str)".into()),
        _ => Err(format!(
            "dtype {descr} with {} dimension(s): strings and integers are 1-D, similarities or embeddings a 2-D float array",
            shape.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::npy;

    /// A `.npy` 1.0 member with this header dict and `data` after it.
    fn member(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h);
        b.extend(data);
        b
    }

    fn err(header: &str, data: &[u8]) -> String {
        match npy(&member(header, data)) {
            Ok((rows, _)) => panic!("{header}: read {rows} rows"),
            Err(e) => e,
        }
    }

    #[test]
    fn headers_that_lie_are_refused_before_allocating() {
        let sims = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert_eq!(npy(&member(sims, &data)).unwrap().0, 2);
        // A shape of 10^12 rows over 24 bytes; one that overflows usize.
        let e = err(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 15), }",
            &data,
        );
        assert!(e.contains("more than the 24 bytes"), "{e}");
        let e = err(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 18446744073709551615), }",
            &data,
        );
        assert!(e.contains("claims shape"), "{e}");
        // Item size 0 (a billion empty strings), and rows of no width.
        let e = err(
            "{'descr': '<U0', 'fortran_order': False, 'shape': (1000000000,), }",
            &[],
        );
        assert!(e.contains("<U0"), "{e}");
        let e = err(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 0), }",
            &[],
        );
        assert!(e.contains("zero-width"), "{e}");
        // A short descr, and one with a character of several bytes.
        let e = err(
            "{'descr': '<', 'fortran_order': False, 'shape': (2,), }",
            &data,
        );
        assert!(e.contains("not one this reads"), "{e}");
        let e = err(
            "{'descr': '\u{e9}4', 'fortran_order': False, 'shape': (2,), }",
            &data,
        );
        assert!(e.contains("not one this reads"), "{e}");
        let e = err(
            "{'descr': '<f4', 'fortran_order': False, 'shape': \u{e9}(2,), }",
            &data,
        );
        assert!(e.contains("bad shape"), "{e}");
        // Strings: 4 bytes a character, bounded the same way.
        let e = err(
            "{'descr': '<U1000000', 'fortran_order': False, 'shape': (1000,), }",
            &data,
        );
        assert!(e.contains("more than the 24 bytes"), "{e}");
    }
}
