//! egress agent library.

pub mod classify;
