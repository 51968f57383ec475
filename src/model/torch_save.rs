//! A writer for `torch.save`'s zip format, so that weights we train load
//! with plain `torch.load` (weights_only included) and `load_state_dict`.
//!
//! The pickle uses only what a state dict needs: OrderedDict, dict, str,
//! int, float, bool and tensors rebuilt by `torch._utils._rebuild_tensor_v2`
//! from one storage per tensor (`archive/data/<n>`, 64-byte aligned, as
//! PyTorch writes them).

use std::io::Write;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use zip::write::SimpleFileOptions;

/// A value in the pickled object tree.
pub(crate) enum Obj<'a> {
    /// `collections.OrderedDict` (what `state_dict()` returns).
    OrderedDict(Vec<(String, Obj<'a>)>),
    Tensor(&'a Tensor),
}

struct Pickler<'a> {
    out: Vec<u8>,
    storages: Vec<(&'a Tensor, &'static str)>,
}

fn storage_name(kind: Kind) -> Result<&'static str, String> {
    Ok(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        k => return Err(format!("cannot save tensors of kind {k:?}")),
    })
}

impl<'a> Pickler<'a> {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.out.extend_from_slice(&[0x8a, 8]);
            self.out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn int_tuple(&mut self, v: &[i64]) {
        self.out.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.out.push(b't');
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R");
    }

    fn items(&mut self, items: &[(String, Obj<'a>)]) -> Result<(), String> {
        // SETITEMS in batches, as pickle does.
        for batch in items.chunks(1000) {
            self.out.push(b'(');
            for (k, v) in batch {
                self.str(k);
                self.obj(v)?;
            }
            self.out.push(b'u');
        }
        Ok(())
    }

    fn obj(&mut self, o: &Obj<'a>) -> Result<(), String> {
        match o {
            Obj::OrderedDict(items) => {
                self.empty_ordered_dict();
                self.items(items)?;
            }
            Obj::Tensor(t) => self.tensor(t)?,
        }
        Ok(())
    }

    fn tensor(&mut self, t: &'a Tensor) -> Result<(), String> {
        let name = storage_name(t.kind())?;
        let key = self.storages.len();
        self.storages.push((t, name));
        let size = t.size();
        // Contiguous strides: the storage is written contiguously.
        let mut stride = vec![1i64; size.len()];
        for i in (0..size.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * size[i + 1].max(1);
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        self.out.push(b'(');
        self.str("storage");
        self.global("torch", name);
        self.str(&key.to_string());
        self.str("cpu");
        self.int(t.numel() as i64);
        self.out.push(b't');
        self.out.push(b'Q');
        self.int(0);
        self.int_tuple(&size);
        self.int_tuple(&stride);
        self.out.push(0x89);
        self.empty_ordered_dict();
        self.out.push(b't');
        self.out.push(b'R');
        Ok(())
    }
}

/// Writes `root` to `path` as `torch.save` would (atomically: a temporary
/// file renamed into place).
pub(crate) fn save(path: &Path, root: &Obj) -> Result<(), String> {
    let mut p = Pickler {
        out: vec![0x80, 2],
        storages: Vec::new(),
    };
    p.obj(root)?;
    p.out.push(b'.');
    let tmp = path.with_extension("pt.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    let ze = |e: zip::result::ZipError| e.to_string();
    let io = |e: std::io::Error| e.to_string();
    zip.start_file("archive/data.pkl", opts).map_err(ze)?;
    zip.write_all(&p.out).map_err(io)?;
    zip.start_file("archive/byteorder", opts).map_err(ze)?;
    zip.write_all(b"little").map_err(io)?;
    for (i, (t, _)) in p.storages.iter().enumerate() {
        let t = t.to_device(Device::Cpu).contiguous().detach();
        let n = t.numel();
        let bytes_len = n * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; bytes_len];
        if n > 0 {
            t.f_copy_data_u8(&mut buf, n).map_err(|e| e.to_string())?;
        }
        let o = opts
            .with_alignment(64)
            .large_file(bytes_len as u64 >= u32::MAX as u64);
        zip.start_file(format!("archive/data/{i}"), o).map_err(ze)?;
        zip.write_all(&buf).map_err(io)?;
    }
    zip.start_file("archive/version", opts).map_err(ze)?;
    zip.write_all(b"3\n").map_err(io)?;
    let mut w = zip.finish().map_err(ze)?;
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes named tensors as a state dict (an OrderedDict, in the given order).
pub fn save_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), String> {
    let items = tensors
        .iter()
        .map(|(k, t)| (k.clone(), Obj::Tensor(t)))
        .collect();
    save(path, &Obj::OrderedDict(items))
}
