//! Only the `egress` binary (the eBPF object) matters; this library target lets egress-agent
//! declare a build-dependency on this crate so cargo rebuilds the agent when it changes.
#![no_std]
