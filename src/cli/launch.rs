//! Data-parallel launch: which rank this process is (torchrun's or
//! SLURM's variables, or `--nproc`), joining libtorch's process group, and
//! spawning and watching local ranks as torchrun does.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::framework::manifest::Plan;
use crate::framework::ranks::{RankHandle, Ranks};
use crate::framework::runner::{self, RunRequest, StageOutcome};
use crate::model::dist::{DistError, ProcessGroup};

/// PyTorch's default collective timeout (`torch.distributed`'s 30 min).
pub const DEFAULT_TIMEOUT_S: u64 = 1800;

/// One rank's place, from its launcher's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlan {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub addr: String,
    pub port: u16,
    pub timeout: Duration,
    /// Which launcher's variables gave it.
    pub source: &'static str,
}

/// How `genecis run` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    Single,
    /// One rank of a run started by torchrun, srun or `--nproc`.
    Rank(RankPlan),
    /// `--nproc N`: spawn N local ranks of this command and watch them.
    Spawn {
        nproc: usize,
    },
}

impl Launch {
    /// `--nproc` first; else torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`; else, under `srun` with more than one
    /// task, `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` with the
    /// `MASTER_ADDR` / `MASTER_PORT` the batch script exports.
    pub fn resolve(
        nproc: Option<usize>,
        timeout: Duration,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Launch> {
        let usage = |m: String| Error::Usage {
            arg: "--nproc".into(),
            message: m,
        };
        let torchrun = var("RANK").is_some() && var("WORLD_SIZE").is_some();
        match nproc {
            Some(_) if torchrun => {
                return Err(usage(
                    "RANK and WORLD_SIZE are set (torchrun or srun started this process): leave --nproc out".into(),
                ))
            }
            Some(0) => return Err(usage("must be at least 1".into())),
            Some(1) => return Ok(Launch::Single),
            Some(n) => return Ok(Launch::Spawn { nproc: n }),
            None => {}
        }
        let num = |k: &'static str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::from(DistError::Environment {
                            var: k,
                            value: v.clone(),
                            message: "not a whole number".into(),
                        })
                    })
                })
                .transpose()
        };
        let (source, rank, world, local) = if torchrun {
            let rank = num("RANK")?.unwrap_or(0);
            (
                "torchrun",
                rank,
                num("WORLD_SIZE")?.unwrap_or(1),
                num("LOCAL_RANK")?.unwrap_or(rank),
            )
        } else {
            match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(rank), Some(world)) if world > 1 => {
                    ("SLURM", rank, world, num("SLURM_LOCALID")?.unwrap_or(0))
                }
                _ => return Ok(Launch::Single),
            }
        };
        if world <= 1 {
            return Ok(Launch::Single);
        }
        if rank >= world {
            return Err(DistError::Environment {
                var: if source == "SLURM" {
                    "SLURM_PROCID"
                } else {
                    "RANK"
                },
                value: rank.to_string(),
                message: format!("not a rank of a world of {world}"),
            }
            .into());
        }
        let addr = var("MASTER_ADDR");
        let port = var("MASTER_PORT");
        let (Some(addr), Some(port)) = (addr, port) else {
            return Err(DistError::Environment {
                var: "MASTER_ADDR",
                value: var("MASTER_ADDR").unwrap_or_default(),
                message: format!(
                    "{source} gives rank {rank} of {world}, but MASTER_ADDR and MASTER_PORT are not both set: export them (rank 0's host and a free port; see the README's SLURM script), or pass --nproc 1 to run this task alone"
                ),
            }
            .into());
        };
        let port = port
            .trim()
            .parse::<u16>()
            .map_err(|_| DistError::Environment {
                var: "MASTER_PORT",
                value: port.clone(),
                message: "not a port number".into(),
            })?;
        Ok(Launch::Rank(RankPlan {
            rank,
            world,
            local_rank: local,
            addr,
            port,
            timeout,
            source,
        }))
    }
}

/// The framework's view of a rank: libtorch's process group and its store.
struct GroupRanks {
    group: Arc<Mutex<ProcessGroup>>,
    plan: RankPlan,
}

impl GroupRanks {
    fn join(plan: &RankPlan) -> Result<GroupRanks> {
        let pg = ProcessGroup::init(&plan.addr, plan.port, plan.rank, plan.world, plan.timeout)?;
        Ok(GroupRanks {
            group: Arc::new(Mutex::new(pg)),
            plan: plan.clone(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ProcessGroup>> {
        self.group
            .lock()
            .map_err(|_| Error::Internal("process group lock poisoned".into()))
    }
}

impl Ranks for GroupRanks {
    fn rank(&self) -> usize {
        self.plan.rank
    }
    fn world(&self) -> usize {
        self.plan.world
    }
    fn local_rank(&self) -> usize {
        self.plan.local_rank
    }
    fn set(&self, key: &str, value: &str) -> Result<()> {
        Ok(self.lock()?.store_set(key, value)?)
    }
    fn wait(&self, key: &str, timeout: Option<Duration>) -> Result<String> {
        let started = Instant::now();
        loop {
            if let Some(v) = self.lock()?.store_try_get(key)? {
                return Ok(v);
            }
            if timeout.is_some_and(|t| started.elapsed() > t) {
                return Err(DistError::Collective {
                    op: "wait",
                    rank: self.plan.rank,
                    message: format!("no '{key}' within {timeout:?}"),
                }
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn timeout(&self) -> Duration {
        self.plan.timeout
    }
    fn group(&self) -> &dyn std::any::Any {
        &self.group
    }
}

/// `genecis run` as launched: one process, one rank of many, or the
/// parent of `--nproc` local ranks (then no outcomes: the ranks report).
pub fn run(plan: &Plan, mut req: RunRequest, launch: &Launch) -> Result<Option<Vec<StageOutcome>>> {
    match launch {
        Launch::Single => runner::run(plan, &req).map(Some),
        Launch::Rank(rp) => {
            runner::check_world(plan, &req, rp.world)?;
            println!(
                "rank {} of {} ({}; local rank {}), rendezvous at {}:{}, {}",
                rp.rank,
                rp.world,
                rp.source,
                rp.local_rank,
                rp.addr,
                rp.port,
                crate::model::dist::backends()
            );
            req.ranks = Some(RankHandle(Arc::new(GroupRanks::join(rp)?)));
            runner::run(plan, &req).map(Some)
        }
        Launch::Spawn { nproc } => {
            // A plan that does not fit the world fails before any rank starts.
            runner::check_world(plan, &req, *nproc)?;
            let args = without_nproc(std::env::args_os().skip(1).collect());
            spawn_ranks(*nproc, |cmd| {
                cmd.args(&args);
            })?;
            Ok(None)
        }
    }
}

/// The arguments with `--nproc N` / `--nproc=N` taken out.
fn without_nproc(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--nproc") => skip = true,
            Some(s) if s.starts_with("--nproc=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// A free TCP port on 127.0.0.1 for a local rendezvous.
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Internal(format!("no free local port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Internal(format!("no free local port: {e}")))?
        .port())
}

/// Starts `nproc` copies of this executable as local ranks (torchrun's
/// variables set; `OMP_NUM_THREADS` split over them unless set), and waits
/// for all. When one fails, the others are stopped (SIGTERM, then SIGKILL
/// after 10 s), as torchrun stops its workers.
pub(crate) fn spawn_ranks(nproc: usize, args: impl Fn(&mut Command)) -> Result<Vec<String>> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("own path: {e}")))?;
    let port = free_port()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / nproc).max(1).to_string();
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        args(&mut cmd);
        cmd.env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            cmd.env("OMP_NUM_THREADS", &threads);
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                stop(&mut children);
                return Err(Error::Internal(format!("cannot start rank {rank}: {e}")));
            }
        }
    }
    watch(children)
}

/// Waits for every child; the first failure stops the rest. Returns each
/// rank's captured stdout (empty unless piped).
fn watch(mut children: Vec<Child>) -> Result<Vec<String>> {
    let world = children.len();
    let mut done = vec![false; world];
    while done.iter().any(|d| !d) {
        for r in 0..world {
            if done[r] {
                continue;
            }
            match children[r].try_wait() {
                Ok(Some(st)) if st.success() => done[r] = true,
                Ok(Some(st)) => {
                    stop(&mut children);
                    return Err(DistError::RankExited {
                        rank: r,
                        world,
                        status: describe(st),
                    }
                    .into());
                }
                Ok(None) => {}
                Err(e) => {
                    stop(&mut children);
                    return Err(Error::Internal(format!("rank {r}: {e}")));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut outs = Vec::with_capacity(world);
    for c in &mut children {
        let mut s = String::new();
        if let Some(o) = c.stdout.as_mut() {
            use std::io::Read;
            let _ = o.read_to_string(&mut s);
        }
        outs.push(s);
    }
    Ok(outs)
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn stop(children: &mut [Child]) {
    for c in children.iter() {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn torchrun_and_slurm_variables_give_the_rank() {
        let torchrun = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let Launch::Rank(r) = Launch::resolve(None, T, env(&torchrun)).unwrap() else {
            panic!("torchrun's variables give a rank")
        };
        assert_eq!((r.rank, r.world, r.local_rank, r.port), (1, 2, 1, 29500));
        assert_eq!((r.addr.as_str(), r.source), ("10.0.0.1", "torchrun"));
        let slurm = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29400"),
        ];
        let Launch::Rank(r) = Launch::resolve(None, T, env(&slurm)).unwrap() else {
            panic!("SLURM's variables give a rank")
        };
        assert_eq!(
            (r.rank, r.world, r.local_rank, r.source),
            (5, 8, 1, "SLURM")
        );
        // srun without MASTER_ADDR: an error that says what to export.
        let e = Launch::resolve(None, T, env(&slurm[..3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR and MASTER_PORT"), "{e}");
        // --nproc 1 runs a SLURM task alone; --nproc under torchrun is refused.
        assert_eq!(
            Launch::resolve(Some(1), T, env(&slurm[..3])).unwrap(),
            Launch::Single
        );
        assert!(Launch::resolve(Some(2), T, env(&torchrun)).is_err());
        assert_eq!(Launch::resolve(None, T, env(&[])).unwrap(), Launch::Single);
        assert_eq!(
            Launch::resolve(Some(3), T, env(&[])).unwrap(),
            Launch::Spawn { nproc: 3 }
        );
        let bad = [
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ];
        assert!(Launch::resolve(None, T, env(&bad)).is_err());
    }

    #[test]
    fn nproc_is_taken_out_of_the_ranks_arguments() {
        let a: Vec<OsString> = ["run", "m.toml", "--nproc", "2", "--quiet", "--nproc=3"]
            .iter()
            .map(OsString::from)
            .collect();
        let got: Vec<String> = without_nproc(a)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(got, ["run", "m.toml", "--quiet"]);
    }
}
