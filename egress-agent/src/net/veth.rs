//! The veth pair between a worker namespace and an actor namespace.
