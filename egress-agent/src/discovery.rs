//! Finding Kubernetes pods on this node and what the agent attaches to for each of them.
pub mod cgroup;
