//! The standard world of the integration tests and the demo: node and actor namespaces, an
//! actor cgroup, upstream servers and squid in the node namespace, and the agent capturing
//! the actor.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    agent::{ActorSpec, Agent, AgentOptions, ConnectionLog, LogLine},
    cgroup::Cgroup,
    client::curl_command,
    pki::TestCa,
    process,
    squid::{Squid, SquidConfig},
    topology::Topology,
    upstream::{Upstream, UpstreamSpec},
};

/// The upstream's name, resolving to the node's IPv4 address.
pub const NAME: &str = "web.egress.test";
/// The upstream's IPv6 name, resolving to the node's IPv6 address.
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
    /// HTTPS on :443 and :8443 (IPv4) and :8443 (IPv6), HTTP on :8080, a banner on :2222.
    pub upstream: Upstream,
    /// The CA the upstream's certificate comes from.
    pub ca: TestCa,
    /// The actor's cgroup.
    pub cgroup: Cgroup,
    /// Node and actor namespaces.
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
            &topo.node,
            &ca,
            UpstreamSpec::new()
                .names(&[NAME, NAME6])
                .https(topo.node_addr(443))
                .https(topo.node_addr(8443))
                .https(topo.node_addr6(8443))
                .http(topo.node_addr(8080))
                .banner(topo.node_addr(2222)),
        );
        let squid = Squid::start(
            &topo.node,
            squid
                .host(NAME, IpAddr::V4(topo.node_v4()))
                .host(NAME6, IpAddr::V6(topo.node_v6())),
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

    /// The node's IPv4 address, where the upstreams listen.
    pub fn v4(&self) -> IpAddr {
        IpAddr::V4(self.topo.node_v4())
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
        let want = dst.to_string();
        self.agent
            .wait_until(T, &format!("a connection line for {want}"), |lines| {
                lines
                    .iter()
                    .filter_map(|l| LogLine::parse(l))
                    .filter_map(|l| ConnectionLog::from_line(&l))
                    .find(|c| c.original_dst.as_deref() == Some(want.as_str()))
            })
    }
}
