//! The packet capture front for actors whose traffic arrives as packets (gVisor, microVMs):
//! the worker-owned veth pair ([`veth`]) and the nftables table that redirects the actor's TCP
//! to the agent ([`nft`]).
pub mod nft;
pub mod veth;
