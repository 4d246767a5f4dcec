//! `bench --serve`: timing on request, so that a driver
//! (`benches/compare_cpu.py`) can alternate our calls with PyTorch's,
//! repetition by repetition, and machine drift hits both sides alike.
//!
//! One request a line on standard input, one answer a line on standard output:
//!
//! ```text
//! case SHAPE DTYPE [nn] [relu]   -> ok          (makes the case, drops the previous one)
//! time WORK WARM N               -> S1 ... SN   (seconds of N timed calls after WARM untimed ones)
//! quit                           -> (exits; so does the end of input)
//! ```
//!
//! `WORK` is a measurement's name (`step`, `eval`, `fwd`, `bwd_ops`, ...:
//! `Work::parse`). A request that fails is answered `error MESSAGE`. Before
//! the first request the process prints one line of JSON: rayon's threads, the
//! allocator policy and how candle-core accumulates gradients.

use crate::workload::{parse_dtype, parse_shape, timed_calls, Case, Parts, Work};
use anyhow::{bail, Result};
use candle::Device;
use std::io::{BufRead, Write};

/// Answers requests from standard input until it ends or says `quit`.
pub fn serve(dev: &Device, kept_memory: bool, candle_in_place: bool) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "{{\"threads\": {}, \"allocator\": \"{}\", \"candle_in_place\": {}}}",
        rayon::current_num_threads(),
        if kept_memory {
            "keep_freed_memory"
        } else {
            "default"
        },
        candle_in_place
    )?;
    out.flush()?;
    let mut case: Option<Case> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            break;
        }
        let answer = match answer(dev, &mut case, &words) {
            Ok(answer) => answer,
            Err(e) => format!("error {}", format!("{e:#}").replace('\n', " ")),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// The answer to one request.
fn answer(dev: &Device, case: &mut Option<Case>, words: &[&str]) -> Result<String> {
    match words {
        ["case", shape, dtype, options @ ..] => {
            let mut parts = Parts::default();
            for option in options {
                match *option {
                    "nn" => parts.nn = true,
                    "relu" => parts.relu = true,
                    other => bail!("unknown case option {other}"),
                }
            }
            // The previous case's buffers go before the next one's are made.
            *case = None;
            *case = Some(Case::new(
                dev,
                &parse_shape(shape)?,
                parse_dtype(dtype)?,
                parts,
            )?);
            Ok("ok".into())
        }
        ["time", work, warm, n] => {
            let Some(case) = case else {
                bail!("no case yet")
            };
            let work = Work::parse(work)?;
            let dev = case.device().clone();
            let seconds = timed_calls(&dev, warm.parse()?, n.parse()?, || case.run(work))?;
            let seconds: Vec<String> = seconds.iter().map(|s| format!("{s:.9}")).collect();
            Ok(seconds.join(" "))
        }
        _ => bail!("unknown request: {}", words.join(" ")),
    }
}
