//! The standard world of the integration tests and the demo: node, actor and upstream
//! namespaces, an actor cgroup, squid in the node namespace, upstream servers in the upstream
//! namespace, and the agent capturing the actor.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    agent::{ActorSpec, Agent, AgentOptions, ConnectionLog, VethActorSpec},
    cgroup::Cgroup,
    client::curl_command,
    dns::Dns,
    netns::{Netns, named_veth},
    pki::TestCa,
    process,
    squid::{Squid, SquidConfig},
    topology::Topology,
    upstream::{Upstream, UpstreamSpec},
};

/// The upstream's name, resolving to the upstream's IPv4 address.
pub const NAME: &str = "web.egress.test";
/// The upstream's IPv6 name, resolving to the upstream's IPv6 address.
pub const NAME6: &str = "web6.egress.test";
/// How long any one step may take.
pub const T: Duration = Duration::from_secs(20);

/// Everything of one world. Fields drop in declaration order: the processes stop first, then
/// the cgroup and the namespaces go.
pub struct World {
    /// The agent under test.
    pub agent: Agent,
    /// The options it was started with (to start it again).
    pub agent_options: AgentOptions,
    /// The PEP.
    pub squid: Squid,
    /// HTTPS on :443 and :8443 (IPv4) and :8443 (IPv6), HTTP on :8080, a banner on :2222, on
    /// the upstream's addresses.
    pub upstream: Upstream,
    /// The CA the upstream's certificate comes from.
    pub ca: TestCa,
    /// The actor's cgroup.
    pub cgroup: Cgroup,
    /// Node, actor and upstream namespaces.
    pub topo: Topology,
}

impl World {
    /// A world on subnet `net` capturing actor `actor_id` (template `coder`, namespace
    /// `team-a`); `squid` and `tune` adjust squid's and the agent's options.
    pub fn new(
        net: u8,
        actor_id: &str,
        squid: SquidConfig,
        tune: impl FnOnce(AgentOptions) -> AgentOptions,
    ) -> World {
        crate::require_root();
        crate::require_commands(&["squid", "curl", "openssl", "bash", "ip"]);
        let topo = Topology::new(net);
        let cgroup = Cgroup::new();
        let ca = TestCa::new();
        let upstream = Upstream::start(
            &topo.upstream,
            &ca,
            UpstreamSpec::new()
                .names(&[NAME, NAME6])
                .https(topo.upstream_addr(443))
                .https(topo.upstream_addr(8443))
                .https(topo.upstream_addr6(8443))
                .http(topo.upstream_addr(8080))
                .banner(topo.upstream_addr(2222)),
        );
        let squid = Squid::start(
            &topo.node,
            squid
                .host(NAME, IpAddr::V4(topo.upstream_v4()))
                .host(NAME6, IpAddr::V6(topo.upstream_v6())),
        );
        let opts = tune(
            AgentOptions::new(squid.addr())
                .actor(ActorSpec::new(actor_id, "coder", "team-a", &cgroup).netns(&topo.actor)),
        );
        let mut agent = Agent::start(&topo.node, None, opts.clone());
        agent.wait_ready(T);
        World {
            agent,
            agent_options: opts,
            squid,
            upstream,
            ca,
            cgroup,
            topo,
        }
    }

    /// The upstream's IPv4 address, where the upstream servers listen.
    pub fn v4(&self) -> IpAddr {
        IpAddr::V4(self.topo.upstream_v4())
    }

    /// A curl for `url` inside the actor (cgroup and namespace; no cgroup when `captured` is
    /// false), resolving `name:port` to `ip`.
    pub fn curl_command(
        &self,
        captured: bool,
        name: &str,
        ip: IpAddr,
        port: u16,
        url: &str,
    ) -> std::process::Command {
        curl_command(
            Some(&self.topo.actor),
            captured.then_some(&self.cgroup),
            &self.ca.cert_path(),
            &[(name, port, ip)],
            url,
        )
    }

    /// Runs a captured curl for `url`.
    pub fn curl(&self, name: &str, ip: IpAddr, port: u16, url: &str) -> process::Output {
        process::run(&mut self.curl_command(true, name, ip, port, url), T)
    }

    /// The agent's log line for the connection whose original destination is `dst`.
    pub fn agent_line(&mut self, dst: SocketAddr) -> ConnectionLog {
        self.agent.wait_for_connection_to(dst, 0, T)
    }
}

/// The world of the veth-mode tests and demo: a "node" namespace (agent, squid), a "worker"
/// namespace (the pod that hosts sandboxes) whose own `eth0`-like link goes to the node, an
/// "upstream" namespace (the internet: upstream servers and the worker's DNS server) linked to
/// the node, and an empty actor namespace the agent gives a veth pair to.
///
/// Address plan, one `NET` per test:
///
/// | link | node side | other side |
/// |---|---|---|
/// | node ↔ worker (`wk…`) | `10.252.NET.1/24` | worker `10.252.NET.2` (the "pod IP") |
/// | node ↔ upstream (`up…`) | `10.249.NET.1/24` | upstream `10.249.NET.2` |
/// | worker ↔ actor (`egressN`, made by the agent) | | the agent's pool, `10.200.0.0/24` |
///
/// The worker and the upstream have default routes via the node, which forwards (IPv4, in its
/// own namespace only) and routes the agent's pool to the worker, so the worker's own traffic
/// reaches the upstream directly from the worker's address, and so would an actor's
/// connection the capture missed, from the actor's.
pub struct VethWorld {
    /// The agent under test.
    pub agent: Agent,
    /// The options it was started with (to start it again).
    pub agent_options: AgentOptions,
    /// The resolver the agent relays the actors' DNS to (`--dns-upstream`): dnsmasq on the
    /// upstream's address, answering [`NAME`] with it.
    pub dns: Dns,
    /// The PEP.
    pub squid: Squid,
    /// HTTPS on :443 and :8443, HTTP on :8080, on the upstream's address.
    pub upstream: Upstream,
    /// The CA the upstream's certificate comes from.
    pub ca: TestCa,
    /// The (first) actor's namespace: empty until the agent gives it `eth0`.
    pub actor: Netns,
    /// The worker's namespace.
    pub worker: Netns,
    /// The upstream's namespace ("the internet"), where the upstream servers and dnsmasq run.
    pub upstream_netns: Netns,
    /// The node's namespace.
    pub node: Netns,
    net: u8,
}

impl VethWorld {
    /// A world on `10.252.NET.0/24` and `10.249.NET.0/24` whose agent captures veth actor
    /// `actor_id` (template `sandbox`, namespace `team-b`) from its config file; `tune`
    /// adjusts the agent's options (e.g. clears the actors to add them at run time).
    pub fn new(net: u8, actor_id: &str, tune: impl FnOnce(AgentOptions) -> AgentOptions) -> Self {
        crate::require_root();
        crate::require_commands(&["squid", "curl", "openssl", "ip", "nft", "dnsmasq", "dig"]);
        let node = Netns::named("node");
        let upstream_netns = Netns::named("upstream");
        let actor = Netns::named("actor");
        let worker = worker_behind(&node, "worker", "wk", net);
        named_veth(
            "up",
            &node,
            &upstream_netns,
            &[&format!("10.249.{net}.1/24")],
            &[&format!("10.249.{net}.2/24")],
        );
        upstream_netns.ip(&["route", "add", "default", "via", &format!("10.249.{net}.1")]);
        node.sysctl("net/ipv4/ip_forward", "1");
        let up_v4 = Ipv4Addr::new(10, 249, net, 2);
        let ca = TestCa::new();
        let at = |port| SocketAddr::new(IpAddr::V4(up_v4), port);
        let upstream = Upstream::start(
            &upstream_netns,
            &ca,
            UpstreamSpec::new()
                .names(&[NAME])
                .https(at(443))
                .https(at(8443))
                .http(at(8080)),
        );
        let squid = Squid::start(&node, SquidConfig::default().host(NAME, IpAddr::V4(up_v4)));
        let dns = Dns::start(
            &upstream_netns,
            IpAddr::V4(up_v4),
            &[(NAME, IpAddr::V4(up_v4))],
        );
        let mut opts = AgentOptions::new(squid.addr()).veth_actor(VethActorSpec::new(
            actor_id, "sandbox", "team-b", &actor, &worker,
        ));
        opts.dns_upstream = SocketAddr::new(IpAddr::V4(up_v4), 53);
        let opts = tune(opts);
        let mut agent = Agent::start(&node, None, opts.clone());
        agent.wait_ready(T);
        VethWorld {
            agent,
            agent_options: opts,
            dns,
            squid,
            upstream,
            ca,
            actor,
            worker,
            upstream_netns,
            node,
            net,
        }
    }

    /// The node's address on its link to the worker (where inbound clients on the node come
    /// from, and the worker's gateway).
    pub fn node_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 252, self.net, 1)
    }

    /// The worker's own address on its link to the node (the "pod IP").
    pub fn worker_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 252, self.net, 2)
    }

    /// The node's address on its link to the upstream: where squid's connections to the
    /// upstream come from.
    pub fn node_uplink_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 249, self.net, 1)
    }

    /// The upstream's address, where the upstream servers and the resolver are.
    pub fn upstream_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 249, self.net, 2)
    }

    /// `node_v4:port`.
    pub fn node_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node_v4()), port)
    }

    /// `upstream_v4:port`.
    pub fn upstream_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.upstream_v4()), port)
    }

    /// A curl for `url` inside `netns` (no cgroup: veth capture needs none), resolving
    /// [`NAME`]`:port` to the upstream.
    pub fn curl_command(&self, netns: &Netns, port: u16, url: &str) -> std::process::Command {
        curl_command(
            Some(netns),
            None,
            &self.ca.cert_path(),
            &[(NAME, port, IpAddr::V4(self.upstream_v4()))],
            url,
        )
    }

    /// Runs a curl for `url` in `netns`.
    pub fn curl(&self, netns: &Netns, port: u16, url: &str) -> process::Output {
        process::run(&mut self.curl_command(netns, port, url), T)
    }

    /// `nft list tables` in the worker namespace.
    pub fn worker_tables(&self) -> String {
        let out = process::run(self.worker.command("nft").args(["list", "tables"]), T);
        out.expect_success("nft list tables in the worker");
        out.stdout
    }
}

/// A worker namespace (named by `role`) behind `node`, for veth actors: linked by a veth
/// (`tag…`) on `10.252.NET.0/24` (node `.1`, worker `.2`), its default route via the node, and
/// the node's route to the agent's pool (10.200.0.0/24, its default) via the worker. The node
/// routes like a real node: were an actor's packet to leave the worker unmasqueraded (the
/// capture missed it), the upstream's answer would find its way back, the connection would
/// complete, and a test asserting that nothing reached the upstream directly would see it.
pub fn worker_behind(node: &Netns, role: &str, tag: &str, net: u8) -> Netns {
    let worker = Netns::named(role);
    named_veth(
        tag,
        node,
        &worker,
        &[&format!("10.252.{net}.1/24")],
        &[&format!("10.252.{net}.2/24")],
    );
    worker.ip(&["route", "add", "default", "via", &format!("10.252.{net}.1")]);
    node.ip(&[
        "route",
        "add",
        "10.200.0.0/24",
        "via",
        &format!("10.252.{net}.2"),
    ]);
    worker
}

/// The name the policy never allows (an NXDOMAIN from the agent, and a denied connect).
pub const DENIED: &str = "denied.egress.test";
/// A second server, on its own address: what an SNI-spoofing actor dials.
pub const OTHER: &str = "other.egress.test";
/// A server-first service the actor finds through DNS only.
pub const BANNER_NAME: &str = "banner.egress.test";
/// A name that resolves to the metadata address.
pub const METADATA_ALIAS: &str = "meta.egress.test";
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The world of the policy tests and the demo's no-PEP part: node + actor + upstream
/// namespaces; upstream servers on `.2` (web, banner), `.3` (other)
/// and 169.254.169.254; dnsmasq on `.2` as the agent's `--dns-upstream`; the agent with no
/// PEP and `policy` as its policy file.
pub struct PolicyWorld {
    /// The agent under test (no PEP).
    pub agent: Agent,
    /// Its policy file.
    pub policy_file: PathBuf,
    /// The agent's `--dns-upstream`.
    pub dns: Dns,
    /// The upstream servers.
    pub upstream: Upstream,
    /// The CA of the upstream's certificates.
    pub ca: TestCa,
    /// The actor's cgroup.
    pub cgroup: Cgroup,
    /// Node, actor and upstream namespaces.
    pub topo: Topology,
    /// Holds the policy file (and anything else a test puts there).
    pub dir: tempfile::TempDir,
    /// The PEP, when the world has one ([`PolicyWorld::with_pep`]).
    pub squid: Option<Squid>,
}

impl PolicyWorld {
    /// The world on subnet `net` with `policy` as the agent's policy file, and no PEP.
    pub fn new(net: u8, policy: &str) -> Self {
        Self::build(net, policy, false, "policy.toml")
    }

    /// The same world with squid as the PEP (in the node namespace, resolving the upstream's
    /// names like the agent does).
    pub fn with_pep(net: u8, policy: &str) -> Self {
        Self::build(net, policy, true, "policy.toml")
    }

    /// [`PolicyWorld::new`] with the policy file named `policy.yaml` (Substrate EgressPolicy
    /// documents).
    pub fn yaml(net: u8, policy: &str) -> Self {
        Self::build(net, policy, false, "policy.yaml")
    }

    fn build(net: u8, policy: &str, pep: bool, file_name: &str) -> Self {
        crate::require_root();
        crate::require_commands(&["curl", "openssl", "bash", "ip", "dnsmasq", "dig"]);
        let topo = Topology::new(net);
        let cgroup = Cgroup::new();
        let ca = TestCa::new();
        let web = topo.upstream_v4();
        let other = Ipv4Addr::new(10, 250, net, 3);
        let dev = topo.uplink.b_name.clone();
        topo.upstream
            .ip(&["addr", "add", &format!("{other}/24"), "dev", &dev]);
        topo.upstream
            .ip(&["addr", "add", &format!("{METADATA}/32"), "dev", &dev]);
        // Were the agent to dial the metadata address, it would land in the upstream
        // namespace (and be counted there), never leave the test's namespaces.
        topo.node.ip(&[
            "route",
            "add",
            &format!("{METADATA}/32"),
            "via",
            &web.to_string(),
        ]);
        let at = |ip: Ipv4Addr, port| SocketAddr::new(IpAddr::V4(ip), port);
        let upstream = Upstream::start(
            &topo.upstream,
            &ca,
            UpstreamSpec::new()
                .names(&[NAME, OTHER, DENIED])
                .https(at(web, 443))
                .https(at(web, 8443))
                .https(at(other, 8443))
                .http(at(web, 8080))
                .http(at(METADATA, 80))
                .banner(at(web, 2222)),
        );
        let dns = Dns::start(
            &topo.upstream,
            IpAddr::V4(web),
            &[
                (NAME, IpAddr::V4(web)),
                (BANNER_NAME, IpAddr::V4(web)),
                (DENIED, IpAddr::V4(web)),
                (OTHER, IpAddr::V4(other)),
                (METADATA_ALIAS, IpAddr::V4(METADATA)),
            ],
        );
        let dir = tempfile::tempdir().expect("policy dir");
        let policy_file = dir.path().join(file_name);
        std::fs::write(&policy_file, policy).expect("write policy");
        let squid = pep.then(|| {
            Squid::start(
                &topo.node,
                SquidConfig::default()
                    .host(NAME, IpAddr::V4(web))
                    .host(BANNER_NAME, IpAddr::V4(web))
                    .host(OTHER, IpAddr::V4(other)),
            )
        });
        let base = match &squid {
            Some(squid) => AgentOptions::new(squid.addr()),
            None => AgentOptions::without_pep(),
        };
        let mut opts =
            base.actor(ActorSpec::new("actor-p", "coder", "team-a", &cgroup).netns(&topo.actor));
        opts.policy = Some(policy_file.clone());
        opts.dns_upstream = SocketAddr::new(IpAddr::V4(web), 53);
        let mut agent = Agent::start(&topo.node, None, opts);
        agent.wait_ready(T);
        PolicyWorld {
            agent,
            policy_file,
            dns,
            upstream,
            ca,
            cgroup,
            topo,
            dir,
            squid,
        }
    }

    /// `web.egress.test`'s address (the upstream's first) at `port`.
    pub fn web(&self, port: u16) -> SocketAddr {
        self.topo.upstream_addr(port)
    }

    /// `other.egress.test`'s address at `port`.
    pub fn other(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 250, self.topo.net(), 3)), port)
    }

    /// A captured curl of `https://name:port/` sent to `ip`.
    pub fn curl(&self, name: &str, ip: IpAddr, port: u16, path: &str) -> process::Output {
        let url = format!("https://{name}:{port}{path}");
        process::run(
            &mut curl_command(
                Some(&self.topo.actor),
                Some(&self.cgroup),
                &self.ca.cert_path(),
                &[(name, port, ip)],
                &url,
            ),
            T,
        )
    }

    /// The agent's line for the connection to `dst` (the `n`th such, from 0).
    pub fn line(&mut self, dst: SocketAddr, n: usize) -> ConnectionLog {
        self.agent.wait_for_connection_to(dst, n, T)
    }

    /// Replaces the policy file (write and rename, as an editor or a ConfigMap update does)
    /// and waits for the agent to log the reload.
    pub fn replace_policy(&mut self, text: &str) {
        let before = self.reloads();
        let tmp = self.policy_file.with_extension("new");
        std::fs::write(&tmp, text).expect("write new policy");
        std::fs::rename(&tmp, &self.policy_file).expect("rename policy");
        self.agent.wait_until(T, "the policy reload", |lines| {
            let n = lines.iter().filter(|l| l.contains("policy reload")).count();
            (n > before).then_some(())
        });
    }

    /// How many `policy reload` lines the agent has logged.
    pub fn reloads(&self) -> usize {
        self.agent
            .lines()
            .iter()
            .filter(|l| l.contains("policy reload"))
            .count()
    }
}
