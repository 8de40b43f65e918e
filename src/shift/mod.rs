//! Where traffic goes: weighted, sticky upstream choice and failover, and
//! the health state and active checks that take an upstream out of it, and
//! the passive ejection of an upstream's failing addresses, and a
//! rollout's schedule, gates and state ([`rollout`]).

pub mod endpoints;
pub mod health;
pub mod probe;
pub mod rollout;
pub mod selection;
