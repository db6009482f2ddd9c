//! `cargo xtask demo`: captures a real actor's traffic end to end and shows what each layer saw.
//!
//! It makes a throw-away world (a "node", an "actor" and an "upstream" network namespace, the
//! actor on 10.251.200.0/24 and the upstream on 10.250.200.0/24, both linked to the node; a
//! fresh actor cgroup), starts local upstream servers in the upstream namespace (HTTPS with
//! names on 443 and 8443, plain HTTP on 8080, a server-first service on 2222), a real squid as
//! the PEP that logs the CONNECT authority and all five x-ate-* headers, and the agent; then runs real
//! curl, openssl s_client and a bash client inside the actor, and prints side by side the
//! client's result, the agent's log line and squid's access-log line. Everything is removed on
//! exit, Ctrl-C included. Traffic only goes to addresses inside these namespaces.
use std::{
    net::IpAddr,
    process::{Command, ExitCode},
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_tests::{
    agent::{Agent, ConnectionLog},
    client::banner_exchange_command,
    contract::{CertDir, Pki, client_cert, files_source, pep_toml, pki},
    process::{self, command_in},
    squid::{AccessEntry, Squid, SquidConfig},
    world::{NAME, PolicyWorld, T, VethWorld, World},
};

/// The no-PEP part's world, where the signal thread and the panic guard can take it.
static POLICY_WORLD: Mutex<Option<PolicyWorld>> = Mutex::new(None);
/// The substrate part's world (with its certificates), likewise.
static SUBSTRATE_WORLD: Mutex<Option<(World, CertDir, Pki)>> = Mutex::new(None);

/// The demo's policy: one name on one port.
const DEMO_POLICY: &str = r#"[[template]]
name = "coder"
allow = [ { host = "web.egress.test", ports = [8443] } ]
"#;

const NET: u8 = 200;

type Shared = Arc<Mutex<Option<World>>>;
type SharedVeth = Arc<Mutex<Option<VethWorld>>>;

/// Builds one scenario's client command inside the world.
type MakeCommand = Box<dyn Fn(&World) -> Command>;

fn main() -> ExitCode {
    egress_tests::require_root();
    egress_tests::require_commands(&["squid", "curl", "openssl", "bash", "ip"]);
    let world: Shared = Arc::new(Mutex::new(None));
    let veth_world: SharedVeth = Arc::new(Mutex::new(None));
    install_cleanup_on_signal(world.clone(), veth_world.clone());
    // A panic (a step that cannot even be set up) unwinds through this guard, which stops
    // everything and removes the worlds; the signal thread's clones would keep them alive.
    let _cleanup = Cleanup(world.clone(), veth_world.clone());

    println!(
        "egress demo: building a throw-away actor (network namespaces, cgroup, upstreams, squid, agent)..."
    );
    let built = build_world();
    {
        let w = &built;
        println!();
        println!(
            "  node netns     {} (agent, squid on {}; routes actor <-> upstream)",
            w.topo.node.path().display(),
            w.squid.addr(),
        );
        println!(
            "  actor netns    {} (veth {} -> node {})",
            w.topo.actor.path().display(),
            w.topo.actor_v4(),
            w.topo.node_v4()
        );
        println!(
            "  upstream netns {} (servers on {} and [{}]; veth -> node {})",
            w.topo.upstream.path().display(),
            w.topo.upstream_v4(),
            w.topo.upstream_v6(),
            w.topo.node_uplink_v4()
        );
        println!(
            "  actor cgroup   {} (id {})",
            w.cgroup.path().display(),
            w.cgroup.id()
        );
        println!("  agent pins     {}", w.agent.bpffs_dir().display());
        println!("  identity       actor-id=demo-actor template=coder template-namespace=team-a");
    }
    *world.lock().unwrap_or_else(|e| e.into_inner()) = Some(built);
    // Stored first, checked second: a signal that came while building is seen here, one that
    // comes from now on finds the world in the signal thread.
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        drop(world.lock().unwrap_or_else(|e| e.into_inner()).take());
        eprintln!("cleaned up");
        return ExitCode::from(130);
    }

    let upstream = {
        let g = world.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|w| IpAddr::V4(w.topo.upstream_v4()))
    };
    let Some(upstream) = upstream else {
        wait_for_cleanup()
    };
    let mut failures = 0;
    let scenarios: Vec<(String, MakeCommand, u16)> = vec![
        (
            format!("curl https://{NAME}:8443/"),
            Box::new(move |w| {
                w.curl_command(true, NAME, upstream, 8443, &format!("https://{NAME}:8443/"))
            }),
            8443,
        ),
        (
            format!("curl https://{NAME}/"),
            Box::new(move |w| {
                w.curl_command(true, NAME, upstream, 443, &format!("https://{NAME}/"))
            }),
            443,
        ),
        (
            format!("curl http://{NAME}:8080/"),
            Box::new(move |w| {
                w.curl_command(true, NAME, upstream, 8080, &format!("http://{NAME}:8080/"))
            }),
            8080,
        ),
        (
            format!("openssl s_client -connect {upstream}:8443 -servername {NAME}"),
            Box::new(move |w| {
                let mut cmd = command_in("openssl", Some(&w.topo.actor), Some(&w.cgroup));
                cmd.args([
                    "s_client",
                    "-connect",
                    &format!("{upstream}:8443"),
                    "-servername",
                    NAME,
                    "-brief",
                    "-ign_eof",
                    "-CAfile",
                ])
                .arg(w.ca.cert_path());
                cmd
            }),
            8443,
        ),
        (
            format!("bash /dev/tcp/{upstream}/2222 (server speaks first)"),
            Box::new(move |w| {
                banner_exchange_command(
                    Some(&w.topo.actor),
                    Some(&w.cgroup),
                    (upstream, 2222).into(),
                )
            }),
            2222,
        ),
    ];
    for (i, (title, make, port)) in scenarios.iter().enumerate() {
        println!("\n[{}] actor runs: {title}", i + 1);
        let cmd = {
            let g = world.lock().unwrap_or_else(|e| e.into_inner());
            let Some(w) = g.as_ref() else {
                drop(g);
                wait_for_cleanup()
            };
            make(w)
        };
        let mut cmd = cmd;
        let input: &[u8] = if title.starts_with("openssl") {
            b"GET / HTTP/1.1\r\nHost: web.egress.test\r\nConnection: close\r\n\r\n"
        } else {
            b""
        };
        let out = process::run_with_input(&mut cmd, input, T);
        print_client(&out);
        if !out.success() {
            failures += 1;
        }
        let g = world.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = g.as_ref() else {
            drop(g);
            wait_for_cleanup()
        };
        let dst = format!("{upstream}:{port}");
        let conn = wait_conn(&w.agent, &dst, i);
        match &conn {
            Some(c) => println!(
                "    agent   actor={} pid={} original_dst={} authority={} source={} pep_status={} bytes_up={} bytes_down={} outcome={}",
                s(&c.actor),
                n(c.pid.map(u64::from)),
                s(&c.original_dst),
                s(&c.authority),
                s(&c.source),
                n(c.pep_status.map(u64::from)),
                n(c.bytes_up),
                n(c.bytes_down),
                s(&c.outcome)
            ),
            None => {
                println!("    agent   (no connection line)");
                failures += 1;
            }
        }
        let authority = conn
            .as_ref()
            .and_then(|c| c.authority.clone())
            .unwrap_or_default();
        match wait_squid(&w.squid, &authority) {
            Some(e) => println!(
                "    squid   {} {} status={} x-ate-actor-id={} x-ate-actor-template={} x-ate-actor-template-namespace={} x-ate-original-destination={} x-ate-connect-authority={}",
                e.method,
                e.uri,
                n(e.status.map(u64::from)),
                s(&e.actor_id),
                s(&e.actor_template),
                s(&e.actor_template_namespace),
                s(&e.original_destination),
                s(&e.connect_authority)
            ),
            None => {
                println!("    squid   (no access-log line for {authority})");
                failures += 1;
            }
        }
    }
    {
        let g = world.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = g.as_ref() else {
            drop(g);
            wait_for_cleanup()
        };
        println!("\n[contrast] the same curl from the actor's namespace but outside its cgroup:");
        let out = process::run(
            &mut w.curl_command(
                false,
                NAME,
                upstream,
                8443,
                &format!("https://{NAME}:8443/"),
            ),
            T,
        );
        let first = out.stdout.lines().next().unwrap_or("").trim().to_string();
        println!(
            "    client  exit {} | {first}",
            out.code().map_or("?".into(), |c| c.to_string())
        );
        let peer = w
            .upstream
            .seen()
            .last()
            .map_or("-".into(), |s| s.peer.ip().to_string());
        println!(
            "    not captured: the upstream saw it come from {peer} (the actor's veth address), \
             while the captured ones came from squid ({}); squid logged nothing new",
            w.topo.node_uplink_v4()
        );
    }

    println!("\ncleaning up...");
    drop(world.lock().unwrap_or_else(|e| e.into_inner()).take());
    failures += veth_part(&veth_world);
    failures += policy_part();
    failures += substrate_part();
    if failures == 0 {
        println!(
            "demo: every captured connection (cgroup and veth actors) reached its upstream through \
             squid with the actor's identity, with no PEP the agent allowed and denied by its \
             policy, and through the substrate profile squid verified the actor's own certificate"
        );
        ExitCode::SUCCESS
    } else {
        println!("demo: {failures} step(s) failed (see above)");
        ExitCode::FAILURE
    }
}

/// Veth mode: a worker namespace, an actor namespace the agent gives a veth pair, and a
/// process and (when runsc is installed) a gVisor sandbox as the actor.
fn veth_part(shared: &SharedVeth) -> usize {
    println!(
        "\negress demo, veth mode: a worker namespace, an upstream namespace, an empty actor namespace; the agent makes the pair and the nftables rules..."
    );
    let built = VethWorld::new(NET + 1, "demo-sandbox", |o| o);
    println!(
        "  worker netns   {} (its own link {} -> node {})",
        built.worker.path().display(),
        built.worker_v4(),
        built.node_v4()
    );
    println!(
        "  upstream netns {} (servers and the worker's resolver on {}, via the node)",
        built.upstream_netns.path().display(),
        built.upstream_v4()
    );
    println!(
        "  actor netns    {} (eth0 10.200.0.2/30 via 10.200.0.1, made by the agent)",
        built.actor.path().display()
    );
    println!("  identity       actor-id=demo-sandbox template=sandbox template-namespace=team-b");
    *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(built);
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        drop(shared.lock().unwrap_or_else(|e| e.into_inner()).take());
        std::process::exit(130);
    }
    {
        let g = shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = g.as_ref() {
            let answer = egress_tests::dns::dig(
                &w.actor,
                IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 0, 1)),
                NAME,
            );
            println!(
                "\n[veth dns] dig @10.200.0.1 {NAME} in the actor -> {answer:?} (redirected to the agent's DNS socket in the worker, relayed to --dns-upstream)"
            );
            let list = w.agent.control(&["actor", "list"]);
            println!(
                "[veth list] egress-agent actor list:\n    {}",
                list.stdout.trim()
            );
        }
    }
    let mut failures = 0;
    let gvisor = which_runsc();
    let runs: Vec<(&str, bool)> = if gvisor {
        vec![
            ("a process in the actor namespace", false),
            ("gVisor (runsc, its own netstack)", true),
        ]
    } else {
        println!(
            "  (runsc not installed: the gVisor step is skipped; `cargo xtask setup` installs it)"
        );
        vec![("a process in the actor namespace", false)]
    };
    for (i, (who, in_gvisor)) in runs.iter().enumerate() {
        let url = format!("https://{NAME}:8443/");
        println!("\n[veth {}] {who} runs: curl {url}", i + 1);
        let g = shared.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = g.as_ref() else {
            drop(g);
            wait_for_cleanup()
        };
        if *in_gvisor {
            // runsc took eth0's address when the first sandbox started on it before: put the
            // actor side back (what a runtime does before each sandbox start).
            let _ = w.agent.control(&["veth", "reapply", "demo-sandbox"]);
        }
        let out = if *in_gvisor {
            let ca = w.ca.cert_path().display().to_string();
            egress_tests::gvisor::Sandbox::new(&w.actor)
                .hosts(&[(NAME, IpAddr::V4(w.upstream_v4()))])
                .run(
                    &[
                        "curl",
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "HTTP %{http_code}\n",
                        "--cacert",
                        &ca,
                        &url,
                    ],
                    T,
                )
        } else {
            let mut cmd = w.curl_command(&w.actor, 8443, &url);
            process::run(&mut cmd, T)
        };
        print_client(&out);
        if !out.success() {
            failures += 1;
        }
        match wait_conn(&w.agent, &w.upstream_addr(8443).to_string(), i) {
            Some(c) => println!(
                "    agent   actor={} client={} original_dst={} authority={} source={} pep_status={} outcome={}",
                s(&c.actor),
                c.line.field_str("client").unwrap_or_default(),
                s(&c.original_dst),
                s(&c.authority),
                s(&c.source),
                n(c.pep_status.map(u64::from)),
                s(&c.outcome)
            ),
            None => {
                println!("    agent   (no connection line)");
                failures += 1;
            }
        }
        let entry = (0..100).find_map(|_| {
            let e = w.squid.access_log_entries();
            if e.len() > i {
                return e.get(i).cloned();
            }
            std::thread::sleep(Duration::from_millis(100));
            None
        });
        match entry {
            Some(e) => println!(
                "    squid   {} {} x-ate-actor-id={} x-ate-actor-template={} x-ate-actor-template-namespace={} x-ate-original-destination={}",
                e.method,
                e.uri,
                s(&e.actor_id),
                s(&e.actor_template),
                s(&e.actor_template_namespace),
                s(&e.original_destination)
            ),
            None => {
                println!("    squid   (no access-log line)");
                failures += 1;
            }
        }
    }
    println!("\ncleaning up...");
    drop(shared.lock().unwrap_or_else(|e| e.into_inner()).take());
    failures
}

/// No PEP: the agent decides with its policy file and dials upstream itself. One allowed and
/// one denied request, with the rule that decided each.
fn policy_part() -> usize {
    println!("\n--- no PEP: the agent decides with its policy ---");
    let built = PolicyWorld::new(202, DEMO_POLICY);
    println!(
        "  actor netns    {} (cgroup {}); no --pep; --policy {}",
        built.topo.actor.path().display(),
        built.cgroup.path().display(),
        built.policy_file.display()
    );
    for line in DEMO_POLICY.lines() {
        println!("    | {line}");
    }
    *POLICY_WORLD.lock().unwrap_or_else(|e| e.into_inner()) = Some(built);
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        wait_for_cleanup()
    }
    let mut failures = 0;
    let mut guard = POLICY_WORLD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(w) = guard.as_mut() else {
        wait_for_cleanup()
    };
    let ip = IpAddr::V4(w.topo.upstream_v4());
    for (i, (port, want)) in [(8443u16, "direct"), (443, "denied")]
        .into_iter()
        .enumerate()
    {
        let url = if port == 443 {
            format!("https://{NAME}/")
        } else {
            format!("https://{NAME}:{port}/")
        };
        println!("\n[policy {}] actor runs: curl {url}", i + 1);
        let out = w.curl(NAME, ip, port, "/");
        print_client(&out);
        let c = w.line(w.web(port), 0);
        let field = |name: &str| c.line.field_str(name).unwrap_or_default();
        println!(
            "    agent   outcome={} authority={} source={} dialled={} rule=\"{}\"",
            s(&c.outcome),
            s(&c.authority),
            s(&c.source),
            field("dialled"),
            field("rule")
        );
        if c.outcome.as_deref() != Some(want) || out.success() != (want == "direct") {
            println!("    expected outcome={want}");
            failures += 1;
        }
    }
    println!(
        "    upstream accepted {} connection(s) on :8443 and {} on :443",
        w.upstream.accepted(w.web(8443)),
        w.upstream.accepted(w.web(443))
    );
    drop(guard);
    println!("\ncleaning up...");
    drop(
        POLICY_WORLD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    failures
}

/// Agent Substrate's contract: mTLS to squid (`https_port` requiring client certificates),
/// the actor proven by its own certificate, CONNECT to the address it dialled.
fn substrate_part() -> usize {
    println!(
        "\n--- substrate profile: mTLS to the PEP, the actor's own certificate, CONNECT ip:port ---"
    );
    let pki = pki();
    let certs = CertDir::new();
    certs.write(
        "demo-substrate",
        &client_cert(&pki.actors_ca, "demo-substrate"),
    );
    let pep = pep_toml(
        "substrate",
        "1.1",
        &pki.pep_ca.cert_path(),
        &files_source(certs.path()),
    );
    let built = World::new(
        203,
        "demo-substrate",
        SquidConfig::default()
            .tls(&pki.pep_cert, &pki.pep_key)
            .client_ca(&pki.actors_ca.cert_path()),
        |mut o| {
            o.config_extra = pep.clone();
            o
        },
    );
    println!(
        "  squid          https_port {} requiring client certificates from the actors' CA",
        built.squid.addr()
    );
    println!(
        "  certificates   {}/{}/tls.crt + tls.key (written by the runtime; CN=demo-substrate)",
        certs.path().display(),
        egress_agent::certs::dir_name("demo-substrate")
    );
    for line in pep.lines() {
        println!("    | {line}");
    }
    *SUBSTRATE_WORLD.lock().unwrap_or_else(|e| e.into_inner()) = Some((built, certs, pki));
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        wait_for_cleanup()
    }
    let mut failures = 0;
    let mut guard = SUBSTRATE_WORLD.lock().unwrap_or_else(|e| e.into_inner());
    let Some((w, _, _)) = guard.as_mut() else {
        wait_for_cleanup()
    };
    let ip = IpAddr::V4(w.topo.upstream_v4());
    let original = w.topo.upstream_addr(443);
    // The certificate is loaded within a second of the actor's registration.
    let mut out = w.curl(NAME, ip, 443, &format!("https://{NAME}/"));
    for _ in 0..20 {
        if out.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        out = w.curl(NAME, ip, 443, &format!("https://{NAME}/"));
    }
    println!("\n[substrate 1] actor runs: curl https://{NAME}/");
    print_client(&out);
    match wait_conn(
        &w.agent,
        &original.to_string(),
        w.agent.connection_lines().len().saturating_sub(1),
    ) {
        Some(c) => println!(
            "    agent   outcome={} authority={} pep={} pep_status={}",
            s(&c.outcome),
            s(&c.authority),
            c.line.field_str("pep").unwrap_or_default(),
            c.pep_status.map_or("-".into(), |v| v.to_string())
        ),
        None => println!("    agent   (no connection line)"),
    }
    match wait_squid(&w.squid, &original.to_string()) {
        Some(e) => {
            println!(
                "    squid   {} {} status={} client-certificate=\"{}\" x-ate-connect-authority={} x-ate-actor-id={}",
                e.method,
                e.uri,
                e.status.map_or("-".into(), |v| v.to_string()),
                s(&e.client_cert_subject),
                s(&e.connect_authority),
                s(&e.actor_id)
            );
            if !e
                .client_cert_subject
                .as_deref()
                .is_some_and(|c| c.contains("CN=demo-substrate"))
            {
                println!("    expected the actor's certificate CN=demo-substrate in squid's log");
                failures += 1;
            }
        }
        None => {
            println!("    squid   (no CONNECT to {original}: the target must be the address)");
            failures += 1;
        }
    }
    if !out.success() {
        failures += 1;
    }
    drop(guard);
    println!("\ncleaning up...");
    drop(
        SUBSTRATE_WORLD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    failures
}

fn which_runsc() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("runsc").is_file()))
}

fn build_world() -> World {
    World::new(NET, "demo-actor", SquidConfig::default(), |o| o)
}

/// The `index`-th connection line, which must be for `dst`.
fn wait_conn(agent: &Agent, dst: &str, index: usize) -> Option<ConnectionLog> {
    for _ in 0..100 {
        let lines = agent.connection_lines();
        if let Some(c) = lines.get(index) {
            if c.original_dst.as_deref() != Some(dst) {
                println!(
                    "    (agent line {index} is for {}, expected {dst})",
                    s(&c.original_dst)
                );
            }
            return Some(c.clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn wait_squid(squid: &Squid, authority: &str) -> Option<AccessEntry> {
    for _ in 0..100 {
        if let Some(e) = squid
            .access_log_entries()
            .into_iter()
            .rev()
            .find(|e| e.uri == authority)
        {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The client's exit code and its first non-empty line of output.
fn print_client(out: &process::Output) {
    let first = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    println!(
        "    client  exit {} | {first}",
        out.code().map_or("?".into(), |c| c.to_string())
    );
}

fn s(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn n(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// Drops whatever world is still shared when `main` returns or unwinds.
struct Cleanup(Shared, SharedVeth);

impl Drop for Cleanup {
    fn drop(&mut self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()).take());
        drop(self.1.lock().unwrap_or_else(|e| e.into_inner()).take());
        drop(
            POLICY_WORLD
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        drop(
            SUBSTRATE_WORLD
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

/// The world is gone: the signal thread is removing it and will exit the process.
fn wait_for_cleanup() -> ! {
    loop {
        std::thread::park();
    }
}

/// Set when a signal arrives: if the world is not shared yet, `main` cleans up once it is.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// On SIGINT/SIGTERM: drop the world (stopping the agent and squid, removing pins, the
/// cgroup and the namespaces), then exit.
fn install_cleanup_on_signal(world: Shared, veth_world: SharedVeth) {
    use signal_hook::{
        consts::{SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals = Signals::new([SIGINT, SIGTERM]).expect("install signal handlers");
    std::thread::spawn(move || {
        for sig in signals.forever() {
            eprintln!("\nsignal {sig}: cleaning up...");
            INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            let taken = world.lock().unwrap_or_else(|e| e.into_inner()).take();
            let taken_veth = veth_world.lock().unwrap_or_else(|e| e.into_inner()).take();
            // try_lock: the demo holds it while a step runs; then main's guard cleans up.
            let taken_policy = POLICY_WORLD.try_lock().ok().and_then(|mut g| g.take());
            let taken_substrate = SUBSTRATE_WORLD.try_lock().ok().and_then(|mut g| g.take());
            if taken.is_some()
                || taken_veth.is_some()
                || taken_policy.is_some()
                || taken_substrate.is_some()
            {
                drop(taken);
                drop(taken_veth);
                drop(taken_policy);
                drop(taken_substrate);
                eprintln!("cleaned up");
                std::process::exit(130);
            }
            // Still being built (main cleans up once it has it), or already cleaned by main.
        }
    });
}
