//! egress agent library.
