//! `egress-bench`: the benchmark `cargo xtask bench` runs (see `egress_tests::bench`). Needs
//! root; builds its own namespaces, upstream, squid and agents, and removes them when done.
//! Prints the tables (Markdown) on stdout and writes `bench.json` and `bench.md` to `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use egress_tests::bench::{self, Bench, Bins, Metric, Path, Profile};

#[derive(Parser)]
#[command(about = "Measure every capture path against direct connections and squid")]
struct Cli {
    /// The short run of `cargo xtask test`: a fraction of a second per figure, every byte checked.
    #[arg(long)]
    quick: bool,
    /// Repetitions per figure (the median is reported).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Paths to run, comma-separated (direct is always run).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Measurements to run, comma-separated (e.g. bulk-plain-1,conn-tls-64).
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Idle connections for the memory figure (0 skips it).
    #[arg(long)]
    idle: Option<usize>,
    /// Short connections for the map-entry figure (0 skips it).
    #[arg(long)]
    short: Option<u64>,
    /// An extra argument for every agent (repeat), e.g. `--agent-arg=--relay=copy`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Where bench.json and bench.md go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The agent binary (default: $EGRESS_AGENT_BIN).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The load generator (default: $EGRESS_LOAD_BIN, else egress-load next to this binary).
    #[arg(long)]
    load: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut profile = if cli.quick {
        Profile::quick()
    } else {
        Profile::full()
    };
    if let Some(r) = cli.reps {
        profile.reps = r.max(1);
    }
    if let Some(s) = cli.seconds {
        profile.seconds = s;
    }
    if let Some(n) = cli.idle {
        profile.idle = n;
    }
    if let Some(n) = cli.short {
        profile.short = n;
    }
    if !cli.paths.is_empty() {
        profile.paths.clear();
        for name in &cli.paths {
            match Path::from_name(name) {
                Some(p) => profile.paths.push(p),
                None => {
                    eprintln!(
                        "unknown path {name:?}; paths: {}",
                        Path::ALL.map(Path::name).join(", ")
                    );
                    return ExitCode::from(2);
                }
            }
        }
    }
    if !cli.metrics.is_empty() {
        profile.metrics.clear();
        for name in &cli.metrics {
            match Metric::ALL.into_iter().find(|m| m.name() == *name) {
                Some(m) => profile.metrics.push(m),
                None => {
                    let all: Vec<String> = Metric::ALL.iter().map(|m| m.name()).collect();
                    eprintln!("unknown metric {name:?}; metrics: {}", all.join(", "));
                    return ExitCode::from(2);
                }
            }
        }
    }
    profile.agent_args = cli.agent_args.clone();
    let agent = cli
        .agent
        .clone()
        .or_else(|| std::env::var_os("EGRESS_AGENT_BIN").map(PathBuf::from));
    let Some(agent) = agent else {
        eprintln!("no agent binary: pass --agent or set EGRESS_AGENT_BIN (cargo xtask bench does)");
        return ExitCode::from(2);
    };
    let load = cli
        .load
        .clone()
        .or_else(|| std::env::var_os("EGRESS_LOAD_BIN").map(PathBuf::from))
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("egress-load")))
        });
    let Some(load) = load.filter(|p| p.exists()) else {
        eprintln!(
            "no egress-load binary: build it (cargo build -p egress-tests --bin egress-load) or pass --load"
        );
        return ExitCode::from(2);
    };

    // Ctrl-C or SIGTERM: the run stops at its next step and unwinds, and dropping the bench
    // removes everything it made (the default action would kill this process and leave the
    // namespaces, cgroups, pins and squid behind).
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
            eprintln!("bench: cannot handle signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("\nbench: interrupted; stopping at the next step and cleaning up");
        bench::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    eprintln!(
        "bench: setting up every path (namespaces, nginx, squid, nghttpx, six agents) and checking each one"
    );
    let b = Bench::new(profile.clone(), Bins { load, agent });
    eprintln!("bench: {}", b.describe());
    let results = b.run(&mut |line| eprintln!("bench: {line}"));
    let versions = b.versions();
    drop(b);

    let md = bench::markdown(&results);
    let meta = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "date_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "versions": versions,
        "profile": {
            "seconds": profile.seconds, "reps": profile.reps, "idle": profile.idle,
            "short": profile.short, "verify": profile.verify, "bulk_len": profile.bulk_len,
            "agent_args": profile.agent_args,
        },
    });
    let json = bench::to_json(&results, meta);
    let mut header = String::from("Machine and versions:\n\n");
    for (k, v) in &versions {
        header.push_str(&format!("- {k}: {v}\n"));
    }
    header.push_str(&format!(
        "- profile: {} s per figure, median of {} repetitions; run took {:.0} s\n\n",
        profile.seconds,
        profile.reps,
        results.elapsed.as_secs_f64()
    ));
    println!("{header}{md}");
    let json_path = cli.out.join("bench.json");
    let md_path = cli.out.join("bench.md");
    let written = bench::write_file(&json_path, &format!("{json:#}\n"))
        .and_then(|()| bench::write_file(&md_path, &format!("{header}{md}")));
    if let Err(e) = written {
        eprintln!("bench: cannot write {}: {e}", cli.out.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "bench: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    ExitCode::SUCCESS
}
