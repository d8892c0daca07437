//! Lab worker processes: a share of a lab's relays in a process of its own.
//!
//! The lab starts `crowdsurf-peer lab-worker` and talks to it over its standard streams, one JSON
//! document per line:
//!
//! - the lab writes the worker's plan (the run's options, the ticket its relays join, the start
//!   time on the host's clock, its share) on the worker's stdin, and keeps stdin open; a worker
//!   whose stdin closes before it is done takes it that the lab is gone, and stops;
//! - the worker writes `{"progress": …}` about once a second, then `{"done": …}` with its peers'
//!   figures, or `{"failed": "…"}`, on its stdout. Its stderr is the lab's.
//!
//! Both sides are this program, so the format is private to it and may change with it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::crowd::{Outcome, Plan, Progress};
use super::{LabError, now_us, process_cpu_seconds, sample_scheduler_lag};

/// Most bytes of one line from a worker (the final figures of a few hundred relays over minutes are
/// a few MB); a longer line is an error, not a reason to grow without bound.
const MAX_LINE: usize = 256 * 1024 * 1024;

/// How long a worker has to exit once its figures are in, before it is killed.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// One line a worker writes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Progress(Progress),
    Done(Box<Outcome>),
    Failed(String),
}

/// Starts a worker on `exe` for `plan`, forwards its progress to `progress` and returns its figures.
pub(crate) async fn drive(exe: PathBuf, plan: Plan, progress: watch::Sender<Progress>) -> Result<Outcome, LabError> {
    let share = plan.share;
    let spawn_error = |source| LabError::Spawn { exe: exe.display().to_string(), source };
    let pipe_error = |source| LabError::Pipe { what: format!("worker {share}'s stdin or stdout"), source };
    let mut child = tokio::process::Command::new(&exe)
        .arg("lab-worker")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        unreachable!("both streams were asked for as pipes")
    };
    let mut text = serde_json::to_vec(&plan).map_err(|e| LabError::Worker { share, message: e.to_string() })?;
    text.push(b'\n');
    stdin.write_all(&text).await.map_err(pipe_error)?;
    stdin.flush().await.map_err(pipe_error)?;
    let mut lines = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut lines).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await.map_err(pipe_error)?;
        if n == 0 {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("its exit status unknown: {e}"),
            };
            return Err(LabError::Worker { share, message: format!("ended without its figures ({status})") });
        }
        if n > MAX_LINE {
            return Err(LabError::Worker { share, message: format!("a line of more than {MAX_LINE} bytes") });
        }
        match serde_json::from_slice::<Line>(&line) {
            Ok(Line::Progress(p)) => {
                progress.send_replace(p);
            }
            Ok(Line::Done(outcome)) => {
                // Its stdin closing tells it to go; one that lingers is killed as `child` drops.
                drop(stdin);
                let _ = tokio::time::timeout(REAP_GRACE, child.wait()).await;
                return Ok(*outcome);
            }
            Ok(Line::Failed(message)) => return Err(LabError::Worker { share, message }),
            Err(e) => return Err(LabError::Worker { share, message: format!("unreadable line: {e}") }),
        }
    }
}

/// The worker's side: reads a plan on stdin, runs its share of the relays, and writes progress and
/// then its figures on stdout. Returns once the figures are written, or with an error once it has
/// been written as `failed` (or when the lab went away).
pub async fn serve() -> Result<(), LabError> {
    let io_error = |source| LabError::Pipe { what: "this worker's stdin or stdout".into(), source };
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut text = Vec::new();
    (&mut stdin).take(1024 * 1024).read_until(b'\n', &mut text).await.map_err(io_error)?;
    let mut out = tokio::io::stdout();
    let plan: Plan = match serde_json::from_slice(&text) {
        Ok(plan) => plan,
        Err(e) => {
            let message = format!("unreadable plan: {e}");
            write_line(&mut out, &Line::Failed(message.clone())).await.map_err(io_error)?;
            return Err(LabError::Config(message));
        }
    };
    let share = plan.share;
    // The run's start on this process's monotonic clock, from the host's wall clock.
    let now = now_us();
    let start = if plan.start_us >= now {
        Instant::now() + Duration::from_micros(plan.start_us - now)
    } else {
        Instant::now().checked_sub(Duration::from_micros(now - plan.start_us)).unwrap_or_else(Instant::now)
    };
    let lag = std::sync::Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| unreachable!("static bounds are valid")),
    ));
    let probe = tokio::spawn(sample_scheduler_lag(lag.clone()));
    let cpu_start = process_cpu_seconds();
    let (tx, mut rx) = watch::channel(Progress::default());
    let run = super::crowd::run(&plan, start, &tx);
    tokio::pin!(run);
    let mut rest = Vec::new();
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            changed = rx.changed() => {
                if changed.is_ok() {
                    let p = rx.borrow_and_update().clone();
                    write_line(&mut out, &Line::Progress(p)).await.map_err(io_error)?;
                }
            }
            // The lab keeps our stdin open until it has our figures: end of file means it is gone.
            read = stdin.read_buf(&mut rest) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return Err(LabError::Worker { share, message: "the lab closed our stdin: stopping".into() });
                }
                rest.clear();
            }
        }
    };
    probe.abort();
    match result {
        Ok(mut outcome) => {
            outcome.cpu_s = process_cpu_seconds() - cpu_start;
            outcome.lag = {
                let h = lag.lock().unwrap_or_else(|p| p.into_inner());
                h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
            };
            write_line(&mut out, &Line::Done(Box::new(outcome))).await.map_err(io_error)
        }
        Err(e) => {
            write_line(&mut out, &Line::Failed(e.to_string())).await.map_err(io_error)?;
            Err(e)
        }
    }
}

async fn write_line(out: &mut tokio::io::Stdout, line: &Line) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    text.push(b'\n');
    out.write_all(&text).await?;
    out.flush().await
}
