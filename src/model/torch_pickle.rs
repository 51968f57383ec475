//! Reads `torch.save` archives (a zip with `<name>/data.pkl` and one raw
//! storage per tensor under `<name>/data/`) holding a state dict, including
//! the `collections.OrderedDict` that `module.state_dict()` returns, which
//! libtorch's own unpickler rejects. A small pickle machine covers the
//! opcodes torch.save emits for dicts of tensors.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// A persistent storage reference: (dtype name, key, numel).
    Storage(String, String, i64),
    Tensor(usize),
    Mark,
    /// An object (a TorchScript module) with the attributes BUILD gave it.
    Object(Vec<(Value, Value)>),
    /// Objects this reader does not need (hooks, metadata): kept opaque.
    Opaque,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    tensors: Vec<Tensor>,
    storages: &'a dyn Fn(&str, &str, i64) -> Result<Tensor, String>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.pos + n > self.data.len() {
            return Err("truncated pickle".into());
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle: no mark")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn line(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.take(8)?;
                } // FRAME
                b'.' => return self.pop(), // STOP
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let b = self.take(2)?;
                    let v = u16::from_le_bytes([b[0], b[1]]) as i64;
                    self.stack.push(Value::Int(v))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap()) as i64;
                    self.stack.push(Value::Int(v))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let mut buf = [0u8; 8];
                    let fill = if b.last().is_some_and(|x| x & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    buf.iter_mut().for_each(|x| *x = fill);
                    buf[..n.min(8)].copy_from_slice(&b[..n.min(8)]);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.stack.last().cloned().ok_or("memo of empty stack")?;
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.stack.last().cloned().ok_or("memo of empty stack")?;
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.stack.last().cloned().ok_or("memo of empty stack")?;
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo.get(&i).cloned().ok_or("missing memo")?;
                    self.stack.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo.get(&i).cloned().ok_or("missing memo")?;
                    self.stack.push(v)
                }
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    self.stack.push(Value::Global(m, n))
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    match (m, n) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]))
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]))
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]))
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Some(Value::List(l)) = self.stack.last_mut() {
                        l.push(v)
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Some(Value::List(l)) = self.stack.last_mut() {
                        l.extend(items)
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Some(Value::Dict(d)) = self.stack.last_mut() {
                        d.push((k, v))
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Some(Value::Dict(d)) = self.stack.last_mut() {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = match pid {
                        Value::Tuple(t) if t.len() >= 5 => {
                            let dtype = match &t[1] {
                                Value::Global(_, n) => n.clone(),
                                _ => return Err("storage without a type".into()),
                            };
                            let key = match &t[2] {
                                Value::Str(s) => s.clone(),
                                _ => return Err("storage without a key".into()),
                            };
                            let numel = match &t[4] {
                                Value::Int(n) => *n,
                                _ => return Err("storage without a size".into()),
                            };
                            Value::Storage(dtype, key, numel)
                        }
                        _ => return Err("unknown persistent id".into()),
                    };
                    self.stack.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    let _args = self.pop()?;
                    let _cls = self.pop()?;
                    self.stack.push(Value::Object(Vec::new()))
                }
                b'b' => {
                    // BUILD: a module's attributes (TorchScript); other state is ignored.
                    let state = self.pop()?;
                    if let (Some(Value::Object(attrs)), Value::Dict(items)) =
                        (self.stack.last_mut(), state)
                    {
                        attrs.extend(items);
                    }
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }

    fn reduce(&mut self, f: Value, args: Value) -> Result<Value, String> {
        let Value::Global(m, n) = f else {
            return Ok(Value::Opaque);
        };
        let Value::Tuple(a) = args else {
            return Ok(Value::Opaque);
        };
        match (m.as_str(), n.as_str()) {
            ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let Some(Value::Storage(dtype, key, numel)) = a.first() else {
                    return Err("tensor without storage".into());
                };
                let ints = |v: &Value| -> Result<Vec<i64>, String> {
                    match v {
                        Value::Tuple(t) | Value::List(t) => t
                            .iter()
                            .map(|x| {
                                if let Value::Int(i) = x {
                                    Ok(*i)
                                } else {
                                    Err("bad size".to_string())
                                }
                            })
                            .collect(),
                        _ => Err("bad size".into()),
                    }
                };
                let offset = if let Some(Value::Int(o)) = a.get(1) {
                    *o
                } else {
                    0
                };
                let size = ints(a.get(2).ok_or("no size")?)?;
                let stride = ints(a.get(3).ok_or("no stride")?)?;
                check_view(key, *numel, offset, &size, &stride)?;
                let storage = (self.storages)(dtype, key, *numel)?;
                let t = storage
                    .f_as_strided(size.as_slice(), stride.as_slice(), Some(offset))
                    .and_then(|t| t.f_contiguous())
                    .map_err(|e| format!("tensor over storage {key}: {e}"))?;
                self.tensors.push(t);
                Ok(Value::Tensor(self.tensors.len() - 1))
            }
            ("torch._utils", "_rebuild_parameter") => {
                Ok(a.into_iter().next().unwrap_or(Value::None))
            }
            (m, _) if m.starts_with("__torch__") => Ok(Value::Object(Vec::new())),
            _ => Ok(Value::Opaque),
        }
    }
}

fn kind_of(storage: &str) -> Option<(Kind, usize)> {
    Some(match storage {
        "FloatStorage" => (Kind::Float, 4),
        "DoubleStorage" => (Kind::Double, 8),
        "HalfStorage" => (Kind::Half, 2),
        "BFloat16Storage" => (Kind::BFloat16, 2),
        "LongStorage" => (Kind::Int64, 8),
        "IntStorage" => (Kind::Int, 4),
        "ShortStorage" => (Kind::Int16, 2),
        "CharStorage" => (Kind::Int8, 1),
        "ByteStorage" => (Kind::Uint8, 1),
        "BoolStorage" => (Kind::Bool, 1),
        _ => return None,
    })
}

/// The named tensors of a torch.save'd state dict.
/// Checks a tensor's view (size, stride, offset) against its storage's
/// element count before anything is allocated: every element it reads must
/// lie inside the storage, and it may not hold more elements than the
/// storage (overlapping views are not what a state dict saves; a few
/// header bytes could otherwise claim gigabytes).
fn check_view(
    key: &str,
    numel: i64,
    offset: i64,
    size: &[i64],
    stride: &[i64],
) -> Result<(), String> {
    let bad = |why: String| Err(format!("tensor over storage {key}: {why}"));
    if numel < 0 || offset < 0 || size.iter().chain(stride).any(|&x| x < 0) {
        return bad(format!(
            "negative size, stride or offset (storage {numel}, offset {offset}, size {size:?}, stride {stride:?})"
        ));
    }
    if size.len() != stride.len() {
        return bad(format!("{} sizes but {} strides", size.len(), stride.len()));
    }
    let overflow = || format!("size {size:?} overflows");
    let elements = size
        .iter()
        .try_fold(1i64, |n, &s| n.checked_mul(s))
        .ok_or_else(overflow)?;
    if elements == 0 {
        return Ok(());
    }
    let last = size
        .iter()
        .zip(stride)
        .try_fold(offset, |acc, (&s, &st)| {
            acc.checked_add((s - 1).checked_mul(st)?)
        })
        .ok_or_else(overflow)?;
    if last >= numel {
        return bad(format!(
            "size {size:?}, stride {stride:?} and offset {offset} reach element {last} of a storage of {numel}"
        ));
    }
    if elements > numel {
        return bad(format!(
            "{elements} elements over a storage of {numel}: a view larger than its storage"
        ));
    }
    Ok(())
}

pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a zip archive: {e}"))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or("no data.pkl (not a torch.save archive)")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut pkl)
        .map_err(|e| e.to_string())?;
    let zip = std::cell::RefCell::new(zip);
    let storages = |dtype: &str, key: &str, numel: i64| -> Result<Tensor, String> {
        let (kind, width) =
            kind_of(dtype).ok_or_else(|| format!("unsupported storage type {dtype}"))?;
        let need = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(width))
            .ok_or_else(|| format!("storage {key} claims {numel} elements"))?;
        let mut zip = zip.borrow_mut();
        let entry = zip
            .by_name(&format!("{prefix}data/{key}"))
            .map_err(|e| format!("storage {key}: {e}"))?;
        // What the archive can really hold: torch.save stores entries
        // uncompressed; DEFLATE expands at most 1032:1.
        let ratio = match entry.compression() {
            zip::CompressionMethod::Stored => 1,
            _ => 1032,
        };
        if need as u128 > entry.compressed_size() as u128 * ratio {
            return Err(format!(
                "storage {key} claims {numel} elements ({need} bytes), more than its {} bytes in the file can hold",
                entry.compressed_size()
            ));
        }
        if (entry.size() as u128) < need as u128 {
            return Err(format!(
                "storage {key} claims {numel} elements ({need} bytes) but holds {} bytes",
                entry.size()
            ));
        }
        // Never more than the storage needs, whatever the entry claims.
        let mut bytes = Vec::new();
        entry
            .take(need as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        if bytes.len() < need {
            return Err(format!("storage {key} is truncated"));
        }
        Tensor::f_from_data_size(&bytes, &[numel], kind).map_err(|e| e.to_string())
    };
    let mut m = Machine {
        data: &pkl,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        tensors: Vec::new(),
        storages: &storages,
    };
    let root = m.run()?;
    let mut out = Vec::new();
    flatten("", &root, &m.tensors, &mut out);
    if out.is_empty() {
        return Err("data.pkl holds no named tensors".into());
    }
    Ok(out)
}

/// Dotted names for the tensors under dicts (state dicts) and module
/// objects (TorchScript: parameters and buffers alike).
fn flatten(prefix: &str, v: &Value, tensors: &[Tensor], out: &mut Vec<(String, Tensor)>) {
    match v {
        Value::Tensor(i) => out.push((prefix.to_string(), tensors[*i].shallow_clone())),
        Value::Dict(items) | Value::Object(items) => {
            for (k, v) in items {
                if let Value::Str(k) = k {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&name, v, tensors, out);
                }
            }
        }
        _ => {}
    }
}
