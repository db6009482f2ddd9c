//! egress kernel programs, attached to every captured actor cgroup:
//!
//! - `connect4` / `connect6` record a TCP connect's original destination under the socket's
//!   cookie and rewrite the connect to the agent's listener in the actor's network namespace;
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
mod sock_release;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_get_current_ancestor_cgroup_id and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
