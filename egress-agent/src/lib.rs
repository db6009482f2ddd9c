//! egress agent: captures actors' outbound TCP and tunnels it to the PEP with their identity.
//!
//! The path of a connection: [`ebpf`] programs redirect an actor's connect to a [`capture`]
//! listener in the actor's network namespace and record where it was going; the listener
//! takes the record; [`proxy`] classifies the first bytes ([`classify`]), opens a CONNECT
//! tunnel through the PEP ([`tunnel`], over the link [`pep`] configures) and relays ([`relay`]). Where no PEP decides, [`policy`] does.
pub mod access_log;
pub mod actors;
pub mod admin;
pub mod app;
pub mod capture;
pub mod certs;
pub mod classify;
pub mod config;
pub mod control;
pub mod direct;
pub mod discovery;
pub mod dns;
pub mod ebpf;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod pep;
pub mod policy;
pub mod proxy;
pub mod relay;
pub mod resolve;
pub mod route;
pub mod socket;
pub mod status;
pub mod tunnel;
