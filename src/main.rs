//! The `genecis` command: raw arguments (clap) are resolved into one
//! validated [`Command`] before any work starts, then dispatched to the
//! library. Usage and manifest errors exit with 2.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use genecis::cli::args::{Cli, Command};
use genecis::cli::devtools;
use genecis::framework::{runner, sql};

fn main() -> ExitCode {
    // `genecis sql ... | head` should end quietly when the reader goes, as
    // other command-line tools do, not panic in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default action of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match cli
        .cmd
        .resolve()
        .map_err(anyhow::Error::from)
        .and_then(dispatch)
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let g = e.downcast_ref::<genecis::Error>();
            let text = match g {
                Some(g) => genecis::error::report(g),
                None => format!("{e:#}"),
            };
            eprintln!("error: {text}");
            ExitCode::from(if g.is_some_and(|g| g.is_usage()) {
                2
            } else {
                1
            })
        }
    }
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run(plan, req, launch) => {
            println!("pipeline {} -> {}", plan.name, plan.workdir.display());
            let started = std::time::Instant::now();
            let Some(outcomes) = genecis::cli::launch::run(&plan, req, &launch)? else {
                return Ok(());
            };
            let count = |a: runner::Action| outcomes.iter().filter(|o| o.action == a).count();
            println!(
                "done: {} ran, {} up to date, {:.2} s",
                count(runner::Action::Ran),
                count(runner::Action::Skipped),
                started.elapsed().as_secs_f64()
            );
        }
        Command::Status(plan) => print!("{}", runner::status_text(&plan)?),
        Command::Check(plan) => {
            let (text, errors) = runner::check_text(&plan);
            print!("{text}");
            if errors > 0 {
                anyhow::bail!("{errors} problem(s) to fix before running");
            }
        }
        Command::Sql {
            workdir,
            store,
            query,
            format,
            out,
            engine,
        } => sql::run_cli(
            &workdir,
            &store,
            query.as_deref(),
            format,
            out.as_deref(),
            &engine,
        )?,
        Command::Kinds => print!("{}", genecis::stages::KINDS.describe()),
        Command::Doctor => devtools::doctor()?,
        Command::ParseEval(a) => devtools::parse_eval(&a)?,
        Command::Bench(b) => devtools::bench(&b)?,
        Command::Audit(t) => print!("{}", genecis::cli::audit::audit_cli(&t)?),
        Command::Compare(r) => print!("{}", genecis::cli::compare::compare(&r)?),
        Command::Encode(r) => {
            print!("{}", genecis::cli::encode::encode(&r)?)
        }
        Command::Contamination(r) => {
            print!("{}", genecis::cli::contamination::contamination(&r)?)
        }
    }
    Ok(())
}
