//! The fake Kubernetes API server of the discovery tests (one file, shared with the agent's
//! own watch tests): pod lists and streamed watch events on loopback, for an agent run with
//! `--discovery kubernetes --kubeconfig FILE`.
#[path = "../../egress-agent/tests/support/fake_api.rs"]
mod fake_api;

pub use fake_api::*;
