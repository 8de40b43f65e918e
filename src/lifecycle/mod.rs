//! The process: server assembly (the composition root, the one module that
//! names both carriers), signals and reload, the config pulled from a URL
//! (`source`), drain, the admin endpoints, and the `verify` command.

pub mod admin;
pub mod drain;
pub mod server;
pub mod signals;
pub mod source;
pub mod status;
pub mod verify;
