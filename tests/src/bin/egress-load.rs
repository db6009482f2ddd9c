//! `egress-load`: the benchmark's load client, run inside each path's actor namespace so that
//! every path (direct, the agent's capture, squid explicit, squid intercept, ...) is measured
//! with the same client. See `egress_tests::load` for what each mode does.
//!
//! ```text
//! egress-load bulk --target IP:PORT --host NAME [--proxy IP:PORT] [--tls --ca FILE] --path /bulk --streams N --seconds S [--verify] [--threads T]
//! egress-load rate --target IP:PORT --host NAME [--proxy IP:PORT] [--tls --ca FILE] --path /small --concurrency C (--seconds S | --count N) [--verify] [--threads T]
//! egress-load idle --target IP:PORT --host NAME [--proxy IP:PORT] [--tls --ca FILE] --path /small --count N [--concurrency C] [--max-hold S]
//! egress-load pattern --out FILE --bytes N     # the upstream's files, for --verify
//! ```
//!
//! Every traffic mode also takes `--timeout S` (each I/O step, and a whole rate/idle
//! operation; default 10).
//!
//! Prints exactly one JSON object on stdout when done and exits 0 if the run happened (failed
//! operations are counted in it, not fatal); exits 2 with a message on stderr on bad arguments
//! or setup errors. `idle` prints once all connections are open, then holds them until stdin
//! reaches EOF (or `--max-hold` passes).
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use egress_tests::load::{self, Target};

/// Load client of the egress benchmark: one HTTP/1.1 client for every path measured.
#[derive(Debug, Parser)]
#[command(name = "egress-load")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Keep-alive GETs back to back on N streams for S seconds: body bytes received.
    Bulk(BulkArgs),
    /// One connection per request (Connection: close) from C workers: ops/s and latency.
    Rate(RateArgs),
    /// Open N connections, one GET each, print, hold them until stdin reaches EOF.
    Idle(IdleArgs),
    /// Write the first N bytes of the benchmark's pattern to a file (the upstream's files).
    Pattern(PatternArgs),
}

/// Where to send requests, common to every mode.
#[derive(Debug, Args)]
struct Common {
    /// Address to connect to (an IP address and port: the client never resolves names).
    #[arg(long, value_name = "IP:PORT")]
    target: SocketAddr,
    /// Host header, TLS server name and CONNECT authority name.
    #[arg(long, value_name = "NAME")]
    host: String,
    /// Path to GET.
    #[arg(long)]
    path: String,
    /// Connect to this HTTP proxy and CONNECT host:port (the target's port) through it.
    #[arg(long, value_name = "IP:PORT")]
    proxy: Option<SocketAddr>,
    /// Speak TLS to the target (inside the tunnel with --proxy).
    #[arg(long, requires = "ca")]
    tls: bool,
    /// PEM file of the only CA trusted with --tls.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// Timeout of each I/O step and of a whole rate/idle operation, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    timeout: Duration,
    /// Tokio worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

#[derive(Debug, Args)]
struct BulkArgs {
    #[command(flatten)]
    common: Common,
    /// Connections, each doing keep-alive GETs back to back.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    streams: u32,
    /// How long to run.
    #[arg(long, value_parser = parse_seconds)]
    seconds: Duration,
    /// Check every body against the benchmark's pattern.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("limit").required(true).args(["seconds", "count"])))]
struct RateArgs {
    #[command(flatten)]
    common: Common,
    /// Workers, each doing one request (one connection) after another.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Start requests for this long.
    #[arg(long, value_parser = parse_seconds)]
    seconds: Option<Duration>,
    /// Make this many requests in total.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    count: Option<u64>,
    /// Check every body against the benchmark's pattern.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open and hold.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Close everything and exit after this long even if stdin stays open.
    #[arg(long, value_name = "SECONDS", default_value = "3600", value_parser = parse_seconds)]
    max_hold: Duration,
}

#[derive(Debug, Args)]
struct PatternArgs {
    /// File to create or truncate.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Its length in bytes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
    bytes: u64,
}

/// Seconds as a positive decimal, at most a day.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err(format!("{s} must be more than 0 and at most 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// File descriptors beyond the connections: stdio, the runtime, the CA file.
const SPARE_FDS: u64 = 64;

impl Mode {
    /// Where to send requests (`None` for `pattern`, which sends nothing).
    fn common(&self) -> Option<&Common> {
        match self {
            Mode::Bulk(a) => Some(&a.common),
            Mode::Rate(a) => Some(&a.common),
            Mode::Idle(a) => Some(&a.common),
            Mode::Pattern(_) => None,
        }
    }

    /// Connections open at once at most.
    fn connections(&self) -> u64 {
        match self {
            Mode::Bulk(a) => a.streams.into(),
            Mode::Rate(a) => a.concurrency.into(),
            Mode::Idle(a) => a.count,
            Mode::Pattern(_) => 0,
        }
    }
}

/// Everything that can fail before traffic: the target, the CA, the open-file limit.
fn setup(mode: &Mode) -> anyhow::Result<Target> {
    let c = mode
        .common()
        .context("this mode sends no traffic: nothing to set up")?;
    let mut target = Target::new(c.target, &c.host, &c.path)?.io_timeout(c.timeout);
    if let Some(proxy) = c.proxy {
        target = target.via_proxy(proxy);
    }
    if let Some(ca) = &c.ca {
        target = target.with_tls_ca_file(ca)?;
    }
    load::raise_nofile(mode.connections() + SPARE_FDS)?;
    Ok(target)
}

/// Runs `mode` and writes its JSON report to `out`; `idle` then waits for `release` (or its
/// `--max-hold`) before closing its connections.
async fn run(
    mode: &Mode,
    target: &Target,
    out: &mut impl Write,
    release: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let report = match mode {
        Mode::Bulk(a) => {
            let opts = load::BulkOptions {
                streams: a.streams,
                duration: a.seconds,
                verify: a.verify,
            };
            load::bulk(target, &opts).await.to_json()
        }
        Mode::Rate(a) => {
            let limit = match (a.seconds, a.count) {
                (_, Some(n)) => load::Limit::Count(n),
                (Some(d), None) => load::Limit::Duration(d),
                // clap's group makes one of them required.
                (None, None) => load::Limit::Count(0),
            };
            let opts = load::RateOptions {
                concurrency: a.concurrency,
                limit,
                verify: a.verify,
            };
            load::rate(target, &opts).await.to_json()
        }
        Mode::Idle(a) => {
            let opts = load::IdleOptions {
                count: a.count,
                concurrency: a.concurrency,
            };
            let idle = load::idle_open(target, &opts).await;
            writeln!(out, "{}", idle.report.to_json())?;
            out.flush()?;
            let _ = tokio::time::timeout(a.max_hold, release).await;
            drop(idle);
            return Ok(());
        }
        Mode::Pattern(a) => pattern(a)?,
    };
    writeln!(out, "{report}")?;
    out.flush()
}

/// Writes the pattern file; its report.
fn pattern(a: &PatternArgs) -> std::io::Result<serde_json::Value> {
    load::write_pattern_file(&a.out, a.bytes)?;
    Ok(serde_json::json!({
        "mode": "pattern",
        "out": a.out.display().to_string(),
        "bytes": a.bytes,
    }))
}

/// Resolves when stdin reaches EOF (or fails); read on a plain thread, which the process's
/// exit ends.
async fn stdin_eof() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let reader = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = tx.send(());
        });
    // Without the thread there is nothing to wait for: release at once rather than hang.
    if reader.is_ok() {
        let _ = rx.await;
    }
}

fn runtime(threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.into())
            .enable_all()
            .build()
    }
}

fn main() -> ExitCode {
    // clap exits 2 on bad arguments (0 for --help).
    let cli = Cli::parse();
    if let Mode::Pattern(a) = &cli.mode {
        return match pattern(a) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("egress-load: cannot write {}: {e}", a.out.display());
                ExitCode::from(2)
            }
        };
    }
    let started = setup(&cli.mode).and_then(|target| {
        let threads = cli.mode.common().map_or(1, |c| c.threads);
        let rt = runtime(threads).context("start the tokio runtime")?;
        Ok((target, rt))
    });
    let (target, rt) = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("egress-load: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout();
    match rt.block_on(run(&cli.mode, &target, &mut stdout, stdin_eof())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-load: writing the report to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_tests::load::stand_in::{ConnectProxy, PatternServer, Route};

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("egress-load").chain(args.split_whitespace()))
    }

    const T: &str = "--target 127.0.0.1:1 --host web.test --path /small";

    #[test]
    fn accepts_the_documented_forms() {
        let cli = parse(&format!(
            "bulk {T} --streams 8 --seconds 3 --verify --threads 2"
        ))
        .unwrap();
        let Mode::Bulk(a) = &cli.mode else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (a.streams, a.seconds, a.verify),
            (8, Duration::from_secs(3), true)
        );
        assert_eq!(a.common.threads, 2);
        assert_eq!(a.common.timeout, Duration::from_secs(10));

        let cli = parse(&format!(
            "rate {T} --proxy 127.0.0.1:3128 --tls --ca /x.pem --concurrency 64 --count 1000"
        ))
        .unwrap();
        let Mode::Rate(a) = &cli.mode else {
            panic!("{cli:?}")
        };
        assert_eq!((a.concurrency, a.count, a.seconds), (64, Some(1000), None));
        assert!(a.common.tls);
        assert_eq!(a.common.proxy, Some("127.0.0.1:3128".parse().unwrap()));

        let cli = parse(&format!("rate {T} --concurrency 1 --seconds 0.5")).unwrap();
        let Mode::Rate(a) = &cli.mode else {
            panic!("{cli:?}")
        };
        assert_eq!(a.seconds, Some(Duration::from_millis(500)));

        let cli = parse(&format!("idle {T} --count 10000")).unwrap();
        let Mode::Idle(a) = &cli.mode else {
            panic!("{cli:?}")
        };
        assert_eq!((a.count, a.concurrency), (10_000, 64));
        assert_eq!(cli.mode.connections(), 10_000);
    }

    #[test]
    fn refuses_bad_arguments_with_exit_code_2() {
        for bad in [
            format!("rate {T} --concurrency 4"), // neither --seconds nor --count
            format!("rate {T} --concurrency 4 --seconds 1 --count 3"), // both
            format!("bulk {T} --streams 0 --seconds 1"),
            format!("bulk {T} --streams 1 --seconds 0"),
            format!("bulk {T} --streams 1 --seconds nan"),
            format!("bulk {T} --streams 1 --seconds 1 --tls"), // --tls without --ca
            format!("bulk {T} --streams 1 --seconds 1 --ca /x.pem"), // --ca without --tls
            format!("bulk {T} --streams 1 --seconds 1 --threads 0"),
            "bulk --target web.test:80 --host web.test --path / --streams 1 --seconds 1".into(),
            format!("idle {T} --count 0"),
        ] {
            let e = parse(&bad).expect_err(&bad);
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
    }

    #[test]
    fn setup_errors_say_what_is_wrong() {
        let cli = parse(
            "bulk --target 127.0.0.1:1 --host web.test --path nopath --streams 1 --seconds 1",
        )
        .unwrap();
        let e = setup(&cli.mode).unwrap_err();
        assert!(format!("{e:#}").contains("must start with '/'"), "{e:#}");

        let cli = parse(&format!(
            "bulk {T} --tls --ca /nonexistent/ca.pem --streams 1 --seconds 1"
        ))
        .unwrap();
        let e = setup(&cli.mode).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
    }

    async fn run_json(args: &str) -> serde_json::Value {
        let cli = parse(args).unwrap();
        let target = setup(&cli.mode).unwrap();
        let mut out = Vec::new();
        run(&cli.mode, &target, &mut out, async {}).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
        serde_json::from_str(&text).unwrap()
    }

    #[tokio::test]
    async fn each_mode_prints_one_json_report() {
        let server = PatternServer::start(
            vec![Route::new("/small", 1000), Route::new("/bulk", 1 << 20)],
            None,
            100,
        )
        .await
        .unwrap();
        let proxy = ConnectProxy::start(server.addr(), 200).await.unwrap();
        let t = format!("--target {} --host web.test", server.addr());

        let v = run_json(&format!(
            "bulk {t} --path /bulk --streams 2 --seconds 0.3 --verify"
        ))
        .await;
        assert_eq!(v["mode"], "bulk");
        assert_eq!(v["streams"], 2);
        assert_eq!(v["errors"], 0, "{v}");
        assert!(v["first_error"].is_null());
        assert!(v["bytes"].as_u64().unwrap() > 1 << 20, "{v}");
        assert!(v["requests"].as_u64().unwrap() >= 1, "{v}");
        assert!(v["seconds"].as_f64().unwrap() >= 0.3, "{v}");

        let v = run_json(&format!(
            "rate {t} --proxy {} --path /small --concurrency 3 --count 20 --verify",
            proxy.addr()
        ))
        .await;
        assert_eq!(v["mode"], "rate");
        assert_eq!(
            (v["ok"].as_u64(), v["errors"].as_u64()),
            (Some(20), Some(0)),
            "{v}"
        );
        assert_eq!(v["latency_samples"], 20);
        let l = &v["latency_us"];
        assert!(
            l["p50"].as_u64() <= l["p90"].as_u64() && l["p99"].as_u64() <= l["max"].as_u64(),
            "{v}"
        );
        assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(proxy.heads().len(), 20);

        let v = run_json(&format!("idle {t} --path /small --count 5 --concurrency 2")).await;
        assert_eq!(v["mode"], "idle");
        assert_eq!(
            (v["open"].as_u64(), v["errors"].as_u64()),
            (Some(5), Some(0)),
            "{v}"
        );
    }

    #[test]
    fn pattern_mode_writes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bulk");
        let cli = parse(&format!("pattern --out {} --bytes 100000", out.display())).unwrap();
        let Mode::Pattern(a) = &cli.mode else {
            panic!("{cli:?}")
        };
        let v = pattern(a).unwrap();
        assert_eq!(v["bytes"], 100_000);
        let data = std::fs::read(&out).unwrap();
        assert_eq!(data.len(), 100_000);
        assert_eq!(load::pattern_mismatch(0, &data), None);
        assert!(setup(&cli.mode).is_err());
    }

    #[tokio::test]
    async fn idle_holds_until_released() {
        let server = PatternServer::start(vec![Route::new("/small", 10)], None, 100)
            .await
            .unwrap();
        let cli = parse(&format!(
            "idle --target {} --host web.test --path /small --count 7",
            server.addr()
        ))
        .unwrap();
        let target = setup(&cli.mode).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            run(&cli.mode, &target, &mut out, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
            out
        });
        // The report comes before the release, while the connections are held.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while server.open() < 7 {
            assert!(tokio::time::Instant::now() < deadline, "never 7 open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished());
        assert_eq!(server.open(), 7);
        tx.send(()).unwrap();
        let out = task.await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["open"], 7);
        while server.open() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "connections not closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
