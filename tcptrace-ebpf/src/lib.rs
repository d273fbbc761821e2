//! Only here so the loader can name this crate as a build dependency (cargo wants a library).
#![no_std]
