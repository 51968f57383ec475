//! Developer tools behind `genecis parse-eval`, `genecis bench ...` and
//! `genecis doctor`: scoring the parser against the reference, speed
//! measurements, and an installation check. Not part of any pipeline.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::preprocess::{self, ImageKey};
use crate::stages::parse::{self, spacy, SceneGraph};

#[derive(Args, Debug)]
pub struct ParseEvalArgs {
    /// Hand-picked captions with reference output (JSON list; sg_gold.dev.json).
    #[arg(long)]
    pub gold: Option<PathBuf>,
    /// Real captions with reference output (JSONL; reference_parses.dev.jsonl).
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Score the post-0.1.0 behaviour (strict_v010 = false).
    #[arg(long)]
    pub loose: bool,
    /// Print the gold captions that do not match.
    #[arg(long)]
    pub misses: bool,
    /// Print the first N dev captions whose relations (or, with --entities, heads) differ.
    #[arg(long, value_name = "N", requires = "dev")]
    pub dev_misses: Option<usize>,
    /// With --dev-misses: compare entity heads instead of relations.
    #[arg(long)]
    pub entities: bool,
    /// Compare the parser with spaCy itself on a parity file written by
    /// scripts/make_spacy_parity_fixture.py (token by token, and the graphs).
    #[arg(long, value_name = "FILE")]
    pub parity: Option<PathBuf>,
    /// Captions to parse and show (tokens, tags, arcs, entities, relations).
    #[arg(long = "show", value_name = "CAPTION")]
    pub captions: Vec<String>,
}

/// `genecis parse-eval`: parity, gold, shown captions and dev scores.
pub fn parse_eval(a: &ParseEvalArgs) -> Result<()> {
    if a.gold.is_none() && a.dev.is_none() && a.parity.is_none() && a.captions.is_empty() {
        return Err(Error::Usage {
            arg: "parse-eval".into(),
            message: "give --gold FILE, --dev FILE, --parity FILE or --show CAPTION".into(),
        });
    }
    let strict = !a.loose;
    if let Some(f) = &a.parity {
        let p = parse::eval::spacy_parity(f, 20)?;
        for e in &p.examples {
            println!("DIFF {e}");
        }
        println!(
            "parity {} ({} captions): token lists differ {}, norms/tags/POS/arcs/lemmas differ {}, scene graphs differ {}",
            f.display(), p.captions, p.tokens_differ, p.analysis_differs, p.graphs_differ
        );
    }
    if let Some(g) = &a.gold {
        let s = parse::eval::score_gold(g, strict)?;
        if a.misses {
            for m in &s.misses {
                println!("MISS {m}");
            }
        }
        println!(
            "gold {}: relations exact {}/{}, exact or listed alternative {}/{}, entity heads exact {}/{}",
            g.display(), s.exact, s.n, s.exact_or_alternative, s.n, s.entities_exact, s.n
        );
    }
    if !a.captions.is_empty() {
        let caps: Vec<&str> = a.captions.iter().map(String::as_str).collect();
        let docs = spacy::analyse(&caps)?;
        let graphs = spacy::scene_graphs(&docs, strict)?;
        for ((c, d), g) in caps.iter().zip(docs).zip(graphs) {
            let toks: Vec<String> = d
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i}:{}/{}/{} {}<-{}", t.text, t.tag, t.pos, t.dep, t.head))
                .collect();
            println!("{c}\n  tokens: {}\n{}", toks.join("  "), graph_text(&g));
        }
    }
    if let Some(d) = &a.dev {
        if let Some(n) = a.dev_misses {
            for m in parse::eval::dev_misses(d, strict, a.entities, n)? {
                println!("DIFF {m}");
            }
        }
        let s = parse::eval::score_dev(d, strict)?;
        println!(
            "dev {} ({} captions): relation triples P {:.4} R {:.4} F1 {:.4}; entity heads P {:.4} R {:.4} F1 {:.4}; captions with identical relations {}",
            d.display(), s.captions,
            s.relations.precision(), s.relations.recall(), s.relations.f1(),
            s.entities.precision(), s.entities.recall(), s.entities.f1(), s.exact_captions
        );
    }
    Ok(())
}

/// A scene graph for `parse-eval --show`: entity heads, then relations.
fn graph_text(g: &SceneGraph) -> String {
    let heads: Vec<&str> = g.entities.iter().map(|e| e.head.as_str()).collect();
    let rels: Vec<String> = g
        .relations
        .iter()
        .map(|r| {
            format!(
                "({} | {} | {})",
                heads[r.subject], r.relation, heads[r.object]
            )
        })
        .collect();
    format!("  entities: {heads:?}\n  relations: {}", rels.join(" "))
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Decode + CLIP-preprocess every image in a folder (rayon), images/s.
    Preprocess {
        dir: PathBuf,
        #[arg(long, default_value_t = 224)]
        n_px: u32,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Also write each image's preprocessed RGB bytes to DUMP/<name>.rgb,
        /// for `scripts/bench_preprocess_pil.py --compare DIR DUMP`.
        #[arg(long, value_name = "DUMP")]
        dump: Option<PathBuf>,
        /// With --dump: decode with the `image` crate (the decoder used
        /// before libjpeg-turbo) instead, to measure how far it was off.
        #[arg(long, requires = "dump")]
        image_crate: bool,
    },
    /// Parse captions from a CC3M TSV, repeated to at least --min-captions,
    /// with rayon over chunks; prints captions/s and peak memory.
    Parse {
        /// A CC3M-style TSV (caption<TAB>url).
        captions: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        min_captions: usize,
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
    },
    /// Global retrieval as `score` ranks CIRR and MIT-States: random unit
    /// queries against a random unit gallery, one matmul + top-10 per block
    /// of queries, the reference masked; queries/s.
    Rank {
        #[arg(long, default_value_t = 4000)]
        queries: usize,
        #[arg(long, default_value_t = 100_000)]
        gallery: usize,
        #[arg(long, default_value_t = 640)]
        dim: usize,
        /// `cpu`, `cuda`, `cuda:N` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Write each query's rank and top-10 gallery indices, one line
        /// per query, to compare devices (the inputs are seeded on the CPU).
        #[arg(long, value_name = "FILE")]
        dump: Option<PathBuf>,
    },
    /// Training steps (`train_step`, the stage's code) on random inputs:
    /// cached mode by default, fine-tuning with --checkpoint; s/step,
    /// samples/s, an epoch extrapolated, peak RSS.
    Train {
        /// Samples per epoch to extrapolate to (GeneCIS: 1.44 M).
        #[arg(long, default_value_t = 1_440_000)]
        samples: u64,
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Feature width in cached mode (RN50x4: 640).
        #[arg(long, default_value_t = 640)]
        dim: i64,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Fine-tune this CLIP on random images and tokens instead.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long, default_value_t = 2560)]
        projection_dim: i64,
        #[arg(long, default_value_t = 5120)]
        hidden_dim: i64,
        #[arg(long, default_value = "auto")]
        device: String,
        /// fp16 autocast + GradScaler (GPU only).
        #[arg(long)]
        amp: bool,
        /// Also run the steps data-parallel on N local ranks (Gloo), the
        /// global batch split over them, and compare with one rank.
        #[arg(long, default_value_t = 1)]
        nproc: usize,
    },
    /// N training steps from given weights on a given batch, as the train
    /// stage takes them (the original's loss, clip_grad_norm_ on CLIP,
    /// AdamW over Combiner + CLIP, dropout off): the losses, and the final
    /// weights as state dicts, to compare with PyTorch's steps
    /// (scripts/gpu_check.py does, on the CPU and the GPU).
    Steps {
        /// The CLIP to fine-tune (any checkpoint `embed` reads).
        #[arg(long)]
        clip: PathBuf,
        /// The Combiner head's initial state dict.
        #[arg(long)]
        combiner: PathBuf,
        /// A torch.save'd dict: `images` [3B, 3, H, W] (reference, target,
        /// distractor), `tokens` [B, 77].
        #[arg(long)]
        batch: PathBuf,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 1e-5)]
        lr: f64,
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        #[arg(long, default_value_t = 1e-6)]
        eps: f64,
        #[arg(long, default_value = "auto")]
        device: String,
        /// fp16 autocast + GradScaler (GPU only).
        #[arg(long)]
        amp: bool,
        /// Writes clip_final.pt, combiner_final.pt and losses.json here.
        #[arg(long)]
        out: PathBuf,
    },
    /// One rank of libtorch's process group (TCPStore + Gloo): all-reduce,
    /// all-gather, broadcast from rank 0 and a barrier on small known
    /// tensors; prints what this rank got as one JSON line. Start one per
    /// rank with the same --world, --addr and --port.
    Dist(RankArgs),
    /// One rank of a data-parallel gradient check: a linear layer's
    /// gradient of a contrastive loss over the global batch, each rank
    /// holding a slice, features gathered with gradient and gradients
    /// summed, against the single-process gradient this rank also
    /// computes; prints the largest difference as one JSON line.
    DistGrad(RankArgs),
    /// The training image path per core: JPEG decode + resize + random crop
    /// (the original's per-epoch work) against crops of the cached resize.
    Augment {
        dir: PathBuf,
        #[arg(long, default_value_t = 224)]
        n_px: u32,
        #[arg(long, default_value_t = 2)]
        repeat: usize,
    },
}

/// Which rank of which process group a `bench dist*` process is.
#[derive(Debug, Args)]
pub struct RankArgs {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    #[arg(long, default_value = "127.0.0.1")]
    addr: String,
    #[arg(long)]
    port: u16,
    /// Seconds to wait for the other ranks.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Collectives on CUDA tensors (`bench dist`: NCCL where built with it).
    #[arg(long)]
    cuda: bool,
}

/// `genecis bench ...` (build with --release first).
pub fn bench(cmd: &BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Preprocess {
            dir,
            n_px,
            repeat,
            dump,
            image_crate,
        } => {
            bench_preprocess(dir, *n_px, *repeat)?;
            match dump {
                Some(out) => dump_preprocessed(dir, *n_px, out, *image_crate),
                None => Ok(()),
            }
        }
        BenchCmd::Parse {
            captions,
            min_captions,
            chunk,
        } => bench_parse(captions, *min_captions, *chunk),
        BenchCmd::Dist(a) => bench_dist(a),
        BenchCmd::DistGrad(a) => bench_dist_grad(a),
        BenchCmd::Steps {
            clip,
            combiner,
            batch,
            steps,
            lr,
            weight_decay,
            eps,
            device,
            amp,
            out,
        } => bench_steps(
            clip,
            combiner,
            batch,
            *steps,
            (*lr, *weight_decay, *eps),
            device,
            *amp,
            out,
        ),
        BenchCmd::Rank {
            queries,
            gallery,
            dim,
            device,
            repeat,
            dump,
        } => bench_rank(*queries, *gallery, *dim, device, *repeat, dump.as_deref()),
        BenchCmd::Train {
            samples,
            batch,
            dim,
            steps,
            checkpoint,
            projection_dim,
            hidden_dim,
            device,
            amp,
            nproc,
        } => {
            use crate::cli::launch::Launch;
            let launch = Launch::resolve(
                Some(*nproc).filter(|&n| n > 1),
                std::time::Duration::from_secs(300),
                |k| std::env::var(k).ok(),
            )?;
            if let Launch::Spawn { nproc } = launch {
                return bench_train_ranks(nproc);
            }
            let group = match launch {
                Launch::Rank(r) => Some(crate::model::dist::ProcessGroup::init(
                    &r.addr, r.port, r.rank, r.world, r.timeout,
                )?),
                _ => None,
            };
            crate::stages::train::bench::bench_train(&mut crate::stages::train::bench::TrainBench {
                samples: *samples,
                batch: *batch,
                dim: *dim,
                steps: *steps,
                checkpoint: checkpoint.as_deref(),
                projection_dim: *projection_dim,
                hidden_dim: *hidden_dim,
                device,
                amp: *amp,
                group,
            })
        }
        BenchCmd::Augment { dir, n_px, repeat } => {
            crate::stages::train::bench::bench_augment(dir, *n_px, *repeat)
        }
    }
}

fn bench_rank(
    n_q: usize,
    n_g: usize,
    d: usize,
    device: &str,
    repeat: usize,
    dump: Option<&Path>,
) -> Result<()> {
    use tch::{Kind, Tensor};
    let device = crate::model::select_device(device).map_err(|m| Error::Usage {
        arg: "--device".into(),
        message: m,
    })?;
    tch::manual_seed(0);
    let unit = |n: usize| {
        let t = Tensor::randn([n as i64, d as i64], (Kind::Float, tch::Device::Cpu));
        let norm = t.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        t / norm
    };
    let gallery = unit(n_g).to_device(device);
    let queries = Vec::<f32>::try_from(unit(n_q).view([-1]))?;
    let mask: Vec<Option<usize>> = (0..n_q).map(|i| Some(i * 7919 % n_g)).collect();
    let relevant: Vec<Vec<usize>> = (0..n_q).map(|i| vec![(i * 104_729 + 1) % n_g]).collect();
    // Warm up (kernels, allocator), then time.
    crate::eval::rank_global(
        &queries[..d.min(queries.len())],
        d,
        &gallery,
        &mask[..1],
        &relevant[..1],
        10,
        device,
    )?;
    let mut best = f64::INFINITY;
    let mut last = Vec::new();
    for _ in 0..repeat.max(1) {
        let t0 = std::time::Instant::now();
        let out = crate::eval::rank_global(&queries, d, &gallery, &mask, &relevant, 10, device)?;
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        best = best.min(t0.elapsed().as_secs_f64());
        if out.len() != n_q {
            return Err(Error::Internal(format!(
                "ranked {} of {n_q} queries",
                out.len()
            )));
        }
        last = out;
    }
    if let Some(path) = dump {
        let mut text = String::new();
        for r in &last {
            text.push_str(&r.rank.to_string());
            for (i, _) in &r.top {
                text.push(' ');
                text.push_str(&i.to_string());
            }
            text.push('\n');
        }
        std::fs::write(path, text).map_err(Error::io("cannot write", path))?;
    }
    println!(
        "ranked {n_q} queries x {n_g} gallery images (d = {d}) on {device:?} in {best:.3} s (best of {repeat}): {:.0} queries/s, {:.1} GFLOP/s in the matmul; {} threads",
        n_q as f64 / best,
        2.0 * n_q as f64 * n_g as f64 * d as f64 / best / 1e9,
        tch::get_num_threads()
    );
    Ok(())
}

/// `bench train --nproc N`: the same steps as 1 rank and as N local
/// ranks (each a process of this command, started as `--nproc` starts
/// ranks), side by side.
fn bench_train_ranks(nproc: usize) -> Result<()> {
    use crate::stages::train::bench::TrainBenchResult;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--nproc") {
        args.drain(i..(i + 2).min(args.len()));
    }
    args.retain(|a| !a.to_string_lossy().starts_with("--nproc="));
    let mut results = Vec::new();
    for world in [1, nproc] {
        let outs = crate::cli::launch::spawn_ranks(world, |cmd| {
            cmd.args(&args).stdout(std::process::Stdio::piped());
        })?;
        print!("--- {world} rank(s) ---\n{}", outs[0]);
        let line = outs[0]
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .ok_or_else(|| {
                Error::Internal(format!("{world} rank(s): rank 0 reported no result"))
            })?;
        let r: TrainBenchResult =
            serde_json::from_str(line).map_err(|e| Error::Internal(format!("result: {e}")))?;
        results.push(r);
    }
    let (one, many) = (&results[0], &results[1]);
    println!(
        "1 rank: {:.1} samples/s ({:.3} s/step); {} ranks: {:.1} samples/s ({:.3} s/step), {:.2}x; collectives {:.1}% of the {}-rank step",
        one.samples_per_s,
        one.seconds_per_step,
        many.world,
        many.samples_per_s,
        many.seconds_per_step,
        many.samples_per_s / one.samples_per_s,
        100.0 * many.comm_share,
        many.world
    );
    Ok(())
}

impl RankArgs {
    fn join(&self) -> Result<crate::model::dist::ProcessGroup> {
        Ok(crate::model::dist::ProcessGroup::init(
            &self.addr,
            self.port,
            self.rank,
            self.world,
            std::time::Duration::from_secs(self.timeout),
        )?)
    }
}

fn bench_dist(a: &RankArgs) -> Result<()> {
    use tch::Tensor;
    let (rank, world) = (a.rank, a.world);
    let mut pg = a.join()?;
    let dev = match a.cuda {
        true => tch::Device::Cuda(rank),
        false => tch::Device::Cpu,
    };
    let r = rank as f32;
    let mut sum = Tensor::from_slice(&[r + 1.0; 4]).to_device(dev);
    pg.all_reduce_sum(&mut sum)?;
    let gathered =
        pg.all_gather_cat(&Tensor::from_slice(&[10.0 * r, 10.0 * r + 1.0]).to_device(dev))?;
    let mut b = Tensor::from_slice(&[r + 100.0; 3]).to_device(dev);
    pg.broadcast(&mut b, 0)?;
    pg.barrier()?;
    let v = |t: &Tensor| {
        Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).view([-1])).unwrap_or_default()
    };
    println!(
        "{}",
        serde_json::json!({ "rank": rank, "world": world, "device": format!("{dev:?}"), "backends": crate::model::dist::backends(), "all_reduce": v(&sum), "all_gather": v(&gathered), "broadcast": v(&b) })
    );
    Ok(())
}

fn bench_dist_grad(a: &RankArgs) -> Result<()> {
    use tch::{Device, Kind, Tensor};
    let (rank, world) = (a.rank, a.world);
    let mut pg = a.join()?;
    // The same draws on every rank: the model and the global batch.
    let (n, d, k) = (4i64, 16i64, 8i64);
    tch::manual_seed(7);
    let b = n * world as i64;
    let x = Tensor::randn([b, d], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([b, d], (Kind::Float, Device::Cpu));
    let w0 = Tensor::randn([d, k], (Kind::Float, Device::Cpu)) * 0.3;
    // The original's loss: CE(100 * normalize(query) @ normalize(target)^T).
    let loss = |q: &Tensor, t: &Tensor| {
        let q = q / q.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        let t = t / t.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        (q.matmul(&t.tr()) * 100.0)
            .cross_entropy_for_logits(&Tensor::arange(q.size()[0], (Kind::Int64, Device::Cpu)))
    };
    // One process, the whole batch.
    let w = w0.copy().set_requires_grad(true);
    loss(&x.matmul(&w), &y.matmul(&w)).backward();
    let single = w.grad().copy();
    // This rank's slice, gathered with gradient, gradients summed.
    let w = w0.copy().set_requires_grad(true);
    let (r0, len) = (rank as i64 * n, n);
    let q = pg.all_gather_with_grad(&x.narrow(0, r0, len).matmul(&w))?;
    let t = pg.all_gather_with_grad(&y.narrow(0, r0, len).matmul(&w))?;
    loss(&q, &t).backward();
    let mut g = w.grad().copy();
    pg.all_reduce_sum(&mut g)?;
    let diff = (&g - &single).abs().max().double_value(&[]);
    let scale = single.abs().max().double_value(&[]);
    println!(
        "{}",
        serde_json::json!({ "rank": rank, "world": world, "max_diff": diff, "grad_scale": scale })
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_steps(
    clip_path: &Path,
    comb_path: &Path,
    batch: &Path,
    steps: usize,
    (lr, wd, eps): (f64, f64, f64),
    device: &str,
    amp: bool,
    out: &Path,
) -> Result<()> {
    use crate::model::clip::Clip;
    use crate::model::combiner::Combiner;
    use crate::model::combiner::Dropout;
    use crate::model::optim::{AdamW, GradScaler};
    use crate::model::StateDict;
    use crate::stages::train::{train_step, Finetune, Optimizer, StepConfig};
    use tch::Kind;
    let device = crate::model::select_device(device).map_err(|m| Error::Usage {
        arg: "--device".into(),
        message: m,
    })?;
    let amp = amp && device.is_cuda();
    let mut clip = Clip::load(clip_path, None, device)?;
    clip.set_training(true);
    let comb = Combiner::new(StateDict::load(comb_path, device)?)?;
    let mut opt = Optimizer::new(
        &comb,
        Some(&clip),
        Finetune::ImagePlusTextWhole,
        AdamW::new((0.9, 0.999), eps, wd),
        GradScaler::new(amp),
    );
    let cfg = StepConfig {
        lamda: 100.0,
        clip_grad_norm: 1.0,
        clip_before_unscale: true,
        device,
        amp,
    };
    let b: std::collections::HashMap<String, tch::Tensor> =
        crate::model::torch_pickle::read_state_dict(batch)
            .map_err(|m| Error::Data(format!("{}: {m}", batch.display())))?
            .into_iter()
            .collect();
    let get = |k: &str| {
        b.get(k)
            .ok_or_else(|| Error::Data(format!("{} has no '{k}'", batch.display())))
    };
    let images = get("images")?.to_kind(Kind::Float).to_device(device);
    let tokens = get("tokens")?.to_kind(Kind::Int64).to_device(device);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let m = train_step(&cfg, &mut opt, &comb, lr, Dropout::Off, None, || {
            let f = clip.encode_image(&images)?;
            let p = f.chunk(3, 0);
            Ok((
                p[0].shallow_clone(),
                p[1].shallow_clone(),
                clip.encode_text(&tokens)?,
            ))
        })?;
        losses.push(m.metrics[0].1);
    }
    std::fs::create_dir_all(out).map_err(Error::io("cannot create", out))?;
    let save = |name: &str, w: &StateDict| -> Result<()> {
        let mut named: Vec<(String, tch::Tensor)> = w
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_device(tch::Device::Cpu)))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        crate::model::torch_save::save_state_dict(&out.join(name), &named)
            .map_err(|m| Error::Data(format!("cannot write {name}: {m}")))
    };
    save("clip_final.pt", clip.weights())?;
    save("combiner_final.pt", comb.weights())?;
    let json = serde_json::json!({ "losses": losses, "amp": amp, "device": format!("{device:?}") });
    std::fs::write(out.join("losses.json"), json.to_string())
        .map_err(Error::io("cannot write", out))?;
    println!("{steps} steps on {device:?} (amp {amp}): losses {losses:?}");
    Ok(())
}

fn bench_preprocess(dir: &Path, n_px: u32, repeat: usize) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(Error::io("cannot list", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| matches!(x.to_str(), Some("jpg" | "jpeg" | "png")))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Usage {
            arg: dir.display().to_string(),
            message: "no .jpg/.png files in this folder".into(),
        });
    }
    let keys: Vec<ImageKey> = files
        .iter()
        .map(|p| ImageKey {
            path: p,
            bbox: None,
            rgb_first: false,
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut ok = 0usize;
    for _ in 0..repeat.max(1) {
        ok += preprocess::load_batch(&keys, n_px)
            .iter()
            .filter(|r| r.is_ok())
            .count();
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "preprocessed {ok} images ({} files x {repeat}) to {n_px}px in {secs:.2} s on {} threads: {:.1} images/s",
        files.len(),
        rayon::current_num_threads(),
        ok as f64 / secs
    );
    // Where the time goes, on this thread: decode, resize + crop, normalise.
    let t1 = std::time::Instant::now();
    let decoded: Vec<preprocess::Raster> = files
        .iter()
        .filter_map(|f| preprocess::open(f).ok())
        .collect();
    let dec = t1.elapsed().as_secs_f64();
    let t2 = std::time::Instant::now();
    let resized: Vec<image::RgbImage> = decoded
        .iter()
        .map(|d| {
            let r = preprocess::resize_center_crop_raster(d, n_px);
            image::RgbImage::from_raw(r.width, r.height, preprocess::to_rgb(&r)).unwrap_or_default()
        })
        .collect();
    let resize = t2.elapsed().as_secs_f64();
    let t3 = std::time::Instant::now();
    for r in &resized {
        let _ = preprocess::to_tensor(r);
    }
    let norm = t3.elapsed().as_secs_f64();
    let n = decoded.len().max(1) as f64;
    println!(
        "one thread: decode {:.2} ms/image, resize + crop + RGB {:.2} ms/image, normalise to a tensor {:.2} ms/image",
        1000.0 * dec / n,
        1000.0 * resize / n,
        1000.0 * norm / n
    );
    Ok(())
}

/// Writes `<stem>.rgb` (n x n x 3 bytes) per image of `dir` into `out`.
fn dump_preprocessed(dir: &Path, n_px: u32, out: &Path, image_crate: bool) -> Result<()> {
    std::fs::create_dir_all(out).map_err(Error::io("cannot create", out))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(Error::io("cannot list", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "jpg" || x == "jpeg" || x == "png")
        })
        .collect();
    files.sort();
    for f in &files {
        let rgb = if image_crate {
            let img = image::open(f).map_err(|e| Error::Data(format!("{}: {e}", f.display())))?;
            preprocess::resize_center_crop(&img, n_px)
        } else {
            preprocess::load_rgb(
                &ImageKey {
                    path: f,
                    bbox: None,
                    rgb_first: false,
                },
                n_px,
            )
            .map_err(Error::Data)?
        };
        let stem = f.file_stem().unwrap_or_default().to_string_lossy();
        let p = out.join(format!("{stem}.rgb"));
        std::fs::write(&p, rgb.as_raw()).map_err(Error::io("cannot write", &p))?;
    }
    println!(
        "{} preprocessed images written to {}",
        files.len(),
        out.display()
    );
    Ok(())
}

fn bench_parse(captions: &Path, min_captions: usize, chunk: usize) -> Result<()> {
    let text = std::fs::read_to_string(captions).map_err(Error::io("cannot read", captions))?;
    let base: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit_once('\t').map_or(l, |(c, _)| c))
        .collect();
    if base.is_empty() {
        return Err(Error::Usage {
            arg: captions.display().to_string(),
            message: "the file has no captions".into(),
        });
    }
    let copies = min_captions.div_ceil(base.len()).max(1);
    let all: Vec<&str> = (0..copies).flat_map(|_| base.iter().copied()).collect();
    // Warm up: unpack the model.
    parse::parse_captions(&["warm up the parser"], true)?;
    let t0 = std::time::Instant::now();
    let (ents, rels) = all
        .par_chunks(chunk.max(1))
        .map(|c| {
            // One chunk per task, parsed on this thread (the engine's own
            // batching stays inside the chunk).
            let gs = c
                .chunks(spacy::BATCH)
                .map(spacy::parse_batch)
                .collect::<Result<Vec<_>>>()?;
            Ok::<_, Error>(gs.iter().flatten().fold((0usize, 0usize), |(e, r), g| {
                (e + g.entities.len(), r + g.relations.len())
            }))
        })
        .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "parsed {} captions ({} x {}) in {secs:.2} s on {} threads: {:.0} captions/s; {} entities, {} relations; peak RSS {}",
        all.len(), copies, base.len(), rayon::current_num_threads(), all.len() as f64 / secs, ents, rels, peak_rss()
    );
    Ok(())
}

/// Peak resident memory of this process (Linux), for benchmark reports.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l["VmHWM:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `genecis doctor`: libtorch loads and computes; whether CUDA is visible.
pub fn doctor() -> Result<()> {
    println!("genecis {}", env!("CARGO_PKG_VERSION"));
    let t = tch::Tensor::from_slice(&[1f32, 2.0, 3.0]);
    let sum = (&t * &t).sum(tch::Kind::Float).double_value(&[]);
    println!("libtorch: loaded, CPU check 1+4+9 = {sum}");
    println!(
        "cuda: available = {}, devices = {}",
        tch::Cuda::is_available(),
        tch::Cuda::device_count()
    );
    if sum != 14.0 {
        return Err(Error::Data(format!(
            "libtorch computed {sum} instead of 14; reinstall it with `rm -rf .venv && make setup`"
        )));
    }
    Ok(())
}
