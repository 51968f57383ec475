//! Reads `torch.save` archives (a zip with `<name>/data.pkl` and one raw
//! storage per tensor under `<name>/data/`) holding a state dict, including
//! the `collections.OrderedDict` that `module.state_dict()` returns, which
//! libtorch's own unpickler rejects. A small pickle machine covers the
//! opcodes torch.save emits for dicts of tensors.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use tch::{Kind, Tensor};

/// A pickle value. Containers live in the machine's arena and are held by
/// index, so a memo reference shares its container as Python's unpickler
/// does: a few hundred bytes that reuse one list at 40 levels cost 40
/// nodes, not 2^40 copies, and dropping any nesting is flat.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Global(Rc<str>, Rc<str>),
    /// A persistent storage reference: (dtype name, key, numel).
    Storage(Rc<str>, Rc<str>, i64),
    Tensor(usize),
    Mark,
    /// A tuple, list, dict or object in the arena.
    Node(usize),
    /// Objects this reader does not need (hooks, metadata): kept opaque.
    Opaque,
}

#[derive(Debug)]
enum Node {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// An object (a TorchScript module): the dicts BUILD gave it, by node.
    Object(Vec<usize>),
}

/// Dicts and modules nested deeper than this are refused: a state dict
/// nests a few levels per module (TorchScript's deepest here are ~20).
const MAX_DEPTH: usize = 1000;

/// Why a file is not read as a state dict.
#[derive(Debug)]
pub enum PickleError {
    /// Not a torch.save'd state dict (perhaps TorchScript, which libtorch reads).
    NotStateDict(String),
    /// A state dict whose contents are refused: nothing else should try it.
    Refused(String),
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickleError::NotStateDict(m) | PickleError::Refused(m) => f.write_str(m),
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    nodes: Vec<Node>,
    tensors: Vec<Tensor>,
    storages: &'a dyn Fn(&str, &str, i64) -> Result<Tensor, String>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if n > self.data.len() - self.pos {
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
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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
    fn node(&mut self, n: Node) -> Value {
        self.nodes.push(n);
        Value::Node(self.nodes.len() - 1)
    }
    /// The node on top of the stack, if there is one.
    fn top_node(&mut self) -> Option<&mut Node> {
        match self.stack.last() {
            Some(Value::Node(i)) => self.nodes.get_mut(*i),
            _ => None,
        }
    }
    /// The items of a tuple or list value.
    fn items(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Node(i) => match &self.nodes[*i] {
                Node::Tuple(t) | Node::List(t) => Some(t),
                _ => None,
            },
            _ => None,
        }
    }
    fn memo_put(&mut self, i: u32) -> Result<(), String> {
        let v = self.stack.last().cloned().ok_or("memo of empty stack")?;
        self.memo.insert(i, v);
        Ok(())
    }
    fn memo_get(&mut self, i: u32) -> Result<(), String> {
        let v = self.memo.get(&i).cloned().ok_or("missing memo")?;
        self.stack.push(v);
        Ok(())
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
                b'}' => {
                    let v = self.node(Node::Dict(Vec::new()));
                    self.stack.push(v)
                }
                b']' => {
                    let v = self.node(Node::List(Vec::new()));
                    self.stack.push(v)
                }
                b')' => {
                    let v = self.node(Node::Tuple(Vec::new()));
                    self.stack.push(v)
                }
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
                    let v = self.u32()? as i32 as i64;
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
                    let s: Rc<str> = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s: Rc<str> = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    self.stack.push(Value::Global(m.into(), n.into()))
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
                    let v = self.node(Node::Tuple(items));
                    self.stack.push(v)
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.node(Node::Tuple(items));
                    self.stack.push(v)
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Some(Node::List(l)) = self.top_node() {
                        l.push(v)
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Some(Node::List(l)) = self.top_node() {
                        l.extend(items)
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Some(Node::Dict(d)) = self.top_node() {
                        d.push((k, v))
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Some(Node::Dict(d)) = self.top_node() {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let t = self
                        .items(&pid)
                        .filter(|t| t.len() >= 5)
                        .ok_or("unknown persistent id")?;
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
                    self.stack.push(Value::Storage(dtype, key, numel))
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
                    let v = self.node(Node::Object(Vec::new()));
                    self.stack.push(v)
                }
                b'b' => {
                    // BUILD: a module's attributes (TorchScript); other state is ignored.
                    let state = self.pop()?;
                    if let Value::Node(i) = state {
                        if matches!(self.nodes[i], Node::Dict(_)) {
                            if let Some(Node::Object(attrs)) = self.top_node() {
                                attrs.push(i);
                            }
                        }
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
        let Some(a) = self.items(&args) else {
            return Ok(Value::Opaque);
        };
        match (&*m, &*n) {
            ("collections", "OrderedDict") => Ok(self.node(Node::Dict(Vec::new()))),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let Some(Value::Storage(dtype, key, numel)) = a.first() else {
                    return Err("tensor without storage".into());
                };
                let ints = |v: Option<&Value>, what: &str| -> Result<Vec<i64>, String> {
                    v.and_then(|v| self.items(v))
                        .ok_or_else(|| format!("tensor without a {what}"))?
                        .iter()
                        .map(|x| match x {
                            Value::Int(i) => Ok(*i),
                            _ => Err(format!("bad {what}")),
                        })
                        .collect()
                };
                let offset = if let Some(Value::Int(o)) = a.get(1) {
                    *o
                } else {
                    0
                };
                let size = ints(a.get(2), "size")?;
                let stride = ints(a.get(3), "stride")?;
                let (dtype, key, numel) = (dtype.clone(), key.clone(), *numel);
                check_view(&key, numel, offset, &size, &stride)?;
                let storage = (self.storages)(&dtype, &key, numel)?;
                let t = storage
                    .f_as_strided(size.as_slice(), stride.as_slice(), Some(offset))
                    .and_then(|t| t.f_contiguous())
                    .map_err(|e| format!("tensor over storage {key}: {e}"))?;
                self.tensors.push(t);
                Ok(Value::Tensor(self.tensors.len() - 1))
            }
            ("torch._utils", "_rebuild_parameter") => Ok(a.first().cloned().unwrap_or(Value::None)),
            (m, _) if m.starts_with("__torch__") => Ok(self.node(Node::Object(Vec::new()))),
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

/// The largest `data.pkl` read: a state dict's pickle names its tensors
/// (a ViT-L's is ~100 KB); a compressed entry claiming more is refused.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, PickleError> {
    use PickleError::{NotStateDict, Refused};
    let file = std::fs::File::open(path).map_err(|e| NotStateDict(e.to_string()))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| NotStateDict(format!("not a zip archive: {e}")))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| NotStateDict("no data.pkl (not a torch.save archive)".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .map_err(|e| NotStateDict(e.to_string()))?
        .take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut pkl)
        .map_err(|e| NotStateDict(e.to_string()))?;
    if pkl.len() as u64 > MAX_PICKLE_BYTES {
        return Err(Refused(format!(
            "its {pkl_name} is over {} MiB: no state dict's pickle is that large",
            MAX_PICKLE_BYTES >> 20
        )));
    }
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
        nodes: Vec::new(),
        tensors: Vec::new(),
        storages: &storages,
    };
    let root = m.run().map_err(NotStateDict)?;
    let mut out = Vec::new();
    // Every node a tree visits took at least one opcode byte; more visits
    // than bytes means one dict is reached along exponentially many paths.
    let mut budget = pkl.len();
    flatten("", &root, &m, 0, &mut budget, &mut out).map_err(Refused)?;
    if out.is_empty() {
        return Err(NotStateDict("data.pkl holds no named tensors".into()));
    }
    Ok(out)
}

/// Dotted names for the tensors under dicts (state dicts) and module
/// objects (TorchScript: parameters and buffers alike), to [`MAX_DEPTH`]
/// levels and within `budget` visits.
fn flatten(
    prefix: &str,
    v: &Value,
    m: &Machine,
    depth: usize,
    budget: &mut usize,
    out: &mut Vec<(String, Tensor)>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "its dicts nest more than {MAX_DEPTH} levels deep: not a state dict"
        ));
    }
    *budget = budget.checked_sub(1).ok_or(
        "it reaches its dicts along more paths than its pickle has bytes (shared references nested many levels deep): not a state dict",
    )?;
    match v {
        Value::Tensor(i) => out.push((prefix.to_string(), m.tensors[*i].shallow_clone())),
        Value::Node(i) => {
            let dicts: Vec<&[(Value, Value)]> = match &m.nodes[*i] {
                Node::Dict(items) => vec![items.as_slice()],
                Node::Object(ds) => ds
                    .iter()
                    .filter_map(|&d| match &m.nodes[d] {
                        Node::Dict(items) => Some(items.as_slice()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            for (k, v) in dicts.into_iter().flatten() {
                if let Value::Str(k) = k {
                    let name = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&name, v, m, depth + 1, budget, out)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}
