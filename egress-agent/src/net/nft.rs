//! nftables: the `egress` table of a worker namespace.
