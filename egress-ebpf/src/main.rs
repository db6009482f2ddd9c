//! egress kernel programs, attached to every captured actor cgroup:
//!
//! - `connect4` / `connect6` record a TCP connect's original destination under the socket's
//!   cookie and rewrite the connect to the agent's listener in the actor's network namespace;
//!   for UDP they apply the DNS policy (`udp`): port 53 is recorded and rewritten to the
//!   actor's own DNS socket, loopback of the actor's namespace is allowed, the rest refused;
//! - `sendmsg4` / `sendmsg6` apply the same UDP policy to unconnected sends;
//! - `recvmsg4` / `recvmsg6` show a reply from the actor's DNS socket as coming from the
//!   resolver the actor asked;
//! - `sockops` copies that record, once the connection is established, to the key the agent
//!   computes on accept (netns cookie, client address, client port), and removes both on close;
//! - `getpeername4` / `getpeername6` show the actor the original destination as its peer;
//! - `sock_release` removes the record of a socket closed before it ever connected.
//!
//! The layout of every map and the scheme behind it are in docs/architecture.md.
#![no_std]
#![no_main]

mod actor;
mod connect4;
mod connect6;
mod getpeername4;
mod getpeername6;
mod maps;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sock_release;
mod sockops;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_get_current_ancestor_cgroup_id and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
