//! A process group of libtorch's own distributed backend (`c10d.cpp`):
//! TCPStore rendezvous and ProcessGroupGloo, the pieces PyTorch's DDP runs
//! on, with the collectives data-parallel training needs.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use tch::Tensor;

#[repr(C)]
struct GcPg {
    _private: [u8; 0],
}

extern "C" {
    fn gc_init(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut GcPg;
    fn gc_free(g: *mut GcPg);
    fn gc_has_nccl() -> c_int;
    fn gc_all_reduce_sum(g: *mut GcPg, t: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
    fn gc_all_gather_cat(
        g: *mut GcPg,
        t: *const c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn gc_broadcast(
        g: *mut GcPg,
        t: *mut c_void,
        root: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn gc_barrier(g: *mut GcPg, err: *mut c_char, errlen: c_int) -> c_int;
    fn gc_store_set(
        g: *mut GcPg,
        key: *const c_char,
        value: *const c_char,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn gc_store_try_get(
        g: *mut GcPg,
        key: *const c_char,
        out: *mut c_char,
        outlen: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
}

/// What a collective or the rendezvous reports when it fails.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rank {rank} of {world} could not join the process group at {addr}:{port} within {timeout:?}: {message}. Check MASTER_ADDR and MASTER_PORT, and that every rank was started")]
    Rendezvous {
        addr: String,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
        message: String,
    },
    #[error("{op} failed on rank {rank}: {message} (another rank died or timed out?)")]
    Collective {
        op: &'static str,
        rank: usize,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("rank {rank} of {world} {status}; the other ranks were stopped. Rerun them all together: train resumes from its last checkpoint")]
    RankExited {
        rank: usize,
        world: usize,
        status: String,
    },
    #[error("{var}={value}: {message}")]
    Environment {
        var: &'static str,
        value: String,
        message: String,
    },
}

/// The backends this build runs collectives on: Gloo always; NCCL for
/// CUDA tensors where built against the CUDA libtorch and a GPU is there.
pub fn backends() -> &'static str {
    // SAFETY: a constant query.
    let nccl = unsafe { gc_has_nccl() } == 1;
    match (nccl, tch::Cuda::is_available()) {
        (true, true) => "gloo (CPU tensors) + nccl (CUDA tensors)",
        (true, false) => "gloo (no GPU: nccl built, unused)",
        (false, _) => "gloo (built without nccl)",
    }
}

/// One rank's membership of a Gloo process group.
pub struct ProcessGroup {
    ptr: *mut GcPg,
    pub rank: usize,
    pub world: usize,
}

// The group is used from one thread at a time (&mut for collectives).
unsafe impl Send for ProcessGroup {}

const ERR: usize = 2048;

/// The C++ exception's message: its first line (c10 appends where it was
/// raised and a stack trace).
fn message(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf)
        .map(|c| c.to_string_lossy().lines().next().unwrap_or("").to_string())
        .unwrap_or_default()
}

impl ProcessGroup {
    /// Joins the group: rank 0 serves the TCPStore at `addr:port`, every
    /// rank waits up to `timeout` for all `world` of them.
    pub fn init(
        addr: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup, DistError> {
        if world == 0 || rank >= world {
            return Err(DistError::Usage(format!(
                "rank {rank} is not one of a world of {world}"
            )));
        }
        let c_addr = CString::new(addr)
            .map_err(|_| DistError::Usage("an address holds a NUL byte".into()))?;
        let mut err = vec![0u8; ERR];
        let ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
        // SAFETY: the strings and buffer outlive the call; the C side
        // copies what it keeps.
        let ptr = unsafe {
            gc_init(
                c_addr.as_ptr(),
                port as c_int,
                rank as c_int,
                world as c_int,
                ms,
                err.as_mut_ptr() as *mut c_char,
                ERR as c_int,
            )
        };
        if ptr.is_null() {
            return Err(DistError::Rendezvous {
                addr: addr.to_string(),
                port,
                rank,
                world,
                timeout,
                message: message(&err),
            });
        }
        Ok(ProcessGroup { ptr, rank, world })
    }

    fn check(&self, op: &'static str, rc: c_int, err: &[u8]) -> Result<(), DistError> {
        match rc {
            0 => Ok(()),
            _ => Err(DistError::Collective {
                op,
                rank: self.rank,
                message: message(err),
            }),
        }
    }

    /// Sums `t` over the ranks, in place (`t` must be contiguous).
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR];
        // SAFETY: `t` is a live tensor for the call's duration.
        let rc = unsafe {
            gc_all_reduce_sum(
                self.ptr,
                t.as_mut_ptr() as *mut c_void,
                err.as_mut_ptr() as *mut c_char,
                ERR as c_int,
            )
        };
        self.check("all_reduce", rc, &err)
    }

    /// Every rank's `t`, concatenated along dim 0 in rank order.
    pub fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor, DistError> {
        let mut err = vec![0u8; ERR];
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: `t` is live; on success the C side hands us a new tensor.
        let rc = unsafe {
            gc_all_gather_cat(
                self.ptr,
                t.as_ptr() as *const c_void,
                &mut out,
                err.as_mut_ptr() as *mut c_char,
                ERR as c_int,
            )
        };
        self.check("all_gather", rc, &err)?;
        // SAFETY: `out` was allocated by the C side for us to own.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// Every rank's `x` ([n, ...], the same n on every rank) concatenated
    /// in rank order, this rank's rows still attached to the autograd
    /// graph and the others constants. Loss on the result, backward, then
    /// [`all_reduce_sum`](Self::all_reduce_sum) of every parameter's
    /// gradient gives the single-process gradient of the global batch: what
    /// the original's GatherLayer (backward: the summed gradient of this
    /// rank's slice) and DDP's averaging give together.
    pub fn all_gather_with_grad(&mut self, x: &Tensor) -> Result<Tensor, DistError> {
        let all = self.all_gather_cat(&x.detach().contiguous())?;
        let n = x.size().first().copied().unwrap_or(0);
        let (r, w) = (self.rank as i64, self.world as i64);
        if all.size().first().copied() != Some(n * w) {
            return Err(DistError::Usage(format!(
                "all_gather_with_grad needs the same number of rows on every rank (this one has {n})"
            )));
        }
        Ok(Tensor::cat(
            &[
                all.narrow(0, 0, r * n),
                x.shallow_clone(),
                all.narrow(0, (r + 1) * n, (w - r - 1) * n),
            ],
            0,
        ))
    }

    /// `root`'s `t` on every rank, in place.
    pub fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR];
        // SAFETY: as all_reduce_sum.
        let rc = unsafe {
            gc_broadcast(
                self.ptr,
                t.as_mut_ptr() as *mut c_void,
                root as c_int,
                err.as_mut_ptr() as *mut c_char,
                ERR as c_int,
            )
        };
        self.check("broadcast", rc, &err)
    }

    /// Sets `key` in the rendezvous store (served by rank 0).
    pub fn store_set(&mut self, key: &str, value: &str) -> Result<(), DistError> {
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| DistError::Usage("a store key holds a NUL byte".into()))
        };
        let (k, v) = (cstr(key)?, cstr(value)?);
        let mut err = vec![0u8; ERR];
        // SAFETY: the strings and buffer outlive the call.
        let rc = unsafe {
            gc_store_set(
                self.ptr,
                k.as_ptr(),
                v.as_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERR as c_int,
            )
        };
        self.check("store set", rc, &err)
    }

    /// `key`'s value when it is set. Fails when the store is gone (rank 0
    /// exited), which is how the other ranks learn that it died.
    pub fn store_try_get(&mut self, key: &str) -> Result<Option<String>, DistError> {
        let k = CString::new(key)
            .map_err(|_| DistError::Usage("a store key holds a NUL byte".into()))?;
        let (mut out, mut err) = (vec![0u8; ERR], vec![0u8; ERR]);
        // SAFETY: the key and buffers outlive the call.
        let rc = unsafe {
            gc_store_try_get(
                self.ptr,
                k.as_ptr(),
                out.as_mut_ptr() as *mut c_char,
                ERR as c_int,
                err.as_mut_ptr() as *mut c_char,
                ERR as c_int,
            )
        };
        match rc {
            1 => Ok(Some(
                CStr::from_bytes_until_nul(&out)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )),
            0 => Ok(None),
            _ => Err(DistError::Collective {
                op: "store get",
                rank: self.rank,
                message: message(&err),
            }),
        }
    }

    pub fn barrier(&mut self) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR];
        // SAFETY: only the group pointer and our buffer are passed.
        let rc = unsafe { gc_barrier(self.ptr, err.as_mut_ptr() as *mut c_char, ERR as c_int) };
        self.check("barrier", rc, &err)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from gc_init and is freed once.
        unsafe { gc_free(self.ptr) }
    }
}
